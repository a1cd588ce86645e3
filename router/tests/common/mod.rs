//! Fixtures shared by the integration tests.
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use router::{Epoch, ShardId, ShardMap, ShardWeight, UserId};
use uuid::Uuid;

/// `(shard, weight)` pairs to `ShardWeight`s.
pub fn weights(pairs: &[(u16, u32)]) -> Vec<ShardWeight> {
    pairs
        .iter()
        .map(|&(shard, weight)| ShardWeight {
            shard: ShardId(shard),
            weight,
        })
        .collect()
}

/// The reference cluster: shards 1..=4, equal weight.
pub fn four_shard_map() -> ShardMap {
    ShardMap::from_weights(Epoch(1), &weights(&[(1, 1), (2, 1), (3, 1), (4, 1)]))
        .expect("invariant: four distinct unit-weight shards are valid")
}

/// The reference cluster after adding shard 5 with equal weight.
pub fn five_shard_map() -> ShardMap {
    ShardMap::from_weights(
        Epoch(2),
        &weights(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]),
    )
    .expect("invariant: five distinct unit-weight shards are valid")
}

/// `n` random v4 user ids from `seed`.
///
/// A seeded generator instead of a proptest `Vec` strategy: 100k elements per
/// case would make proptest's value trees the slowest part of the suite.
pub fn random_users(seed: u64, n: usize) -> impl Iterator<Item = UserId> {
    let mut rng = SplitMix64(seed);
    (0..n).map(move |_| {
        let hi = u128::from(rng.next());
        let lo = u128::from(rng.next());
        let bytes = ((hi << 64) | lo).to_be_bytes();
        UserId(uuid::Builder::from_random_bytes(bytes).into_uuid())
    })
}

/// CRC-32 of the table as consecutive little-endian `u16`s: a short,
/// platform-independent fingerprint of a whole map.
pub fn table_checksum(map: &ShardMap) -> u32 {
    let bytes: Vec<u8> = map.table().iter().flat_map(|s| s.0.to_le_bytes()).collect();
    crc32fast::hash(&bytes)
}

/// Any UUID, including ones that are not valid v4/v5 (the router must not care).
pub fn user_from_bits(bits: u128) -> UserId {
    UserId(Uuid::from_u128(bits))
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, and good enough to spread test users.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
