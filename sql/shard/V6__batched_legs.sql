-- Batched transfers (wallet bench, issue 5): the coordinator groups concurrent
-- transfers and runs each group as one transaction per shard, instead of one or
-- two per transfer. A cross-shard group is atomic by two-phase commit: every
-- shard but one prepares its transaction, and the last shard's local commit,
-- which inserts the batch's decision row, is the decision for the whole group
-- ("last agent", as in V5). A same-shard group is one local transaction.
--
-- Each shard's work is two statements, so that one refused transfer never sinks
-- its group and nothing is ever undone:
--   1. wallet_batch_check, shard after shard in shard order: claim the payers'
--      Idempotency-Keys, lock every account of the group in user-ID order, and
--      check each leg against the locked rows. Nothing moves yet.
--   2. wallet_batch_apply, on every shard at once: move the money of the
--      transfers that passed every check (the locks taken in step 1 keep the
--      checks true) and record every payer's transfer in its final state.
--      Last, on the deciding shard, wallet_batch_decide inserts the decision
--      row, and that commit decides the group.
-- Locks are taken in one global order, (shard, user ID), so two groups never
-- wait on each other in a cycle. Within a group a payer appears once and never
-- as a payee (the coordinator's batcher ensures it), so a leg's check never
-- depends on another leg of its group.
--
-- Recovery: a prepared group's GID names the group's ID where a transfer's would
-- be, and its deciding shard as home. The decision row is what recovery looks
-- for; without it the group is tombstoned under the same advisory lock the
-- deciding statement takes (see V5).
--
-- The functions live in sql/shard/functions/, applied after the migrations by
-- shard-agent/src/functions.rs; this migration keeps the decision table.

CREATE TABLE batch_decisions (
    batch_id    uuid PRIMARY KEY,
    decided_at  timestamptz NOT NULL DEFAULT now()
);
