//! Rows as typed values: the transfer record (the home shard's decision), users,
//! accounts and ledger entries. Every row is mapped in exactly one place.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use router::{ShardId, UserId};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::{ShardError, ShardResult};
use crate::money::Currency;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TransferId(pub Uuid);

impl TransferId {
    /// Time-ordered (UUIDv7), so recent transfers sit together in the primary key.
    pub fn generate() -> TransferId {
        TransferId(Uuid::now_v7())
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TransferId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s).map(TransferId)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    Preparing,
    Committed,
    Aborted,
    /// Held for review by a fraud rule: its amount is held on the payer's
    /// account until an admin releases it (committed) or rejects it, or it
    /// expires (aborted).
    Held,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    Transfer,
    Deposit,
    Withdrawal,
    /// Money a transfer's payee gives back to its payer (`refund_of`).
    Refund,
    /// A dispute resolved in its payer's favour: the held money goes back.
    DisputeRefund,
}

/// How a transfer was carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Local,
    #[serde(rename = "2pc")]
    TwoPc,
    Redis,
    External,
}

/// Why a transfer was aborted. Stored with the decision and replayed to retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureCode {
    InsufficientFunds,
    RecipientNotFound,
    CurrencyMismatch,
    /// A participant could not be reached while preparing.
    ShardUnavailable,
    /// A participant's row lock was not granted in time (e.g. a cross-shard deadlock).
    ShardBusy,
    /// Recovery aborted a transfer whose coordinator went silent.
    CoordinatorTimeout,
    PaymentDeclined,
    PaymentTimeout,
    LockUnavailable,
    /// A refund of a transfer that did not credit its payer.
    TransferNotFound,
    /// A dispute's refund of a dispute no longer open.
    DisputeNotOpen,
    /// A release of a transfer no longer held.
    NotHeld,
    /// Not a refusal: a fraud rule with the action `review` holds the
    /// transfer (its record is held, not aborted). It ranks after every
    /// refusal, so a transfer refused on any count is refused.
    Held,
    /// A held transfer an admin rejected.
    TransferRejected,
    /// A held transfer nobody decided within the hold's expiry.
    HoldExpired,
    /// A refund above what is left of its original.
    RefundExceedsOriginal,
    /// A fraud rule with the action `block` (the rule's name is the detail).
    TransferBlocked,
    /// Above what is left of the payer's daily limit (the remainder is the detail).
    LimitExceeded,
}

impl FailureCode {
    /// Every code.
    pub const ALL: [FailureCode; 18] = [
        FailureCode::TransferNotFound,
        FailureCode::DisputeNotOpen,
        FailureCode::NotHeld,
        FailureCode::Held,
        FailureCode::TransferRejected,
        FailureCode::HoldExpired,
        FailureCode::RefundExceedsOriginal,
        FailureCode::TransferBlocked,
        FailureCode::LimitExceeded,
        FailureCode::InsufficientFunds,
        FailureCode::RecipientNotFound,
        FailureCode::CurrencyMismatch,
        FailureCode::ShardUnavailable,
        FailureCode::ShardBusy,
        FailureCode::CoordinatorTimeout,
        FailureCode::PaymentDeclined,
        FailureCode::PaymentTimeout,
        FailureCode::LockUnavailable,
    ];

    /// The one order of business refusals (lower first): a transfer that fails
    /// several checks, on one shard or on two, is answered with the first.
    /// `wallet_first_failure` (sql/shard/functions) orders legs on one shard the
    /// same way; a test holds the two equal. Faults come after every business
    /// refusal: they are not the request's fault, and a retry may pass them.
    pub fn precedence(self) -> u8 {
        match self {
            FailureCode::RecipientNotFound => 1,
            FailureCode::CurrencyMismatch => 2,
            FailureCode::TransferNotFound => 3,
            FailureCode::DisputeNotOpen => 4,
            FailureCode::NotHeld => 5,
            FailureCode::RefundExceedsOriginal => 6,
            FailureCode::TransferBlocked => 7,
            FailureCode::LimitExceeded => 8,
            FailureCode::InsufficientFunds => 9,
            FailureCode::Held => 10,
            // Never met in a check: decided by a provider or an admin.
            FailureCode::PaymentDeclined
            | FailureCode::TransferRejected
            | FailureCode::HoldExpired => 11,
            FailureCode::ShardUnavailable
            | FailureCode::ShardBusy
            | FailureCode::CoordinatorTimeout
            | FailureCode::PaymentTimeout
            | FailureCode::LockUnavailable => 12,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::InsufficientFunds => "insufficient_funds",
            FailureCode::RecipientNotFound => "recipient_not_found",
            FailureCode::CurrencyMismatch => "currency_mismatch",
            FailureCode::ShardUnavailable => "shard_unavailable",
            FailureCode::ShardBusy => "shard_busy",
            FailureCode::CoordinatorTimeout => "coordinator_timeout",
            FailureCode::PaymentDeclined => "payment_declined",
            FailureCode::PaymentTimeout => "payment_timeout",
            FailureCode::LockUnavailable => "lock_unavailable",
            FailureCode::TransferNotFound => "transfer_not_found",
            FailureCode::DisputeNotOpen => "dispute_not_open",
            FailureCode::NotHeld => "not_held",
            FailureCode::Held => "held",
            FailureCode::TransferRejected => "transfer_rejected",
            FailureCode::HoldExpired => "hold_expired",
            FailureCode::RefundExceedsOriginal => "refund_exceeds_original",
            FailureCode::TransferBlocked => "transfer_blocked",
            FailureCode::LimitExceeded => "limit_exceeded",
        }
    }

    /// An abort caused by a fault, not by the request: a retry with the same
    /// Idempotency-Key starts a fresh attempt instead of replaying the abort. Safe
    /// because an aborted decision is final and moved no money.
    /// `payment_timeout` is deliberately not here: the provider may have acted.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            FailureCode::ShardUnavailable
                | FailureCode::ShardBusy
                | FailureCode::CoordinatorTimeout
                | FailureCode::LockUnavailable
        )
    }
}

impl FromStr for FailureCode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FailureCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown failure code {s:?}"))
    }
}

/// A row of `transfers`: the decision record on the payer's (home) shard.
#[derive(Clone, Debug, PartialEq)]
pub struct TransferRecord {
    pub transfer_id: TransferId,
    pub kind: TransferKind,
    pub mode: Mode,
    pub from_user: Option<UserId>,
    pub from_username: Option<String>,
    pub to_user: Option<UserId>,
    pub to_username: Option<String>,
    pub amount: Decimal,
    pub currency: Currency,
    pub state: TransferState,
    pub failure_code: Option<FailureCode>,
    pub participants: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    /// A refund's original transfer.
    pub refund_of: Option<TransferId>,
    /// A refund's reason, as its payer gave it.
    pub reason: Option<String>,
    /// What a refusal's client is told besides its code: the fraud rule that
    /// blocked it, what was left of a daily limit or of a refunded transfer.
    pub failure_detail: Option<String>,
}

/// The column list every query that maps a `TransferRecord` selects.
pub const TRANSFER_COLUMNS: &str = "transfer_id, kind, mode, from_user, from_username, to_user, \
     to_username, amount, currency, state, failure_code, participants, created_at, decided_at, \
     refund_of, reason, failure_detail";

fn parse_col<T: FromStr>(shard: ShardId, row: &Row, col: &str) -> ShardResult<T> {
    let text: String = row.get(col);
    text.trim().parse().map_err(|_| ShardError::CorruptRow {
        shard,
        detail: format!("column {col} has unexpected value {text:?}"),
    })
}

impl TransferRecord {
    pub fn from_row(shard: ShardId, row: &Row) -> ShardResult<TransferRecord> {
        let kind = match row.get::<_, &str>("kind") {
            "transfer" => TransferKind::Transfer,
            "deposit" => TransferKind::Deposit,
            "withdrawal" => TransferKind::Withdrawal,
            "refund" => TransferKind::Refund,
            "dispute_refund" => TransferKind::DisputeRefund,
            other => return Err(corrupt(shard, "kind", other)),
        };
        let mode = match row.get::<_, &str>("mode") {
            "local" => Mode::Local,
            "2pc" => Mode::TwoPc,
            "redis" => Mode::Redis,
            "external" => Mode::External,
            other => return Err(corrupt(shard, "mode", other)),
        };
        let state = match row.get::<_, &str>("state") {
            "preparing" => TransferState::Preparing,
            "committed" => TransferState::Committed,
            "aborted" => TransferState::Aborted,
            "held" => TransferState::Held,
            other => return Err(corrupt(shard, "state", other)),
        };
        let failure_code = match row.get::<_, Option<&str>>("failure_code") {
            None => None,
            Some(code) => Some(
                code.parse()
                    .map_err(|_| corrupt(shard, "failure_code", code))?,
            ),
        };
        Ok(TransferRecord {
            transfer_id: TransferId(row.get("transfer_id")),
            kind,
            mode,
            from_user: row.get::<_, Option<Uuid>>("from_user").map(UserId),
            from_username: row.get("from_username"),
            to_user: row.get::<_, Option<Uuid>>("to_user").map(UserId),
            to_username: row.get("to_username"),
            amount: row.get("amount"),
            currency: parse_col(shard, row, "currency")?,
            state,
            failure_code,
            participants: row.get("participants"),
            created_at: row.get("created_at"),
            decided_at: row.get("decided_at"),
            refund_of: row.get::<_, Option<Uuid>>("refund_of").map(TransferId),
            reason: row.get("reason"),
            failure_detail: row.get("failure_detail"),
        })
    }
}

fn corrupt(shard: ShardId, col: &str, value: &str) -> ShardError {
    ShardError::CorruptRow {
        shard,
        detail: format!("column {col} has unexpected value {value:?}"),
    }
}

pub(crate) fn kind_str(kind: TransferKind) -> &'static str {
    match kind {
        TransferKind::Transfer => "transfer",
        TransferKind::Deposit => "deposit",
        TransferKind::Withdrawal => "withdrawal",
        TransferKind::Refund => "refund",
        TransferKind::DisputeRefund => "dispute_refund",
    }
}

pub(crate) fn mode_str(mode: Mode) -> &'static str {
    match mode {
        Mode::Local => "local",
        Mode::TwoPc => "2pc",
        Mode::Redis => "redis",
        Mode::External => "external",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct UserRow {
    pub user_id: UserId,
    pub username: String,
    pub email: String,
    pub currency: Currency,
    pub created_at: DateTime<Utc>,
}

impl UserRow {
    pub const COLUMNS: &'static str = "u.user_id, u.username, u.email, u.currency, u.created_at";

    pub fn from_row(shard: ShardId, row: &Row) -> ShardResult<UserRow> {
        Ok(UserRow {
            user_id: UserId(row.get("user_id")),
            username: row.get("username"),
            email: row.get("email"),
            currency: parse_col(shard, row, "currency")?,
            created_at: row.get("created_at"),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LedgerEntry {
    pub entry_id: i64,
    pub transfer_id: TransferId,
    pub kind: String,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub counterparty: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl LedgerEntry {
    pub fn from_row(row: &Row) -> LedgerEntry {
        LedgerEntry {
            entry_id: row.get("entry_id"),
            transfer_id: TransferId(row.get("transfer_id")),
            kind: row.get("kind"),
            amount: row.get("amount"),
            balance_after: row.get("balance_after"),
            counterparty: row.get("counterparty"),
            created_at: row.get("created_at"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_codes_round_trip_through_their_names() {
        let names: std::collections::HashSet<&str> =
            FailureCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names.len(),
            FailureCode::ALL.len(),
            "each code once, each its own name"
        );
        for code in FailureCode::ALL {
            assert_eq!(code.as_str().parse::<FailureCode>(), Ok(code));
        }
    }

    #[test]
    fn business_rejections_are_replayed_not_retried() {
        assert!(!FailureCode::InsufficientFunds.is_retryable());
        assert!(!FailureCode::RecipientNotFound.is_retryable());
        assert!(!FailureCode::PaymentTimeout.is_retryable());
        assert!(FailureCode::CoordinatorTimeout.is_retryable());
    }
}
