-- Events: the transactional outbox. wallet_post writes one event for every
-- ledger entry on a user's account, in the transaction that writes the entry,
-- so a committed movement always has its event and an aborted one never does.
-- `events` is what happened (the notification feed reads it by user and
-- sequence number, and it is never updated); `event_outbox` lists the events
-- not yet published, one narrow row each, which a relay (in every
-- coordinator, one at a time per shard by the lease below) deletes once the
-- broker acknowledged the event. Publishing so costs a delete of a narrow
-- row, not an update of the event and all its indexes.
--
-- event_id is the entry's own identity, md5(transfer_id || account_id) as a
-- uuid (an entry is unique by that pair), so the checker can tell each entry's
-- event apart without a column on the ledger.
--
-- seq counts a user's events from 1 with no gaps: the account row's event_seq
-- is raised in the update that moves the balance, under the row lock every
-- movement of the account takes, so an aborted movement gives its numbers
-- back with its rollback.
--
-- outbox_no orders the outbox for the relay. It is drawn when the row is
-- inserted, under that same row lock, so one user's events have it in seq
-- order. It is identity, so a bucket move's copy draws new ones on the
-- target, in the source's order.
ALTER TABLE accounts ADD COLUMN event_seq bigint NOT NULL DEFAULT 0;

CREATE TABLE events (
    event_id       uuid PRIMARY KEY,
    user_id        uuid NOT NULL,
    seq            bigint NOT NULL CHECK (seq > 0),
    type           text NOT NULL,
    -- The transfer the event is about (for a hold or a release, the held or
    -- disputed transfer, not the entry's own ID).
    transfer_id    uuid NOT NULL,
    amount         numeric NOT NULL,
    currency       char(3) NOT NULL,
    balance_after  numeric NOT NULL,
    counterparty   text,
    -- The insert's own time (not the transaction's start), taken under the
    -- account's row lock: one user's events have it in seq order, so
    -- pruning by age never leaves a hole in a user's numbers.
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (user_id, seq)
);
-- Pruning reads events by age; rows arrive in about that order, so a block
-- range index serves it and costs next to nothing to keep.
CREATE INDEX events_by_age ON events USING brin (created_at);

CREATE TABLE event_outbox (
    outbox_no  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   uuid NOT NULL,
    -- The event's user and the user's bucket, so a bucket's rows can be
    -- told apart (moves, the relay's ownership filter) without reading the
    -- event or the user.
    user_id    uuid NOT NULL,
    bucket     integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The history before this migration: each existing entry on a user's
-- account gets its event, numbered in entry order, and none goes into the
-- outbox (it happened before there was a broker to tell).
INSERT INTO events (event_id, user_id, seq, type, transfer_id, amount, currency, balance_after,
                    counterparty, created_at)
SELECT md5(e.transfer_id::text || e.account_id::text)::uuid, a.user_id,
       row_number() OVER (PARTITION BY e.account_id ORDER BY e.entry_id),
       e.kind, e.transfer_id, e.amount, a.currency, e.balance_after, e.counterparty,
       e.created_at
  FROM ledger_entries e JOIN accounts a USING (account_id)
 WHERE a.kind = 'user'
 ORDER BY e.account_id, e.entry_id;
UPDATE accounts a SET event_seq = n.count
  FROM (SELECT user_id, count(*) FROM events GROUP BY user_id) n
 WHERE a.user_id = n.user_id;

-- The relay lease of this shard's outbox: one row. A relay publishes only
-- while it holds the lease, and deletes outbox rows only under it.
CREATE TABLE event_relay_lease (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    holder       text NOT NULL,
    expires_at   timestamptz NOT NULL
);
INSERT INTO event_relay_lease (holder, expires_at) VALUES ('', '-infinity');

-- The posting function takes two more arrays (what each entry is about, and
-- its event type); the old signature would stay behind as an overload.
DROP FUNCTION IF EXISTS wallet_post(uuid[], uuid[], text[], numeric[], text[], bigint);
