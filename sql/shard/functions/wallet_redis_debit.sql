-- Redis mode, a group's debits on one payer shard, in one autocommitted
-- statement: its commit is the commit point of every transfer it passes.
-- The coordinator holds the Redis locks of every account involved, under the
-- one fencing token p_fence, and has read each payee (unlocked: accounts are
-- never deleted and never change currency); p_failure carries the payee's
-- refusal, or 'lock_unavailable' for a transfer whose locks were not granted.
-- Answers as wallet_batch_apply answers.
--
-- Rules owned here:
--   - Sessions, keys and refusals are wallet_batch_check's, in its one order,
--     on the payers' legs; a transfer refused on the payee's side still claims
--     its key here, and its refusal is recorded and replayed.
--   - Fencing: a debit passes only while the payer's last_fence is older than
--     p_fence (the row is locked since the check), else the transfer is
--     aborted with lock_unavailable, a fault a retry runs afresh. The
--     coordinator then raises its token source above this shard's fences.
--     p_enforce_fence is false only in the chaos suite's broken variant.
--   - Every transfer that passes gets a pending credit in the same
--     transaction: forward recovery applies it if the coordinator does not.
--   - Each row lock is waited for at most p_lock_wait_ms, as in
--     wallet_batch_local.
--   - Ownership first, as in wallet_batch_local: wallet_own's write check of
--     p_buckets (the payers' buckets) before anything is read or locked.
CREATE OR REPLACE FUNCTION wallet_redis_debit(
    p_buckets int[], p_transfer uuid[], p_user uuid[], p_amount numeric[], p_currency text[],
    p_key_user uuid[], p_key text[], p_fingerprint bytea[], p_session bytea[],
    p_failure text[], p_user_name text[], p_party uuid[], p_party_name text[],
    p_fence bigint, p_enforce_fence boolean, p_lock_wait_ms int,
    p_limit numeric[], p_refund_of uuid[], p_reason text[], p_rules jsonb, p_dispute uuid[],
    p_release boolean[]
) RETURNS TABLE (
    for_transfer uuid, verdict text,
    transfer_id uuid, kind text, mode text, from_user uuid, from_username text, to_user uuid,
    to_username text, amount numeric, currency text, state text, failure_code text,
    participants text[], created_at timestamptz, decided_at timestamptz,
    refund_of uuid, reason text, failure_detail text
)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    n int := coalesce(array_length(p_transfer, 1), 0);
    v_debit boolean[] := array_fill(true, ARRAY[n]);
    v_out text[];
    v_stale uuid[] := '{}';
    i int;
BEGIN
    PERFORM wallet_own(p_buckets, true);
    PERFORM set_config('lock_timeout', p_lock_wait_ms || 'ms', true);
    v_out := wallet_batch_check(p_transfer, v_debit, p_user, p_amount, p_currency, p_key_user,
                                p_key, p_fingerprint, p_session, p_failure, p_party, p_limit,
                                p_refund_of, p_rules, p_dispute, p_release);
    IF p_enforce_fence THEN
        SELECT coalesce(array_agg(a.user_id), '{}') INTO v_stale
          FROM accounts a
         WHERE a.user_id = ANY (ARRAY(SELECT p_user[x] FROM generate_subscripts(p_user, 1) AS x
                                      WHERE v_out[x] IS NULL OR v_out[x] = 'held'))
           AND a.last_fence >= p_fence;
        -- A transfer held for review writes too (its hold), so its fence is
        -- checked like a debit's.
        FOR i IN 1..n LOOP
            IF (v_out[i] IS NULL OR v_out[i] = 'held') AND p_user[i] = ANY (v_stale) THEN
                v_out[i] := 'lock_unavailable';
            END IF;
        END LOOP;
    END IF;
    RETURN QUERY
    SELECT * FROM wallet_batch_apply('{}', 'redis', p_transfer, v_debit, p_user, p_amount,
                                     p_currency, p_user_name, p_party, p_party_name, v_out,
                                     p_fence, p_refund_of, p_reason, p_dispute, p_release);
    INSERT INTO pending_credits (transfer_id, to_user, to_username, from_username, amount, currency,
                                 refund_of, dispute_id)
    SELECT p_transfer[x], p_party[x], p_party_name[x], p_user_name[x], p_amount[x], p_currency[x],
           p_refund_of[x], p_dispute[x]
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE v_out[x] IS NULL
     ORDER BY x;
END
$$;
