-- A bucket move copies, counts and cleans the bucket's outbox rows, each by
-- `bucket = $1`. Without an index each of those statements read the whole
-- outbox, and with `events.mode = none` the outbox keeps every event of the
-- retention (30 days): during the rebalance bench the moves' scans read
-- 160,000 outbox rows a second on each source shard.
--
-- Building the index blocks outbox writes, so every money movement, until it
-- is done, and waits first for transactions that hold the table (prepared
-- legs among them). The lock wait is bounded so that an upgrade fails and
-- can be run again rather than hang with writes queued behind it; on a large
-- outbox, build it beforehand with
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS event_outbox_by_bucket ON event_outbox (bucket);
SET LOCAL lock_timeout = '10s';
CREATE INDEX IF NOT EXISTS event_outbox_by_bucket ON event_outbox (bucket);
