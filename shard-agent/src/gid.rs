//! The global transaction identifier of one prepared leg.
//!
//! It names the transfer, the home shard (where the decision lives) and the
//! participant shard, behind a fixed prefix so recovery can tell our prepared
//! transactions apart from anyone else's in `pg_prepared_xacts`. The exact string is
//! stored in the transfer's record when the transfer starts and is never rebuilt.

use std::fmt;
use std::str::FromStr;

use router::ShardId;
use uuid::Uuid;

use crate::TransferId;

/// Every GID of ours starts with this; recovery filters on it.
pub const GID_PREFIX: &str = "wtx1";

/// PostgreSQL rejects longer GIDs (SQLSTATE 22023).
pub const GID_LEN_MAX_BYTES: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gid {
    pub transfer_id: TransferId,
    pub home: ShardId,
    pub participant: ShardId,
}

impl Gid {
    pub fn new(transfer_id: TransferId, home: ShardId, participant: ShardId) -> Gid {
        Gid {
            transfer_id,
            home,
            participant,
        }
    }

    /// The `LIKE` pattern that matches every GID of ours.
    pub fn like_pattern() -> String {
        format!("{GID_PREFIX}\\_%")
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{GID_PREFIX}_{}_h{}_p{}",
            self.transfer_id.0.simple(),
            self.home.0,
            self.participant.0
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a wallet GID ({GID_PREFIX}_<transfer>_h<home>_p<participant>)")]
pub struct GidParseError {
    pub text: String,
}

impl FromStr for Gid {
    type Err = GidParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || GidParseError { text: s.to_owned() };
        let mut parts = s.split('_');
        let (prefix, transfer, home, participant) =
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(p), Some(t), Some(h), Some(q)) => (p, t, h, q),
                _ => return Err(err()),
            };
        if prefix != GID_PREFIX || parts.next().is_some() || transfer.len() != 32 {
            return Err(err());
        }
        let transfer_id = Uuid::try_parse(transfer).map_err(|_| err())?;
        let shard = |text: &str, tag: char| -> Result<ShardId, GidParseError> {
            let digits = text.strip_prefix(tag).ok_or_else(err)?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            digits.parse::<u16>().map(ShardId).map_err(|_| err())
        };
        Ok(Gid {
            transfer_id: TransferId(transfer_id),
            home: shard(home, 'h')?,
            participant: shard(participant, 'p')?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_gid_round_trips_through_its_text(bits in any::<u128>(), home in any::<u16>(), part in any::<u16>()) {
            let gid = Gid::new(TransferId(Uuid::from_u128(bits)), ShardId(home), ShardId(part));
            let text = gid.to_string();
            prop_assert!(text.len() <= GID_LEN_MAX_BYTES);
            prop_assert!(text.starts_with(GID_PREFIX));
            prop_assert_eq!(text.parse::<Gid>(), Ok(gid));
        }

        #[test]
        fn arbitrary_text_never_panics_the_parser(text in ".{0,80}") {
            let _ = text.parse::<Gid>();
        }
    }

    #[test]
    fn foreign_gids_are_rejected() {
        for foreign in [
            "",
            "citus_0_1_2_3",
            "wtx1_",
            "wtx1_nothex_h1_p2",
            "wtx2_0123456789abcdef0123456789abcdef_h1_p2",
            "wtx1_0123456789abcdef0123456789abcdef_h1_p2_extra",
            "wtx1_0123456789abcdef0123456789abcdef_h+1_p2",
            "wtx1_0123456789abcdef0123456789abcdef_h99999_p2",
        ] {
            assert!(
                foreign.parse::<Gid>().is_err(),
                "{foreign:?} must not parse"
            );
        }
    }
}
