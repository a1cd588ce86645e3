-- The one rule for an Idempotency-Key that already exists, for every money
-- movement whatever its path: a group's check calls it for each payer whose
-- key it could not claim, and a claim outside a group (a deposit, a
-- withdrawal, a Redis-mode transfer) calls it the same way.
--
-- Returns the answer the request gets, as a verdict (see wallet_batch_check):
--   - 'key_reused:' when the key was used for another operation or body;
--   - 'in_progress:<transfer id>' when its transfer is still being decided;
--   - 'replay:<transfer id>' when its transfer reached a final outcome;
--   - NULL for a fresh attempt: the transfer was aborted by a fault (the
--     codes FailureCode::is_retryable lists; a test holds the two equal), so
--     nothing moved and the key is re-pointed to p_fresh, whose record the
--     caller writes in this transaction;
--   - 'key_busy:' when the key's row is not there to read (its claimant rolled
--     back after the caller's insert met it): nothing is written, and the
--     request may be retried at once.
--
-- Rules owned here:
--   - The key's row is locked, so of two retries of one key only one turns a
--     fault abort into a fresh attempt; the other waits and replays it (or
--     finds it in progress).
--   - The answer is built from the transfer the key points at, so a stored
--     answer can never disagree with the decision record.
CREATE OR REPLACE FUNCTION wallet_key_answer(
    p_user uuid, p_key text, p_operation text, p_fingerprint bytea, p_fresh uuid
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_operation text;
    v_fingerprint bytea;
    v_transfer uuid;
    v_state text;
    v_code text;
BEGIN
    SELECT operation, fingerprint, transfer_id INTO v_operation, v_fingerprint, v_transfer
      FROM idempotency_keys WHERE user_id = p_user AND idem_key = p_key FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'key_busy:';
    END IF;
    IF v_operation <> p_operation OR v_fingerprint <> p_fingerprint THEN
        RETURN 'key_reused:';
    END IF;
    SELECT state, failure_code INTO v_state, v_code FROM transfers WHERE transfer_id = v_transfer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key points at missing transfer %', v_transfer
              USING ERRCODE = 'WL011';
    END IF;
    IF v_state = 'preparing' THEN
        RETURN 'in_progress:' || v_transfer;
    END IF;
    IF v_state = 'aborted'
       AND v_code IN ('shard_unavailable', 'shard_busy', 'coordinator_timeout', 'lock_unavailable') THEN
        UPDATE idempotency_keys SET transfer_id = p_fresh WHERE user_id = p_user AND idem_key = p_key;
        RETURN NULL;
    END IF;
    RETURN 'replay:' || v_transfer;
END
$$;
