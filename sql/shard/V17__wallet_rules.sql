-- The wallet's rules (daily limits, fraud rules, refunds), enforced by the
-- group's check in the transaction that moves the money.

-- Daily outgoing limits live on the account row every debit already locks, so
-- checking and consuming a limit costs no other row and no other lock, and
-- moves with the bucket like the balance. daily_limit is an admin's override
-- (NULL: the configured default for the currency, if any). used_today is what
-- committed transfers took out on the UTC day used_day; a row whose used_day
-- is not today has used nothing today.
ALTER TABLE accounts
    ADD COLUMN daily_limit numeric CHECK (daily_limit >= 0),
    ADD COLUMN used_day date,
    ADD COLUMN used_today numeric NOT NULL DEFAULT 0 CHECK (used_today >= 0);

-- Refunds are transfers from the original's payee back to its payer, recorded
-- on the refund's payer shard (the original payee's) with the transfer they
-- refund; their sum per original is checked under the refunding payee's
-- account lock, so concurrent refunds queue on that row.
ALTER TABLE transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check
    CHECK (kind IN ('transfer', 'deposit', 'withdrawal', 'refund'));
ALTER TABLE transfers
    ADD COLUMN refund_of uuid,
    ADD COLUMN reason text CHECK (length(reason) <= 500),
    -- What a refusal's client is told besides its code: the rule that blocked
    -- it, or what was left of a daily limit.
    ADD COLUMN failure_detail text,
    ADD CONSTRAINT refund_names_its_original CHECK ((kind = 'refund') = (refund_of IS NOT NULL));
CREATE INDEX transfers_refunds ON transfers (refund_of) WHERE refund_of IS NOT NULL;

-- Fraud rules read a payer's recent transfers (velocity) and whether they paid
-- a recipient before (new recipient).
CREATE INDEX transfers_by_payer ON transfers (from_user, to_user, created_at)
    WHERE kind = 'transfer';

ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('transfer_debit', 'transfer_credit', 'deposit', 'withdrawal', 'clearing',
                    'refund_debit', 'refund_credit'));

-- A Redis-mode refund's credit is posted as a refund on the payee's shard,
-- by the coordinator or by recovery.
ALTER TABLE pending_credits ADD COLUMN refund_of uuid;
