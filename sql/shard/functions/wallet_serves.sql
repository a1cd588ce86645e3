-- Whether this shard serves bucket p_bucket (owned, or fenced by a move that
-- has not switched yet): the rows an audit counts as this shard's. The rows
-- of a bucket copied in but not switched, or switched away but not cleaned
-- yet, are another shard's.
CREATE OR REPLACE FUNCTION wallet_serves(p_bucket int) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT NOT EXISTS (SELECT 1 FROM bucket_ownership_init)
        OR EXISTS (SELECT 1 FROM owned_buckets
                    WHERE bucket = p_bucket AND state IN ('owned', 'fenced'))
$$;
