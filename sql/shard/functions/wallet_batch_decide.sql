-- The decision of a cross-shard group, on its deciding shard, once every other
-- shard has prepared: this statement and the COMMIT sent with it are the
-- group's commit point.
--
-- Rules owned here:
--   - Under the group's advisory lock (the one wallet_tombstone takes), refuse
--     with WL010 if recovery tombstoned the group first, else insert the
--     group's decision row, which is what recovery looks for.
CREATE OR REPLACE FUNCTION wallet_batch_decide(p_batch uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1464598529, hashtext(p_batch::text));
    PERFORM 1 FROM transfer_tombstones WHERE transfer_id = p_batch;
    IF FOUND THEN
        RAISE EXCEPTION 'batch % was aborted by recovery', p_batch USING ERRCODE = 'WL010';
    END IF;
    INSERT INTO batch_decisions (batch_id) VALUES (p_batch);
END
$$;
