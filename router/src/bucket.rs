//! The fixed user -> bucket hash.
//!
//! This function is part of the storage format: every row is filed under the
//! bucket computed here, so it must never change. It is therefore a plain,
//! fully specified checksum rather than anything with a seed or a
//! platform-dependent `Hash` impl.

use crate::ids::{Bucket, UserId};

/// Number of buckets. Fixed forever: changing it re-buckets every user.
///
/// 4096 is many times any plausible shard count, so buckets are a fine enough
/// grain to balance shards, while the whole table (8 KiB) stays cheap to store
/// and ship with every map.
pub const BUCKET_COUNT: u16 = 4096;

/// CRC-32 (IEEE, as computed by `crc32fast`) of the 16 raw bytes of the UUID,
/// in the order `Uuid::as_bytes` gives them (RFC 4122 network order),
/// modulo [`BUCKET_COUNT`].
///
/// CRC-32 is chosen because it is standard and available everywhere (including
/// in PostgreSQL-side tooling), not for cryptographic strength: user ids are
/// UUIDv5/v4, already uniformly distributed.
pub fn bucket_of(user: &UserId) -> Bucket {
    let crc = crc32fast::hash(user.as_uuid().as_bytes());
    let n = crc % u32::from(BUCKET_COUNT);
    Bucket(u16::try_from(n).expect("invariant: value modulo BUCKET_COUNT fits u16"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    // Expected values computed independently with Python's `zlib.crc32`, so
    // these pin the documented hash, not just whatever crc32fast does.
    #[test]
    fn the_nil_user_lands_in_the_bucket_python_zlib_predicts() {
        // zlib.crc32(bytes(16)) == 3971697493; 3971697493 % 4096 == 2901.
        assert_eq!(crc32fast::hash(&[0u8; 16]), 3_971_697_493);
        assert_eq!(bucket_of(&UserId(Uuid::nil())), Bucket(2901));
    }

    #[test]
    fn bytes_are_hashed_in_rfc4122_order() {
        // zlib.crc32(bytes.fromhex("00112233445566778899aabbccddeeff"))
        // == 0x8407759b; 0x8407759b % 4096 == 1435.
        let user = UserId(Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff));
        assert_eq!(bucket_of(&user), Bucket(1435));
    }

    #[test]
    fn username_derived_users_land_in_the_buckets_python_predicts() {
        assert_eq!(bucket_of(&UserId::for_username("alice")), Bucket(739));
        assert_eq!(bucket_of(&UserId::for_username("bob")), Bucket(2580));
    }
}
