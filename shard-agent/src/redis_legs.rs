//! Redis-lock mode, shard side: each leg is a local transaction, fenced and
//! idempotent by transfer ID.
//!
//! The debit is the commit point: in one transaction it moves `preparing` to
//! `committed` (the same compare-and-set recovery uses to abort), takes the money
//! and records a pending credit. Crash rule: before the debit commits, recovery
//! aborts the stale `preparing` record and nothing moved; after it, recovery
//! applies the pending credit (forward recovery), under a fresh lock.
//!
//! Every write carries the fencing token of the caller's Redis lock and is refused
//! unless the account's `last_fence` is older, so a holder whose lock expired
//! (a pause, a Redis restart) cannot write after a newer holder.

use std::time::Duration;

use router::UserId;
use rust_decimal::Decimal;
use tokio_postgres::error::SqlState;
use tracing::instrument;

use crate::agent::{Conn, ShardAgent};
use crate::error::{ShardError, ShardResult};
use crate::idempotency::read_transfer;
use crate::money::Currency;
use crate::records::{FailureCode, TransferId, TransferRecord, TRANSFER_COLUMNS};

/// One side of a Redis-mode transfer.
#[derive(Clone, Debug)]
pub struct FencedLeg {
    pub transfer_id: TransferId,
    pub user: UserId,
    pub amount: Decimal,
    pub currency: Currency,
    /// The fencing token of the lock on `user`'s account.
    pub fence: i64,
    pub counterparty: String,
}

/// What a debit's pending credit needs, to be completed by anyone.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingCredit {
    pub transfer_id: TransferId,
    pub to_user: UserId,
    pub to_username: String,
    pub from_username: String,
    pub amount: Decimal,
    pub currency: Currency,
}

#[derive(Clone, Debug)]
pub enum Debited {
    /// Committed: the money left the payer and a pending credit is recorded.
    Yes(TransferRecord),
    /// A business rule refused it; the transfer is aborted with that code.
    Rejected(TransferRecord),
    /// Someone (recovery) decided the transfer first; this is their decision.
    AlreadyDecided(TransferRecord),
    /// The lock's fencing token is not above the account's: nothing written.
    /// `last_fence` is the account's, so the token source can be raised above it.
    FenceRejected { last_fence: i64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credited {
    Yes,
    AlreadyApplied,
    /// As for [`Debited::FenceRejected`]: nothing written; the account's fence.
    FenceRejected {
        last_fence: i64,
    },
}

/// Pending credits of one home shard older than `in_doubt_after`: in doubt until
/// recovery applies them.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PendingStats {
    pub count: i64,
    pub oldest_age_ms: i64,
    /// How many of them failed at least one attempt (a fence, a shard).
    pub failing: i64,
}

const DEBIT_SQL: &str = "WITH a AS (
       UPDATE accounts SET balance = balance - $1, last_fence = $4
       WHERE user_id = $2 AND currency = $3 AND balance - held >= $1 AND (NOT $7 OR last_fence < $4)
       RETURNING account_id, balance)
     INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty, fence)
     SELECT account_id, $5, 'transfer_debit', -$1::numeric, balance, $6, $4 FROM a
     RETURNING balance_after";

const CREDIT_SQL: &str = "WITH a AS (
       UPDATE accounts SET balance = balance + $1, last_fence = $4
       WHERE user_id = $2 AND currency = $3 AND (NOT $7 OR last_fence < $4)
       RETURNING account_id, balance)
     INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty, fence)
     SELECT account_id, $5, 'transfer_credit', $1::numeric, balance, $6, $4 FROM a
     RETURNING balance_after";

/// A deliberately broken variant for the chaos suite (failpoint
/// `broken-skip-fence`): writes ignore the fencing token. Compiled in only with
/// the `failpoints` feature.
fn enforce_fence() -> bool {
    #[cfg(feature = "failpoints")]
    if fail::eval("broken-skip-fence", |_| ()).is_some() {
        return false;
    }
    true
}

impl ShardAgent {
    /// Why a payee cannot be credited, checked (under the payee's lock) before the
    /// debit commits, so forward recovery never meets a credit it cannot apply.
    pub async fn recipient_refusal(
        &self,
        user: UserId,
        currency: Currency,
    ) -> ShardResult<Option<FailureCode>> {
        self.timed("check recipient", async {
            let conn = self.conn().await?;
            let row = conn
                .query_opt(
                    "SELECT currency FROM accounts WHERE user_id = $1",
                    &[user.as_uuid()],
                )
                .await
                .map_err(self.pg("check recipient"))?;
            Ok(match row {
                None => Some(FailureCode::RecipientNotFound),
                Some(r) if r.get::<_, String>(0).trim() != currency.code() => {
                    Some(FailureCode::CurrencyMismatch)
                }
                Some(_) => None,
            })
        })
        .await
    }

    /// The debit and the commit point, in one local transaction on the home shard.
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %leg.transfer_id, fence = leg.fence))]
    pub async fn debit_fenced(
        &self,
        leg: &FencedLeg,
        pending: &PendingCredit,
    ) -> ShardResult<Debited> {
        self.timed("fenced debit", async {
            let mut conn = self.conn().await?;
            conn.begin(self.id()).await?;
            let result = self.debit_in_txn(&conn, leg, pending).await;
            match result {
                Ok(Some(done @ (Debited::Yes(_) | Debited::Rejected(_)))) => {
                    conn.batch_execute("COMMIT")
                        .await
                        .map_err(self.pg("commit debit"))?;
                    conn.ended();
                    Ok(done)
                }
                Ok(Some(other)) => {
                    conn.rollback_quietly().await;
                    Ok(other)
                }
                Ok(None) => {
                    conn.rollback_quietly().await;
                    let record = read_transfer(&conn, self.id(), leg.transfer_id).await?;
                    record.map(Debited::AlreadyDecided).ok_or_else(|| {
                        self.corrupt(format!("transfer {} vanished", leg.transfer_id))
                    })
                }
                Err(e) => {
                    conn.rollback_quietly().await;
                    Err(e)
                }
            }
        })
        .await
    }

    /// `None`: the transfer was already decided (the caller reads the decision
    /// after rolling back).
    async fn debit_in_txn(
        &self,
        conn: &Conn,
        leg: &FencedLeg,
        pending: &PendingCredit,
    ) -> ShardResult<Option<Debited>> {
        let tid = leg.transfer_id;
        let decided = conn
            .query_opt(
                &format!(
                    "UPDATE transfers SET state = 'committed', decided_at = now()
                     WHERE transfer_id = $1 AND state = 'preparing' RETURNING {TRANSFER_COLUMNS}"
                ),
                &[&tid.0],
            )
            .await
            .map_err(self.pg("decide fenced debit"))?;
        let Some(decided) = decided else {
            return Ok(None);
        };
        let enforce = enforce_fence();
        let applied = conn
            .query_opt(
                DEBIT_SQL,
                &[
                    &leg.amount,
                    leg.user.as_uuid(),
                    &leg.currency.code(),
                    &leg.fence,
                    &tid.0,
                    &leg.counterparty,
                    &enforce,
                ],
            )
            .await
            .map_err(self.pg("apply fenced debit"))?;
        if applied.is_none() {
            let row = conn
                .query_one(
                    "SELECT balance, last_fence FROM accounts WHERE user_id = $1",
                    &[leg.user.as_uuid()],
                )
                .await
                .map_err(self.pg("diagnose fenced debit"))?;
            let last_fence: i64 = row.get("last_fence");
            if enforce && last_fence >= leg.fence {
                return Ok(Some(Debited::FenceRejected { last_fence }));
            }
            let row = conn
                .query_one(
                    &format!(
                        "UPDATE transfers SET state = 'aborted', failure_code = 'insufficient_funds'
                         WHERE transfer_id = $1 RETURNING {TRANSFER_COLUMNS}"
                    ),
                    &[&tid.0],
                )
                .await
                .map_err(self.pg("abort fenced debit"))?;
            return Ok(Some(Debited::Rejected(TransferRecord::from_row(
                self.id(),
                &row,
            )?)));
        }
        conn.execute(
            "INSERT INTO pending_credits (transfer_id, to_user, to_username, from_username, amount, currency)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&tid.0, pending.to_user.as_uuid(), &pending.to_username, &pending.from_username, &pending.amount, &pending.currency.code()],
        )
        .await
        .map_err(self.pg("record pending credit"))?;
        Ok(Some(Debited::Yes(TransferRecord::from_row(
            self.id(),
            &decided,
        )?)))
    }

    /// The credit, on the payee's shard. Safe to repeat: a credit already applied
    /// (by the coordinator or by recovery) is reported, never applied twice.
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %leg.transfer_id, fence = leg.fence))]
    pub async fn credit_fenced(&self, leg: &FencedLeg) -> ShardResult<Credited> {
        self.timed("fenced credit", async {
            let mut conn = self.conn().await?;
            let done = conn
                .query_opt(
                    "SELECT 1 FROM ledger_entries e JOIN accounts a USING (account_id)
                     WHERE e.transfer_id = $1 AND a.user_id = $2",
                    &[&leg.transfer_id.0, leg.user.as_uuid()],
                )
                .await
                .map_err(self.pg("check credit"))?;
            if done.is_some() {
                return Ok(Credited::AlreadyApplied);
            }
            let enforce = enforce_fence();
            conn.begin(self.id()).await?;
            let applied = conn
                .query_opt(
                    CREDIT_SQL,
                    &[
                        &leg.amount,
                        leg.user.as_uuid(),
                        &leg.currency.code(),
                        &leg.fence,
                        &leg.transfer_id.0,
                        &leg.counterparty,
                        &enforce,
                    ],
                )
                .await;
            match applied {
                Ok(Some(_)) => {
                    conn.batch_execute("COMMIT")
                        .await
                        .map_err(self.pg("commit credit"))?;
                    conn.ended();
                    Ok(Credited::Yes)
                }
                Ok(None) => {
                    conn.rollback_quietly().await;
                    let row = conn
                        .query_opt(
                            "SELECT last_fence FROM accounts WHERE user_id = $1",
                            &[leg.user.as_uuid()],
                        )
                        .await
                        .map_err(self.pg("diagnose fenced credit"))?;
                    // The recipient was checked before the debit committed and
                    // accounts are never deleted, so a missing row is corruption.
                    let row = row.ok_or_else(|| {
                        self.corrupt(format!("credit to {} found no account", leg.user))
                    })?;
                    Ok(Credited::FenceRejected {
                        last_fence: row.get(0),
                    })
                }
                // A concurrent applier won the race to the ledger's unique key.
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    conn.rollback_quietly().await;
                    Ok(Credited::AlreadyApplied)
                }
                Err(e) => {
                    conn.rollback_quietly().await;
                    Err(ShardError::from_pg(self.id(), "apply fenced credit", e))
                }
            }
        })
        .await
    }

    pub async fn clear_pending_credit(&self, tid: TransferId) -> ShardResult<()> {
        self.timed("clear pending credit", async {
            let conn = self.conn().await?;
            conn.execute(
                "DELETE FROM pending_credits WHERE transfer_id = $1",
                &[&tid.0],
            )
            .await
            .map_err(self.pg("clear pending credit"))?;
            Ok(())
        })
        .await
    }

    /// Records a failed attempt at a pending credit, with its reason.
    pub async fn pending_credit_failed(&self, tid: TransferId, reason: &str) -> ShardResult<()> {
        self.timed("record pending credit attempt", async {
            let conn = self.conn().await?;
            conn.execute(
                "UPDATE pending_credits
                 SET attempts = attempts + 1, last_error = $2, last_attempt_at = now()
                 WHERE transfer_id = $1",
                &[&tid.0, &reason],
            )
            .await
            .map_err(self.pg("record pending credit attempt"))?;
            Ok(())
        })
        .await
    }

    /// Count, oldest age and failing count of the pending credits older than
    /// `older_than`: Redis mode's in-doubt figure.
    pub async fn pending_stats(&self, older_than: Duration) -> ShardResult<PendingStats> {
        self.timed("pending credit stats", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one(
                    "SELECT count(*) AS n,
                            coalesce(max((extract(epoch FROM now() - created_at) * 1000)::bigint), 0) AS oldest,
                            count(*) FILTER (WHERE attempts > 0) AS failing
                     FROM pending_credits WHERE created_at < now() - make_interval(secs => $1)",
                    &[&older_than.as_secs_f64()],
                )
                .await
                .map_err(self.pg("pending credit stats"))?;
            Ok(PendingStats {
                count: row.get("n"),
                oldest_age_ms: row.get("oldest"),
                failing: row.get("failing"),
            })
        })
        .await
    }

    /// The highest fencing token stored on this shard: the floor below which a
    /// Redis token source that lost its state must never grant.
    pub async fn max_fence(&self) -> ShardResult<i64> {
        self.timed("read highest fence", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one("SELECT coalesce(max(last_fence), 0) FROM accounts", &[])
                .await
                .map_err(self.pg("read highest fence"))?;
            Ok(row.get(0))
        })
        .await
    }

    /// Pending credits of this home shard older than `older_than`, never tried
    /// first, then the least recently tried, so credits that keep failing never
    /// crowd out newer ones.
    pub async fn pending_credits(&self, older_than: Duration) -> ShardResult<Vec<PendingCredit>> {
        self.timed("list pending credits", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT transfer_id, to_user, to_username, from_username, amount, currency
                     FROM pending_credits WHERE created_at < now() - make_interval(secs => $1)
                     ORDER BY last_attempt_at NULLS FIRST, created_at LIMIT $2",
                    &[
                        &older_than.as_secs_f64(),
                        &crate::two_pc::recover::RECOVERY_BATCH_MAX,
                    ],
                )
                .await
                .map_err(self.pg("list pending credits"))?;
            rows.iter()
                .map(|r| {
                    let currency: String = r.get("currency");
                    Ok(PendingCredit {
                        transfer_id: TransferId(r.get("transfer_id")),
                        to_user: UserId(r.get("to_user")),
                        to_username: r.get("to_username"),
                        from_username: r.get("from_username"),
                        amount: r.get("amount"),
                        currency: currency.trim().parse().map_err(|_| {
                            self.corrupt(format!("pending credit currency {currency:?}"))
                        })?,
                    })
                })
                .collect()
        })
        .await
    }
}
