-- Runs once, on shard0's first start (empty data volume), via the postgres
-- image's /docker-entrypoint-initdb.d hook. The catalog lives beside shard 0's
-- data in its own database; `wallet serve` applies the catalog schema at start.
-- To re-run it, remove shard0's volume: `docker compose down -v`.
CREATE DATABASE wallet_catalog;
