-- Shard schema: one user's account, ledger, sessions, idempotency keys and the
-- transfers they initiated all live on that user's shard (router: user -> bucket -> shard).

CREATE TABLE users (
    user_id        uuid PRIMARY KEY,
    username       text NOT NULL UNIQUE,
    email          text NOT NULL,
    password_hash  text NOT NULL,
    currency       char(3) NOT NULL,
    bucket         integer NOT NULL CHECK (bucket >= 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- One user account per user, plus one clearing account per currency per shard.
-- Deposits and withdrawals move money between a user account and the clearing
-- account, so the sum of every account on every shard is always zero and the sum of
-- user accounts equals deposits minus withdrawals (invariant 1).
CREATE TABLE accounts (
    account_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          uuid UNIQUE REFERENCES users (user_id),
    kind             text NOT NULL CHECK (kind IN ('user', 'clearing')),
    currency         char(3) NOT NULL,
    bucket           integer,
    opening_balance  numeric NOT NULL DEFAULT 0,
    balance          numeric NOT NULL DEFAULT 0,
    -- Redis-lock mode: the highest fencing token that has written this row.
    last_fence       bigint NOT NULL DEFAULT 0,
    -- Invariant 2, enforced by the database as well as by every debit.
    CONSTRAINT no_overdraft CHECK (kind = 'clearing' OR balance >= 0),
    CONSTRAINT user_account_has_user CHECK ((kind = 'user') = (user_id IS NOT NULL))
);
CREATE UNIQUE INDEX one_clearing_account_per_currency ON accounts (currency) WHERE kind = 'clearing';

INSERT INTO accounts (kind, currency)
SELECT 'clearing', c FROM unnest(ARRAY['USD', 'EUR', 'GBP', 'CHF', 'JPY']) AS c;

-- Signed entries: negative takes money out of the account. Each transfer touches an
-- account at most once, which makes every leg idempotent by transfer ID.
CREATE TABLE ledger_entries (
    entry_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id     uuid NOT NULL REFERENCES accounts (account_id),
    transfer_id    uuid NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('transfer_debit', 'transfer_credit', 'deposit', 'withdrawal', 'clearing')),
    amount         numeric NOT NULL CHECK (amount <> 0),
    balance_after  numeric NOT NULL,
    counterparty   text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (transfer_id, account_id)
);
CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, entry_id DESC);

-- The transfers a user of this shard initiated (the home shard's decision record),
-- and deposits/withdrawals. `state` moves preparing -> committed | aborted exactly
-- once, through a compare-and-set that the coordinator and recovery both use.
CREATE TABLE transfers (
    transfer_id    uuid PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('transfer', 'deposit', 'withdrawal')),
    mode           text NOT NULL CHECK (mode IN ('local', '2pc', 'redis', 'external')),
    from_user      uuid,
    from_username  text,
    to_user        uuid,
    to_username    text,
    amount         numeric NOT NULL CHECK (amount > 0),
    currency       char(3) NOT NULL,
    state          text NOT NULL CHECK (state IN ('preparing', 'committed', 'aborted')),
    failure_code   text,
    -- The exact GID of every prepared leg, never rebuilt (PgDog #1175).
    participants   text[] NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    decided_at     timestamptz,
    CONSTRAINT failure_code_iff_aborted CHECK ((state = 'aborted') = (failure_code IS NOT NULL))
);
CREATE INDEX transfers_in_flight ON transfers (created_at) WHERE state = 'preparing';

-- The outcome a key replays is read from the transfer it points to, so the stored
-- answer can never disagree with the decision record.
CREATE TABLE idempotency_keys (
    user_id      uuid NOT NULL,
    idem_key     text NOT NULL CHECK (length(idem_key) BETWEEN 1 AND 255),
    operation    text NOT NULL,
    fingerprint  bytea NOT NULL,
    transfer_id  uuid NOT NULL REFERENCES transfers (transfer_id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idem_key)
);

CREATE TABLE sessions (
    token_hash  bytea PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (user_id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX sessions_by_user ON sessions (user_id);
