-- A same-shard transfer with a new Idempotency-Key, whole, in one statement.
--
-- Rules owned here:
--   - A key that exists raises WL009 and leaves nothing behind: the caller
--     replays it the slow way. It is looked up before any row lock, so a retry
--     of a decided key never waits on the accounts.
--   - Both accounts are locked in user-ID order, the order every protocol locks
--     in, so no two transfers deadlock.
--   - The transfer is recorded in its final state (committed, or aborted with
--     recipient_not_found, currency_mismatch or insufficient_funds) together
--     with its key; only a committed one moves money and writes its two ledger
--     entries. A payer without an account raises WL008 (a corrupt shard).
CREATE OR REPLACE FUNCTION wallet_transfer_local(
    p_transfer uuid, p_key_user uuid, p_key text, p_fingerprint bytea,
    p_from uuid, p_from_name text, p_to uuid, p_to_name text,
    p_amount numeric, p_currency text
) RETURNS SETOF transfers
LANGUAGE plpgsql AS $$
DECLARE
    v_from accounts%ROWTYPE;
    v_to accounts%ROWTYPE;
    v_row accounts%ROWTYPE;
    v_failure text;
BEGIN
    -- A retry of a decided key must not wait on the accounts' row locks: look
    -- first. (A claim racing this one is caught by the insert below.)
    PERFORM 1 FROM idempotency_keys WHERE user_id = p_key_user AND idem_key = p_key;
    IF FOUND THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'WL009';
    END IF;
    FOR v_row IN
        SELECT * FROM accounts WHERE user_id IN (p_from, p_to) ORDER BY user_id FOR UPDATE
    LOOP
        IF v_row.user_id = p_from THEN v_from := v_row; ELSE v_to := v_row; END IF;
    END LOOP;
    IF v_from.account_id IS NULL THEN
        RAISE EXCEPTION 'payer % has no account', p_from USING ERRCODE = 'WL008';
    ELSIF v_to.account_id IS NULL THEN
        v_failure := 'recipient_not_found';
    ELSIF trim(v_from.currency) <> p_currency OR trim(v_to.currency) <> p_currency THEN
        v_failure := 'currency_mismatch';
    ELSIF v_from.balance < p_amount THEN
        v_failure := 'insufficient_funds';
    END IF;
    INSERT INTO transfers (transfer_id, kind, mode, from_user, from_username, to_user, to_username,
                           amount, currency, state, failure_code, decided_at)
    VALUES (p_transfer, 'transfer', 'local', p_from, p_from_name, p_to, p_to_name, p_amount, p_currency,
            CASE WHEN v_failure IS NULL THEN 'committed' ELSE 'aborted' END, v_failure, now());
    INSERT INTO idempotency_keys (user_id, idem_key, operation, fingerprint, transfer_id)
    VALUES (p_key_user, p_key, 'transfer', p_fingerprint, p_transfer)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'WL009';
    END IF;
    IF v_failure IS NULL THEN
        UPDATE accounts SET balance = balance - p_amount WHERE account_id = v_from.account_id;
        UPDATE accounts SET balance = balance + p_amount WHERE account_id = v_to.account_id;
        INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
        VALUES (v_from.account_id, p_transfer, 'transfer_debit', -p_amount, v_from.balance - p_amount, p_to_name),
               (v_to.account_id, p_transfer, 'transfer_credit', p_amount, v_to.balance + p_amount, p_from_name);
    END IF;
    RETURN QUERY SELECT * FROM transfers WHERE transfer_id = p_transfer;
END
$$;
