-- Redis mode, a group's credits on one payee shard, in one autocommitted
-- statement: the credits of transfers already committed by their debits
-- (wallet_redis_debit), applied by the coordinator or, for a pending credit
-- it left behind, by recovery. Returns a verdict per credit: NULL (applied
-- now), 'applied:' (applied before, so not again), 'fence:<last_fence>'
-- (refused by its fence: nothing written; the caller raises its token source
-- above that and retries later), or 'missing:' (no such account, which the
-- debit's payee read rules out: a corrupt shard).
--
-- Rules owned here:
--   - A credit is applied at most once: one already in the ledger is
--     reported, never repeated. The accounts are locked first (user-ID
--     order), so two appliers of one credit queue, and the second sees the
--     first's entry.
--   - Fencing: a credit passes only while the payee's last_fence is older
--     than p_fence, the token of the lock it runs under. p_enforce_fence is
--     false only in the chaos suite's broken variant.
--   - Balances and ledger entries are written by wallet_batch_apply.
--   - Ownership first, as in wallet_batch_local: wallet_own's write check of
--     p_buckets (the payees' buckets) before anything is read or locked.
CREATE OR REPLACE FUNCTION wallet_redis_credit(
    p_buckets int[], p_transfer uuid[], p_user uuid[], p_amount numeric[], p_currency text[],
    p_user_name text[], p_party uuid[], p_party_name text[], p_fence bigint,
    p_enforce_fence boolean, p_refund_of uuid[], p_dispute uuid[]
) RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n int := coalesce(array_length(p_transfer, 1), 0);
    v_out text[] := array_fill(NULL::text, ARRAY[n]);
    v_ids uuid[];
    v_accounts uuid[];
    v_fences bigint[];
    v_done uuid[];
    v_at int;
    i int;
BEGIN
    PERFORM wallet_own(p_buckets, true);
    SELECT coalesce(array_agg(l.user_id), '{}'), coalesce(array_agg(l.account_id), '{}'),
           coalesce(array_agg(l.last_fence), '{}')
      INTO v_ids, v_accounts, v_fences
      FROM (SELECT user_id, account_id, last_fence FROM accounts
             WHERE user_id = ANY (p_user) ORDER BY user_id FOR UPDATE) AS l;
    SELECT coalesce(array_agg(e.transfer_id), '{}') INTO v_done
      FROM ledger_entries e
     WHERE e.transfer_id = ANY (p_transfer) AND e.account_id = ANY (v_accounts);
    FOR i IN 1..n LOOP
        v_at := array_position(v_ids, p_user[i]);
        IF v_at IS NULL THEN
            v_out[i] := 'missing:';
        ELSIF p_transfer[i] = ANY (v_done) THEN
            v_out[i] := 'applied:';
        ELSIF p_enforce_fence AND v_fences[v_at] >= p_fence THEN
            v_out[i] := 'fence:' || v_fences[v_at];
        END IF;
    END LOOP;
    PERFORM * FROM wallet_batch_apply('{}', 'redis', p_transfer, array_fill(false, ARRAY[n]),
                                      p_user, p_amount, p_currency, p_user_name, p_party,
                                      p_party_name, v_out, p_fence, p_refund_of,
                                      array_fill(NULL::text, ARRAY[n]), p_dispute,
                                      array_fill(false, ARRAY[n]));
    RETURN v_out;
END
$$;
