-- Step 1 of a group of transfers on one shard (the coordinator's batching):
-- claims the payers' keys, locks every account of the group and checks each
-- leg, moving nothing. Returns per leg NULL (passed) or the reason.
--
-- One element per leg; the legs of one transfer on this shard are adjacent (a
-- same-shard transfer has two: its debit and its credit). p_failure is the
-- transfer's refusal found on an earlier shard: its key is still claimed (the
-- refusal is recorded and replayed) but nothing is checked or locked.
-- p_session holds, on a debit leg, the SHA-256 of the payer's session token
-- (NULL when the coordinator already verified the payer, or on a credit leg).
--
-- Rules owned here:
--   - Sessions first: a payer whose session is not live, or whose account
--     holds another currency than the transfer, gets 'unverified' on every leg
--     of the transfer, which wins over any other verdict; nothing of it is
--     claimed, locked or written, and the coordinator runs it alone.
--   - Keys next, before any row lock, so a replay never waits: a key that
--     exists gives 'key_exists' (the caller replays that transfer the slow way).
--   - Accounts are locked in user-ID order (with the shard order the
--     coordinator keeps, one global order), so two groups never wait on each
--     other in a cycle; the legs are then checked against the locked rows:
--     recipient_not_found, currency_mismatch, insufficient_funds, the first
--     by wallet_first_failure's order whichever leg finds it. A transfer an
--     earlier shard refused for a lower-ranked reason is read here (unlocked)
--     for a higher-ranked one. A payer without an account raises WL008.
--   - A fixed number of statements per group whatever its size, and generic
--     plans: every statement stays on its index whatever the arrays hold, and
--     PL/pgSQL would otherwise plan each call afresh. A generic plan is built
--     from the statistics of the moment, so a bulk import must be followed by
--     ANALYZE.
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
    v_seen_ids uuid[];
    v_seen_currencies text[];
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
    -- The accounts of transfers an earlier shard refused, read unlocked in one
    -- statement (see below); only the ordered check passes such refusals.
    IF 'currency_mismatch' = ANY (v_out) OR 'insufficient_funds' = ANY (v_out) THEN
        SELECT coalesce(array_agg(a.user_id), '{}'), coalesce(array_agg(trim(a.currency)), '{}')
          INTO v_seen_ids, v_seen_currencies
          FROM accounts a
         WHERE a.user_id = ANY (ARRAY(SELECT p_user[x] FROM generate_subscripts(p_user, 1) AS x
                                      WHERE v_out[x] IN ('currency_mismatch', 'insufficient_funds')));
    END IF;
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
                    v_fail := wallet_first_failure(v_fail, 'recipient_not_found');
                ELSIF trim(v_currencies[v_at]) <> p_currency[k] THEN
                    v_fail := wallet_first_failure(v_fail, 'currency_mismatch');
                ELSIF p_debit[k] AND v_balances[v_at] < p_amount[k] THEN
                    v_fail := wallet_first_failure(v_fail, 'insufficient_funds');
                END IF;
            END LOOP;
            FOR k IN i..j LOOP v_out[k] := v_fail; END LOOP;
        ELSIF v_out[i] IN ('currency_mismatch', 'insufficient_funds') THEN
            -- Refused on an earlier shard for a reason that ranks below what
            -- this shard may find: a missing or other-currency account outranks
            -- it. Accounts are never deleted and never change currency, so this
            -- reads them without a lock; nothing of the transfer is locked here.
            v_fail := v_out[i];
            FOR k IN i..j LOOP
                v_at := array_position(v_seen_ids, p_user[k]);
                IF v_at IS NULL THEN
                    -- A payer without an account is a corrupt shard (WL008
                    -- above), not a refusal: only a payee can be nobody.
                    IF NOT p_debit[k] THEN
                        v_fail := wallet_first_failure(v_fail, 'recipient_not_found');
                    END IF;
                ELSIF v_seen_currencies[v_at] <> p_currency[k] THEN
                    v_fail := wallet_first_failure(v_fail, 'currency_mismatch');
                END IF;
            END LOOP;
            FOR k IN i..j LOOP v_out[k] := v_fail; END LOOP;
        END IF;
        i := j + 1;
    END LOOP;
    RETURN v_out;
END
$$;
