-- A same-shard group: both steps (wallet_batch_check, wallet_batch_apply) in
-- one statement, answered as wallet_batch_apply answers.
--
-- Rules owned here:
--   - Each row lock is waited for at most p_lock_wait_ms. A group of several
--     transfers gets a short bound: a row held outside it (an in-doubt
--     prepared leg, a deposit settling) then fails the group fast, and only
--     the blocked transfer waits, alone, later, instead of the whole group and
--     every group behind it in the shard's lane. Other groups hold a row for a
--     few milliseconds.
--   - Generic plans, as in the two functions it calls.
--   - Ownership first: wallet_own's write check of p_buckets (the buckets of
--     every user of the group) runs before anything is read or locked. A
--     refusal (WB001) writes nothing. The check runs inside this one
--     statement so that a group still costs one statement and one round trip;
--     wallet_own's own queries take fresh snapshots, as every query of a
--     volatile function does under READ COMMITTED.
CREATE OR REPLACE FUNCTION wallet_batch_local(
    p_buckets int[], p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_key_user uuid[], p_key text[], p_fingerprint bytea[],
    p_session bytea[], p_user_name text[], p_party uuid[], p_party_name text[],
    p_lock_wait_ms int, p_limit numeric[], p_refund_of uuid[], p_reason text[], p_rules jsonb,
    p_dispute uuid[], p_release boolean[]
) RETURNS TABLE (
    for_transfer uuid, verdict text,
    transfer_id uuid, kind text, mode text, from_user uuid, from_username text, to_user uuid,
    to_username text, amount numeric, currency text, state text, failure_code text,
    participants text[], created_at timestamptz, decided_at timestamptz,
    refund_of uuid, reason text, failure_detail text
)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    PERFORM wallet_own(p_buckets, true);
    -- Local to this statement's transaction, so the connection's own bound
    -- is back for whatever runs next on it.
    PERFORM set_config('lock_timeout', p_lock_wait_ms || 'ms', true);
    RETURN QUERY
    SELECT * FROM wallet_batch_apply(
        '{}', 'local', p_transfer, p_debit, p_user, p_amount, p_currency,
        p_user_name, p_party, p_party_name,
        wallet_batch_check(p_transfer, p_debit, p_user, p_amount, p_currency,
                           p_key_user, p_key, p_fingerprint, p_session,
                           array_fill(NULL::text, ARRAY[coalesce(array_length(p_transfer, 1), 0)]),
                           p_party, p_limit, p_refund_of, p_rules, p_dispute, p_release),
        NULL, p_refund_of, p_reason, p_dispute, p_release);
END
$$;
