//! # Layout
//!
//! Routing is a pure, two-step function with no I/O:
//! `UserId` --[`bucket_of`]--> [`Bucket`] --[`ShardMap`]--> [`ShardId`].
//!
//! - [`ids`] holds the identifier newtypes. A user's id is derived from the
//!   normalized username, so any coordinator can route a recipient from the
//!   username alone.
//! - [`bucket`] is the fixed user -> bucket hash. It never changes, so a user
//!   never changes bucket; only buckets move between shards.
//! - `ring` is the weighted consistent-hash ring (virtual nodes on top of
//!   `hashring`) used to place buckets when a map is first built from weights.
//! - [`map`] holds [`ShardMap`], the durable bucket -> shard table plus the move
//!   plan between two maps.
//! - [`error`] holds [`RouterError`].
//!
//! Every hash here is specified down to the byte string hashed, so the same
//! map gives the same answer in every process, on every platform.

pub mod bucket;
pub mod error;
pub mod ids;
pub mod map;
mod ring;

pub use bucket::{bucket_of, BUCKET_COUNT};
pub use error::RouterError;
pub use ids::{Bucket, Epoch, ShardId, UserId, USER_ID_NAMESPACE};
pub use map::{BucketMove, ShardMap, ShardWeight, MAX_WEIGHT, VNODES_PER_WEIGHT};
