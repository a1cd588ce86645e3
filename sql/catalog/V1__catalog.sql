-- The catalog: which shards exist and which shard owns each bucket, versioned by an
-- epoch so every coordinator can tell its map is stale and reload it.

CREATE TABLE shards (
    shard_id    integer PRIMARY KEY CHECK (shard_id >= 0 AND shard_id < 65536),
    dsn         text NOT NULL,
    weight      integer NOT NULL CHECK (weight > 0),
    state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'removed')),
    added_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE catalog_epoch (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch       bigint NOT NULL CHECK (epoch > 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bucket_map (
    bucket      integer PRIMARY KEY CHECK (bucket >= 0),
    shard_id    integer NOT NULL REFERENCES shards (shard_id),
    -- The epoch at which this bucket last changed owner.
    epoch       bigint NOT NULL
);
