//! # Layout
//!
//! The shard agent owns every statement sent to a shard: nothing else in the
//! workspace speaks SQL to one (the catalog client lives here too).
//!
//! - [`agent`]: one shard's pool, its limits, and a connection guard that never
//!   returns a half-done transaction to the pool.
//! - [`idempotency`]: step 1 of every money movement (claim the key, record the transfer).
//! - [`transfer`]: a transfer order and the answer its client gets.
//! - [`two_pc`]: prepare, decide, finish and recover, one file per step.
//! - [`batch`]: many concurrent transfers in one transaction per shard.
//! - [`redis_legs`]: Redis-lock mode's fenced, idempotent legs and pending credits.
//! - [`external`]: deposits and withdrawals through the shard's clearing account.
//! - [`events`]: the outbox the relay publishes and the notification feed reads.
//! - [`users`]: users, sessions, account and transfer views; [`bulk`]: loading
//!   many users at once (for `wallet bench`).
//! - [`catalog`], [`migrate`], [`functions`]: the bucket map with its epoch;
//!   schema migrations; the shard's SQL functions and the check that a shard
//!   runs this build's.
//! - [`tls`]: every connection is made here, plain or TLS as the DSN's
//!   `sslmode` says; [`dsn`]: redacting DSNs for logs, libpq's TLS parameters;
//!   [`secret`]: `env:`/`file:` references for DSNs and other secrets.
//! - [`check`]: the read-only queries behind the invariant checker (the checker
//!   itself is the `checker` crate: tooling, not production).
//! - [`money`], [`gid`], [`records`]: the typed values all of the above exchange.

pub mod agent;
pub mod batch;
pub mod bulk;
pub mod catalog;
pub mod check;
pub mod disputes;
pub mod dsn;
pub mod error;
pub mod events;
pub mod external;
pub mod functions;
pub mod gid;
pub mod holdings;
pub mod idempotency;
pub mod migrate;
pub mod money;
pub mod moves;
pub mod ownership;
pub mod policy;
pub mod records;
pub mod redis_legs;
pub mod rules;
pub mod secret;
pub mod tls;
pub mod transfer;
pub mod two_pc;
pub mod users;

pub use agent::{AgentConfig, ShardAgent};
pub use error::{ShardError, ShardResult};
pub use gid::Gid;
pub use money::{Amount, Currency};
pub use records::{FailureCode, Mode, TransferId, TransferKind, TransferRecord, TransferState};
