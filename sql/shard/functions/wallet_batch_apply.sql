-- Step 2 of a group of transfers on one shard, with each transfer's final
-- verdict from step 1 (NULL: commit; a refusal: aborted; an answer of the
-- form 'word:argument', see wallet_batch_check: nothing written). Returns one
-- row per transfer whose payer is here: the transfer ID the group gave it, its
-- verdict, and the record the client's answer is built from (the new one, or
-- for 'replay:' and 'in_progress:' the one the key points at; none for the
-- other answers).
--
-- Rules owned here:
--   - Only the legs of transfers that passed every check move money; the row
--     locks taken by wallet_batch_check keep those checks true.
--   - Every transfer whose payer is here (its debit leg) is recorded in its
--     final state, except one answered without writing.
--   - One balance update per account for the whole group (by the sum of its
--     legs) and one ledger insert; each leg's balance_after runs in leg order
--     from the account's opening balance, since a payee may be credited
--     several times in a group. Generic plans, as in wallet_batch_check.
--   - It never decides: a cross-shard group's decision is wallet_batch_decide,
--     sent once every other shard has prepared.
--   - p_fence (Redis mode; NULL otherwise) is the fencing token of the locks
--     the group runs under: every account it moves records it as its
--     last_fence, and every ledger entry as its fence. The callers check it
--     against the accounts first (wallet_redis_debit, wallet_redis_credit).
CREATE OR REPLACE FUNCTION wallet_batch_apply(
    p_participants text[], p_mode text,
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_user_name text[], p_party uuid[], p_party_name text[],
    p_outcome text[], p_fence bigint
) RETURNS TABLE (
    for_transfer uuid, verdict text,
    transfer_id uuid, kind text, mode text, from_user uuid, from_username text, to_user uuid,
    to_username text, amount numeric, currency text, state text, failure_code text,
    participants text[], created_at timestamptz, decided_at timestamptz
)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
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
    v_pointed uuid;
    i int;
BEGIN
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
        UPDATE accounts a SET balance = a.balance + d.total,
                              last_fence = coalesce(p_fence, a.last_fence)
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
    INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty,
                                fence)
    SELECT v_account[x], p_transfer[x],
           CASE WHEN p_debit[x] THEN 'transfer_debit' ELSE 'transfer_credit' END,
           CASE WHEN p_debit[x] THEN -p_amount[x] ELSE p_amount[x] END,
           v_balance[x], p_party_name[x], p_fence
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE p_outcome[x] IS NULL
     ORDER BY x;
    -- The records written, each the answer to its own transfer: a refusal's
    -- verdict is its failure code.
    RETURN QUERY
    INSERT INTO transfers AS t (transfer_id, kind, mode, from_user, from_username, to_user,
                                to_username, amount, currency, state, failure_code,
                                participants, decided_at)
    SELECT p_transfer[x], 'transfer', p_mode, p_user[x], p_user_name[x], p_party[x],
           p_party_name[x], p_amount[x], p_currency[x],
           CASE WHEN p_outcome[x] IS NULL THEN 'committed' ELSE 'aborted' END, p_outcome[x],
           p_participants,
           statement_timestamp()
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE p_debit[x] AND (p_outcome[x] IS NULL OR strpos(p_outcome[x], ':') = 0)
     ORDER BY x
    RETURNING t.transfer_id, t.failure_code, t.transfer_id, t.kind, t.mode, t.from_user,
              t.from_username, t.to_user, t.to_username, t.amount, t.currency::text, t.state,
              t.failure_code, t.participants, t.created_at, t.decided_at;
    -- The answers that wrote nothing (rare: a retry, a session gone), with
    -- the record a replayed or in-progress key points at.
    FOR i IN 1..n LOOP
        CONTINUE WHEN NOT p_debit[i] OR p_outcome[i] IS NULL OR strpos(p_outcome[i], ':') = 0;
        v_pointed := NULL;
        IF p_outcome[i] LIKE 'replay:%' OR p_outcome[i] LIKE 'in_progress:%' THEN
            v_pointed := split_part(p_outcome[i], ':', 2)::uuid;
        END IF;
        RETURN QUERY
        SELECT p_transfer[i], p_outcome[i], t.transfer_id, t.kind, t.mode, t.from_user,
               t.from_username, t.to_user, t.to_username, t.amount, t.currency::text, t.state,
               t.failure_code, t.participants, t.created_at, t.decided_at
          FROM (SELECT 1) AS one
          LEFT JOIN transfers t ON t.transfer_id = v_pointed;
    END LOOP;
END
$$;
