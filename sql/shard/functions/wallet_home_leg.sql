-- The payer's side of a cross-shard transfer with a new Idempotency-Key, on the
-- home shard ("last agent"): the payer's leg is not prepared but committed in
-- the same local transaction as the key and the transfer record, and that
-- commit is the transfer's decision. Only the payee's leg is prepared.
--
-- Rules owned here:
--   - The transfer's advisory lock (two-key space, class 1464598529 =
--     0x574c0001) is held for the whole transaction, and a tombstone written by
--     recovery (wallet_tombstone, under the same lock) refuses the transfer
--     with WL010: exactly one of the two wins.
--   - A key that exists raises WL009 before any row lock; the key is claimed
--     in the same transaction as the debit.
--   - The debit applies only if the balance covers it, in the UPDATE that
--     locks the row; only the payer's row is locked.
--
-- p_failure: the outcome is already known to be an abort (the payee's leg was
-- refused or failed); record it without touching the balance.
-- p_record: write the transfer record now (the payee's leg is already prepared,
-- so this statement is the decision). When false and the debit applies, nothing
-- is recorded and no row is returned: the caller's transaction stays open, the
-- payee's leg is prepared, and the record is inserted before COMMIT. A refused
-- debit is always recorded (as aborted) and its row returned.
--
-- Raises WL009 when the key exists (the caller replays it the slow way), WL010
-- when recovery already aborted this transfer ID, WL008 when the payer has no
-- account.
CREATE OR REPLACE FUNCTION wallet_home_leg(
    p_transfer uuid, p_key_user uuid, p_key text, p_fingerprint bytea,
    p_from uuid, p_from_name text, p_to uuid, p_to_name text,
    p_amount numeric, p_currency text, p_participants text[],
    p_failure text, p_record boolean
) RETURNS SETOF transfers
LANGUAGE plpgsql AS $$
DECLARE
    v_account uuid;
    v_balance numeric;
    v_currency text;
    v_failure text := p_failure;
BEGIN
    PERFORM pg_advisory_xact_lock(1464598529, hashtext(p_transfer::text));
    PERFORM 1 FROM transfer_tombstones WHERE transfer_id = p_transfer;
    IF FOUND THEN
        RAISE EXCEPTION 'transfer % was aborted by recovery', p_transfer USING ERRCODE = 'WL010';
    END IF;
    -- A retry of a decided key must not wait on the payer's row lock: look first.
    PERFORM 1 FROM idempotency_keys WHERE user_id = p_key_user AND idem_key = p_key;
    IF FOUND THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'WL009';
    END IF;
    IF v_failure IS NULL THEN
        UPDATE accounts SET balance = balance - p_amount
         WHERE user_id = p_from AND currency = p_currency AND balance >= p_amount
        RETURNING account_id, balance INTO v_account, v_balance;
        IF NOT FOUND THEN
            SELECT currency INTO v_currency FROM accounts WHERE user_id = p_from;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'payer % has no account', p_from USING ERRCODE = 'WL008';
            ELSIF trim(v_currency) <> p_currency THEN
                v_failure := 'currency_mismatch';
            ELSE
                v_failure := 'insufficient_funds';
            END IF;
        END IF;
    END IF;
    INSERT INTO idempotency_keys (user_id, idem_key, operation, fingerprint, transfer_id)
    VALUES (p_key_user, p_key, 'transfer', p_fingerprint, p_transfer)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key exists' USING ERRCODE = 'WL009';
    END IF;
    IF v_failure IS NULL THEN
        INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
        VALUES (v_account, p_transfer, 'transfer_debit', -p_amount, v_balance, p_to_name);
        IF NOT p_record THEN
            RETURN;
        END IF;
    END IF;
    INSERT INTO transfers (transfer_id, kind, mode, from_user, from_username, to_user, to_username,
                           amount, currency, state, failure_code, participants, decided_at)
    VALUES (p_transfer, 'transfer', '2pc', p_from, p_from_name, p_to, p_to_name, p_amount, p_currency,
            CASE WHEN v_failure IS NULL THEN 'committed' ELSE 'aborted' END, v_failure,
            p_participants, now());
    RETURN QUERY SELECT * FROM transfers WHERE transfer_id = p_transfer;
END
$$;
