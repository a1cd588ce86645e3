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
--   - The money moves through wallet_post, one call for the group's legs
--     (p_fence, Redis mode's token, is passed on to it). Holds and releases
--     name the transfer they are about and their event type (review_hold,
--     review_release, dispute_release) for their events.
--   - A leg with p_refund_of is a refund's: its entries are refund_debit and
--     refund_credit, and its record a 'refund' naming the original and
--     carrying p_reason. With p_dispute too it is a dispute's refund
--     (dispute_refund_debit and _credit, a 'dispute_refund' record): the
--     payer's leg also releases the dispute's hold (a 'release' entry) and
--     closes the dispute as refunded, under the row locks the check took. A refusal's record carries the detail
--     wallet_batch_check left for it in this transaction (wallet.refusal_detail),
--     only when it came with the refusal the transfer ends with (a later
--     shard's higher-ranked refusal carries none).
--   - A payer's leg held for review (verdict 'held') holds its amount on the
--     payer's account (a 'hold' entry) and is recorded held, with the rule's
--     name; its payee's leg moves nothing. A release (p_release) of a held
--     transfer releases that hold (a 'release' entry), moves the money, and
--     turns the existing record committed instead of writing one.
--   - It never decides: a cross-shard group's decision is wallet_batch_decide,
--     sent once every other shard has prepared.
CREATE OR REPLACE FUNCTION wallet_batch_apply(
    p_participants text[], p_mode text,
    p_transfer uuid[], p_debit boolean[], p_user uuid[], p_amount numeric[],
    p_currency text[], p_user_name text[], p_party uuid[], p_party_name text[],
    p_outcome text[], p_fence bigint, p_refund_of uuid[], p_reason text[], p_dispute uuid[],
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
    v_ids uuid[];
    v_accounts uuid[];
    v_transfer uuid[] := '{}';
    v_account uuid[] := '{}';
    v_kind text[] := '{}';
    v_amount numeric[] := '{}';
    v_party text[] := '{}';
    v_about uuid[] := '{}';
    v_event text[] := '{}';
    v_pointed uuid;
    v_details jsonb := nullif(current_setting('wallet.refusal_detail', true), '')::jsonb;
    v_release uuid;
    v_releases uuid[] := array_fill(NULL::uuid, ARRAY[n]);
    i int;
BEGIN
    -- The accounts of the legs that move money, locked since the check; the
    -- index condition keeps the planner, which cannot size the arrays, on
    -- the index.
    SELECT coalesce(array_agg(a.user_id), '{}'), coalesce(array_agg(a.account_id), '{}')
      INTO v_ids, v_accounts
      FROM accounts a
     WHERE a.user_id = ANY (ARRAY(SELECT p_user[x] FROM generate_subscripts(p_user, 1) AS x
                                  WHERE p_outcome[x] IS NULL
                                     OR (p_debit[x] AND p_outcome[x] = 'held')));
    FOR i IN 1..n LOOP
        IF p_debit[i] AND p_outcome[i] = 'held' THEN
            -- Held for review: the amount is held under an ID of its own.
            v_transfer := v_transfer || gen_random_uuid();
            v_account := v_account || v_accounts[array_position(v_ids, p_user[i])];
            v_kind := v_kind || 'hold'::text;
            v_amount := v_amount || -p_amount[i];
            v_party := v_party || p_party_name[i];
            v_about := v_about || p_transfer[i];
            v_event := v_event || 'review_hold'::text;
        END IF;
        CONTINUE WHEN p_outcome[i] IS NOT NULL;
        IF p_debit[i] AND (p_dispute[i] IS NOT NULL OR p_release[i]) THEN
            -- The dispute's or the held transfer's hold is released (under an
            -- ID of its own) as its money moves.
            v_release := gen_random_uuid();
            IF p_dispute[i] IS NOT NULL THEN
                v_releases[i] := v_release;
            END IF;
            v_transfer := v_transfer || v_release;
            v_account := v_account || v_accounts[array_position(v_ids, p_user[i])];
            v_kind := v_kind || 'release'::text;
            v_amount := v_amount || p_amount[i];
            v_party := v_party || p_party_name[i];
            v_about := v_about || coalesce(p_refund_of[i], p_transfer[i]);
            v_event := v_event || CASE WHEN p_dispute[i] IS NOT NULL THEN 'dispute_release'
                                       ELSE 'review_release' END;
        END IF;
        v_transfer := v_transfer || p_transfer[i];
        v_account := v_account || v_accounts[array_position(v_ids, p_user[i])];
        v_kind := v_kind || (CASE WHEN p_dispute[i] IS NOT NULL THEN 'dispute_refund'
                                  WHEN p_refund_of[i] IS NOT NULL THEN 'refund'
                                  ELSE 'transfer' END
                             || CASE WHEN p_debit[i] THEN '_debit' ELSE '_credit' END);
        v_amount := v_amount || CASE WHEN p_debit[i] THEN -p_amount[i] ELSE p_amount[i] END;
        v_party := v_party || p_party_name[i];
        v_about := v_about || NULL::uuid;
        v_event := v_event || NULL::text;
    END LOOP;
    PERFORM wallet_post(v_transfer, v_account, v_kind, v_amount, v_party, p_fence, v_about,
                        v_event);
    -- Disputes refunded: closed, naming their release and their refund.
    FOR i IN 1..n LOOP
        CONTINUE WHEN v_releases[i] IS NULL;
        UPDATE disputes d SET state = 'refunded', resolved_at = now(), release_id = v_releases[i],
                              refund_id = p_transfer[i]
         WHERE d.dispute_id = p_dispute[i];
    END LOOP;
    -- The records written, each the answer to its own transfer: a refusal's
    -- verdict is its failure code.
    RETURN QUERY
    INSERT INTO transfers AS t (transfer_id, kind, mode, from_user, from_username, to_user,
                                to_username, amount, currency, state, failure_code,
                                participants, decided_at, refund_of, reason, failure_detail,
                                dispute_id)
    SELECT p_transfer[x], CASE WHEN p_dispute[x] IS NOT NULL THEN 'dispute_refund'
                               WHEN p_refund_of[x] IS NOT NULL THEN 'refund'
                               ELSE 'transfer' END,
           p_mode, p_user[x], p_user_name[x], p_party[x],
           p_party_name[x], p_amount[x], p_currency[x],
           CASE WHEN p_outcome[x] IS NULL THEN 'committed'
                WHEN p_outcome[x] = 'held' THEN 'held'
                ELSE 'aborted' END,
           nullif(p_outcome[x], 'held'),
           p_participants,
           statement_timestamp(), p_refund_of[x], p_reason[x],
           CASE WHEN v_details->(p_transfer[x]::text)->>'code' = p_outcome[x]
                THEN v_details->(p_transfer[x]::text)->>'detail' END,
           p_dispute[x]
      FROM generate_subscripts(p_transfer, 1) AS x
     WHERE p_debit[x] AND NOT p_release[x]
       AND (p_outcome[x] IS NULL OR strpos(p_outcome[x], ':') = 0)
     ORDER BY x
    RETURNING t.transfer_id, t.failure_code, t.transfer_id, t.kind, t.mode, t.from_user,
              t.from_username, t.to_user, t.to_username, t.amount, t.currency::text, t.state,
              t.failure_code, t.participants, t.created_at, t.decided_at, t.refund_of, t.reason,
              t.failure_detail;
    -- Releases: the held record commits; a refused release answers with the
    -- record as it stands.
    IF true = ANY (p_release) THEN
        RETURN QUERY
        UPDATE transfers AS t SET state = 'committed', decided_at = statement_timestamp(),
                                  participants = p_participants
          FROM generate_subscripts(p_transfer, 1) AS x
         WHERE p_debit[x] AND p_release[x] AND p_outcome[x] IS NULL
           AND t.transfer_id = p_transfer[x] AND t.state = 'held'
        RETURNING t.transfer_id, NULL::text, t.transfer_id, t.kind, t.mode, t.from_user,
                  t.from_username, t.to_user, t.to_username, t.amount, t.currency::text,
                  t.state, t.failure_code, t.participants, t.created_at, t.decided_at,
                  t.refund_of, t.reason, t.failure_detail;
        RETURN QUERY
        SELECT p_transfer[x], p_outcome[x], t.transfer_id, t.kind, t.mode, t.from_user,
               t.from_username, t.to_user, t.to_username, t.amount, t.currency::text, t.state,
               t.failure_code, t.participants, t.created_at, t.decided_at, t.refund_of, t.reason,
               t.failure_detail
          FROM generate_subscripts(p_transfer, 1) AS x
          JOIN transfers t ON t.transfer_id = p_transfer[x]
         WHERE p_debit[x] AND p_release[x] AND p_outcome[x] IS NOT NULL
           AND strpos(p_outcome[x], ':') = 0;
    END IF;
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
               t.failure_code, t.participants, t.created_at, t.decided_at, t.refund_of, t.reason,
               t.failure_detail
          FROM (SELECT 1) AS one
          LEFT JOIN transfers t ON t.transfer_id = v_pointed;
    END LOOP;
END
$$;
