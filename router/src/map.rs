//! The bucket -> shard table.
//!
//! A map is built from weights once (via the ring), then stored as a plain
//! table in the catalog. Routing reads only the table, so later changes can
//! move individual buckets without any hash function being involved, and a
//! map loaded from the catalog answers exactly like the one that was saved.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::bucket::{bucket_of, BUCKET_COUNT};
use crate::error::RouterError;
use crate::ids::{Bucket, Epoch, ShardId, UserId};
use crate::ring::place_buckets;

/// A shard and its relative capacity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardWeight {
    pub shard: ShardId,
    pub weight: u32,
}

/// Ring points per unit of weight.
///
/// A shard's share of the ring varies like `1 / sqrt(points)` (about ±2.2%,
/// one sigma, at 2048). Placing only 4096 buckets adds its own sampling noise
/// (about ±2.7% per shard at four shards) that more points cannot remove, so
/// going higher buys little. Measured over 200 random 4-shard id sets, the
/// worst shard was off its fair share by 4.3% (median) and 7.8% (95th
/// percentile) at 2048, against 7.6% / 16% at 256. Building a 5-shard map
/// is ~10k SipHashes plus a sort, so building maps stays cheap.
pub const VNODES_PER_WEIGHT: u32 = 2048;

/// Largest accepted weight. Weights are relative, so this only bounds the
/// ring size (at most 128k points per shard, about 2 MiB while building) and
/// keeps `weight * VNODES_PER_WEIGHT` far from `u32` overflow.
pub const MAX_WEIGHT: u32 = 64;

/// Which shard owns each bucket, at one epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    epoch: Epoch,
    /// Invariant: `table.len() == BUCKET_COUNT`.
    table: Vec<ShardId>,
}

/// One bucket changing owner between two maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketMove {
    pub bucket: Bucket,
    pub from: ShardId,
    pub to: ShardId,
}

impl ShardMap {
    /// Places each bucket on the `hashring` ring of weighted virtual nodes
    /// (weight `w` => `w * VNODES_PER_WEIGHT` vnodes).
    ///
    /// Consistent hashing means adding a shard moves buckets only onto the
    /// new shard. The result does not depend on the order of `shards`.
    ///
    /// Errors: no shards, zero weight, weight above [`MAX_WEIGHT`], duplicate
    /// shard id.
    pub fn from_weights(epoch: Epoch, shards: &[ShardWeight]) -> Result<ShardMap, RouterError> {
        if shards.is_empty() {
            return Err(RouterError::NoShards);
        }
        let mut seen = BTreeSet::new();
        for s in shards {
            if s.weight == 0 {
                return Err(RouterError::ZeroWeight { shard: s.shard });
            }
            if s.weight > MAX_WEIGHT {
                return Err(RouterError::WeightTooLarge {
                    shard: s.shard,
                    weight: s.weight,
                    max: MAX_WEIGHT,
                });
            }
            if !seen.insert(s.shard) {
                return Err(RouterError::DuplicateShard { shard: s.shard });
            }
        }
        Ok(ShardMap {
            epoch,
            table: place_buckets(shards),
        })
    }

    /// Rebuild from a durable table (as stored in the catalog).
    ///
    /// Errors if `table.len() != BUCKET_COUNT`.
    pub fn from_table(epoch: Epoch, table: Vec<ShardId>) -> Result<ShardMap, RouterError> {
        let expected = usize::from(BUCKET_COUNT);
        if table.len() != expected {
            return Err(RouterError::BadTableLength {
                expected,
                actual: table.len(),
            });
        }
        Ok(ShardMap { epoch, table })
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Owner of each bucket, indexed by bucket number; what the catalog stores.
    pub fn table(&self) -> &[ShardId] {
        &self.table
    }

    /// # Panics
    ///
    /// If `b` is not below [`BUCKET_COUNT`]; buckets from [`bucket_of`],
    /// [`Bucket::new`] or `Bucket::from_str` always are.
    pub fn shard_of_bucket(&self, b: Bucket) -> ShardId {
        match self.table.get(b.index()) {
            Some(&shard) => shard,
            None => panic!(
                "invariant violated: bucket {b} is out of range (bucket count {BUCKET_COUNT})"
            ),
        }
    }

    /// `shard_of_bucket(bucket_of(user))`.
    pub fn shard_of(&self, user: &UserId) -> ShardId {
        self.shard_of_bucket(bucket_of(user))
    }

    /// Shards that own at least one bucket.
    pub fn shards(&self) -> BTreeSet<ShardId> {
        self.table.iter().copied().collect()
    }

    /// The buckets `shard` owns, in bucket order.
    pub fn buckets_of(&self, shard: ShardId) -> Vec<Bucket> {
        Bucket::all()
            .zip(&self.table)
            .filter(|(_, owner)| **owner == shard)
            .map(|(b, _)| b)
            .collect()
    }

    /// Buckets owned by each shard that owns any.
    pub fn bucket_counts(&self) -> BTreeMap<ShardId, usize> {
        let mut counts = BTreeMap::new();
        for &shard in &self.table {
            *counts.entry(shard).or_insert(0) += 1;
        }
        counts
    }

    /// Buckets whose owner differs between `self` and `target`, in bucket
    /// order (for the rebalancing CLI's `plan`).
    pub fn moves_to(&self, target: &ShardMap) -> Vec<BucketMove> {
        Bucket::all()
            .zip(self.table.iter().zip(&target.table))
            .filter(|(_, (from, to))| from != to)
            .map(|(bucket, (&from, &to))| BucketMove { bucket, from, to })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(shard: u16, weight: u32) -> ShardWeight {
        ShardWeight {
            shard: ShardId(shard),
            weight,
        }
    }

    #[test]
    fn a_map_needs_at_least_one_shard() {
        assert_eq!(
            ShardMap::from_weights(Epoch(1), &[]),
            Err(RouterError::NoShards)
        );
    }

    #[test]
    fn a_zero_weight_shard_is_rejected() {
        assert_eq!(
            ShardMap::from_weights(Epoch(1), &[w(1, 1), w(2, 0)]),
            Err(RouterError::ZeroWeight { shard: ShardId(2) })
        );
    }

    #[test]
    fn an_oversized_weight_is_rejected() {
        assert_eq!(
            ShardMap::from_weights(Epoch(1), &[w(1, MAX_WEIGHT + 1)]),
            Err(RouterError::WeightTooLarge {
                shard: ShardId(1),
                weight: MAX_WEIGHT + 1,
                max: MAX_WEIGHT
            })
        );
    }

    #[test]
    fn a_shard_listed_twice_is_rejected() {
        assert_eq!(
            ShardMap::from_weights(Epoch(1), &[w(1, 1), w(2, 1), w(1, 3)]),
            Err(RouterError::DuplicateShard { shard: ShardId(1) })
        );
    }

    #[test]
    fn a_table_of_the_wrong_length_is_rejected() {
        for len in [
            0,
            1,
            usize::from(BUCKET_COUNT) - 1,
            usize::from(BUCKET_COUNT) + 1,
        ] {
            assert_eq!(
                ShardMap::from_table(Epoch(1), vec![ShardId(1); len]),
                Err(RouterError::BadTableLength {
                    expected: usize::from(BUCKET_COUNT),
                    actual: len
                })
            );
        }
    }

    #[test]
    fn a_stored_table_rebuilds_the_same_map() {
        let built =
            ShardMap::from_weights(Epoch(9), &[w(1, 1), w(2, 2), w(3, 1)]).expect("valid weights");
        let loaded =
            ShardMap::from_table(Epoch(9), built.table().to_vec()).expect("table has every bucket");
        assert_eq!(loaded, built);
        assert_eq!(loaded.epoch(), Epoch(9));
        assert_eq!(loaded.shards(), built.shards());
    }

    #[test]
    fn a_single_shard_owns_every_bucket() {
        let map = ShardMap::from_weights(Epoch(1), &[w(7, 1)]).expect("valid weights");
        assert_eq!(
            map.bucket_counts(),
            BTreeMap::from([(ShardId(7), usize::from(BUCKET_COUNT))])
        );
    }

    #[test]
    fn moves_list_only_changed_buckets_in_bucket_order() {
        let mut table = vec![ShardId(1); usize::from(BUCKET_COUNT)];
        let from = ShardMap::from_table(Epoch(1), table.clone()).expect("full table");
        table[5] = ShardId(2);
        table[3] = ShardId(3);
        let to = ShardMap::from_table(Epoch(2), table).expect("full table");
        assert_eq!(
            from.moves_to(&to),
            vec![
                BucketMove {
                    bucket: Bucket(3),
                    from: ShardId(1),
                    to: ShardId(3)
                },
                BucketMove {
                    bucket: Bucket(5),
                    from: ShardId(1),
                    to: ShardId(2)
                },
            ]
        );
        assert!(to.moves_to(&to).is_empty());
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn an_out_of_range_bucket_is_a_caller_bug() {
        let map = ShardMap::from_weights(Epoch(1), &[w(1, 1)]).expect("valid weights");
        map.shard_of_bucket(Bucket(BUCKET_COUNT));
    }
}
