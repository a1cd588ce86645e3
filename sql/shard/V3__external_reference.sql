-- Deposits and withdrawals: the payment token the client gave, kept with the
-- claim so that recovery can settle an interrupted one with the provider under
-- the same reference (the transfer ID) instead of guessing its outcome.
ALTER TABLE transfers ADD COLUMN payment_token text;
