-- Step 1 of a group of transfers on one shard (the coordinator's groups, of
-- any size: a lone transfer is a group of one): claims the payers' keys,
-- locks every account of the group and checks each leg, moving nothing.
-- Returns a verdict per leg.
--
-- One element per leg; the legs of one transfer on this shard are adjacent (a
-- same-shard transfer has two: its debit and its credit). p_failure is the
-- transfer's verdict from an earlier shard: a refusal there still claims its
-- key here (the refusal is recorded and replayed) but nothing is checked or
-- locked. p_session holds, on a debit leg, the SHA-256 of the payer's session
-- token (NULL when the coordinator already verified the payer, or on a
-- credit leg).
--
-- Verdicts: NULL (passed); a business refusal (recipient_not_found,
-- currency_mismatch, insufficient_funds: recorded as the transfer's abort);
-- or an answer that writes nothing for the transfer, of the form
-- 'word:argument': 'unauthorized:', 'payer_currency:<what the payer holds>',
-- and wallet_key_answer's 'key_reused:', 'in_progress:<id>', 'replay:<id>'
-- and 'key_busy:'.
--
-- Rules owned here, in the one order every transfer is answered by:
--   1. Sessions: a payer whose session is not live gets 'unauthorized:', one
--      whose account holds another currency than the transfer
--      'payer_currency:'; nothing of the transfer is claimed, locked or
--      written.
--   2. Keys, before any row lock, so a replay never waits on an account: a key
--      that exists is answered by wallet_key_answer (which may start a fresh
--      attempt under this group's transfer ID).
--   3. Accounts are locked in user-ID order (with the shard order the
--      coordinator keeps, one global order), so two groups never wait on each
--      other in a cycle; the legs are then checked against the locked rows:
--      recipient_not_found, currency_mismatch, insufficient_funds (against
--      the balance less what is held: a withdrawal waiting on its provider
--      holds its amount), the first
--      by wallet_first_failure's order whichever leg finds it. A transfer an
--      earlier shard refused for a lower-ranked reason is read here (unlocked)
--      for a higher-ranked one. A payer without an account raises WL008.
--   - A fixed number of statements per group whatever its size (a key that
--     exists costs one more), and generic plans: every statement stays on its
--     index whatever the arrays hold, and PL/pgSQL would otherwise plan each
--     call afresh. A generic plan is built from the statistics of the moment,
--     so a bulk import must be followed by ANALYZE.
CREATE OR REPLACE FUNCTION wallet_batch_check(
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_key_user uuid[], p_key text[], p_fingerprint bytea[],
    p_session bytea[], p_failure text[]
) RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n int := coalesce(array_length(p_transfer, 1), 0);
    v_out text[] := p_failure;
    v_refused_at int[];
    v_holds text[];
    v_answer text;
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
    -- 1. Sessions: what each unverified payer's account holds (NULL: no live
    -- session), for the payers that do not pass.
    SELECT coalesce(array_agg(q.x), '{}'), coalesce(array_agg(q.holds), '{}')
      INTO v_refused_at, v_holds
      FROM (SELECT x, (SELECT trim(u.currency) FROM sessions s JOIN users u USING (user_id)
                        WHERE s.token_hash = p_session[x] AND s.user_id = p_user[x]
                          AND s.revoked_at IS NULL AND s.expires_at > now()) AS holds
              FROM generate_subscripts(p_transfer, 1) AS x
             WHERE p_debit[x] AND p_session[x] IS NOT NULL) AS q
     WHERE q.holds IS DISTINCT FROM p_currency[q.x];
    FOR i IN 1..coalesce(array_length(v_refused_at, 1), 0) LOOP
        FOR k IN 1..n LOOP
            IF p_transfer[k] = p_transfer[v_refused_at[i]] THEN
                v_out[k] := CASE WHEN v_holds[i] IS NULL THEN 'unauthorized:'
                                 ELSE 'payer_currency:' || v_holds[i] END;
            END IF;
        END LOOP;
    END LOOP;
    -- 2. Keys, in one statement: a replay must not wait on the row locks.
    WITH claimed AS (
        INSERT INTO idempotency_keys (user_id, idem_key, operation, fingerprint, transfer_id)
        SELECT p_key_user[x], p_key[x], 'transfer', p_fingerprint[x], p_transfer[x]
          FROM generate_subscripts(p_transfer, 1) AS x
         WHERE p_debit[x] AND (v_out[x] IS NULL OR strpos(v_out[x], ':') = 0)
         ORDER BY x
        ON CONFLICT DO NOTHING
        RETURNING transfer_id
    )
    SELECT coalesce(array_agg(transfer_id), '{}') INTO v_claimed FROM claimed;
    FOR i IN 1..n LOOP
        CONTINUE WHEN NOT p_debit[i] OR strpos(coalesce(v_out[i], ''), ':') > 0
                      OR p_transfer[i] = ANY (v_claimed);
        v_answer := wallet_key_answer(p_key_user[i], p_key[i], 'transfer', p_fingerprint[i],
                                      p_transfer[i]);
        -- NULL: a fresh attempt under this transfer ID, checked like any other.
        CONTINUE WHEN v_answer IS NULL;
        FOR k IN 1..n LOOP
            IF p_transfer[k] = p_transfer[i] THEN v_out[k] := v_answer; END IF;
        END LOOP;
    END LOOP;
    -- 3. Accounts.
    -- Lock in user-ID order, reading the locked rows' current versions.
    SELECT coalesce(array_agg(l.user_id), '{}'), coalesce(array_agg(l.currency::text), '{}'),
           coalesce(array_agg(l.balance), '{}')
      INTO v_ids, v_currencies, v_balances
      FROM (SELECT user_id, currency, balance - held AS balance FROM accounts
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
