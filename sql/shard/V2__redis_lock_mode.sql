-- Redis-lock mode: legs are separate local transactions under Redis locks.

-- The fencing token of the lock each write ran under (NULL outside Redis mode).
-- Per account, fenced entries appear in increasing token order: a holder whose
-- lock expired can never write after a newer holder.
ALTER TABLE ledger_entries ADD COLUMN fence bigint;

-- A transfer whose debit committed and whose credit is not yet applied. The debit
-- is the commit point in this mode; recovery completes these (forward recovery).
CREATE TABLE pending_credits (
    transfer_id    uuid PRIMARY KEY REFERENCES transfers (transfer_id),
    to_user        uuid NOT NULL,
    to_username    text NOT NULL,
    from_username  text NOT NULL,
    amount         numeric NOT NULL CHECK (amount > 0),
    currency       char(3) NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
