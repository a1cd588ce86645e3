-- A bucket move copies, counts and cleans the bucket's outbox rows, each by
-- `bucket = $1`. Without an index each of those statements read the whole
-- outbox, and with `events.mode = none` the outbox keeps every event of the
-- retention (30 days): during the rebalance bench the moves' scans read
-- 160,000 outbox rows a second on each source shard.
CREATE INDEX event_outbox_by_bucket ON event_outbox (bucket);
