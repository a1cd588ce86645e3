-- Recovery's compare-and-set for a prepared leg or a prepared group whose home
-- (deciding) shard has no decision for it.
--
-- Rules owned here:
--   - Under the transfer's (or group's) advisory lock, the same one
--     wallet_home_leg and wallet_batch_decide hold: either a decision exists
--     and is returned (a transfer's state, or 'committed' for a group's
--     decision row), or a tombstone is written so that the home transaction
--     can never commit it ('tombstoned').
--   - 'busy': the home transaction holds the lock right now; try again later.
CREATE OR REPLACE FUNCTION wallet_tombstone(p_transfer uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
BEGIN
    IF NOT pg_try_advisory_xact_lock(1464598529, hashtext(p_transfer::text)) THEN
        RETURN 'busy';
    END IF;
    SELECT state INTO v_state FROM transfers WHERE transfer_id = p_transfer;
    IF FOUND THEN
        RETURN v_state;
    END IF;
    PERFORM 1 FROM batch_decisions WHERE batch_id = p_transfer;
    IF FOUND THEN
        RETURN 'committed';
    END IF;
    INSERT INTO transfer_tombstones (transfer_id) VALUES (p_transfer) ON CONFLICT DO NOTHING;
    RETURN 'tombstoned';
END
$$;
