-- Rejects an open dispute on its payee's shard: the hold is released (a
-- 'release' entry under a fresh ID, the balance unchanged) and the dispute
-- closed. Returns the dispute's row and a verdict: NULL (rejected now),
-- 'not_found', or 'resolved' (not open: its row as it is).
--
-- Rules owned here:
--   - Ownership first, then the payee's account row, then the dispute: the
--     order a dispute refund's group takes them in, so the two outcomes of one
--     dispute are decided one after the other and only the first applies.
CREATE OR REPLACE FUNCTION wallet_dispute_reject(p_bucket int, p_dispute uuid)
RETURNS TABLE (verdict text, dispute disputes)
LANGUAGE plpgsql AS $$
DECLARE
    v_row disputes%ROWTYPE;
    v_account accounts%ROWTYPE;
    v_release uuid := gen_random_uuid();
BEGIN
    PERFORM wallet_own(ARRAY[p_bucket], true);
    SELECT * INTO v_row FROM disputes WHERE dispute_id = p_dispute;
    IF v_row.dispute_id IS NULL THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::disputes;
        RETURN;
    END IF;
    SELECT * INTO v_account FROM accounts WHERE user_id = v_row.payee_user FOR UPDATE;
    SELECT * INTO v_row FROM disputes WHERE dispute_id = p_dispute FOR UPDATE;
    IF v_row.state <> 'open' THEN
        RETURN QUERY SELECT 'resolved'::text, v_row;
        RETURN;
    END IF;
    PERFORM wallet_post(ARRAY[v_release], ARRAY[v_account.account_id], ARRAY['release'],
                        ARRAY[v_row.amount], ARRAY[v_row.payer_username], NULL,
                        ARRAY[v_row.transfer_id], ARRAY['dispute_release']);
    UPDATE disputes SET state = 'rejected', resolved_at = now(), release_id = v_release
     WHERE dispute_id = p_dispute
    RETURNING * INTO v_row;
    RETURN QUERY SELECT NULL::text, v_row;
END
$$;
