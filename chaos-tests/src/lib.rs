//! # Layout
//!
//! The harness that proves no money is created, lost or moved twice.
//!
//! - [`checker`]: the invariants of ARCHITECTURE.md over a snapshot of every shard
//!   (the `checker` crate, shared with `wallet bench`).
//! - [`workload`]: concurrent clients through the real HTTP API, with
//!   Idempotency-Keys and retries, recording every request's outcome.
//! - [`events`]: the consumer that reads the broker's stream after every run
//!   and checks it against the outboxes and the clients' history.
//! - [`cluster`]: servers, a fault [`proxy`] per shard, the coordinator process.
//! - [`scenario`], [`run`], [`report`]: what to inject, one seeded run, its report.

pub mod checker;
pub mod cluster;
pub mod events;
pub mod proxy;
pub mod report;
pub mod run;
pub mod scenario;
pub mod workload;
