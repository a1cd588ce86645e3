-- A cross-shard transfer in three transactions instead of six (wallet bench,
-- issue 5; the "last-agent" optimization): the payer's leg is not prepared
-- but committed on the home shard in the same local transaction as the key and
-- the transfer record, which is the decision. Only the payee's leg is prepared.
--
-- The home transaction may commit after the payee's leg was prepared, so a
-- prepared leg whose home shard has no record yet is normal. Recovery resolves
-- it with a compare-and-set that cannot race the home transaction: both take the
-- transfer's advisory lock (the two-key space, class 0x574c0001) for their whole
-- transaction, and recovery, finding no record, writes a tombstone that the home
-- transaction checks under the same lock. Exactly one of them wins.
--
-- The functions this migration created (wallet_home_leg, wallet_tombstone) live
-- in sql/shard/functions/, applied after the migrations by
-- shard-agent/src/functions.rs; this migration keeps the tables they use.

-- Payer first, the key is claimed when the home transaction opens and the record
-- it points to is inserted just before COMMIT: check the reference at commit.
ALTER TABLE idempotency_keys
    ALTER CONSTRAINT idempotency_keys_transfer_id_fkey DEFERRABLE INITIALLY DEFERRED;

CREATE TABLE transfer_tombstones (
    transfer_id uuid PRIMARY KEY,
    aborted_at  timestamptz NOT NULL DEFAULT now()
);
