-- One leg of a cross-shard 2PC transfer (the payee's, or the payer's on the
-- slow path), inside the transaction the caller then prepares.
--
-- Rules owned here:
--   - A debit applies only if the balance covers it (invariant 2), in the same
--     UPDATE that takes the row lock, so no check can go stale.
--   - Every leg writes exactly one ledger entry for its transfer and account;
--     the ledger's unique (transfer_id, account_id) makes a leg idempotent.
--   - A refusal raises a business SQLSTATE, which aborts the transaction before
--     PREPARE TRANSACTION can run: WL001 insufficient_funds, WL002
--     recipient_not_found, WL003 currency_mismatch.
CREATE OR REPLACE FUNCTION wallet_apply_leg(
    p_debit boolean, p_user uuid, p_currency text, p_amount numeric,
    p_transfer uuid, p_counterparty text
) RETURNS numeric
LANGUAGE plpgsql AS $$
DECLARE
    v_account uuid;
    v_balance numeric;
    v_currency text;
BEGIN
    IF p_debit THEN
        UPDATE accounts SET balance = balance - p_amount
         WHERE user_id = p_user AND currency = p_currency AND balance >= p_amount
        RETURNING account_id, balance INTO v_account, v_balance;
    ELSE
        UPDATE accounts SET balance = balance + p_amount
         WHERE user_id = p_user AND currency = p_currency
        RETURNING account_id, balance INTO v_account, v_balance;
    END IF;
    IF NOT FOUND THEN
        SELECT currency INTO v_currency FROM accounts WHERE user_id = p_user;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'recipient_not_found' USING ERRCODE = 'WL002';
        ELSIF trim(v_currency) <> p_currency THEN
            RAISE EXCEPTION 'currency_mismatch' USING ERRCODE = 'WL003';
        END IF;
        RAISE EXCEPTION 'insufficient_funds' USING ERRCODE = 'WL001';
    END IF;
    INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
    VALUES (v_account, p_transfer,
            CASE WHEN p_debit THEN 'transfer_debit' ELSE 'transfer_credit' END,
            CASE WHEN p_debit THEN -p_amount ELSE p_amount END,
            v_balance, p_counterparty);
    RETURN v_balance;
END
$$;
