-- Batched transfers (wallet bench, issue 5): the coordinator groups concurrent
-- transfers and runs each group as one transaction per shard, instead of one or
-- two per transfer. A cross-shard group is atomic by two-phase commit: every
-- shard but one prepares its transaction, and the last shard's local commit,
-- which inserts the batch's decision row, is the decision for the whole group
-- ("last agent", as in V5). A same-shard group is one local transaction.
--
-- Each shard's work is two statements, so that one refused transfer never sinks
-- its group and nothing is ever undone:
--   1. wallet_batch_check, shard after shard in shard order: claim the payers'
--      Idempotency-Keys, lock every account of the group in user-ID order, and
--      check each leg against the locked rows. Nothing moves yet.
--   2. wallet_batch_apply, on every shard at once: move the money of the
--      transfers that passed every check (the locks taken in step 1 keep the
--      checks true), record every payer's transfer in its final state, and, on
--      the deciding shard, insert the decision row.
-- Locks are taken in one global order, (shard, user ID), so two groups never
-- wait on each other in a cycle. Within a group a payer appears once and never
-- as a payee (the coordinator's batcher ensures it), so a leg's check never
-- depends on another leg of its group.
--
-- Recovery: a prepared group's GID names the group's ID where a transfer's would
-- be, and its deciding shard as home. The decision row is what recovery looks
-- for; without it the group is tombstoned under the same advisory lock the
-- deciding statement takes (see V5).

CREATE TABLE batch_decisions (
    batch_id    uuid PRIMARY KEY,
    decided_at  timestamptz NOT NULL DEFAULT now()
);

-- Step 1. One element per leg; the legs of one transfer on this shard are
-- adjacent (a same-shard transfer has two: its debit and its credit). p_failure
-- is the transfer's refusal found on an earlier shard: its key is still claimed
-- (the refusal is recorded and replayed) but nothing is checked or locked.
-- Returns per leg NULL (passed) or the reason: insufficient_funds,
-- recipient_not_found, currency_mismatch, or key_exists (the caller replays
-- that transfer the slow way). Raises WL008 when a payer has no account.
CREATE FUNCTION wallet_batch_check(
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_key_user uuid[], p_key text[], p_fingerprint bytea[],
    p_failure text[]
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
    -- Keys first: a replay must not wait on the accounts' row locks.
    FOR i IN 1..n LOOP
        CONTINUE WHEN NOT p_debit[i];
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

-- Step 2. The same legs, with each transfer's final outcome (NULL: commit; a
-- reason: aborted; key_exists: not ours, untouched). Applies the committed legs,
-- inserts the record of every transfer whose payer is here (its debit leg), and,
-- when p_decide, the batch's decision row under the batch's advisory lock:
-- WL010 if recovery tombstoned the batch first. Returns the inserted records.
CREATE FUNCTION wallet_batch_apply(
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
     WHERE p_debit[x] AND p_outcome[x] IS DISTINCT FROM 'key_exists'
    RETURNING *;
END
$$;

-- A same-shard group: both steps in one statement. A transfer without a
-- record in the result had a key that exists.
CREATE FUNCTION wallet_batch_local(
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_key_user uuid[], p_key text[], p_fingerprint bytea[],
    p_user_name text[], p_party uuid[], p_party_name text[]
) RETURNS SETOF transfers
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM wallet_batch_apply(
        NULL, false, '{}', 'local', p_transfer, p_debit, p_user, p_amount, p_currency,
        p_user_name, p_party, p_party_name,
        wallet_batch_check(p_transfer, p_debit, p_user, p_amount, p_currency,
                           p_key_user, p_key, p_fingerprint,
                           array_fill(NULL::text, ARRAY[coalesce(array_length(p_transfer, 1), 0)])));
END
$$;

-- Recovery's compare-and-set (V5) also knows batches: a group's decision row
-- answers 'committed'.
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
