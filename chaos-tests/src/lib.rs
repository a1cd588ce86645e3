//! # Layout
//!
//! The harness that proves no money is created, lost or moved twice.
//!
//! - [`checker`]: DESIGN.md's invariants 1-5 over a snapshot of every shard.
//! - [`workload`]: concurrent clients through the real HTTP API, with
//!   Idempotency-Keys and retries, recording every request's outcome.

pub mod checker;
pub mod workload;
