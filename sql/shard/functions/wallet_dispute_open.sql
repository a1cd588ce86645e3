-- Opens a dispute of transfer p_transfer by its payer, on its payee's shard:
-- the amount still unrefunded is held on the payee's account (it stays in the
-- balance, not in what they may spend; a hold may exceed that, and then
-- blocks their transfers and withdrawals until the dispute is resolved).
-- Returns the dispute's row and a verdict: NULL (opened), 'not_found' (no
-- committed transfer from p_payer_name credited p_payee), 'dispute_exists'
-- (one is open: its row is returned) or 'nothing_to_dispute' (fully refunded).
--
-- Rules owned here:
--   - Ownership first (wallet_own), then the payee's account row is locked:
--     refunds of the same transfer take the same lock, so a dispute and a
--     refund racing each other are judged one after the other, and the
--     dispute holds only what refunds left.
--   - One open dispute per transfer (also a unique index).
CREATE OR REPLACE FUNCTION wallet_dispute_open(
    p_bucket int, p_dispute uuid, p_transfer uuid, p_payer uuid, p_payer_name text,
    p_payee uuid, p_reason text
) RETURNS TABLE (verdict text, dispute disputes)
LANGUAGE plpgsql AS $$
DECLARE
    v_account accounts%ROWTYPE;
    v_credit ledger_entries%ROWTYPE;
    v_refunded numeric;
    v_open disputes%ROWTYPE;
    v_row disputes%ROWTYPE;
BEGIN
    PERFORM wallet_own(ARRAY[p_bucket], true);
    SELECT * INTO v_account FROM accounts WHERE user_id = p_payee FOR UPDATE;
    SELECT * INTO v_credit FROM ledger_entries
     WHERE transfer_id = p_transfer AND account_id = v_account.account_id
       AND kind = 'transfer_credit' AND counterparty = p_payer_name;
    IF v_account.account_id IS NULL OR v_credit.entry_id IS NULL THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::disputes;
        RETURN;
    END IF;
    SELECT * INTO v_open FROM disputes WHERE transfer_id = p_transfer AND state = 'open';
    IF v_open.dispute_id IS NOT NULL THEN
        RETURN QUERY SELECT 'dispute_exists'::text, v_open;
        RETURN;
    END IF;
    SELECT coalesce(sum(t.amount), 0) INTO v_refunded FROM transfers t
     WHERE t.refund_of = p_transfer AND t.state = 'committed';
    IF v_credit.amount - v_refunded <= 0 THEN
        RETURN QUERY SELECT 'nothing_to_dispute'::text, NULL::disputes;
        RETURN;
    END IF;
    INSERT INTO disputes (dispute_id, transfer_id, payer_user, payer_username, payee_user,
                          payee_username, amount, currency, reason, state)
    SELECT p_dispute, p_transfer, p_payer, p_payer_name, p_payee, u.username,
           v_credit.amount - v_refunded, v_account.currency, p_reason, 'open'
      FROM users u WHERE u.user_id = p_payee
    RETURNING * INTO v_row;
    PERFORM wallet_post(ARRAY[p_dispute], ARRAY[v_account.account_id], ARRAY['hold'],
                        ARRAY[-v_row.amount], ARRAY[p_payer_name], NULL, ARRAY[p_transfer],
                        ARRAY['dispute_hold']);
    RETURN QUERY SELECT NULL::text, v_row;
END
$$;
