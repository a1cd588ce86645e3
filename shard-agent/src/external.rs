//! Deposits and withdrawals: money entering or leaving through a payment provider.
//!
//! Money moves between the user's account and the shard's clearing account for
//! the currency, so the sum of all accounts stays zero and user balances sum to
//! deposits minus withdrawals.
//!
//! Two steps, so the provider always sees one reference per request:
//! 1. **claim** (committed on its own): the Idempotency-Key and a `preparing`
//!    record whose transfer ID is the provider's reference, with the payment token;
//! 2. **settle**, in three parts, none of which holds a lock or a connection
//!    across the provider call:
//!    - *lease* (a short transaction): the settler leases the record
//!      (`settle_lease_ms`), so recovery does not ask the provider about it
//!      meanwhile; a withdrawal also checks the funds and **holds** its amount
//!      (`accounts.held`, which every debit respects: it checks
//!      `balance - held`), so the funds are still there when it pays out;
//!    - *call* the provider with the transfer ID as reference;
//!    - *apply* (a short transaction): if the record is still `preparing`,
//!      move the money (or not), release the hold and decide.
//!
//! Crash rule: if settling is cut anywhere after the claim, the record stays
//! `preparing` (with its hold, if taken); once its lease runs out recovery
//! settles it again with the same reference and token (a provider
//! de-duplicates on the reference, so it answers as it did), never presuming
//! an outcome. A retry meanwhile gets 409 `request_in_progress`.

use std::future::Future;
use std::time::Duration;

use router::UserId;
use rust_decimal::Decimal;
use tracing::instrument;

use crate::agent::buckets_of;
use crate::agent::{Conn, ShardAgent};
use crate::error::ShardResult;
use crate::idempotency::{Claim, IdempotencyKey, NewTransfer};
use crate::money::Amount;
use crate::records::{
    FailureCode, Mode, TransferId, TransferKind, TransferRecord, TransferState, TRANSFER_COLUMNS,
};
use crate::transfer::Submitted;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Deposit,
    Withdrawal,
}

#[derive(Clone, Debug)]
pub struct ExternalOrder {
    pub user: UserId,
    pub username: String,
    pub direction: Direction,
    pub amount: Amount,
    pub key: IdempotencyKey,
    /// Named on the ledger entry, e.g. "sandbox".
    pub provider: String,
    pub payment_token: String,
}

/// What the payment provider answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderVerdict {
    Approved,
    Declined,
    TimedOut,
}

/// What the lease found.
enum Leased {
    /// Decided already (by whoever), or refused while leasing: the answer.
    Done(TransferRecord),
    /// Another settler holds the lease: still `preparing`, in progress.
    Busy(TransferRecord),
    /// This settler holds the lease (and a withdrawal its funds): call.
    Ready,
}

/// The refusal a provider's answer means, if any.
fn failure_of(verdict: ProviderVerdict) -> Option<FailureCode> {
    match verdict {
        ProviderVerdict::Approved => None,
        ProviderVerdict::Declined => Some(FailureCode::PaymentDeclined),
        ProviderVerdict::TimedOut => Some(FailureCode::PaymentTimeout),
    }
}

/// An interrupted settlement, as recovery finds it.
#[derive(Clone, Debug)]
pub struct Unsettled {
    pub record: TransferRecord,
    pub payment_token: String,
}

impl Unsettled {
    pub fn direction(&self) -> Direction {
        match self.record.kind {
            TransferKind::Withdrawal => Direction::Withdrawal,
            _ => Direction::Deposit,
        }
    }

    pub fn user(&self) -> Option<(UserId, String)> {
        let (user, name) = match self.direction() {
            Direction::Deposit => (self.record.to_user, self.record.to_username.clone()),
            Direction::Withdrawal => (self.record.from_user, self.record.from_username.clone()),
        };
        Some((user?, name?))
    }
}

impl ShardAgent {
    /// Runs a deposit or withdrawal; `call_provider` is invoked at most once per
    /// call, with the transfer ID as the provider's reference, and only if the
    /// request is new.
    #[instrument(skip_all, fields(shard = %self.id(), user = %order.user, direction = ?order.direction, transfer_id = tracing::field::Empty))]
    pub async fn run_external<F, Fut>(
        &self,
        order: &ExternalOrder,
        call_provider: F,
    ) -> ShardResult<Submitted>
    where
        F: FnOnce(TransferId) -> Fut,
        Fut: Future<Output = ProviderVerdict>,
    {
        let (kind, from, to) = match order.direction {
            Direction::Deposit => (TransferKind::Deposit, None, Some(order.user)),
            Direction::Withdrawal => (TransferKind::Withdrawal, Some(order.user), None),
        };
        let name = |u: Option<UserId>| u.map(|_| order.username.clone());
        let new = NewTransfer {
            kind,
            mode: Mode::External,
            from_user: from,
            from_username: name(from),
            to_user: to,
            to_username: name(to),
            amount: order.amount.value(),
            currency: order.amount.currency(),
            legs: None,
            payment_token: Some(order.payment_token.clone()),
        };
        let record = match self.claim(&order.key, &new).await? {
            Claim::Started(r) => r,
            other => {
                return Ok(
                    Submitted::from_claim(other).expect("invariant: only Started maps to None")
                )
            }
        };
        tracing::Span::current().record("transfer_id", tracing::field::display(record.transfer_id));
        self.settle_external(order, record.transfer_id, call_provider)
            .await
            .map(Submitted::New)
    }

    /// Step 2, also used by recovery: settles a claimed deposit or withdrawal that
    /// is still `preparing`, and returns its record (decided by whoever did).
    pub async fn settle_external<F, Fut>(
        &self,
        order: &ExternalOrder,
        tid: TransferId,
        call_provider: F,
    ) -> ShardResult<TransferRecord>
    where
        F: FnOnce(TransferId) -> Fut,
        Fut: Future<Output = ProviderVerdict>,
    {
        match self.lease_external(order, tid).await? {
            Leased::Done(record) | Leased::Busy(record) => Ok(record),
            Leased::Ready => {
                let failure = failure_of(call_provider(tid).await);
                self.apply_external(order, tid, failure).await
            }
        }
    }

    /// The lease, in one short transaction: take it if the record is
    /// undecided and nobody holds it, check the account's currency, and for a
    /// withdrawal whose funds are not held yet, check and hold them. A refusal
    /// is decided here, with nothing moved.
    async fn lease_external(&self, order: &ExternalOrder, tid: TransferId) -> ShardResult<Leased> {
        let lease_ms = self.config().settle_lease_ms;
        self.in_txn("lease external", &buckets_of([&order.user]), async |conn| {
            let leased = conn
                .query_opt(
                    &format!(
                        "UPDATE transfers
                            SET settle_lease_until = now() + make_interval(secs => $2)
                          WHERE transfer_id = $1 AND state = 'preparing'
                            AND (settle_lease_until IS NULL OR settle_lease_until < now())
                         RETURNING {TRANSFER_COLUMNS}, funds_held"
                    ),
                    &[&tid.0, &(lease_ms as f64 / 1000.0)],
                )
                .await
                .map_err(self.pg("lease external"))?;
            let Some(leased) = leased else {
                let current = self.locked_record(conn, tid, false).await?;
                return Ok(match current.state {
                    TransferState::Preparing => Leased::Busy(current),
                    _ => Leased::Done(current),
                });
            };
            let funds_held: bool = leased.get("funds_held");
            let withdrawal = order.direction == Direction::Withdrawal;
            // The user's row is locked only for a withdrawal that is about to
            // hold funds, and only for this short transaction.
            let account = conn
                .query_opt(
                    if withdrawal && !funds_held {
                        "SELECT currency, balance - held AS available FROM accounts
                          WHERE user_id = $1 FOR UPDATE"
                    } else {
                        "SELECT currency, balance - held AS available FROM accounts
                          WHERE user_id = $1"
                    },
                    &[order.user.as_uuid()],
                )
                .await
                .map_err(self.pg("read account"))?
                .ok_or_else(|| self.corrupt(format!("user {} has no account", order.user)))?;
            let currency: String = account.get("currency");
            let available: Decimal = account.get("available");
            let refusal = if currency.trim() != order.amount.currency().code() {
                Some(FailureCode::CurrencyMismatch)
            } else if withdrawal && !funds_held && available < order.amount.value() {
                Some(FailureCode::InsufficientFunds)
            } else {
                None
            };
            if refusal.is_some() {
                return self
                    .decide_external(conn, order, tid, funds_held, refusal)
                    .await
                    .map(Leased::Done);
            }
            if withdrawal && !funds_held {
                conn.execute(
                    "WITH h AS (UPDATE accounts SET held = held + $2 WHERE user_id = $1)
                     UPDATE transfers SET funds_held = true WHERE transfer_id = $3",
                    &[order.user.as_uuid(), &order.amount.value(), &tid.0],
                )
                .await
                .map_err(self.pg("hold funds"))?;
            }
            Ok(Leased::Ready)
        })
        .await
    }

    /// After the provider answered, in one short transaction: if the record is
    /// still `preparing`, apply the answer. Bounded as a whole (a provider
    /// call has its own, shorter bound): a cancelled settlement drops its
    /// connection, and recovery settles it later.
    async fn apply_external(
        &self,
        order: &ExternalOrder,
        tid: TransferId,
        failure: Option<FailureCode>,
    ) -> ShardResult<TransferRecord> {
        self.in_txn(
            "settle external",
            &buckets_of([&order.user]),
            async |conn| {
                let current = conn
                    .query_one(
                        &format!(
                            "SELECT {TRANSFER_COLUMNS}, funds_held FROM transfers
                          WHERE transfer_id = $1 FOR UPDATE"
                        ),
                        &[&tid.0],
                    )
                    .await
                    .map_err(self.pg("lock external"))?;
                let funds_held: bool = current.get("funds_held");
                let current = TransferRecord::from_row(self.id(), &current)?;
                if current.state != TransferState::Preparing {
                    return Ok(current);
                }
                fail::fail_point!("external-after-provider", |_| Err(
                    crate::error::ShardError::Unavailable {
                        shard: self.id(),
                        reason: "failpoint external-after-provider".into(),
                    }
                ));
                self.decide_external(conn, order, tid, funds_held, failure)
                    .await
            },
        )
        .await
    }

    /// The record as it stands, locked if `lock`.
    async fn locked_record(
        &self,
        conn: &Conn,
        tid: TransferId,
        lock: bool,
    ) -> ShardResult<TransferRecord> {
        let row = conn
            .query_opt(
                &format!(
                    "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = $1{}",
                    if lock { " FOR UPDATE" } else { "" }
                ),
                &[&tid.0],
            )
            .await
            .map_err(self.pg("read external"))?
            .ok_or_else(|| self.corrupt(format!("external transfer {tid} vanished")))?;
        TransferRecord::from_row(self.id(), &row)
    }

    /// Moves the money of an approved payment (user and clearing account, with
    /// their ledger entries), releases a withdrawal's hold, and decides the
    /// record.
    async fn decide_external(
        &self,
        conn: &Conn,
        order: &ExternalOrder,
        tid: TransferId,
        funds_held: bool,
        failure: Option<FailureCode>,
    ) -> ShardResult<TransferRecord> {
        let release = if funds_held {
            order.amount.value()
        } else {
            Decimal::ZERO
        };
        if funds_held {
            conn.execute(
                "UPDATE accounts SET held = held - $2 WHERE user_id = $1",
                &[order.user.as_uuid(), &release],
            )
            .await
            .map_err(self.pg("release held funds"))?;
        }
        if failure.is_none() {
            let signed = match order.direction {
                Direction::Deposit => order.amount.value(),
                Direction::Withdrawal => -order.amount.value(),
            };
            let kind = match order.direction {
                Direction::Deposit => "deposit",
                Direction::Withdrawal => "withdrawal",
            };
            // The user's account and the clearing account of the currency, by
            // the one posting function every movement goes through.
            conn.execute(
                "SELECT wallet_post(
                     ARRAY[$1, $1]::uuid[],
                     ARRAY[(SELECT account_id FROM accounts WHERE user_id = $2),
                           (SELECT account_id FROM accounts
                             WHERE kind = 'clearing' AND currency = $3)],
                     ARRAY[$4::text, 'clearing'],
                     ARRAY[$5::numeric, -$5::numeric],
                     ARRAY[$6::text, $7::text],
                     NULL)",
                &[
                    &tid.0,
                    order.user.as_uuid(),
                    &order.amount.currency().code(),
                    &kind,
                    &signed,
                    &order.provider,
                    &order.username,
                ],
            )
            .await
            .map_err(self.pg("apply external"))?;
        }
        let (state, code) = match failure {
            None => ("committed", None),
            Some(c) => ("aborted", Some(c.as_str())),
        };
        let row = conn
            .query_one(
                &format!(
                    "UPDATE transfers SET state = $2, failure_code = $3, decided_at = now(),
                                         funds_held = false
                     WHERE transfer_id = $1 RETURNING {TRANSFER_COLUMNS}"
                ),
                &[&tid.0, &state, &code],
            )
            .await
            .map_err(self.pg("decide external"))?;
        TransferRecord::from_row(self.id(), &row)
    }

    /// Deposits and withdrawals claimed more than `older_than` ago and never
    /// settled (their settling was cut): recovery settles them again.
    pub async fn unsettled_external(&self, older_than: Duration) -> ShardResult<Vec<Unsettled>> {
        self.timed("list unsettled external", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT {TRANSFER_COLUMNS}, payment_token FROM transfers
                         WHERE state = 'preparing' AND mode = 'external'
                           AND created_at < now() - make_interval(secs => $1)
                           AND (settle_lease_until IS NULL OR settle_lease_until < now())
                         ORDER BY created_at LIMIT $2"
                    ),
                    &[
                        &older_than.as_secs_f64(),
                        &crate::two_pc::recover::RECOVERY_BATCH_MAX,
                    ],
                )
                .await
                .map_err(self.pg("list unsettled external"))?;
            rows.iter()
                .map(|r| {
                    Ok(Unsettled {
                        record: TransferRecord::from_row(self.id(), r)?,
                        payment_token: r
                            .get::<_, Option<String>>("payment_token")
                            .unwrap_or_default(),
                    })
                })
                .collect()
        })
        .await
    }
}
