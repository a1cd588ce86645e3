-- Which buckets this shard owns, kept by the shard itself so that a write is
-- checked inside its own transaction (wallet_own), whatever map the caller
-- holds. A bucket's row moves owned -> fenced -> moved (then is deleted) on
-- the shard a move takes it from, and incoming -> owned on the shard it goes
-- to; move_id names the catalog's move that set a fenced, moved or incoming
-- state, so a resumed or rolled back move touches only its own rows.
CREATE TABLE owned_buckets (
    bucket   integer PRIMARY KEY CHECK (bucket >= 0),
    state    text NOT NULL CHECK (state IN ('owned', 'fenced', 'moved', 'incoming')),
    epoch    bigint NOT NULL CHECK (epoch > 0),
    move_id  bigint,
    CONSTRAINT move_states_name_their_move CHECK ((state = 'owned') = (move_id IS NULL))
);

-- Present once the shard's ownership was recorded from the catalog. Before
-- that (a shard no coordinator has opened yet) the shard owns every bucket,
-- which is what a single shard or a freshly provisioned one used alone needs.
CREATE TABLE bucket_ownership_init (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch      bigint NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);

-- A move reads and deletes a bucket's rows by these.
CREATE INDEX users_by_bucket ON users (bucket);
CREATE INDEX accounts_by_bucket ON accounts (bucket) WHERE kind = 'user';
CREATE INDEX transfers_by_home ON transfers ((coalesce(from_user, to_user)));
