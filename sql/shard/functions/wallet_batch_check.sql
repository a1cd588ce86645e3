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
-- credit leg). p_party is each leg's other user. On a payer's leg, p_limit is
-- the configured daily limit for the transfer's currency (NULL: none; an
-- admin's override on the account wins) and p_refund_of the transfer a refund
-- gives back (NULL: a transfer); p_dispute, on both legs of a dispute's
-- refund, the dispute it resolves; p_release, on a payer's leg, that the
-- transfer is a held one an admin releases (its record exists, held). p_rules
-- holds the fraud rules (NULL: none; see wallet_fraud_check).
--
-- A release must find its transfer still held for this payer and amount
-- (not_held) and spends the held money. A transfer that passes everything
-- but meets a 'review' rule gets the verdict 'held' (ranked after every
-- refusal): wallet_batch_apply records it held and holds its amount.
--
-- Verdicts: NULL (passed); a business refusal (wallet_first_failure's list:
-- recorded as the transfer's abort, with its detail, if any, left for
-- wallet_batch_apply in the transaction's setting wallet.refusal_detail, as
-- {transfer: {code, detail}}, which the apply records only if the code is
-- the transfer's final one);
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
--      recipient_not_found, currency_mismatch, then on a payer's leg the
--      wallet's rules: a dispute's refund must resolve a dispute still open
--      for this payee, transfer and amount (dispute_not_open), and takes the
--      money the dispute holds; a refund must refund a transfer credited to
--      this payer (transfer_not_found) by no more than what refunds and open
--      disputes left of it (refund_exceeds_original); a transfer must pass
--      the fraud rules
--      (transfer_blocked) and fit the payer's daily limit (limit_exceeded);
--      then insufficient_funds (against the balance less what is held: a
--      withdrawal waiting on its provider holds its amount), the first by
--      wallet_first_failure's order whichever leg finds it. Each rule reads
--      what the payer's locked account row guards (the limit's usage on the
--      row itself; the refunds of a payee's transfers and the payer's recent
--      transfers, which only transfers holding this row's lock write), so
--      concurrent transfers cannot pass a rule together that they break
--      together. A transfer an
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
    p_session bytea[], p_failure text[], p_party uuid[], p_limit numeric[],
    p_refund_of uuid[], p_rules jsonb, p_dispute uuid[], p_release boolean[]
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
    v_limits numeric[];
    v_used numeric[];
    v_today date := (now() AT TIME ZONE 'UTC')::date;
    v_refund_at int[];
    v_credited numeric[];
    v_refunded numeric[];
    v_fraud text[];
    v_details jsonb := '{}';
    v_limit numeric;
    v_disputed int[] := '{}';
    v_held int[] := '{}';
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
           coalesce(array_agg(l.balance), '{}'), coalesce(array_agg(l.daily_limit), '{}'),
           coalesce(array_agg(l.used), '{}')
      INTO v_ids, v_currencies, v_balances, v_limits, v_used
      FROM (SELECT user_id, currency, balance - held AS balance, daily_limit,
                   -- A row already on a later day (this transaction began
                   -- before midnight) is judged by that day's usage.
                   CASE WHEN used_day >= v_today THEN used_today ELSE 0 END AS used
              FROM accounts
             WHERE user_id = ANY (ARRAY(SELECT p_user[x] FROM generate_subscripts(p_user, 1) AS x
                                        WHERE v_out[x] IS NULL))
             ORDER BY user_id FOR UPDATE) AS l;
    -- Refunds, read under the refunding payee's lock: what the original
    -- credited this payer, and what its committed refunds gave back.
    IF EXISTS (SELECT 1 FROM unnest(p_refund_of) AS r WHERE r IS NOT NULL) THEN
        SELECT coalesce(array_agg(x), '{}'),
               coalesce(array_agg((SELECT sum(e.amount) FROM ledger_entries e JOIN accounts a USING (account_id)
                                    WHERE e.transfer_id = p_refund_of[x] AND a.user_id = p_user[x]
                                      AND e.kind = 'transfer_credit')), '{}'),
               coalesce(array_agg((SELECT coalesce(sum(t.amount), 0) FROM transfers t
                                    WHERE t.refund_of = p_refund_of[x] AND t.state = 'committed')
                                  + (SELECT coalesce(sum(d.amount), 0) FROM disputes d
                                      WHERE d.transfer_id = p_refund_of[x] AND d.state = 'open')), '{}')
          INTO v_refund_at, v_credited, v_refunded
          FROM generate_subscripts(p_transfer, 1) AS x
         WHERE p_debit[x] AND p_refund_of[x] IS NOT NULL AND p_dispute[x] IS NULL
           AND v_out[x] IS NULL;
        -- Disputes' refunds: the legs whose dispute is open for them.
        SELECT coalesce(array_agg(x), '{}') INTO v_disputed
          FROM generate_subscripts(p_transfer, 1) AS x
         WHERE p_debit[x] AND p_dispute[x] IS NOT NULL AND v_out[x] IS NULL
           AND EXISTS (SELECT 1 FROM disputes d
                        WHERE d.dispute_id = p_dispute[x] AND d.state = 'open'
                          AND d.payee_user = p_user[x] AND d.transfer_id = p_refund_of[x]
                          AND d.amount = p_amount[x]);
    END IF;
    -- Releases: the legs whose transfer is still held, as ordered.
    IF true = ANY (p_release) THEN
        SELECT coalesce(array_agg(x), '{}') INTO v_held
          FROM generate_subscripts(p_transfer, 1) AS x
         WHERE p_debit[x] AND p_release[x] AND v_out[x] IS NULL
           AND EXISTS (SELECT 1 FROM transfers t
                        WHERE t.transfer_id = p_transfer[x] AND t.state = 'held'
                          AND t.from_user = p_user[x] AND t.amount = p_amount[x]);
    END IF;
    -- Fraud rules, for the transfers still passing.
    IF p_rules IS NOT NULL THEN
        v_fraud := wallet_fraud_check(p_debit, p_user, p_party, p_amount, p_currency,
                                      p_refund_of, v_out, p_rules);
    END IF;
    -- The accounts of transfers an earlier shard refused, read unlocked in one
    -- statement (see below); only the ordered check passes such refusals.
    IF v_out && ARRAY['currency_mismatch', 'transfer_not_found', 'dispute_not_open',
                      'not_held', 'refund_exceeds_original', 'transfer_blocked',
                      'limit_exceeded', 'insufficient_funds', 'held'] THEN
        SELECT coalesce(array_agg(a.user_id), '{}'), coalesce(array_agg(trim(a.currency)), '{}')
          INTO v_seen_ids, v_seen_currencies
          FROM accounts a
         WHERE a.user_id = ANY (ARRAY(SELECT p_user[x] FROM generate_subscripts(p_user, 1) AS x
                                      WHERE v_out[x] IN ('currency_mismatch', 'transfer_not_found',
                                                         'dispute_not_open', 'not_held',
                                                         'refund_exceeds_original', 'transfer_blocked',
                                                         'limit_exceeded', 'insufficient_funds',
                                                         'held')));
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
                ELSIF p_debit[k] AND p_release[k] THEN
                    -- The money is on the account, held for this transfer. It
                    -- counts toward the daily limit when it moves, so the
                    -- day must still have room for it.
                    v_limit := coalesce(v_limits[v_at], p_limit[k]);
                    IF NOT k = ANY (v_held) THEN
                        v_fail := wallet_first_failure(v_fail, 'not_held');
                    ELSIF v_limit IS NOT NULL AND v_used[v_at] + p_amount[k] > v_limit THEN
                        v_fail := wallet_first_failure(v_fail, 'limit_exceeded');
                        v_details := v_details || jsonb_build_object(p_transfer[k]::text,
                            jsonb_build_object('code', 'limit_exceeded', 'detail',
                                               greatest(v_limit - v_used[v_at], 0)::text));
                    ELSIF v_balances[v_at] < 0 THEN
                        v_fail := wallet_first_failure(v_fail, 'insufficient_funds');
                    END IF;
                ELSIF p_debit[k] AND p_dispute[k] IS NOT NULL THEN
                    -- The money is on the account, held by the dispute: the
                    -- other holds must still be covered once it is spent.
                    IF NOT k = ANY (v_disputed) THEN
                        v_fail := wallet_first_failure(v_fail, 'dispute_not_open');
                    ELSIF v_balances[v_at] < 0 THEN
                        v_fail := wallet_first_failure(v_fail, 'insufficient_funds');
                    END IF;
                ELSIF p_debit[k] AND p_refund_of[k] IS NOT NULL
                      AND v_credited[array_position(v_refund_at, k)] IS NULL THEN
                    v_fail := wallet_first_failure(v_fail, 'transfer_not_found');
                ELSIF p_debit[k] AND p_refund_of[k] IS NOT NULL
                      AND v_refunded[array_position(v_refund_at, k)] + p_amount[k]
                          > v_credited[array_position(v_refund_at, k)] THEN
                    v_fail := wallet_first_failure(v_fail, 'refund_exceeds_original');
                    v_details := v_details || jsonb_build_object(p_transfer[k]::text,
                        jsonb_build_object('code', 'refund_exceeds_original', 'detail',
                            (v_credited[array_position(v_refund_at, k)]
                             - v_refunded[array_position(v_refund_at, k)])::text));
                ELSIF p_debit[k] AND v_fraud[k] LIKE 'block:%' THEN
                    v_fail := wallet_first_failure(v_fail, 'transfer_blocked');
                    v_details := v_details || jsonb_build_object(p_transfer[k]::text,
                        jsonb_build_object('code', 'transfer_blocked', 'detail', substr(v_fraud[k], 7)));
                ELSIF p_debit[k] AND p_refund_of[k] IS NULL
                      AND coalesce(v_limits[v_at], p_limit[k]) IS NOT NULL
                      AND v_used[v_at] + p_amount[k] > coalesce(v_limits[v_at], p_limit[k]) THEN
                    v_limit := coalesce(v_limits[v_at], p_limit[k]);
                    v_fail := wallet_first_failure(v_fail, 'limit_exceeded');
                    v_details := v_details || jsonb_build_object(p_transfer[k]::text,
                        jsonb_build_object('code', 'limit_exceeded', 'detail',
                                           greatest(v_limit - v_used[v_at], 0)::text));
                ELSIF p_debit[k] AND v_balances[v_at] < p_amount[k] THEN
                    v_fail := wallet_first_failure(v_fail, 'insufficient_funds');
                ELSIF p_debit[k] AND v_fraud[k] LIKE 'review:%' THEN
                    v_fail := wallet_first_failure(v_fail, 'held');
                    v_details := v_details || jsonb_build_object(p_transfer[k]::text,
                        jsonb_build_object('code', 'held', 'detail', substr(v_fraud[k], 8)));
                END IF;
            END LOOP;
            FOR k IN i..j LOOP v_out[k] := v_fail; END LOOP;
        ELSIF v_out[i] IN ('currency_mismatch', 'transfer_not_found', 'dispute_not_open',
                           'not_held', 'refund_exceeds_original', 'transfer_blocked',
                           'limit_exceeded', 'insufficient_funds', 'held') THEN
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
    -- Written every time, so a detail never outlives the check that found it.
    PERFORM set_config('wallet.refusal_detail', v_details::text, true);
    RETURN v_out;
END
$$;
