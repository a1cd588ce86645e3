-- The payer's session is checked inside the group's own check (wallet bench,
-- issue 5). Before, every POST /v1/transfer read the session in a statement of
-- its own before the transfer was queued: a round trip to the payer's shard
-- that the bench measured at 230-310 CPU µs per transfer over HTTP, more than
-- a transfer's share of its group. A token that names its user now reaches the
-- batcher unread, and the check below reads the session on the payer's shard,
-- in the transaction that claims the key and moves the money.
--
-- p_session holds, on a debit leg, the SHA-256 of the payer's token (NULL when
-- the coordinator already verified the payer, or on a credit leg). A payer
-- whose session is not live, or whose account holds another currency than the
-- transfer, gets the verdict 'unverified' on every leg of the transfer, which
-- wins over any other: nothing of the transfer is claimed, locked or written,
-- and the coordinator runs it alone, where the session is read first and the
-- client gets 401 unauthorized or 422 currency_mismatch, unstored, exactly as
-- an unbatched request would. The rest of the group is not affected.
--
-- Otherwise V6's rules hold unchanged; the functions are V6's plus that check.

DROP FUNCTION wallet_batch_local(uuid[], boolean[], uuid[], numeric[], text[], uuid[], text[],
                                 bytea[], text[], uuid[], text[]);
DROP FUNCTION wallet_batch_check(uuid[], boolean[], uuid[], numeric[], text[], uuid[], text[],
                                 bytea[], text[]);

CREATE FUNCTION wallet_batch_check(
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_key_user uuid[], p_key text[], p_fingerprint bytea[],
    p_session bytea[], p_failure text[]
) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_transfer, 1), 0);
    v_out text[] := p_failure;
    v_acc accounts%ROWTYPE;
    v_fail text;
    i int;
    j int;
    k int;
BEGIN
    -- Sessions first: an unverified payer's transfer must not claim its key.
    FOR i IN 1..n LOOP
        CONTINUE WHEN NOT p_debit[i] OR p_session[i] IS NULL;
        PERFORM 1 FROM sessions s JOIN users u USING (user_id)
         WHERE s.token_hash = p_session[i] AND s.user_id = p_user[i]
           AND s.revoked_at IS NULL AND s.expires_at > now()
           AND trim(u.currency) = p_currency[i];
        IF NOT FOUND THEN
            FOR k IN 1..n LOOP
                IF p_transfer[k] = p_transfer[i] THEN v_out[k] := 'unverified'; END IF;
            END LOOP;
        END IF;
    END LOOP;
    -- Keys next: a replay must not wait on the accounts' row locks.
    FOR i IN 1..n LOOP
        CONTINUE WHEN NOT p_debit[i] OR v_out[i] IS NOT DISTINCT FROM 'unverified';
        INSERT INTO idempotency_keys (user_id, idem_key, operation, fingerprint, transfer_id)
        VALUES (p_key_user[i], p_key[i], 'transfer', p_fingerprint[i], p_transfer[i])
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            FOR k IN 1..n LOOP
                IF p_transfer[k] = p_transfer[i] THEN v_out[k] := 'key_exists'; END IF;
            END LOOP;
        END IF;
    END LOOP;
    PERFORM 1 FROM accounts
     WHERE user_id = ANY (ARRAY(SELECT p_user[x] FROM generate_subscripts(p_user, 1) AS x
                                WHERE v_out[x] IS NULL))
     ORDER BY user_id FOR UPDATE;
    i := 1;
    WHILE i <= n LOOP
        j := i;
        WHILE j < n AND p_transfer[j + 1] = p_transfer[i] LOOP j := j + 1; END LOOP;
        IF v_out[i] IS NULL THEN
            v_fail := NULL;
            FOR k IN i..j LOOP
                SELECT * INTO v_acc FROM accounts WHERE user_id = p_user[k];
                IF NOT FOUND THEN
                    IF p_debit[k] THEN
                        RAISE EXCEPTION 'payer % has no account', p_user[k] USING ERRCODE = 'WL008';
                    END IF;
                    v_fail := coalesce(v_fail, 'recipient_not_found');
                ELSIF trim(v_acc.currency) <> p_currency[k] THEN
                    v_fail := coalesce(v_fail, 'currency_mismatch');
                ELSIF p_debit[k] AND v_acc.balance < p_amount[k] THEN
                    v_fail := coalesce(v_fail, 'insufficient_funds');
                END IF;
            END LOOP;
            FOR k IN i..j LOOP v_out[k] := v_fail; END LOOP;
        END IF;
        i := j + 1;
    END LOOP;
    RETURN v_out;
END
$$;

-- Step 2, as in V6, except that an unverified transfer, like one whose key
-- exists, is not recorded: it is not this group's.
CREATE OR REPLACE FUNCTION wallet_batch_apply(
    p_batch uuid, p_decide boolean, p_participants text[], p_mode text,
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_user_name text[], p_party uuid[], p_party_name text[],
    p_outcome text[]
) RETURNS SETOF transfers
LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_transfer, 1), 0);
    v_account uuid;
    v_balance numeric;
    i int;
BEGIN
    IF p_decide THEN
        PERFORM pg_advisory_xact_lock(1464598529, hashtext(p_batch::text));
        PERFORM 1 FROM transfer_tombstones WHERE transfer_id = p_batch;
        IF FOUND THEN
            RAISE EXCEPTION 'batch % was aborted by recovery', p_batch USING ERRCODE = 'WL010';
        END IF;
        INSERT INTO batch_decisions (batch_id) VALUES (p_batch);
    END IF;
    FOR i IN 1..n LOOP
        CONTINUE WHEN p_outcome[i] IS NOT NULL;
        UPDATE accounts
           SET balance = balance + CASE WHEN p_debit[i] THEN -p_amount[i] ELSE p_amount[i] END
         WHERE user_id = p_user[i]
        RETURNING account_id, balance INTO v_account, v_balance;
        INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
        VALUES (v_account, p_transfer[i],
                CASE WHEN p_debit[i] THEN 'transfer_debit' ELSE 'transfer_credit' END,
                CASE WHEN p_debit[i] THEN -p_amount[i] ELSE p_amount[i] END,
                v_balance, p_party_name[i]);
    END LOOP;
    RETURN QUERY
    INSERT INTO transfers (transfer_id, kind, mode, from_user, from_username, to_user, to_username,
                           amount, currency, state, failure_code, participants, decided_at)
    SELECT p_transfer[x], 'transfer', p_mode, p_user[x], p_user_name[x], p_party[x], p_party_name[x],
           p_amount[x], p_currency[x],
           CASE WHEN p_outcome[x] IS NULL THEN 'committed' ELSE 'aborted' END, p_outcome[x],
           p_participants,
           statement_timestamp()
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE p_debit[x] AND coalesce(p_outcome[x] NOT IN ('key_exists', 'unverified'), true)
    RETURNING *;
END
$$;

-- A same-shard group: both steps in one statement. A transfer without a
-- record in the result had a key that exists or an unverified payer.
CREATE FUNCTION wallet_batch_local(
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_key_user uuid[], p_key text[], p_fingerprint bytea[],
    p_session bytea[], p_user_name text[], p_party uuid[], p_party_name text[]
) RETURNS SETOF transfers
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM wallet_batch_apply(
        NULL, false, '{}', 'local', p_transfer, p_debit, p_user, p_amount, p_currency,
        p_user_name, p_party, p_party_name,
        wallet_batch_check(p_transfer, p_debit, p_user, p_amount, p_currency,
                           p_key_user, p_key, p_fingerprint, p_session,
                           array_fill(NULL::text, ARRAY[coalesce(array_length(p_transfer, 1), 0)])));
END
$$;
