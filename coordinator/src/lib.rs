//! # Layout
//!
//! The coordinator serves the wallet API and moves money between shards.
//!
//! - [`service`]: the wallet's operations without HTTP ([`service::Coordinator`]).
//! - [`batch`]: the one transfer protocol: groups, with a named failpoint per
//!   step; a cross-shard group runs by two-phase commit or, in Redis-lock
//!   mode (chosen per deployment by `lock_mode`), under [`redis_lock`]'s locks
//!   and fencing tokens with forward recovery.
//! - [`recovery`]: the loop that resolves in-doubt transactions from their decision.
//! - [`cluster`]: the bucket map and one shard agent per shard, reloaded by epoch.
//! - [`api`]: axum routes, problem+json errors, OpenAPI.
//! - [`auth`], [`inputs`], [`payments`]: passwords and tokens, validating newtypes,
//!   the payment provider (with its sandbox).
//! - [`config`], [`serve`]: deployment configuration; serving the API on it;
//!   [`secrets`]: `env:`/`file:` references in it, and values that never print.
//!
//! The `wallet` binary is the `wallet` crate; `wallet dev`, `wallet bench` and
//! the test kit are tooling crates of their own, which this one never depends
//! on (except tests, as dev-dependencies).

/// Whether this build carries the failpoints and the deliberately broken variants
/// (feature `failpoints`). The chaos harness refuses to run without them; the
/// release `wallet` is checked in CI to be built without them.
pub const FAILPOINTS_COMPILED: bool = cfg!(feature = "failpoints");

pub mod api;
pub mod auth;
pub mod batch;
pub mod cluster;
pub mod config;
pub mod error;
pub mod events;
pub mod inputs;
pub mod metrics;
pub mod payments;
pub mod recovery;
pub mod redis_lock;
pub mod secrets;
pub mod serve;
pub mod service;
pub mod suspects;
