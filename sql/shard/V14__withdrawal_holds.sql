-- A withdrawal asks its payment provider without holding any row lock, so the
-- funds it checked are held instead: `held` is money on the account that no
-- debit may spend (every debit checks balance - held), and `funds_held` marks
-- the withdrawal whose amount is in it. Settling releases the hold and, if the
-- provider paid out, debits the balance. Holds of the wallet-rules work (fraud
-- review, disputes) will live in the same column.
ALTER TABLE accounts ADD COLUMN held numeric NOT NULL DEFAULT 0 CHECK (held >= 0);
ALTER TABLE transfers ADD COLUMN funds_held boolean NOT NULL DEFAULT false;
