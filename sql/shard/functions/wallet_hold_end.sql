-- Ends a held transfer without moving its money, on its payer's shard: an
-- admin's rejection (p_code 'transfer_rejected') or its expiry
-- ('hold_expired'). The hold is released (a 'release' entry under a fresh ID)
-- and the record aborted with p_code. Returns the record and a verdict: NULL
-- (ended now), 'not_found', or 'not_held' (decided before: the record as it
-- stands).
--
-- Rules owned here:
--   - Ownership first (wallet_own), then the payer's account row, then the
--     record: the order a release's group takes them in, so a release, a
--     rejection and an expiry of one transfer are decided one after the
--     other, and only the first applies.
--   - An expiry ends only a transfer held longer than p_older_than (NULL: any
--     age), judged under the locks, so it never ends one an admin just
--     decided.
CREATE OR REPLACE FUNCTION wallet_hold_end(
    p_bucket int, p_transfer uuid, p_code text, p_older_than interval
) RETURNS TABLE (verdict text, ended transfers)
LANGUAGE plpgsql AS $$
DECLARE
    v_row transfers%ROWTYPE;
    v_account uuid;
BEGIN
    PERFORM wallet_own(ARRAY[p_bucket], true);
    SELECT * INTO v_row FROM transfers WHERE transfer_id = p_transfer;
    IF v_row.transfer_id IS NULL OR v_row.from_user IS NULL THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::transfers;
        RETURN;
    END IF;
    SELECT account_id INTO v_account FROM accounts WHERE user_id = v_row.from_user FOR UPDATE;
    SELECT * INTO v_row FROM transfers WHERE transfer_id = p_transfer FOR UPDATE;
    IF v_row.state <> 'held'
       OR (p_older_than IS NOT NULL AND v_row.created_at > now() - p_older_than) THEN
        RETURN QUERY SELECT 'not_held'::text, v_row;
        RETURN;
    END IF;
    PERFORM wallet_post(ARRAY[gen_random_uuid()], ARRAY[v_account], ARRAY['release'],
                        ARRAY[v_row.amount], ARRAY[v_row.to_username], NULL,
                        ARRAY[p_transfer], ARRAY['review_release']);
    UPDATE transfers SET state = 'aborted', failure_code = p_code,
                         decided_at = statement_timestamp()
     WHERE transfer_id = p_transfer
    RETURNING * INTO v_row;
    RETURN QUERY SELECT NULL::text, v_row;
END
$$;
