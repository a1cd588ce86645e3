-- A same-shard group: both steps (wallet_batch_check, wallet_batch_apply) in
-- one statement. A transfer without a record in the result had a key that
-- exists or an unverified payer.
--
-- Rules owned here:
--   - The group waits at most 200 ms for a row lock: a row held outside any
--     group (an in-doubt prepared leg, a slow transaction) then fails the group
--     fast, its members run alone, and only the blocked one waits, up to the
--     connection's lock_timeout, instead of the whole group and every group
--     behind it in the shard's lane. Other groups hold a row for a few
--     milliseconds.
--   - Generic plans, as in the two functions it calls.
CREATE OR REPLACE FUNCTION wallet_batch_local(
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_key_user uuid[], p_key text[], p_fingerprint bytea[],
    p_session bytea[], p_user_name text[], p_party uuid[], p_party_name text[]
) RETURNS SETOF transfers
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET lock_timeout = '200ms'
AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM wallet_batch_apply(
        '{}', 'local', p_transfer, p_debit, p_user, p_amount, p_currency,
        p_user_name, p_party, p_party_name,
        wallet_batch_check(p_transfer, p_debit, p_user, p_amount, p_currency,
                           p_key_user, p_key, p_fingerprint, p_session,
                           array_fill(NULL::text, ARRAY[coalesce(array_length(p_transfer, 1), 0)])));
END
$$;
