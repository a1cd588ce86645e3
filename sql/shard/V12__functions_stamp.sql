-- Which version of the SQL functions (sql/shard/functions/) this shard runs.
-- The shard agent applies the function files after the migrations and stamps
-- them here; every connection it opens compares the stamp with the one it was
-- compiled with, so a coordinator never runs against functions of another
-- version (shard-agent/src/functions.rs).
--
-- version: raised whenever a function file changes; an agent refuses to apply
--   older functions over newer ones, and to run against either.
-- checksum: SHA-256 of the function files this version is made of.
-- live_digest: SHA-256 of the functions as PostgreSQL holds them right after
--   the apply (pg_get_functiondef), so a function replaced by hand is noticed.
CREATE TABLE wallet_functions (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version      integer NOT NULL CHECK (version > 0),
    checksum     text NOT NULL,
    live_digest  text NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
);
