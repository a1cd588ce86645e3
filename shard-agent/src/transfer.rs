//! A transfer as the coordinator hands it to the shards, and the answer its
//! client gets. Every transfer, same-shard or cross-shard, runs as a member of
//! a group (`crate::batch`); a lone transfer is a group of one.

use crate::idempotency::{Claim, IdempotencyKey, NewTransfer};
use crate::money::Amount;
use crate::records::{Mode, TransferKind, TransferRecord};
use router::UserId;

/// A transfer request as the coordinator hands it to a shard.
#[derive(Clone, Debug)]
pub struct TransferOrder {
    pub from: UserId,
    pub from_username: String,
    pub to: UserId,
    pub to_username: String,
    pub amount: Amount,
    pub key: IdempotencyKey,
    /// A refund's original transfer: the payer is its payee, the payee its
    /// payer (`POST /v1/refunds`).
    pub refund_of: Option<crate::records::TransferId>,
    /// A refund's reason.
    pub reason: Option<String>,
    /// A dispute's refund: the dispute it resolves (`refund_of` is the
    /// disputed transfer).
    pub dispute: Option<uuid::Uuid>,
    /// An admin's release of this held transfer, which the order completes
    /// under the transfer's own ID.
    pub release_of: Option<crate::records::TransferId>,
}

/// The final answer of a money movement, as the client will see it.
#[derive(Clone, Debug)]
pub enum Submitted {
    /// This request created (and decided) the transfer.
    New(TransferRecord),
    /// An earlier request with the same key decided it; this is its outcome.
    Replayed(TransferRecord),
    InProgress(TransferRecord),
    KeyReused,
}

impl Submitted {
    pub(crate) fn from_claim(claim: Claim) -> Option<Submitted> {
        match claim {
            Claim::Started(_) => None,
            Claim::Replay(r) => Some(Submitted::Replayed(r)),
            Claim::InProgress(r) => Some(Submitted::InProgress(r)),
            Claim::KeyReused => Some(Submitted::KeyReused),
        }
    }
}

impl TransferOrder {
    pub fn new_transfer(&self, mode: Mode) -> NewTransfer {
        NewTransfer {
            kind: TransferKind::Transfer,
            mode,
            from_user: Some(self.from),
            from_username: Some(self.from_username.clone()),
            to_user: Some(self.to),
            to_username: Some(self.to_username.clone()),
            amount: self.amount.value(),
            currency: self.amount.currency(),
            legs: None,
            payment_token: None,
        }
    }
}
