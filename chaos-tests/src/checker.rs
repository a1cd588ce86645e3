//! The invariant checker lives in `shard_agent::invariants`, so that `wallet bench`
//! runs the same checks; re-exported here for the harness and its tests.

pub use shard_agent::invariants::*;
