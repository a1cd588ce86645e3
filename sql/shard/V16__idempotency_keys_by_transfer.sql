-- Cleaning a moved bucket deletes its transfers, and each deleted transfer
-- makes PostgreSQL check that no idempotency key still points at it (the
-- foreign key idempotency_keys.transfer_id). Without an index that check
-- reads the whole table, once per transfer: the source shard of a move spent
-- most of its CPU there. With it, each check is one index probe.
CREATE INDEX idempotency_keys_by_transfer ON idempotency_keys (transfer_id);
