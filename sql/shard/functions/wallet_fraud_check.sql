-- The fraud rules of a group's payers on this shard, called by
-- wallet_batch_check once the payers' accounts are locked. Returns, per leg,
-- NULL or '<action>:<rule name>' for the rule the transfer meets: a 'block'
-- rule wins over a 'review' rule, and among rules of one action the first in
-- p_rules. Only payers' legs of transfers (not refunds) that still pass
-- (p_out NULL) are judged.
--
-- p_rules is the configured list, each an object with "name", "action"
-- ('block' or 'review') and "rule":
--   - 'velocity': "max_transfers" and "window_s": met when the payer already
--     has max_transfers transfers (not aborted) created in the last window_s
--     seconds, so this one would be one more than allowed;
--   - 'amount': "over", a map of currency to amount: met when the transfer is
--     above the amount of its currency;
--   - 'new_recipient': "over", likewise: met when the transfer is above it and
--     the payer never had a committed transfer to this payee.
--
-- Rules owned here:
--   - One statement per rule that reads history, whatever the group's size,
--     each on the transfers_by_payer index, and none for the others.
--   - What it reads only transfers holding the payer's row lock write, so
--     concurrent transfers of one payer are judged one after the other.
CREATE OR REPLACE FUNCTION wallet_fraud_check(
    p_debit boolean[], p_user uuid[], p_party uuid[], p_amount numeric[], p_currency text[],
    p_refund_of uuid[], p_out text[], p_rules jsonb
) RETURNS text[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    n int := coalesce(array_length(p_user, 1), 0);
    v_hit text[] := array_fill(NULL::text, ARRAY[n]);
    v_legs int[];
    v_met int[];
    v_rule jsonb;
    v_over numeric;
    i int;
    r int;
BEGIN
    -- Plain loops, not queries: each statement costs PL/pgSQL an executor
    -- start, and these run for every group while rules are configured.
    v_legs := '{}';
    FOR i IN 1..n LOOP
        IF p_debit[i] AND p_refund_of[i] IS NULL AND p_out[i] IS NULL THEN
            v_legs := v_legs || i;
        END IF;
    END LOOP;
    IF cardinality(v_legs) = 0 THEN
        RETURN v_hit;
    END IF;
    FOR r IN 0..jsonb_array_length(p_rules) - 1 LOOP
        v_rule := p_rules->r;
        v_met := '{}';
        IF v_rule->>'rule' = 'velocity' THEN
            SELECT coalesce(array_agg(x), '{}') INTO v_met
              FROM unnest(v_legs) AS x
             WHERE p_user[x] = ANY (ARRAY(
                    SELECT t.from_user FROM transfers t
                     WHERE t.from_user = ANY (ARRAY(SELECT p_user[y] FROM unnest(v_legs) AS y))
                       AND t.kind = 'transfer' AND t.state <> 'aborted'
                       AND t.created_at > now() - make_interval(secs => (v_rule->>'window_s')::float8)
                     GROUP BY t.from_user
                    HAVING count(*) >= (v_rule->>'max_transfers')::int));
        ELSE
            FOREACH i IN ARRAY v_legs LOOP
                v_over := (v_rule->'over'->>p_currency[i])::numeric;
                IF v_over IS NOT NULL AND p_amount[i] > v_over THEN
                    v_met := v_met || i;
                END IF;
            END LOOP;
            IF v_rule->>'rule' = 'new_recipient' AND cardinality(v_met) > 0 THEN
                SELECT coalesce(array_agg(x), '{}') INTO v_met
                  FROM unnest(v_met) AS x
                 WHERE NOT EXISTS (SELECT 1 FROM transfers t
                                    WHERE t.from_user = p_user[x] AND t.to_user = p_party[x]
                                      AND t.kind = 'transfer' AND t.state = 'committed');
            END IF;
        END IF;
        FOREACH i IN ARRAY v_met LOOP
            IF v_hit[i] IS NULL OR (v_hit[i] LIKE 'review:%' AND v_rule->>'action' = 'block') THEN
                v_hit[i] := (v_rule->>'action') || ':' || (v_rule->>'name');
            END IF;
        END LOOP;
    END LOOP;
    RETURN v_hit;
END
$$;
