-- A same-shard group waits at most 200 ms for a row lock (the coordinator's
-- batch lanes, coordinator/src/batch.rs): a row held outside any group (an
-- in-doubt prepared leg, a slow transaction) then fails the group fast, its
-- members run alone, and only the blocked one waits, up to the connection's
-- lock_timeout, instead of the whole group and every group behind it in the
-- shard's lane. Other groups hold a row for a few milliseconds.
ALTER FUNCTION wallet_batch_local(uuid[], boolean[], uuid[], numeric[], text[], uuid[], text[],
                                  bytea[], bytea[], text[], uuid[], text[])
    SET lock_timeout = '200ms';
