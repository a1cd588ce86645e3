-- Ownership: raises WB001 unless this shard may touch every bucket of
-- p_buckets. Every transaction that writes a user's rows calls it first
-- (p_write), and the views that read them (NOT p_write).
--
-- Rules owned here:
--   - A write holds each bucket's shared advisory lock to the end of its
--     transaction (a prepared leg keeps it until COMMIT PREPARED). A move
--     fences a bucket under the same lock, exclusive, so the fence waits for
--     every write in flight and every write after it sees the fence.
--   - The state is read after the locks, by a statement of its own: under
--     READ COMMITTED that statement sees a fence committed while this one
--     waited. Under a snapshot taken earlier it would not, so any other
--     isolation level is refused.
--   - Writes need 'owned'; reads also pass 'fenced' (the rows are still
--     here and frozen). 'moved', 'incoming' and no row at all refuse both.
--   - A shard whose ownership was never recorded (bucket_ownership_init
--     empty) owns every bucket: no coordinator has opened it yet, so no move
--     can have touched it. Its writes take the locks all the same.
CREATE OR REPLACE FUNCTION wallet_own(p_buckets int[], p_write boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    b int;
    v_bad int;
    v_state text;
BEGIN
    -- The locks first, even before ownership is recorded: a leg prepared
    -- then must still hold up the first fence of its bucket.
    IF p_write THEN
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'wallet_own needs READ COMMITTED, not %',
                current_setting('transaction_isolation') USING ERRCODE = 'WB002';
        END IF;
        FOR b IN SELECT DISTINCT x FROM unnest(p_buckets) AS x ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock_shared(1464598530, b);
        END LOOP;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM bucket_ownership_init) THEN
        RETURN;
    END IF;
    -- One index probe per bucket: a plain join's cached generic plan
    -- hashed the whole table on every call.
    SELECT u.b, o.state INTO v_bad, v_state
      FROM unnest(p_buckets) AS u (b)
      LEFT JOIN LATERAL (SELECT ob.state FROM owned_buckets ob
                          WHERE ob.bucket = u.b LIMIT 1) o ON true
     WHERE o.state IS NULL OR o.state IN ('moved', 'incoming')
        OR (p_write AND o.state = 'fenced')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'bucket % is not served here (%)', v_bad, coalesce(v_state, 'not owned')
            USING ERRCODE = 'WB001', DETAIL = v_bad::text, HINT = coalesce(v_state, 'gone');
    END IF;
END
$$;
