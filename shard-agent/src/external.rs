//! Deposits and withdrawals: money entering or leaving through a payment provider.
//!
//! Money moves between the user's account and the shard's clearing account for
//! the currency, so the sum of all accounts stays zero and user balances sum to
//! deposits minus withdrawals.
//!
//! Two steps, so the provider always sees one reference per request:
//! 1. **claim** (committed on its own): the Idempotency-Key and a `preparing`
//!    record whose transfer ID is the provider's reference, with the payment token;
//! 2. **settle**: call the provider with that reference, apply, decide. A
//!    deposit holds no lock and no connection during the call: it reads the
//!    account, calls, then applies in a short transaction that decides the
//!    record only while it is still `preparing`. A withdrawal locks the record
//!    and the user's row (not the clearing row, which every deposit of the shard
//!    shares) across the call, so the funds it checked are still there when it
//!    pays out.
//!
//! Crash rule: if settling is cut after the provider answered, the record stays
//! `preparing`; recovery settles it again with the same reference and token (a
//! provider de-duplicates on the reference, so it answers as it did), never
//! presuming an outcome. A retry meanwhile gets 409 `request_in_progress`.

use std::future::Future;
use std::time::Duration;

use router::UserId;
use rust_decimal::Decimal;
use tracing::instrument;

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

/// What settling does once it holds the record: apply an outcome already
/// known (a deposit asked its provider before), or lock the payer's row, check
/// the funds and ask the provider under that lock (a withdrawal).
enum Step<F> {
    Decided(Option<FailureCode>),
    CallLocked(F),
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
        match order.direction {
            Direction::Deposit => self.settle_deposit(order, tid, call_provider).await,
            // A withdrawal keeps the payer's row locked across the provider
            // call: the funds it checked must still be there when it pays out,
            // and there is no reservation yet that every other debit respects.
            Direction::Withdrawal => {
                self.settle_txn(order, tid, Step::CallLocked(call_provider))
                    .await
            }
        }
    }

    /// A deposit holds no lock and no connection while the provider decides:
    /// only money coming in depends on its answer, so the account is read
    /// unlocked before the call and written after it, in a short transaction
    /// that decides the record only if it is still `preparing`. Instead of the
    /// row lock, a lease (`deposit_lease_ms`) keeps recovery from asking the
    /// provider about the same deposit while the request waits on it.
    async fn settle_deposit<F, Fut>(
        &self,
        order: &ExternalOrder,
        tid: TransferId,
        call_provider: F,
    ) -> ShardResult<TransferRecord>
    where
        F: FnOnce(TransferId) -> Fut,
        Fut: Future<Output = ProviderVerdict>,
    {
        let lease_ms = self.config().deposit_lease_ms;
        let (current, currency, leased) = self
            .timed("lease deposit", async {
                let conn = self.conn().await?;
                // Take the lease if the deposit is undecided and nobody holds
                // it; otherwise read it as it stands: decided, or being settled
                // by another (still `preparing`, answered as in progress).
                let leased = conn
                    .query_opt(
                        &format!(
                            "UPDATE transfers
                                SET settle_lease_until = now() + make_interval(secs => $2)
                              WHERE transfer_id = $1 AND state = 'preparing'
                                AND (settle_lease_until IS NULL OR settle_lease_until < now())
                             RETURNING {TRANSFER_COLUMNS}"
                        ),
                        &[&tid.0, &(lease_ms as f64 / 1000.0)],
                    )
                    .await
                    .map_err(self.pg("lease external"))?;
                let (current, leased) = match leased {
                    Some(row) => (row, true),
                    None => (
                        conn.query_opt(
                            &format!(
                                "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = $1"
                            ),
                            &[&tid.0],
                        )
                        .await
                        .map_err(self.pg("read external"))?
                        .ok_or_else(|| self.corrupt(format!("external transfer {tid} vanished")))?,
                        false,
                    ),
                };
                let currency: String = conn
                    .query_opt(
                        "SELECT currency FROM accounts WHERE user_id = $1",
                        &[order.user.as_uuid()],
                    )
                    .await
                    .map_err(self.pg("read account"))?
                    .ok_or_else(|| self.corrupt(format!("user {} has no account", order.user)))?
                    .get(0);
                Ok((
                    TransferRecord::from_row(self.id(), &current)?,
                    currency,
                    leased,
                ))
            })
            .await?;
        if current.state != TransferState::Preparing || !leased {
            return Ok(current);
        }
        let failure = if currency.trim() != order.amount.currency().code() {
            Some(FailureCode::CurrencyMismatch)
        } else {
            failure_of(call_provider(tid).await)
        };
        self.settle_txn::<F, Fut>(order, tid, Step::Decided(failure))
            .await
    }

    /// The settling transaction: lock the record; if it is still `preparing`,
    /// take the step and apply its outcome. Bounded as a whole (a provider call
    /// has its own, shorter bound): a cancelled settlement drops its
    /// connection, and recovery settles it later.
    async fn settle_txn<F, Fut>(
        &self,
        order: &ExternalOrder,
        tid: TransferId,
        step: Step<F>,
    ) -> ShardResult<TransferRecord>
    where
        F: FnOnce(TransferId) -> Fut,
        Fut: Future<Output = ProviderVerdict>,
    {
        self.timed("settle external", async {
            let mut conn = self.conn().await?;
            conn.begin(self.id()).await?;
            match self.settle_in_txn(&conn, order, tid, step).await {
                Ok(record) => {
                    conn.batch_execute("COMMIT")
                        .await
                        .map_err(self.pg("commit external"))?;
                    conn.ended();
                    Ok(record)
                }
                Err(e) => {
                    conn.rollback_quietly().await;
                    Err(e)
                }
            }
        })
        .await
    }

    async fn settle_in_txn<F, Fut>(
        &self,
        conn: &Conn,
        order: &ExternalOrder,
        tid: TransferId,
        step: Step<F>,
    ) -> ShardResult<TransferRecord>
    where
        F: FnOnce(TransferId) -> Fut,
        Fut: Future<Output = ProviderVerdict>,
    {
        let current = conn
            .query_opt(
                &format!(
                    "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = $1 FOR UPDATE"
                ),
                &[&tid.0],
            )
            .await
            .map_err(self.pg("lock external"))?
            .ok_or_else(|| self.corrupt(format!("external transfer {tid} vanished")))?;
        let current = TransferRecord::from_row(self.id(), &current)?;
        if current.state != TransferState::Preparing {
            return Ok(current);
        }
        let failure = match step {
            Step::Decided(failure) => failure,
            Step::CallLocked(call_provider) => {
                let locked = conn
                    .query_opt(
                        "SELECT currency, balance FROM accounts WHERE user_id = $1 FOR UPDATE",
                        &[order.user.as_uuid()],
                    )
                    .await
                    .map_err(self.pg("lock account"))?
                    .ok_or_else(|| self.corrupt(format!("user {} has no account", order.user)))?;
                let currency: String = locked.get("currency");
                let balance: Decimal = locked.get("balance");
                if currency.trim() != order.amount.currency().code() {
                    Some(FailureCode::CurrencyMismatch)
                } else if balance < order.amount.value() {
                    Some(FailureCode::InsufficientFunds)
                } else {
                    failure_of(call_provider(tid).await)
                }
            }
        };
        fail::fail_point!("external-after-provider", |_| Err(
            crate::error::ShardError::Unavailable {
                shard: self.id(),
                reason: "failpoint external-after-provider".into(),
            }
        ));
        self.apply_external(conn, order, tid, failure).await
    }

    async fn apply_external(
        &self,
        conn: &Conn,
        order: &ExternalOrder,
        tid: TransferId,
        failure: Option<FailureCode>,
    ) -> ShardResult<TransferRecord> {
        if failure.is_none() {
            let signed = match order.direction {
                Direction::Deposit => order.amount.value(),
                Direction::Withdrawal => -order.amount.value(),
            };
            let kind = match order.direction {
                Direction::Deposit => "deposit",
                Direction::Withdrawal => "withdrawal",
            };
            let written = conn
                .execute(
                    "WITH u AS (UPDATE accounts SET balance = balance + $1 WHERE user_id = $2
                                RETURNING account_id, balance),
                          c AS (UPDATE accounts SET balance = balance - $1
                                WHERE kind = 'clearing' AND currency = $3
                                RETURNING account_id, balance)
                     INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
                     SELECT account_id, $4::uuid, $5::text, $1::numeric, balance, $6::text FROM u
                     UNION ALL
                     SELECT account_id, $4::uuid, 'clearing', $7::numeric, balance, $8::text FROM c",
                    &[&signed, order.user.as_uuid(), &order.amount.currency().code(), &tid.0, &kind, &order.provider, &-signed, &order.username],
                )
                .await
                .map_err(self.pg("apply external"))?;
            if written != 2 {
                return Err(self.corrupt(format!("external {tid} wrote {written} ledger entries")));
            }
        }
        let (state, code) = match failure {
            None => ("committed", None),
            Some(c) => ("aborted", Some(c.as_str())),
        };
        let row = conn
            .query_one(
                &format!(
                    "UPDATE transfers SET state = $2, failure_code = $3, decided_at = now()
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
