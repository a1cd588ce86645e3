-- The one order of business refusals, for every transfer whatever its path:
-- recipient_not_found, currency_mismatch, transfer_not_found (a refund of no
-- transfer credited to its payer), dispute_not_open (a dispute's refund of
-- a dispute resolved meanwhile), not_held (a release of a transfer no longer
-- held), refund_exceeds_original, transfer_blocked (a fraud rule),
-- limit_exceeded, insufficient_funds, then held (a review rule: not a
-- refusal, but it must give way to every refusal). A
-- transfer that fails several checks is answered with the first in this order,
-- whichever leg, shard or group size found it; the coordinator merges the
-- verdicts of different shards by the same order (`FailureCode::precedence`,
-- and a test holds the two equal). The recipient comes first so that a payer
-- learns nothing about a balance while paying nobody, and the rules come
-- before the balance for the same reason.
--
-- Returns whichever of the two refusals (either may be NULL) comes first.
CREATE OR REPLACE FUNCTION wallet_first_failure(p_a text, p_b text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_a IS NULL THEN p_b
        WHEN p_b IS NULL THEN p_a
        WHEN array_position(ARRAY['recipient_not_found', 'currency_mismatch', 'transfer_not_found',
                                   'dispute_not_open', 'not_held', 'refund_exceeds_original',
                                   'transfer_blocked', 'limit_exceeded', 'insufficient_funds',
                                   'held'], p_b)
             < coalesce(array_position(ARRAY['recipient_not_found', 'currency_mismatch', 'transfer_not_found',
                                   'dispute_not_open', 'not_held', 'refund_exceeds_original',
                                   'transfer_blocked', 'limit_exceeded', 'insufficient_funds',
                                   'held'], p_a), 11)
            THEN p_b
        ELSE p_a
    END
$$;
