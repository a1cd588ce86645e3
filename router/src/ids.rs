//! Identifier newtypes.
//!
//! Each is a distinct type so a shard number can never be passed where a
//! bucket number is expected. All serialize as their bare inner value
//! (`serde(transparent)`), so they are stored and sent exactly like the
//! underlying UUID or integer.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bucket::BUCKET_COUNT;
use crate::error::RouterError;

/// Namespace for [`UserId::for_username`].
///
/// Part of the on-disk format: changing it would give every user a new id
/// (and so, in general, a new bucket and shard). Never change it.
pub const USER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x0ce3_c148_92c3_4894_8537_3fbb_9dab_357d);

/// A user's identity, and the only input to routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(pub Uuid);

impl UserId {
    /// Deterministic: UUIDv5 in [`USER_ID_NAMESPACE`] of the already-normalized
    /// username.
    ///
    /// Lets any coordinator find a recipient's shard from the username alone,
    /// without a directory lookup or a scatter to every shard. Normalization
    /// (case folding, trimming, ...) is the caller's job: this hashes exactly
    /// the bytes it is given, so two spellings of one name must be normalized
    /// to one string first.
    pub fn for_username(normalized_username: &str) -> UserId {
        UserId(Uuid::new_v5(
            &USER_ID_NAMESPACE,
            normalized_username.as_bytes(),
        ))
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

/// Hyphenated lowercase UUID, the form `FromStr` and Postgres both accept.
impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// Accepts any form `uuid` parses (hyphenated, simple, braced, URN).
impl FromStr for UserId {
    type Err = RouterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(UserId)
            .map_err(|source| RouterError::InvalidUserId {
                input: s.to_owned(),
                source,
            })
    }
}

/// A PostgreSQL shard. Stable for the life of the shard; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShardId(pub u16);

/// The bare number, so it reads well in logs and round-trips through `FromStr`.
impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for ShardId {
    type Err = RouterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<u16>()
            .map(ShardId)
            .map_err(|source| RouterError::InvalidNumber {
                kind: "shard id",
                input: s.to_owned(),
                source,
            })
    }
}

/// The unit of data movement: users never change bucket, buckets change shard.
///
/// Valid values are `0..BUCKET_COUNT`. The field is public for cheap
/// construction from trusted sources (e.g. [`crate::bucket_of`]); use
/// [`Bucket::new`] or `FromStr` for untrusted input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bucket(pub u16);

impl Bucket {
    /// Range-checked constructor for input that did not come from `bucket_of`.
    pub fn new(n: u16) -> Result<Bucket, RouterError> {
        if n < BUCKET_COUNT {
            Ok(Bucket(n))
        } else {
            Err(RouterError::BucketOutOfRange {
                bucket: u32::from(n),
                count: BUCKET_COUNT,
            })
        }
    }

    /// Position in a bucket table.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// Every bucket, in order.
    pub fn all() -> impl Iterator<Item = Bucket> {
        (0..BUCKET_COUNT).map(Bucket)
    }
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Parses and range-checks, for operator input to the rebalancing CLI.
impl FromStr for Bucket {
    type Err = RouterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n = s
            .parse::<u16>()
            .map_err(|source| RouterError::InvalidNumber {
                kind: "bucket",
                input: s.to_owned(),
                source,
            })?;
        Bucket::new(n)
    }
}

/// Version of a shard map. Bumped on every change, so a coordinator holding
/// an older map can tell it is stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for Epoch {
    type Err = RouterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<u64>()
            .map(Epoch)
            .map_err(|source| RouterError::InvalidNumber {
                kind: "epoch",
                input: s.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed with Python's `uuid.uuid5(namespace, name)`: guards the
    // namespace constant and the UUIDv5 construction against accidental edits.
    #[test]
    fn usernames_map_to_the_ids_python_uuid5_predicts() {
        assert_eq!(
            UserId::for_username("alice").to_string(),
            "b2893450-58e0-5b54-9a61-34a298b49ed3"
        );
        assert_eq!(
            UserId::for_username("").to_string(),
            "e8b56848-5480-501d-8e95-261ef3a80a74"
        );
    }

    #[test]
    fn user_ids_display_hyphenated_lowercase() {
        let id = UserId(Uuid::from_u128(0xABCD_EF00_0000_0000_0000_0000_0000_0001));
        assert_eq!(id.to_string(), "abcdef00-0000-0000-0000-000000000001");
    }

    #[test]
    fn garbage_is_not_a_user_id() {
        assert!(matches!(
            "not-a-uuid".parse::<UserId>(),
            Err(RouterError::InvalidUserId { .. })
        ));
    }

    #[test]
    fn shard_ids_display_as_the_bare_number() {
        assert_eq!(ShardId(7).to_string(), "7");
        assert_eq!("7".parse::<ShardId>(), Ok(ShardId(7)));
        assert!("65536".parse::<ShardId>().is_err());
        assert!("-1".parse::<ShardId>().is_err());
        assert!("".parse::<ShardId>().is_err());
    }

    #[test]
    fn buckets_are_range_checked_when_parsed() {
        assert_eq!("4095".parse::<Bucket>(), Ok(Bucket(4095)));
        assert_eq!(
            "4096".parse::<Bucket>(),
            Err(RouterError::BucketOutOfRange {
                bucket: 4096,
                count: BUCKET_COUNT
            })
        );
        assert_eq!(Bucket::all().count(), usize::from(BUCKET_COUNT));
        assert_eq!(Bucket(12).index(), 12);
    }

    #[test]
    fn epochs_round_trip_through_strings() {
        assert_eq!(Epoch(42).to_string().parse::<Epoch>(), Ok(Epoch(42)));
    }
}
