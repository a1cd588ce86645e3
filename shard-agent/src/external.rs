//! Deposits and withdrawals: money entering or leaving through a payment provider.
//!
//! Each is one local transaction on the user's shard that moves money between the
//! user's account and the shard's clearing account for the currency, so the sum of
//! all accounts stays zero and user balances sum to deposits minus withdrawals.
//!
//! The provider is called while the user's row is locked (not the clearing row,
//! which every deposit of the shard shares), so a withdrawal cannot be spent twice
//! while the provider decides. Crash rule: a crash before COMMIT leaves nothing; the
//! provider sees the same reference (the transfer ID) if the client retries.

use std::future::Future;

use router::UserId;
use rust_decimal::Decimal;
use tracing::instrument;

use crate::agent::{Conn, ShardAgent};
use crate::error::ShardResult;
use crate::idempotency::{claim, Claim, IdempotencyKey, NewTransfer};
use crate::money::Amount;
use crate::records::{
    FailureCode, Mode, TransferId, TransferKind, TransferRecord, TRANSFER_COLUMNS,
};
use crate::transfer_local::Submitted;

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
}

/// What the payment provider answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderVerdict {
    Approved,
    Declined,
    TimedOut,
}

impl ShardAgent {
    /// Runs a deposit or withdrawal; `call_provider` is invoked at most once, with the
    /// transfer ID as the provider's reference, and only if the request is new.
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
        let mut conn = self.conn().await?;
        conn.begin(self.id()).await?;
        match self.external_in_txn(&mut conn, order, call_provider).await {
            Ok(done) => {
                conn.batch_execute("COMMIT")
                    .await
                    .map_err(self.pg("commit external"))?;
                conn.ended();
                Ok(done)
            }
            Err(e) => {
                conn.rollback_quietly().await;
                Err(e)
            }
        }
    }

    async fn external_in_txn<F, Fut>(
        &self,
        conn: &mut Conn,
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
        };
        let tid = match self
            .timed(
                "claim external",
                claim(conn, self.id(), &order.key, &new, true),
            )
            .await?
        {
            Claim::Started(r) => r.transfer_id,
            other => {
                return Ok(
                    Submitted::from_claim(other).expect("invariant: only Started maps to None")
                )
            }
        };
        tracing::Span::current().record("transfer_id", tracing::field::display(tid));
        let locked = self
            .timed("lock account", async {
                conn.query_opt(
                    "SELECT currency, balance FROM accounts WHERE user_id = $1 FOR UPDATE",
                    &[order.user.as_uuid()],
                )
                .await
                .map_err(self.pg("lock account"))
            })
            .await?
            .ok_or_else(|| self.corrupt(format!("user {} has no account", order.user)))?;
        let amount = order.amount.value();
        let currency: String = locked.get("currency");
        let balance: Decimal = locked.get("balance");
        let failure = if currency.trim() != order.amount.currency().code() {
            Some(FailureCode::CurrencyMismatch)
        } else if order.direction == Direction::Withdrawal && balance < amount {
            Some(FailureCode::InsufficientFunds)
        } else {
            match call_provider(tid).await {
                ProviderVerdict::Approved => None,
                ProviderVerdict::Declined => Some(FailureCode::PaymentDeclined),
                ProviderVerdict::TimedOut => Some(FailureCode::PaymentTimeout),
            }
        };
        self.timed(
            "apply external",
            self.apply_external(conn, order, tid, failure),
        )
        .await
    }

    async fn apply_external(
        &self,
        conn: &Conn,
        order: &ExternalOrder,
        tid: TransferId,
        failure: Option<FailureCode>,
    ) -> ShardResult<Submitted> {
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
                    &[
                        &signed,
                        order.user.as_uuid(),
                        &order.amount.currency().code(),
                        &tid.0,
                        &kind,
                        &order.provider,
                        &-signed,
                        &order.username,
                    ],
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
        Ok(Submitted::New(TransferRecord::from_row(self.id(), &row)?))
    }
}
