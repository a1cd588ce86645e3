-- Fewer statements per group (wallet bench, issue 5). PostgreSQL pays for
-- every statement a PL/pgSQL function runs: executor start-up, and a fresh
-- parse of the CHECK constraints of every table it writes. V6/V7 ran, per
-- group, one session read and one key insert per payer, one account read per
-- leg in the check, and one balance update plus one ledger insert per leg in
-- the apply. These versions keep the same signatures, rules and lock order
-- and run, per group:
--   check: one statement for all sessions, one for all keys, and one that
--          locks the accounts in user-ID order and returns their locked
--          versions, which the legs are then checked against in memory;
--   apply: one statement updates every balance (one row per account, by the
--          sum of its legs), and one inserts every ledger entry, whose
--          balance_after runs in leg order (a payee may be credited several
--          times in a group).
-- Measured with pgbench on one shard (4 clients, groups of 3 same-shard
-- transfers, generic plans: see the end of this file): 359-374 -> 299-309
-- CPU µs per transfer. In wallet bench (8 s runs, alternating builds): 2PC
-- 411-429 -> 394-397 CPU µs per transfer, same-shard 345-362 -> 346-349.

-- Step 1 (V7's rules): returns per leg NULL (passed) or the reason.
CREATE OR REPLACE FUNCTION wallet_batch_check(
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_key_user uuid[], p_key text[], p_fingerprint bytea[],
    p_session bytea[], p_failure text[]
) RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n int := coalesce(array_length(p_transfer, 1), 0);
    v_out text[] := p_failure;
    v_refused uuid[];
    v_claimed uuid[];
    v_ids uuid[];
    v_currencies text[];
    v_balances numeric[];
    v_at int;
    v_fail text;
    i int;
    j int;
    k int;
BEGIN
    -- Sessions first: an unverified payer's transfer must not claim its key.
    SELECT coalesce(array_agg(p_transfer[x]), '{}') INTO v_refused
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE p_debit[x] AND p_session[x] IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM sessions s JOIN users u USING (user_id)
                        WHERE s.token_hash = p_session[x] AND s.user_id = p_user[x]
                          AND s.revoked_at IS NULL AND s.expires_at > now()
                          AND trim(u.currency) = p_currency[x]);
    FOR k IN 1..n LOOP
        IF p_transfer[k] = ANY (v_refused) THEN v_out[k] := 'unverified'; END IF;
    END LOOP;
    -- Keys next, in one statement: a replay must not wait on the row locks.
    WITH claimed AS (
        INSERT INTO idempotency_keys (user_id, idem_key, operation, fingerprint, transfer_id)
        SELECT p_key_user[x], p_key[x], 'transfer', p_fingerprint[x], p_transfer[x]
          FROM generate_subscripts(p_transfer, 1) AS x
         WHERE p_debit[x] AND v_out[x] IS DISTINCT FROM 'unverified'
         ORDER BY x
        ON CONFLICT DO NOTHING
        RETURNING transfer_id
    )
    SELECT coalesce(array_agg(transfer_id), '{}') INTO v_claimed FROM claimed;
    FOR i IN 1..n LOOP
        CONTINUE WHEN NOT p_debit[i] OR v_out[i] IS NOT DISTINCT FROM 'unverified'
                      OR p_transfer[i] = ANY (v_claimed);
        FOR k IN 1..n LOOP
            IF p_transfer[k] = p_transfer[i] THEN v_out[k] := 'key_exists'; END IF;
        END LOOP;
    END LOOP;
    -- Lock in user-ID order, reading the locked rows' current versions.
    SELECT coalesce(array_agg(l.user_id), '{}'), coalesce(array_agg(l.currency::text), '{}'),
           coalesce(array_agg(l.balance), '{}')
      INTO v_ids, v_currencies, v_balances
      FROM (SELECT user_id, currency, balance FROM accounts
             WHERE user_id = ANY (ARRAY(SELECT p_user[x] FROM generate_subscripts(p_user, 1) AS x
                                        WHERE v_out[x] IS NULL))
             ORDER BY user_id FOR UPDATE) AS l;
    i := 1;
    WHILE i <= n LOOP
        j := i;
        WHILE j < n AND p_transfer[j + 1] = p_transfer[i] LOOP j := j + 1; END LOOP;
        IF v_out[i] IS NULL THEN
            v_fail := NULL;
            FOR k IN i..j LOOP
                v_at := array_position(v_ids, p_user[k]);
                IF v_at IS NULL THEN
                    IF p_debit[k] THEN
                        RAISE EXCEPTION 'payer % has no account', p_user[k] USING ERRCODE = 'WL008';
                    END IF;
                    v_fail := coalesce(v_fail, 'recipient_not_found');
                ELSIF trim(v_currencies[v_at]) <> p_currency[k] THEN
                    v_fail := coalesce(v_fail, 'currency_mismatch');
                ELSIF p_debit[k] AND v_balances[v_at] < p_amount[k] THEN
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

-- Step 2 (V7's rules, decided apart since V8): applies the passing legs and
-- records every transfer whose payer is here.
CREATE OR REPLACE FUNCTION wallet_batch_apply(
    p_batch uuid, p_decide boolean, p_participants text[], p_mode text,
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_user_name text[], p_party uuid[], p_party_name text[],
    p_outcome text[]
) RETURNS SETOF transfers
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n int := coalesce(array_length(p_transfer, 1), 0);
    v_delta numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    v_users uuid[] := '{}';
    v_totals numeric[] := '{}';
    v_moved uuid[];
    v_moved_account uuid[];
    v_running numeric[];
    v_account uuid[] := array_fill(NULL::uuid, ARRAY[n]);
    v_balance numeric[] := array_fill(NULL::numeric, ARRAY[n]);
    v_at int;
    i int;
BEGIN
    IF p_decide THEN
        PERFORM wallet_batch_decide(p_batch);
    END IF;
    -- Each account's total change: one update per account for the group.
    FOR i IN 1..n LOOP
        CONTINUE WHEN p_outcome[i] IS NOT NULL;
        v_delta[i] := CASE WHEN p_debit[i] THEN -p_amount[i] ELSE p_amount[i] END;
        v_at := array_position(v_users, p_user[i]);
        IF v_at IS NULL THEN
            v_users := v_users || p_user[i];
            v_totals := v_totals || v_delta[i];
        ELSE
            v_totals[v_at] := v_totals[v_at] + v_delta[i];
        END IF;
    END LOOP;
    -- The rows are locked since the check; the index condition keeps the
    -- planner, which cannot size the arrays, on the index.
    WITH moved AS (
        UPDATE accounts a SET balance = a.balance + d.total
          FROM unnest(v_users, v_totals) AS d (user_id, total)
         WHERE a.user_id = d.user_id AND a.user_id = ANY (v_users)
        RETURNING a.user_id, a.account_id, a.balance - d.total AS opening
    )
    SELECT coalesce(array_agg(user_id), '{}'), coalesce(array_agg(account_id), '{}'),
           coalesce(array_agg(opening), '{}')
      INTO v_moved, v_moved_account, v_running
      FROM moved;
    -- Each leg's balance_after runs in leg order from the account's opening.
    -- A leg whose account did not move (impossible under the check's locks)
    -- keeps NULLs, which the ledger's NOT NULL then refuses.
    FOR i IN 1..n LOOP
        CONTINUE WHEN p_outcome[i] IS NOT NULL;
        v_at := array_position(v_moved, p_user[i]);
        CONTINUE WHEN v_at IS NULL;
        v_running[v_at] := v_running[v_at] + v_delta[i];
        v_account[i] := v_moved_account[v_at];
        v_balance[i] := v_running[v_at];
    END LOOP;
    INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
    SELECT v_account[x], p_transfer[x],
           CASE WHEN p_debit[x] THEN 'transfer_debit' ELSE 'transfer_credit' END,
           CASE WHEN p_debit[x] THEN -p_amount[x] ELSE p_amount[x] END,
           v_balance[x], p_party_name[x]
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE p_outcome[x] IS NULL
     ORDER BY x;
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

-- Generic plans (the SET on the two functions above, and here on V7's
-- wallet_batch_local): PL/pgSQL plans a statement afresh on every call while
-- it judges a custom plan (one built for the call's array values) cheaper than
-- a generic one, which with array parameters it keeps doing, and planning then
-- costs more than running. Every statement above is written to stay on its
-- index whatever the arrays hold, so the generic plan is the right one. A
-- generic plan is built once per connection, from the table statistics of the
-- moment: a bulk import must be followed by ANALYZE (`bulk_load_users` runs
-- VACUUM ANALYZE). Measured with pgbench (groups of 3): these functions with
-- the planner's default choice 361-380 CPU µs per transfer, slower than V7's
-- 359-374; with generic plans 299-309.
ALTER FUNCTION wallet_batch_local(uuid[], boolean[], uuid[], numeric[], text[], uuid[], text[],
                                  bytea[], bytea[], text[], uuid[], text[])
    SET plan_cache_mode = force_generic_plan;
