//! Disputes on the payee's shard: opening one (the hold), reading it, and
//! rejecting it (the release). A dispute resolved with a refund is a group
//! member like any transfer (`TransferOrder::dispute`), whose check and apply
//! (`wallet_batch_check`, `wallet_batch_apply`) close it.

use chrono::{DateTime, Utc};
use router::{bucket_of, Bucket, UserId};
use rust_decimal::Decimal;
use tokio_postgres::Row;
use tracing::instrument;
use uuid::Uuid;

use crate::agent::ShardAgent;
use crate::error::ShardResult;
use crate::money::Currency;
use crate::records::TransferId;

/// Where a dispute stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisputeState {
    Open,
    Refunded,
    Rejected,
}

impl DisputeState {
    pub fn as_str(self) -> &'static str {
        match self {
            DisputeState::Open => "open",
            DisputeState::Refunded => "refunded",
            DisputeState::Rejected => "rejected",
        }
    }
}

/// A row of `disputes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dispute {
    pub dispute_id: Uuid,
    /// The disputed transfer.
    pub transfer_id: TransferId,
    pub payer: UserId,
    pub payer_username: String,
    pub payee: UserId,
    pub payee_username: String,
    /// What the dispute holds: the transfer's amount less its refunds when
    /// it was opened.
    pub amount: Decimal,
    pub currency: Currency,
    pub reason: String,
    pub state: DisputeState,
    /// The dispute's refund, once refunded.
    pub refund_id: Option<TransferId>,
    pub created_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// What opening a dispute found.
#[derive(Clone, Debug, PartialEq)]
pub enum Opened {
    Opened(Dispute),
    /// The transfer already has an open dispute: this one.
    Exists(Dispute),
    /// No committed transfer from this payer credited this payee.
    NotFound,
    /// Refunds gave the whole transfer back already.
    NothingToDispute,
}

/// What rejecting a dispute found.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejected {
    Rejected(Dispute),
    /// Not open any more (refunded or rejected before): as it is.
    Resolved(Dispute),
    NotFound,
}

/// A new dispute's ID: time-ordered (UUIDv7) with the payee's bucket in its
/// last two bytes, so a request naming it routes to the payee's shard
/// (where the dispute and its hold live) without a directory.
pub fn new_dispute_id(payee: &UserId) -> Uuid {
    let mut bytes = *Uuid::now_v7().as_bytes();
    bytes[14..16].copy_from_slice(&bucket_of(payee).0.to_be_bytes());
    Uuid::from_bytes(bytes)
}

/// The bucket a dispute ID names, if it is one this wallet could have made.
pub fn dispute_bucket(id: &Uuid) -> Option<Bucket> {
    let b = u16::from_be_bytes([id.as_bytes()[14], id.as_bytes()[15]]);
    Bucket::new(b).ok()
}

const DISPUTE_COLUMNS: &str = "dispute_id, transfer_id, payer_user, payer_username, payee_user, \
     payee_username, amount, currency, reason, state, refund_id, created_at, resolved_at";

impl ShardAgent {
    fn dispute_from_row(&self, row: &Row) -> ShardResult<Option<Dispute>> {
        let Some(dispute_id) = row.get::<_, Option<Uuid>>("dispute_id") else {
            return Ok(None);
        };
        let currency: String = row.get("currency");
        let state = match row.get::<_, &str>("state") {
            "open" => DisputeState::Open,
            "refunded" => DisputeState::Refunded,
            "rejected" => DisputeState::Rejected,
            other => return Err(self.corrupt(format!("dispute state {other:?}"))),
        };
        Ok(Some(Dispute {
            dispute_id,
            transfer_id: TransferId(row.get("transfer_id")),
            payer: UserId(row.get("payer_user")),
            payer_username: row.get("payer_username"),
            payee: UserId(row.get("payee_user")),
            payee_username: row.get("payee_username"),
            amount: row.get("amount"),
            currency: currency
                .trim()
                .parse()
                .map_err(|_| self.corrupt(format!("dispute currency {currency:?}")))?,
            reason: row.get("reason"),
            state,
            refund_id: row.get::<_, Option<Uuid>>("refund_id").map(TransferId),
            created_at: row.get("created_at"),
            resolved_at: row.get("resolved_at"),
        }))
    }

    /// Opens a dispute of `transfer` by `payer` against `payee` (this shard's
    /// user), holding what refunds left of it (`wallet_dispute_open`).
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %transfer, dispute = %dispute_id))]
    pub async fn open_dispute(
        &self,
        dispute_id: Uuid,
        transfer: TransferId,
        payer: UserId,
        payer_username: &str,
        payee: UserId,
        reason: &str,
    ) -> ShardResult<Opened> {
        self.timed("open dispute", async {
            let conn = self.conn().await?;
            let bucket = i32::from(bucket_of(&payee).0);
            let row = conn
                .query_one(
"SELECT verdict, (dispute).* FROM wallet_dispute_open($1, $2, $3, $4, $5, $6, $7)
                       AS v (verdict, dispute)",
                    &[
                        &bucket,
                        &dispute_id,
                        &transfer.0,
                        payer.as_uuid(),
                        &payer_username,
                        payee.as_uuid(),
                        &reason,
                    ],
                )
                .await
                .map_err(self.pg("open dispute"))?;
            let found = self.dispute_from_row(&row)?;
            match (row.get::<_, Option<&str>>("verdict"), found) {
                (None, Some(d)) => Ok(Opened::Opened(d)),
                (Some("dispute_exists"), Some(d)) => Ok(Opened::Exists(d)),
                (Some("not_found"), _) => Ok(Opened::NotFound),
                (Some("nothing_to_dispute"), _) => Ok(Opened::NothingToDispute),
                (verdict, _) => Err(self.corrupt(format!("open dispute answered {verdict:?}"))),
            }
        })
        .await
    }

    /// The dispute `id` (on its payee's shard, named by its bucket).
    pub async fn dispute(&self, id: Uuid, bucket: Bucket) -> ShardResult<Option<Dispute>> {
        self.timed(
            "read dispute",
            self.owned_read(&[i32::from(bucket.0)], async |conn| {
                let row = conn
                    .query_opt(
                        &format!("SELECT {DISPUTE_COLUMNS} FROM disputes WHERE dispute_id = $1"),
                        &[&id],
                    )
                    .await
                    .map_err(self.pg("read dispute"))?;
                match row {
                    Some(row) => self.dispute_from_row(&row),
                    None => Ok(None),
                }
            }),
        )
        .await
    }

    /// Rejects the open dispute `id`: its hold is released
    /// (`wallet_dispute_reject`).
    #[instrument(skip_all, fields(shard = %self.id(), dispute = %id))]
    pub async fn reject_dispute(&self, id: Uuid, bucket: Bucket) -> ShardResult<Rejected> {
        self.timed("reject dispute", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one(
                    "SELECT verdict, (dispute).* FROM wallet_dispute_reject($1, $2)
                       AS v (verdict, dispute)",
                    &[&i32::from(bucket.0), &id],
                )
                .await
                .map_err(self.pg("reject dispute"))?;
            let found = self.dispute_from_row(&row)?;
            match (row.get::<_, Option<&str>>("verdict"), found) {
                (None, Some(d)) => Ok(Rejected::Rejected(d)),
                (Some("resolved"), Some(d)) => Ok(Rejected::Resolved(d)),
                (Some("not_found"), _) => Ok(Rejected::NotFound),
                (verdict, _) => Err(self.corrupt(format!("reject dispute answered {verdict:?}"))),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dispute_id_names_its_payees_bucket() {
        for name in ["alice", "bob", "carol", "merchant"] {
            let payee = UserId::for_username(name);
            let id = new_dispute_id(&payee);
            assert_eq!(dispute_bucket(&id), Some(bucket_of(&payee)));
            assert_eq!(id.get_version_num(), 7);
        }
        assert_eq!(dispute_bucket(&Uuid::from_u128(0xffff)), None);
    }
}
