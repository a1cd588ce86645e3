//! Errors for building maps and parsing identifiers.
//!
//! `PartialEq` so callers and tests can match exact failures.

use crate::ids::ShardId;

/// Everything the router can reject. The router does no I/O, so every error
/// is a bad input: a malformed map description or an unparsable identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouterError {
    /// A map must place every bucket somewhere.
    #[error("a shard map needs at least one shard")]
    NoShards,
    /// A zero-weight shard would own no virtual nodes; drain it by removing
    /// it from the weights instead.
    #[error("shard {shard} has weight 0")]
    ZeroWeight { shard: ShardId },
    /// Weights are relative; an enormous one only costs memory and time.
    #[error("shard {shard} has weight {weight}, above the maximum {max}")]
    WeightTooLarge {
        shard: ShardId,
        weight: u32,
        max: u32,
    },
    /// Two entries for one shard are ambiguous (sum them? last wins?).
    #[error("shard {shard} is listed more than once")]
    DuplicateShard { shard: ShardId },
    /// A stored table must cover exactly every bucket.
    #[error("bucket table has {actual} entries, expected {expected}")]
    BadTableLength { expected: usize, actual: usize },
    /// A bucket number at or above `BUCKET_COUNT`.
    #[error("bucket {bucket} is out of range (bucket count {count})")]
    BucketOutOfRange { bucket: u32, count: u16 },
    /// Not a UUID.
    #[error("invalid user id {input:?}: {source}")]
    InvalidUserId {
        input: String,
        #[source]
        source: uuid::Error,
    },
    /// Not a number, or does not fit the id's width.
    #[error("invalid {kind} {input:?}: {source}")]
    InvalidNumber {
        kind: &'static str,
        input: String,
        #[source]
        source: std::num::ParseIntError,
    },
}
