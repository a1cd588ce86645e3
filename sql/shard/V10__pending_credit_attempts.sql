-- Redis-lock mode: a pending credit that cannot be applied is never silent.
-- Each failed attempt (a fence that refused it, a shard that did not answer) is
-- counted on the row with its reason, so the admin view shows it as in doubt,
-- and recovery works the least recently tried credits first, so credits that
-- keep failing never starve newer ones.
ALTER TABLE pending_credits
    ADD COLUMN attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    ADD COLUMN last_error      text,
    ADD COLUMN last_attempt_at timestamptz;
