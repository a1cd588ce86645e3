//! The shard's side of the wallet's rules outside a group: an admin's daily
//! limit, what a refund may give back, and a fraud rule evaluation that moves
//! nothing. Enforcement itself is the group's check (`wallet_batch_check`).

use router::UserId;
use rust_decimal::Decimal;
use tracing::instrument;

use crate::agent::{buckets_of, ShardAgent};
use crate::error::ShardResult;
use crate::money::{Amount, Currency};
use crate::records::{TransferId, TransferRecord, TRANSFER_COLUMNS};
use crate::rules::Action;

/// A user's daily limit as the account row holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitRow {
    pub currency: Currency,
    /// The admin's override (`None`: the configured default).
    pub daily_limit: Option<Decimal>,
    /// What transfers took out today (UTC).
    pub used_today: Decimal,
}

/// A committed transfer as its payee may refund it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refundable {
    /// What it credited the payee.
    pub amount: Decimal,
    /// Its payer, as the credit names them.
    pub payer_username: String,
    /// What committed refunds gave back so far.
    pub refunded: Decimal,
}

/// A fraud rule a transfer would meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleHit {
    pub action: Action,
    pub rule: String,
}

impl ShardAgent {
    /// Sets (or with `None` clears) the admin's daily limit of `user`, under
    /// the ownership check of their bucket. `None` if the user has no account
    /// here.
    #[instrument(skip_all, fields(shard = %self.id(), user = %user))]
    pub async fn set_daily_limit(
        &self,
        user: UserId,
        daily: Option<Decimal>,
    ) -> ShardResult<Option<LimitRow>> {
        self.timed("set daily limit", async {
            let mut conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(
                    "UPDATE accounts SET daily_limit = $2 WHERE user_id = $1
                     RETURNING currency, daily_limit,
                               CASE WHEN used_day >= (now() AT TIME ZONE 'UTC')::date
                                    THEN used_today ELSE 0 END AS used_today",
                )
                .await
                .map_err(self.pg("prepare set daily limit"))?;
            let rows = self
                .owned_autocommit(
                    &mut conn,
                    &buckets_of([&user]),
                    &stmt,
                    &[user.as_uuid(), &daily],
                    self.pg("set daily limit"),
                )
                .await?;
            rows.first()
                .map(|r| {
                    let currency: String = r.get("currency");
                    Ok(LimitRow {
                        currency: currency
                            .trim()
                            .parse()
                            .map_err(|_| self.corrupt(format!("account currency {currency:?}")))?,
                        daily_limit: r.get("daily_limit"),
                        used_today: r.get("used_today"),
                    })
                })
                .transpose()
        })
        .await
    }

    /// Transfer `tid` as `payee` may refund it: only a committed transfer
    /// credited to `payee` (the credit entry exists only then). `None` for any
    /// other transfer, so a caller who is not its payee learns nothing.
    pub async fn refundable(
        &self,
        payee: UserId,
        tid: TransferId,
    ) -> ShardResult<Option<Refundable>> {
        self.timed(
            "read refundable",
            self.owned_read(&buckets_of([&payee]), async |conn| {
                let row = conn
                    .query_opt(
                        "SELECT e.amount, e.counterparty,
                                (SELECT coalesce(sum(t.amount), 0) FROM transfers t
                                  WHERE t.refund_of = e.transfer_id AND t.state = 'committed')
                                  AS refunded
                           FROM ledger_entries e JOIN accounts a USING (account_id)
                          WHERE e.transfer_id = $1 AND a.user_id = $2 AND e.kind = 'transfer_credit'",
                        &[&tid.0, payee.as_uuid()],
                    )
                    .await
                    .map_err(self.pg("read refundable"))?;
                Ok(row.and_then(|r| {
                    Some(Refundable {
                        amount: r.get("amount"),
                        payer_username: r.get::<_, Option<String>>("counterparty")?,
                        refunded: r.get("refunded"),
                    })
                }))
            }),
        )
        .await
    }

    /// The refunds of transfer `tid` its payee `payee` made (they are recorded
    /// on the payee's shard), oldest first.
    pub async fn refunds_of(
        &self,
        payee: UserId,
        tid: TransferId,
    ) -> ShardResult<Vec<TransferRecord>> {
        self.timed(
            "read refunds",
            self.owned_read(&buckets_of([&payee]), async |conn| {
                let rows = conn
                    .query(
                        &format!(
                            "SELECT {TRANSFER_COLUMNS} FROM transfers
                              WHERE refund_of = $1 AND from_user = $2 ORDER BY created_at"
                        ),
                        &[&tid.0, payee.as_uuid()],
                    )
                    .await
                    .map_err(self.pg("read refunds"))?;
                rows.iter()
                    .map(|r| TransferRecord::from_row(self.id(), r))
                    .collect()
            }),
        )
        .await
    }

    /// The fraud rule a transfer of `amount` from `payer` to `payee` would meet
    /// now, by the same function the group's check runs
    /// (`wallet_fraud_check`), moving and locking nothing. `None`: no rule.
    pub async fn fraud_check(
        &self,
        payer: UserId,
        payee: UserId,
        amount: Amount,
    ) -> ShardResult<Option<RuleHit>> {
        let Some(rules) = self.config().rules.sql_rules() else {
            return Ok(None);
        };
        self.timed(
            "fraud check",
            self.owned_read(&buckets_of([&payer]), async |conn| {
                let row = conn
                    .query_one(
                        "SELECT (wallet_fraud_check(ARRAY[true], ARRAY[$1::uuid], ARRAY[$2::uuid],
                                                    ARRAY[$3::numeric], ARRAY[$4::text],
                                                    ARRAY[NULL::uuid], ARRAY[NULL::text], $5))[1]",
                        &[
                            payer.as_uuid(),
                            payee.as_uuid(),
                            &amount.value(),
                            &amount.currency().code(),
                            &rules,
                        ],
                    )
                    .await
                    .map_err(self.pg("fraud check"))?;
                let hit: Option<String> = row.get(0);
                hit.map(|h| {
                    let (action, rule) = h.split_once(':').unwrap_or((h.as_str(), ""));
                    let action = match action {
                        "block" => Action::Block,
                        "review" => Action::Review,
                        other => {
                            return Err(self.corrupt(format!("fraud check answered {other:?}")))
                        }
                    };
                    Ok(RuleHit {
                        action,
                        rule: rule.to_owned(),
                    })
                })
                .transpose()
            }),
        )
        .await
    }
}

/// What ending a held transfer found (`wallet_hold_end`).
#[derive(Clone, Debug, PartialEq)]
pub enum HoldEnded {
    /// Aborted now, its hold released.
    Ended(TransferRecord),
    /// Not held (released, rejected or expired before, or, for an expiry,
    /// not old enough): the record as it stands.
    NotHeld(TransferRecord),
    NotFound,
}

impl ShardAgent {
    /// Transfer `tid` if this shard serves its payer (a held transfer's admin
    /// routes name only the transfer, so the coordinator asks every shard).
    pub async fn served_transfer(&self, tid: TransferId) -> ShardResult<Option<TransferRecord>> {
        self.timed("read served transfer", async {
            let conn = self.conn().await?;
            let row = conn
                .query_opt(
                    &format!(
                        "SELECT {TRANSFER_COLUMNS} FROM transfers t
                          WHERE transfer_id = $1 AND t.from_user IS NOT NULL
                            AND coalesce((SELECT wallet_serves(u.bucket) FROM users u
                                           WHERE u.user_id = t.from_user), false)"
                    ),
                    &[&tid.0],
                )
                .await
                .map_err(self.pg("read served transfer"))?;
            row.map(|r| TransferRecord::from_row(self.id(), &r))
                .transpose()
        })
        .await
    }

    /// Ends held transfer `tid` of `payer` without moving its money
    /// (`wallet_hold_end`): `code` is `TransferRejected` (an admin) or
    /// `HoldExpired` (only if held longer than `older_than`).
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %tid))]
    pub async fn end_hold(
        &self,
        tid: TransferId,
        payer: UserId,
        code: crate::records::FailureCode,
        older_than: Option<std::time::Duration>,
    ) -> ShardResult<HoldEnded> {
        self.timed("end hold", async {
            let conn = self.conn().await?;
            let bucket = i32::from(router::bucket_of(&payer).0);
            let older = older_than.map(|d| d.as_secs_f64());
            let row = conn
                .query_one(
                    &format!(
                        "SELECT verdict, {} FROM wallet_hold_end($1, $2, $3,
                                  make_interval(secs => $4::float8)) AS v (verdict, ended)",
                        TRANSFER_COLUMNS
                            .split(", ")
                            .map(|c| format!("(ended).{}", c.trim()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    &[&bucket, &tid.0, &code.as_str(), &older],
                )
                .await
                .map_err(self.pg("end hold"))?;
            let verdict: Option<&str> = row.get("verdict");
            match verdict {
                Some("not_found") => Ok(HoldEnded::NotFound),
                None => Ok(HoldEnded::Ended(TransferRecord::from_row(self.id(), &row)?)),
                Some("not_held") => Ok(HoldEnded::NotHeld(TransferRecord::from_row(
                    self.id(),
                    &row,
                )?)),
                Some(other) => Err(self.corrupt(format!("end hold answered {other:?}"))),
            }
        })
        .await
    }

    /// Held transfers of this shard's payers older than `older_than`, oldest
    /// first, at most `limit`: what the expiry pass ends.
    pub async fn expired_holds(
        &self,
        older_than: std::time::Duration,
        limit: i64,
    ) -> ShardResult<Vec<(TransferId, UserId)>> {
        self.timed("list expired holds", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT transfer_id, from_user FROM transfers t
                      WHERE state = 'held' AND created_at < now() - make_interval(secs => $1)
                        AND coalesce((SELECT wallet_serves(u.bucket) FROM users u
                                       WHERE u.user_id = t.from_user), false)
                      ORDER BY created_at LIMIT $2",
                    &[&older_than.as_secs_f64(), &limit],
                )
                .await
                .map_err(self.pg("list expired holds"))?;
            Ok(rows
                .iter()
                .map(|r| (TransferId(r.get(0)), UserId(r.get(1))))
                .collect())
        })
        .await
    }
}
