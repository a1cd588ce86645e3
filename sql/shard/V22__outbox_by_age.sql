-- Pruning keeps every event still in the outbox, so it reads the outbox rows
-- old enough to matter. Without an index by age that read was the whole
-- outbox, once a minute on every shard; with `events.mode = none` the outbox
-- keeps every event of the retention (30 days). Rows arrive in about age
-- order, so a block range index serves the read, as `events_by_age` does for
-- the events, and costs next to nothing to keep.
--
-- The build blocks outbox writes until it is done; the lock wait is bounded
-- so that an upgrade fails and can be run again rather than hang with writes
-- queued behind it (see V21). On a large outbox, build it beforehand with
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS event_outbox_by_age ON event_outbox USING brin (created_at);
SET LOCAL lock_timeout = '10s';
CREATE INDEX IF NOT EXISTS event_outbox_by_age ON event_outbox USING brin (created_at);
