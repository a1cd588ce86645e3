-- Disputes: a payer contests a transfer, and its amount is held on the
-- payee's account until an admin resolves it. The dispute lives on the
-- payee's shard, with the hold, so opening and rejecting it are one
-- transaction there; its ID carries the payee's bucket, so either party's
-- request routes to it.
CREATE TABLE disputes (
    dispute_id      uuid PRIMARY KEY,
    transfer_id     uuid NOT NULL,
    payer_user      uuid NOT NULL,
    payer_username  text NOT NULL,
    payee_user      uuid NOT NULL REFERENCES users (user_id),
    payee_username  text NOT NULL,
    amount          numeric NOT NULL CHECK (amount > 0),
    currency        char(3) NOT NULL,
    reason          text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    state           text NOT NULL CHECK (state IN ('open', 'refunded', 'rejected')),
    -- The ledger entry that released the hold (its transfer ID), and for a
    -- refund the transfer that gave the money back.
    release_id      uuid,
    refund_id       uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    CONSTRAINT resolved_iff_closed CHECK ((state = 'open') = (resolved_at IS NULL)),
    CONSTRAINT released_iff_closed CHECK ((state = 'open') = (release_id IS NULL)),
    CONSTRAINT refund_iff_refunded CHECK ((state = 'refunded') = (refund_id IS NOT NULL))
);
CREATE UNIQUE INDEX one_open_dispute_per_transfer ON disputes (transfer_id) WHERE state = 'open';
CREATE INDEX disputes_by_payee ON disputes (payee_user);

-- A hold and its release are ledger entries that leave the balance alone
-- (balance_after is the balance then): the hold's amount is negative, the
-- release's positive, and together an account's hold entries are minus the
-- money its open disputes hold. A dispute refund moves the money itself.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('transfer_debit', 'transfer_credit', 'deposit', 'withdrawal', 'clearing',
                    'refund_debit', 'refund_credit', 'hold', 'release',
                    'dispute_refund_debit', 'dispute_refund_credit'));

ALTER TABLE transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check
    CHECK (kind IN ('transfer', 'deposit', 'withdrawal', 'refund', 'dispute_refund'));
ALTER TABLE transfers DROP CONSTRAINT refund_names_its_original;
ALTER TABLE transfers
    ADD COLUMN dispute_id uuid,
    ADD CONSTRAINT refund_names_its_original
        CHECK ((kind IN ('refund', 'dispute_refund')) = (refund_of IS NOT NULL)),
    ADD CONSTRAINT dispute_refund_names_its_dispute
        CHECK ((kind = 'dispute_refund') = (dispute_id IS NOT NULL));

ALTER TABLE pending_credits ADD COLUMN dispute_id uuid;
