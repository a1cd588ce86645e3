//! Redis-lock mode, shard side: a group's debits on each payer shard, then
//! its credits on each payee shard, each one autocommitted statement, fenced,
//! and idempotent by transfer ID.
//!
//! The debits are the commit point (`wallet_redis_debit`): in one statement
//! they claim the keys, check, take the money, record each transfer as
//! decided and record a pending credit for each transfer that passed. Crash
//! rule: before that statement commits nothing of the group exists; after
//! it, recovery applies the pending credits (forward recovery), under a
//! fresh lock. The credits (`wallet_redis_credit`) are applied at most once.
//!
//! Every write carries the fencing token of the caller's Redis locks and is
//! refused unless the account's `last_fence` is older, so a holder whose lock
//! expired (a pause, a Redis restart) cannot write after a newer holder.

use std::collections::HashMap;
use std::time::Duration;

use router::UserId;
use rust_decimal::Decimal;
use tracing::instrument;

use crate::agent::ShardAgent;
use crate::error::ShardResult;
use crate::money::Currency;
use crate::records::{FailureCode, TransferId};

/// What a debit's pending credit needs, to be completed by anyone.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingCredit {
    pub transfer_id: TransferId,
    pub to_user: UserId,
    pub to_username: String,
    pub from_username: String,
    pub amount: Decimal,
    pub currency: Currency,
    /// A refund's original transfer: the credit is posted as a refund.
    pub refund_of: Option<TransferId>,
    /// A dispute's refund: the credit is posted as one.
    pub dispute: Option<uuid::Uuid>,
}

/// What became of one credit of a group (`wallet_redis_credit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credited {
    Yes,
    /// Applied before (by the coordinator or by recovery): not again.
    AlreadyApplied,
    /// The lock's fencing token is not above the payee account's: nothing
    /// written. `last_fence` is the account's, so the token source can be
    /// raised above it.
    FenceRejected {
        last_fence: i64,
    },
    /// The payee has no account here: nothing written. The payee was read
    /// before the debit committed and accounts are never deleted, so this is
    /// a corrupt shard; the credit stays pending and is reported.
    Missing,
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

/// A deliberately broken variant for the chaos suite (failpoint
/// `broken-skip-fence`): writes ignore the fencing token. Compiled in only with
/// the `failpoints` feature.
pub(crate) fn enforce_fence() -> bool {
    #[cfg(feature = "failpoints")]
    if fail::eval("broken-skip-fence", |_| ()).is_some() {
        return false;
    }
    true
}

impl ShardAgent {
    /// Why each payee cannot be credited: read before the debits commit, so
    /// forward recovery never meets a credit it cannot apply. Unlocked:
    /// accounts never change currency, and leave a shard only with their
    /// bucket, which the read checks this shard still serves
    /// ([`ShardError::NotOwner`] otherwise: a missing row must not read as
    /// `recipient_not_found` when the payee merely moved).
    pub async fn payee_refusals(
        &self,
        payees: &[(UserId, Currency)],
    ) -> ShardResult<Vec<Option<FailureCode>>> {
        self.timed("read payees", async {
            let mut conn = self.conn().await?;
            let ids: Vec<uuid::Uuid> = payees.iter().map(|(u, _)| u.0).collect();
            let buckets = crate::agent::buckets_of(payees.iter().map(|(u, _)| u));
            let own = conn
                .prepare_cached(crate::agent::OWN_READ)
                .await
                .map_err(self.pg("prepare ownership check"))?;
            let own_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&buckets];
            let read_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
            // Pipelined, in one snapshot: a bucket's rows leave a shard in the
            // transaction that forgets the bucket, so a check that passes
            // sees the rows it passed for.
            conn.mark_in_txn();
            let (begun, owned, rows, ended) = tokio::join!(
                conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
                conn.execute(&own, &own_params),
                conn.query(
                    "SELECT user_id, currency FROM accounts WHERE user_id = ANY ($1)",
                    &read_params,
                ),
                conn.batch_execute("COMMIT")
            );
            if ended.is_ok() {
                conn.ended();
            }
            begun.map_err(self.pg("begin"))?;
            owned.map_err(self.pg("ownership check"))?;
            let rows = rows.map_err(self.pg("read payees"))?;
            let held: HashMap<uuid::Uuid, String> = rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, String>(1).trim().to_owned()))
                .collect();
            Ok(payees
                .iter()
                .map(|(user, currency)| match held.get(&user.0) {
                    None => Some(FailureCode::RecipientNotFound),
                    Some(c) if c != currency.code() => Some(FailureCode::CurrencyMismatch),
                    Some(_) => None,
                })
                .collect())
        })
        .await
    }

    /// A group's credits on this payee shard, in one statement
    /// (`wallet_redis_credit`), under the locks whose token is `fence`. Safe
    /// to repeat: a credit already applied is reported, never applied twice.
    #[instrument(skip_all, fields(shard = %self.id(), credits = credits.len(), fence))]
    pub async fn credit_group(
        &self,
        credits: &[PendingCredit],
        fence: i64,
    ) -> ShardResult<Vec<Credited>> {
        self.timed("fenced credits", async {
            let buckets = crate::agent::buckets_of(credits.iter().map(|c| &c.to_user));
            let conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(
                    "SELECT wallet_redis_credit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                )
                .await
                .map_err(self.pg("prepare fenced credits"))?;
            let tid: Vec<uuid::Uuid> = credits.iter().map(|c| c.transfer_id.0).collect();
            let user: Vec<uuid::Uuid> = credits.iter().map(|c| c.to_user.0).collect();
            let amount: Vec<Decimal> = credits.iter().map(|c| c.amount).collect();
            let currency: Vec<&str> = credits.iter().map(|c| c.currency.code()).collect();
            let user_name: Vec<&str> = credits.iter().map(|c| c.to_username.as_str()).collect();
            let party: Vec<Option<uuid::Uuid>> = vec![None; credits.len()];
            let party_name: Vec<&str> = credits.iter().map(|c| c.from_username.as_str()).collect();
            let refund_of: Vec<Option<uuid::Uuid>> =
                credits.iter().map(|c| c.refund_of.map(|t| t.0)).collect();
            let dispute: Vec<Option<uuid::Uuid>> = credits.iter().map(|c| c.dispute).collect();
            let enforce = enforce_fence();
            let rows = conn
                .query(
                    &stmt,
                    &[
                        &buckets,
                        &tid,
                        &user,
                        &amount,
                        &currency,
                        &user_name,
                        &party,
                        &party_name,
                        &fence,
                        &enforce,
                        &refund_of,
                        &dispute,
                    ],
                )
                .await
                .map_err(self.pg("apply fenced credits"))?;
            let row = rows
                .first()
                .ok_or_else(|| self.corrupt("fenced credits answered no row".into()))?;
            let verdicts: Vec<Option<String>> = row.get(0);
            verdicts
                .iter()
                .map(|v| match v.as_deref() {
                    None => Ok(Credited::Yes),
                    Some("applied:") => Ok(Credited::AlreadyApplied),
                    Some("missing:") => Ok(Credited::Missing),
                    Some(v) => v
                        .strip_prefix("fence:")
                        .and_then(|f| f.parse().ok())
                        .map(|last_fence| Credited::FenceRejected { last_fence })
                        .ok_or_else(|| self.corrupt(format!("fenced credit answered {v:?}"))),
                })
                .collect()
        })
        .await
    }

    /// Clears the pending credits of transfers whose credit is applied, with
    /// an asynchronous commit: a clear lost in a crash leaves a pending credit
    /// that recovery finds applied and clears again, so it need not wait for
    /// its own fsync (the credit it follows did).
    pub async fn clear_pending_credits(&self, tids: &[TransferId]) -> ShardResult<()> {
        self.timed("clear pending credits", async {
            let mut conn = self.conn().await?;
            let stmt = conn
                .prepare_cached("DELETE FROM pending_credits WHERE transfer_id = ANY ($1)")
                .await
                .map_err(self.pg("prepare clear pending credits"))?;
            let ids: Vec<uuid::Uuid> = tids.iter().map(|t| t.0).collect();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
            conn.mark_in_txn();
            // Pipelined, in order: the statement is prepared, so each of the
            // three goes out on its first poll.
            let (begun, deleted, committed) = tokio::join!(
                conn.batch_execute(
                    "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL synchronous_commit = off"
                ),
                conn.execute(&stmt, &params),
                conn.batch_execute("COMMIT")
            );
            // COMMIT ends the transaction even after a failed statement (it
            // then rolls back), so the connection can go back to the pool.
            if committed.is_ok() {
                conn.ended();
            }
            begun.map_err(self.pg("begin clear pending credits"))?;
            deleted.map_err(self.pg("clear pending credits"))?;
            committed.map_err(self.pg("commit clear pending credits"))?;
            Ok(())
        })
        .await
    }

    /// Records a failed attempt at pending credits, with its reason.
    pub async fn pending_credits_failed(
        &self,
        tids: &[TransferId],
        reason: &str,
    ) -> ShardResult<()> {
        self.timed("record pending credit attempt", async {
            let conn = self.conn().await?;
            let ids: Vec<uuid::Uuid> = tids.iter().map(|t| t.0).collect();
            conn.execute(
                "UPDATE pending_credits
                 SET attempts = attempts + 1, last_error = $2, last_attempt_at = now()
                 WHERE transfer_id = ANY ($1)",
                &[&ids, &reason],
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
                    "SELECT transfer_id, to_user, to_username, from_username, amount, currency, refund_of,
                            dispute_id
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
                        refund_of: r.get::<_, Option<uuid::Uuid>>("refund_of").map(TransferId),
                        dispute: r.get("dispute_id"),
                    })
                })
                .collect()
        })
        .await
    }
}
