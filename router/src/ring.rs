//! Weighted consistent hashing, used to place buckets when a map is built
//! from shard weights.
//!
//! `hashring` 0.3.6 is a sorted `Vec` of points hashed with SipHash-2-4 under
//! all-zero keys (its `DefaultHashBuilder`), so the point of any value depends
//! only on the bytes its `Hash` impl feeds the hasher. It has no virtual
//! nodes, so we add them as [`VNode`]s: one shard of weight `w` gets
//! `w * VNODES_PER_WEIGHT` points, which evens out the arc lengths and makes a
//! new shard take a little from every old shard rather than a lot from one.
//!
//! Both `Hash` impls below are written by hand to feed a fixed little-endian
//! byte string. `derive(Hash)` on integers feeds native-endian bytes (and
//! `usize` lengths for slices), which would give a different ring on a
//! big-endian machine.

use std::hash::{Hash, Hasher};

use hashring::{DefaultHashBuilder, HashRing};

use crate::bucket::BUCKET_COUNT;
use crate::ids::{Bucket, ShardId};
use crate::map::{ShardWeight, VNODES_PER_WEIGHT};

/// One point of a shard on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VNode {
    pub(crate) shard: ShardId,
    pub(crate) idx: u32,
}

/// Hashes exactly `shard.0` as 2 LE bytes, then `idx` as 4 LE bytes.
impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.shard.0.to_le_bytes());
        state.write(&self.idx.to_le_bytes());
    }
}

/// A bucket's position on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BucketKey(pub(crate) Bucket);

/// Hashes exactly the bucket number as 2 LE bytes.
impl Hash for BucketKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0 .0.to_le_bytes());
    }
}

/// Owner of every bucket, indexed by bucket number.
///
/// `shards` must already be validated (non-empty, non-zero weights within
/// bounds, unique ids). Their order does not matter: points are added in
/// shard-id order, so even a hash tie between two points resolves the same
/// way whatever order the caller listed the shards in.
pub(crate) fn place_buckets(shards: &[ShardWeight]) -> Vec<ShardId> {
    let mut sorted: Vec<&ShardWeight> = shards.iter().collect();
    sorted.sort_by_key(|s| s.shard);

    let vnodes: Vec<VNode> = sorted
        .iter()
        .flat_map(|s| {
            (0..s.weight * VNODES_PER_WEIGHT).map(move |idx| VNode {
                shard: s.shard,
                idx,
            })
        })
        .collect();

    // Explicit hasher rather than `HashRing::new()`, to say that the fixed,
    // unseeded SipHash is what we rely on for cross-process stability.
    let mut ring: HashRing<VNode, DefaultHashBuilder> = HashRing::with_hasher(DefaultHashBuilder);
    ring.batch_add(vnodes);

    (0..BUCKET_COUNT)
        .map(|b| {
            ring.get(&BucketKey(Bucket(b)))
                .expect("invariant: ring is non-empty because shards were validated")
                .shard
        })
        .collect()
}
