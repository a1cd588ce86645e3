-- Shards get a name (what operators type), and buckets move by a journal.

ALTER TABLE shards ADD COLUMN name text;
UPDATE shards SET name = 'shard' || shard_id;
ALTER TABLE shards ALTER COLUMN name SET NOT NULL;
ALTER TABLE shards ADD CONSTRAINT shard_names_are_unique UNIQUE (name);

-- One row per bucket move: the journal a resumed rebalance continues from, and
-- afterwards the move's audit record. step moves planned -> fenced -> copied
-- -> verified -> switched -> cleaned; a move that cannot finish its cutover in
-- time goes back to planned (attempts counts the tries), and one given up is
-- rolled_back. Every step is safe to repeat.
CREATE TABLE bucket_moves (
    move_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    bucket         integer NOT NULL CHECK (bucket >= 0),
    from_shard     integer NOT NULL REFERENCES shards (shard_id),
    to_shard       integer NOT NULL REFERENCES shards (shard_id),
    step           text NOT NULL CHECK (step IN ('planned', 'fenced', 'copied', 'verified',
                                                 'switched', 'cleaned', 'rolled_back')),
    epoch_before   bigint,
    epoch_after    bigint,
    attempts       integer NOT NULL DEFAULT 0,
    -- Rows per table and the money, as the verifier counted them on both sides.
    rows           jsonb,
    balance_sum    numeric,
    held_sum       numeric,
    -- When the source's fence committed: the start of the bucket's pause.
    fenced_at      timestamptz,
    pause_ms       integer,
    verifier       text,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    CHECK (from_shard <> to_shard)
);
CREATE UNIQUE INDEX one_open_move_per_bucket ON bucket_moves (bucket)
    WHERE step NOT IN ('cleaned', 'rolled_back');
