//! Groups (the `wallet_batch_*` SQL functions): the one protocol every
//! transfer runs by. A group is one transaction per shard for concurrent
//! transfers, each still decided on its own (one refused transfer never sinks
//! its group); a lone transfer is a group of one.
//!
//! - A same-shard group is one statement ([`ShardAgent::transfer_local_batch`]).
//! - A cross-shard group takes three steps. [`ShardAgent::open_batch`] claims
//!   the payers' keys, locks the group's accounts and checks every leg, leaving
//!   its transaction open. Then, on every shard at once, the transfers that
//!   passed everywhere move their money and every payer's transfer is recorded:
//!   [`OpenBatch::prepare`] prepares the transaction, except on the deciding
//!   shard, whose [`OpenBatch::apply_undecided`] leaves it open. Last,
//!   [`OpenBatch::decide`] inserts the group's decision row there and commits:
//!   that commit decides the whole group.
//!
//! Every transfer gets its answer from the group ([`GroupAnswer`]): its new
//! record, a refusal recorded as an abort, or, writing nothing, a replay, a
//! transfer in progress, a key reused, a session that is not live.
//!
//! Crash rule: until the deciding shard commits there is no decision row, and
//! recovery rolls back the group's prepared transactions through the tombstone
//! compare-and-set (their GID names the group's ID and the deciding shard).
//! After it commits, recovery commits them.

use router::{ShardId, UserId};
use rust_decimal::Decimal;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use tracing::instrument;
use uuid::Uuid;

use crate::agent::{Conn, ShardAgent};
use crate::error::{ShardError, ShardResult};
use crate::gid::Gid;
use crate::idempotency::{broken_skip_idempotency, IdempotencyKey};
use crate::money::{Amount, Currency};
use crate::records::{FailureCode, TransferId, TransferRecord, TransferState};
use crate::transfer::{Submitted, TransferOrder};

/// The columns of a group's answers (`wallet_batch_apply`).
const ANSWER_COLUMNS: &str = "for_transfer, verdict, transfer_id, kind, mode, from_user, \
     from_username, to_user, to_username, amount, currency, state, failure_code, participants, \
     created_at, decided_at, refund_of, reason, failure_detail";

/// SQLSTATE the batch functions raise when a payer has no account.
const PAYER_MISSING: &str = "WL008";
/// SQLSTATE `wallet_key_answer` raises when a key points at no transfer.
const KEY_DANGLING: &str = "WL011";

/// One transfer's leg on one shard. A same-shard transfer has two legs on its
/// shard, debit first; a cross-shard transfer has one on each.
#[derive(Clone, Debug)]
pub struct BatchLeg {
    pub tid: TransferId,
    /// The payer's leg (which also claims the key and carries the record).
    pub debit: bool,
    pub user: UserId,
    pub user_name: String,
    /// The other side of the transfer.
    pub party: UserId,
    pub party_name: String,
    pub amount: Amount,
    /// The payer's Idempotency-Key, on the debit leg.
    pub key: Option<IdempotencyKey>,
    /// On the debit leg of a payer the coordinator has not verified: the SHA-256
    /// of their session token, which the check reads on this shard (`wallet_batch_check`).
    pub session: Option<Vec<u8>>,
    /// A refund's original transfer, on both legs.
    pub refund_of: Option<TransferId>,
    /// A refund's reason, on the debit leg.
    pub reason: Option<String>,
    /// A dispute's refund: the dispute it resolves, on both legs.
    pub dispute: Option<Uuid>,
    /// A release of the held transfer `tid`.
    pub release: bool,
}

impl BatchLeg {
    /// A transfer's two legs, debit first. `session`: the payer's token hash
    /// while their session is unread.
    pub fn both(tid: TransferId, order: &TransferOrder, session: Option<Vec<u8>>) -> [BatchLeg; 2] {
        [
            BatchLeg {
                tid,
                debit: true,
                user: order.from,
                user_name: order.from_username.clone(),
                party: order.to,
                party_name: order.to_username.clone(),
                amount: order.amount,
                key: Some(order.key.clone()),
                session,
                refund_of: order.refund_of,
                reason: order.reason.clone(),
                dispute: order.dispute,
                release: order.release_of.is_some(),
            },
            BatchLeg {
                tid,
                debit: false,
                user: order.to,
                user_name: order.to_username.clone(),
                party: order.from,
                party_name: order.from_username.clone(),
                amount: order.amount,
                key: None,
                session: None,
                refund_of: order.refund_of,
                reason: None,
                dispute: order.dispute,
                release: order.release_of.is_some(),
            },
        ]
    }
}

/// What a leg's check found, and then a transfer's outcome over all its legs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// A business refusal: recorded as the transfer's abort.
    Refused(FailureCode),
    /// The request is answered without writing anything for this transfer.
    Answered(Answer),
}

/// How a transfer is answered when nothing of it is written
/// (`wallet_batch_check`, `wallet_key_answer`), in the order they win.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The payer's session is not live.
    Unauthorized,
    /// The payer's account holds this currency, not the transfer's.
    PayerCurrency(Currency),
    /// The key was used for another request.
    KeyReused,
    /// The key's transfer is still being decided.
    InProgress(TransferId),
    /// The key's transfer is decided: its record is the answer.
    Replay(TransferId),
    /// The key's row vanished under the check (its claimant rolled back):
    /// nothing was written, and a retry runs afresh.
    KeyBusy,
}

impl Verdict {
    fn as_sql(self) -> Option<String> {
        match self {
            Verdict::Pass => None,
            Verdict::Refused(code) => Some(code.as_str().to_owned()),
            Verdict::Answered(answer) => Some(match answer {
                Answer::Unauthorized => "unauthorized:".to_owned(),
                Answer::PayerCurrency(c) => format!("payer_currency:{}", c.code()),
                Answer::KeyReused => "key_reused:".to_owned(),
                Answer::InProgress(tid) => format!("in_progress:{tid}"),
                Answer::Replay(tid) => format!("replay:{tid}"),
                Answer::KeyBusy => "key_busy:".to_owned(),
            }),
        }
    }

    fn from_sql(agent: &ShardAgent, text: Option<&str>) -> ShardResult<Verdict> {
        verdict_of(text).ok_or_else(|| agent.corrupt(format!("batch check answered {text:?}")))
    }

    /// The transfer's outcome from its legs' verdicts: an answer that writes
    /// nothing wins (only the payer's shard gives one, so two never meet), then
    /// the refusal that comes first in [`FailureCode::precedence`], whichever
    /// shard found it.
    pub fn merge(self, other: Verdict) -> Verdict {
        match (self, other) {
            (answered @ Verdict::Answered(_), _) | (_, answered @ Verdict::Answered(_)) => answered,
            (Verdict::Pass, other) => other,
            (Verdict::Refused(a), Verdict::Refused(b)) if b.precedence() < a.precedence() => {
                Verdict::Refused(b)
            }
            (refused, _) => refused,
        }
    }
}

/// A verdict from its SQL text; `None` for a text no function writes.
fn verdict_of(text: Option<&str>) -> Option<Verdict> {
    let Some(text) = text else {
        return Some(Verdict::Pass);
    };
    let Some((word, arg)) = text.split_once(':') else {
        return text.parse::<FailureCode>().ok().map(Verdict::Refused);
    };
    let tid = || arg.parse::<TransferId>().ok();
    let answer = match word {
        "unauthorized" => Answer::Unauthorized,
        "payer_currency" => Answer::PayerCurrency(arg.parse().ok()?),
        "key_reused" => Answer::KeyReused,
        "in_progress" => Answer::InProgress(tid()?),
        "replay" => Answer::Replay(tid()?),
        "key_busy" => Answer::KeyBusy,
        _ => return None,
    };
    Some(Verdict::Answered(answer))
}

/// A group's answer for one of its transfers, from the shard of its payer.
#[derive(Clone, Debug)]
pub struct GroupAnswer {
    /// The transfer ID the group gave it.
    pub tid: TransferId,
    pub verdict: Verdict,
    /// The record written for it, or, for [`Answer::Replay`] and
    /// [`Answer::InProgress`], the one its key points at.
    pub record: Option<TransferRecord>,
}

impl GroupAnswer {
    fn from_row(agent: &ShardAgent, row: &Row) -> ShardResult<GroupAnswer> {
        let record = match row.get::<_, Option<Uuid>>("transfer_id") {
            Some(_) => Some(TransferRecord::from_row(agent.id(), row)?),
            None => None,
        };
        Ok(GroupAnswer {
            tid: TransferId(row.get("for_transfer")),
            verdict: Verdict::from_sql(agent, row.get("verdict"))?,
            record,
        })
    }

    /// The client's answer: the record of a transfer this group decided or
    /// one it replays, or (`Ok(Err(_))`) what the check answered without a
    /// record. A record that should be here and is not is a corrupt shard.
    pub fn submitted(self, shard: ShardId) -> ShardResult<Result<Submitted, Answer>> {
        let tid = self.tid;
        let missing = || ShardError::CorruptRow {
            shard,
            detail: format!("the group's answer for transfer {tid} has no record"),
        };
        Ok(match (self.verdict, self.record) {
            (Verdict::Pass | Verdict::Refused(_), Some(r)) => Ok(Submitted::New(r)),
            (Verdict::Answered(Answer::Replay(_)), Some(r)) => Ok(Submitted::Replayed(r)),
            // Read after the check: decided meanwhile, it is a replay.
            (Verdict::Answered(Answer::InProgress(_)), Some(r))
                if r.state != TransferState::Preparing =>
            {
                Ok(Submitted::Replayed(r))
            }
            (Verdict::Answered(Answer::InProgress(_)), Some(r)) => Ok(Submitted::InProgress(r)),
            (Verdict::Answered(Answer::KeyReused), _) => Ok(Submitted::KeyReused),
            (
                Verdict::Answered(Answer::Replay(_) | Answer::InProgress(_))
                | Verdict::Pass
                | Verdict::Refused(_),
                None,
            ) => return Err(missing()),
            (Verdict::Answered(answer), _) => Err(answer),
        })
    }
}

/// The group's transaction on one shard after its check: open, holding the
/// claimed keys and the account locks. Dropped without [`OpenBatch::prepare`] or [`OpenBatch::decide`], its
/// connection is closed and PostgreSQL rolls it back.
pub struct OpenBatch<'a> {
    agent: &'a ShardAgent,
    conn: Conn,
}

/// The legs as the column arrays the batch functions take.
struct Columns {
    tid: Vec<Uuid>,
    debit: Vec<bool>,
    user: Vec<Uuid>,
    amount: Vec<Decimal>,
    currency: Vec<&'static str>,
    key_user: Vec<Option<Uuid>>,
    key: Vec<Option<String>>,
    fingerprint: Vec<Option<Vec<u8>>>,
    session: Vec<Option<Vec<u8>>>,
    user_name: Vec<String>,
    party: Vec<Uuid>,
    party_name: Vec<String>,
    /// The configured daily limit of each payer's leg (its currency's).
    limit: Vec<Option<Decimal>>,
    refund_of: Vec<Option<Uuid>>,
    reason: Vec<Option<String>>,
    /// The configured fraud rules (`None`: none).
    rules: Option<serde_json::Value>,
    dispute: Vec<Option<Uuid>>,
    release: Vec<bool>,
}

impl Columns {
    /// The parameters of `wallet_batch_check` that follow the legs' verdicts
    /// so far, and of `wallet_batch_local` that follow its lock bound.
    fn rule_params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.party,
            &self.limit,
            &self.refund_of,
            &self.rules,
            &self.dispute,
            &self.release,
        ]
    }

    /// The leading parameters of `wallet_batch_check` and `wallet_batch_local`.
    fn check_params(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.tid,
            &self.debit,
            &self.user,
            &self.amount,
            &self.currency,
            &self.key_user,
            &self.key,
            &self.fingerprint,
            &self.session,
        ]
    }

    fn of(agent: &ShardAgent, legs: &[BatchLeg]) -> Columns {
        let rules = &agent.config().rules;
        let keys: Vec<Option<IdempotencyKey>> = legs
            .iter()
            .map(|l| l.key.as_ref().map(broken_skip_idempotency))
            .collect();
        Columns {
            tid: legs.iter().map(|l| l.tid.0).collect(),
            debit: legs.iter().map(|l| l.debit).collect(),
            user: legs.iter().map(|l| l.user.0).collect(),
            amount: legs.iter().map(|l| l.amount.value()).collect(),
            currency: legs.iter().map(|l| l.amount.currency().code()).collect(),
            key_user: keys.iter().map(|k| k.as_ref().map(|k| k.user.0)).collect(),
            key: keys
                .iter()
                .map(|k| k.as_ref().map(|k| k.key.clone()))
                .collect(),
            fingerprint: keys
                .iter()
                .map(|k| k.as_ref().map(|k| k.fingerprint.clone()))
                .collect(),
            session: legs.iter().map(|l| l.session.clone()).collect(),
            user_name: legs.iter().map(|l| l.user_name.clone()).collect(),
            party: legs.iter().map(|l| l.party.0).collect(),
            party_name: legs.iter().map(|l| l.party_name.clone()).collect(),
            limit: legs
                .iter()
                .map(|l| {
                    l.debit
                        .then(|| rules.daily_limit(l.amount.currency()))
                        .flatten()
                })
                .collect(),
            refund_of: legs.iter().map(|l| l.refund_of.map(|t| t.0)).collect(),
            reason: legs.iter().map(|l| l.reason.clone()).collect(),
            rules: rules.sql_rules(),
            dispute: legs.iter().map(|l| l.dispute).collect(),
            release: legs.iter().map(|l| l.release).collect(),
        }
    }
}

/// A deliberately broken variant for the chaos suite (failpoint
/// `broken-limit-outside-check`): the group's check is not told the daily
/// limits, which the coordinator then reads before it queues the transfer
/// (`coordinator::service`), outside the transaction that moves the money.
/// Two transfers of one payer in flight together can then pass a limit each
/// fits alone. The checker must catch it; compiled in only with the
/// `failpoints` feature.
fn broken_limit_outside_check(c: &mut Columns) {
    #[cfg(feature = "failpoints")]
    if fail::eval("broken-limit-outside-check", |_| ()).is_some() {
        c.limit.iter_mut().for_each(|l| *l = None);
    }
    let _ = c;
}

impl ShardAgent {
    /// A same-shard group in one autocommitted statement, each row lock waited
    /// for at most `lock_wait_ms`. Answers every transfer of the group.
    #[instrument(skip_all, fields(shard = %self.id(), transfers = legs.len() / 2))]
    pub async fn transfer_local_batch(
        &self,
        legs: &[BatchLeg],
        lock_wait_ms: u64,
    ) -> ShardResult<Vec<GroupAnswer>> {
        self.timed("local batch", async {
            let mut c = Columns::of(self, legs);
            broken_limit_outside_check(&mut c);
            let buckets = crate::agent::buckets_of(legs.iter().map(|l| &l.user));
            let conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(&format!(
                    "SELECT {ANSWER_COLUMNS} FROM wallet_batch_local($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)"
                ))
                .await
                .map_err(self.pg("prepare local batch"))?;
            let lock_wait_ms = i32::try_from(lock_wait_ms).unwrap_or(i32::MAX);
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&buckets];
            params.extend(c.check_params());
            params.extend([
                &c.user_name as &(dyn ToSql + Sync),
                &c.party,
                &c.party_name,
                &lock_wait_ms,
                &c.limit,
                &c.refund_of,
                &c.reason,
                &c.rules,
                &c.dispute,
                &c.release,
            ]);
            let rows = conn
                .query(&stmt, &params)
                .await
                .map_err(|e| self.batch_error("local batch", e))?;
            rows.iter()
                .map(|r| GroupAnswer::from_row(self, r))
                .collect()
        })
        .await
    }

    /// Redis mode: a group's debits on this payer shard, in one autocommitted
    /// statement (`wallet_redis_debit`) whose commit is the commit point of
    /// every transfer it passes, each with a pending credit. `legs` are the
    /// debit legs; `prior` each transfer's verdict so far (a payee's refusal,
    /// or [`FailureCode::LockUnavailable`] for one whose locks were not
    /// granted: recorded, with nothing moved). `fence` is the token of the
    /// locks; each row lock is waited for at most `lock_wait_ms`. An error
    /// the shard answered ([`ShardError::Database`], [`ShardError::LockTimeout`])
    /// means nothing was written; any other leaves the outcome unknown.
    #[instrument(skip_all, fields(shard = %self.id(), transfers = legs.len(), fence))]
    pub async fn redis_debit_group(
        &self,
        legs: &[BatchLeg],
        prior: &[Verdict],
        fence: i64,
        lock_wait_ms: u64,
    ) -> ShardResult<Vec<GroupAnswer>> {
        self.timed("fenced debits", async {
            let mut c = Columns::of(self, legs);
            broken_limit_outside_check(&mut c);
            let prior: Vec<Option<String>> = prior.iter().map(|v| v.as_sql()).collect();
            let buckets = crate::agent::buckets_of(legs.iter().map(|l| &l.user));
            let conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(&format!(
                    "SELECT {ANSWER_COLUMNS} FROM wallet_redis_debit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)"
                ))
                .await
                .map_err(self.pg("prepare fenced debits"))?;
            let lock_wait_ms = i32::try_from(lock_wait_ms).unwrap_or(i32::MAX);
            let enforce = crate::redis_legs::enforce_fence();
            let params: [&(dyn ToSql + Sync); 22] = [
                &buckets,
                &c.tid,
                &c.user,
                &c.amount,
                &c.currency,
                &c.key_user,
                &c.key,
                &c.fingerprint,
                &c.session,
                &prior,
                &c.user_name,
                &c.party,
                &c.party_name,
                &fence,
                &enforce,
                &lock_wait_ms,
                &c.limit,
                &c.refund_of,
                &c.reason,
                &c.rules,
                &c.dispute,
                &c.release,
            ];
            let rows = conn
                .query(&stmt, &params)
                .await
                .map_err(|e| self.batch_error("fenced debits", e))?;
            rows.iter()
                .map(|r| GroupAnswer::from_row(self, r))
                .collect()
        })
        .await
    }

    /// Step 1 of a cross-shard group on this shard: opens a transaction, claims
    /// the payers' keys, locks the legs' accounts in user-ID order and checks each
    /// leg. `prior` is each leg's transfer's verdict from the shards before this
    /// one (a refused transfer only has its key claimed here). `lock_wait_ms`
    /// bounds each lock wait of this transaction below the agent's lock_timeout
    /// (a wait past it is [`ShardError::LockTimeout`]). Returns the open
    /// transaction and each leg's verdict so far.
    #[instrument(skip_all, fields(shard = %self.id(), legs = legs.len()))]
    pub async fn open_batch(
        &self,
        legs: &[BatchLeg],
        prior: &[Verdict],
        lock_wait_ms: Option<u64>,
    ) -> ShardResult<(OpenBatch<'_>, Vec<Verdict>)> {
        self.timed("open batch", async {
            let mut c = Columns::of(self, legs);
            broken_limit_outside_check(&mut c);
            let prior: Vec<Option<String>> = prior.iter().map(|v| v.as_sql()).collect();
            let mut conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(
                    "SELECT wallet_batch_check($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                )
                .await
                .map_err(self.pg("prepare batch check"))?;
            let mut params = c.check_params().to_vec();
            params.push(&prior);
            params.extend(c.rule_params());
            conn.mark_in_txn();
            let begin = match lock_wait_ms {
                // Read committed, whatever the server's default: the deciding
                // statement must see a tombstone recovery committed after BEGIN.
                Some(ms) => {
                    format!("BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL lock_timeout = {ms}")
                }
                None => "BEGIN ISOLATION LEVEL READ COMMITTED".to_owned(),
            };
            let own = conn
                .prepare_cached(crate::agent::OWN_WRITE)
                .await
                .map_err(self.pg("prepare ownership check"))?;
            let buckets = crate::agent::buckets_of(legs.iter().map(|l| &l.user));
            let own_params: [&(dyn ToSql + Sync); 1] = [&buckets];
            // Pipelined: BEGIN, the ownership check and the group's check go
            // out together.
            let (begun, owned, checked) = tokio::join!(
                conn.batch_execute(&begin),
                conn.execute(&own, &own_params),
                conn.query_one(&stmt, &params)
            );
            begun.map_err(self.pg("begin batch"))?;
            let row = match owned
                .map_err(self.pg("ownership check"))
                .and_then(|_| checked.map_err(|e| self.batch_error("batch check", e)))
            {
                Ok(row) => row,
                Err(e) => {
                    // The shard refused (a bucket moving, a lock not granted):
                    // end the transaction so the connection goes back to the
                    // pool instead of being discarded, which would cost the
                    // next caller a new server process. A connection that
                    // cannot roll back is discarded all the same.
                    conn.rollback_quietly().await;
                    return Err(e);
                }
            };
            let verdicts: Vec<Option<String>> = row.get(0);
            let verdicts = verdicts
                .iter()
                .map(|v| Verdict::from_sql(self, v.as_deref()))
                .collect::<ShardResult<Vec<_>>>()?;
            if verdicts.len() != legs.len() {
                return Err(self.corrupt(format!(
                    "batch check answered {} verdicts for {} legs",
                    verdicts.len(),
                    legs.len()
                )));
            }
            Ok((OpenBatch { agent: self, conn }, verdicts))
        })
        .await
    }

    fn batch_error(&self, context: &'static str, e: tokio_postgres::Error) -> ShardError {
        match e.code().map(|c| c.code()) {
            Some(PAYER_MISSING) => self.corrupt(format!("{context}: a payer has no account")),
            Some(KEY_DANGLING) => self.corrupt(format!(
                "{context}: {}",
                e.as_db_error()
                    .map_or("a key points at no transfer", |d| d.message())
            )),
            _ => ShardError::from_pg(self.id(), context, e),
        }
    }
}

impl OpenBatch<'_> {
    /// Step 2 on every shard but the deciding one: applies the legs whose
    /// transfer's `outcome` is a pass, records the transfers whose payer is here
    /// (committed, or aborted with the refusal), and prepares under `gid`.
    /// Returns the records. An error leaves the transaction's outcome unknown
    /// unless the shard answered it ([`ShardError::Database`],
    /// [`ShardError::LockTimeout`]): then nothing of it is prepared.
    #[instrument(skip_all, fields(shard = %self.agent.id(), batch = %batch))]
    pub async fn prepare(
        mut self,
        batch: Uuid,
        gid: Gid,
        participants: &[String],
        legs: &[BatchLeg],
        outcomes: &[Verdict],
    ) -> ShardResult<Vec<GroupAnswer>> {
        // A shard that fails its prepare, for the chaos suite: the group must
        // then decide nothing (`broken-commit-unprepared` decides anyway).
        #[cfg(feature = "failpoints")]
        fail::fail_point!("shard-before-prepare-transaction", |_| Err(
            ShardError::Unavailable {
                shard: self.agent.id(),
                reason: "failpoint shard-before-prepare-transaction".into(),
            }
        ));
        let end = format!("PREPARE TRANSACTION '{gid}'");
        let records = self.apply(participants, legs, outcomes, Some(&end)).await?;
        self.conn.ended();
        Ok(records)
    }

    /// Step 2 on the deciding shard, while the others prepare: the same apply,
    /// leaving the transaction open for [`OpenBatch::decide`]. Returns the
    /// records; they count only once the decision commits.
    #[instrument(skip_all, fields(shard = %self.agent.id(), batch = %batch))]
    pub async fn apply_undecided(
        &mut self,
        batch: Uuid,
        participants: &[String],
        legs: &[BatchLeg],
        outcomes: &[Verdict],
    ) -> ShardResult<Vec<GroupAnswer>> {
        self.apply(participants, legs, outcomes, None).await
    }

    /// Step 3, once every other shard has prepared: the group's decision row,
    /// under the group's advisory lock, and `COMMIT`. That commit decides the
    /// whole group. An error leaves the decision unknown unless the shard
    /// answered it; WL010 (a `Database` error): recovery aborted the group first.
    #[instrument(skip_all, fields(shard = %self.agent.id(), batch = %batch))]
    pub async fn decide(mut self, batch: Uuid) -> ShardResult<()> {
        let agent = self.agent;
        agent
            .timed("decide batch", async {
                let stmt = self
                    .conn
                    .prepare_cached("SELECT wallet_batch_decide($1)")
                    .await
                    .map_err(agent.pg("prepare batch decision"))?;
                // Pipelined: if the decision fails, the COMMIT rolls back.
                let params: [&(dyn ToSql + Sync); 1] = [&batch];
                let (decided, committed) = tokio::join!(
                    self.conn.execute(&stmt, &params),
                    self.conn.batch_execute("COMMIT")
                );
                // The COMMIT answered: the transaction is over either way (a
                // refused decision turned it into a rollback), and the
                // connection can go back to the pool.
                if committed.is_ok() {
                    self.conn.ended();
                }
                decided.map_err(|e| agent.batch_error("batch decision", e))?;
                committed.map_err(agent.pg("commit batch decision"))?;
                Ok(())
            })
            .await
    }

    /// `wallet_batch_apply` (which never decides: [`OpenBatch::decide`] does),
    /// followed in the same message by `end`, if any.
    async fn apply(
        &mut self,
        participants: &[String],
        legs: &[BatchLeg],
        outcomes: &[Verdict],
        end: Option<&str>,
    ) -> ShardResult<Vec<GroupAnswer>> {
        let agent = self.agent;
        agent
            .timed("apply batch", async {
                let c = Columns::of(agent, legs);
                let outcomes: Vec<Option<String>> = outcomes.iter().map(|v| v.as_sql()).collect();
                let stmt = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT {ANSWER_COLUMNS} FROM wallet_batch_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, $12, $13, $14, $15)"
                    ))
                    .await
                    .map_err(agent.pg("prepare batch apply"))?;
                // The mode column's text for Mode::TwoPc (cross-shard groups only).
                let mode = "2pc";
                let params: [&(dyn ToSql + Sync); 15] = [
                    &participants,
                    &mode,
                    &c.tid,
                    &c.debit,
                    &c.user,
                    &c.amount,
                    &c.currency,
                    &c.user_name,
                    &c.party,
                    &c.party_name,
                    &outcomes,
                    &c.refund_of,
                    &c.reason,
                    &c.dispute,
                    &c.release,
                ];
                let rows = match end {
                    // Pipelined: if the apply fails, PostgreSQL turns the
                    // statement that follows it into a rollback.
                    Some(end) => {
                        let (rows, ended) = tokio::join!(
                            self.conn.query(&stmt, &params),
                            self.conn.batch_execute(end)
                        );
                        let rows = rows.map_err(|e| agent.batch_error("batch apply", e))?;
                        ended.map_err(agent.pg("end batch"))?;
                        rows
                    }
                    None => self
                        .conn
                        .query(&stmt, &params)
                        .await
                        .map_err(|e| agent.batch_error("batch apply", e))?,
                };
                rows.iter()
                    .map(|r| GroupAnswer::from_row(agent, r))
                    .collect()
            })
            .await
    }

    /// Rolls the group's transaction back, bounded by the call timeout (a
    /// connection that does not answer is closed, which rolls back as well).
    pub async fn rollback(mut self) {
        let agent = self.agent;
        let _ = agent
            .timed("roll back batch", async {
                self.conn.rollback_quietly().await;
                Ok(())
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_wins_any_merge_and_otherwise_the_first_refusal_by_precedence() {
        let funds = Verdict::Refused(FailureCode::InsufficientFunds);
        let nobody = Verdict::Refused(FailureCode::RecipientNotFound);
        let replay = Verdict::Answered(Answer::Replay(TransferId::generate()));
        // The payee's shard (lower) refused; the payer's found the key decided.
        assert_eq!(nobody.merge(replay), replay);
        assert_eq!(replay.merge(nobody), replay);
        assert_eq!(Verdict::Pass.merge(funds), funds);
        assert_eq!(
            funds.merge(nobody),
            nobody,
            "the recipient outranks the funds"
        );
        assert_eq!(nobody.merge(funds), nobody);
        assert_eq!(nobody.merge(Verdict::Pass), nobody);
        assert_eq!(Verdict::Pass.merge(Verdict::Pass), Verdict::Pass);
        let unauthorized = Verdict::Answered(Answer::Unauthorized);
        for other in [Verdict::Pass, funds, nobody] {
            assert_eq!(unauthorized.merge(other), unauthorized);
            assert_eq!(other.merge(unauthorized), unauthorized);
        }
    }

    #[test]
    fn every_verdict_reads_back_as_written() {
        let tid = TransferId::generate();
        for verdict in [
            Verdict::Pass,
            Verdict::Refused(FailureCode::CurrencyMismatch),
            Verdict::Answered(Answer::Unauthorized),
            Verdict::Answered(Answer::PayerCurrency(Currency::Eur)),
            Verdict::Answered(Answer::KeyReused),
            Verdict::Answered(Answer::InProgress(tid)),
            Verdict::Answered(Answer::Replay(tid)),
            Verdict::Answered(Answer::KeyBusy),
        ] {
            let text = verdict.as_sql();
            // Only answers carry a colon: the SQL tells them from refusals so.
            assert_eq!(
                text.as_deref().is_some_and(|t| t.contains(':')),
                matches!(verdict, Verdict::Answered(_)),
                "{verdict:?}"
            );
            assert_eq!(parse(text.as_deref()), Some(verdict), "{text:?}");
        }
        assert_eq!(parse(Some("replay:not-a-uuid")), None);
        assert_eq!(parse(Some("nonsense")), None);
    }

    /// [`Verdict::from_sql`] without an agent (its error needs one).
    fn parse(text: Option<&str>) -> Option<Verdict> {
        verdict_of(text)
    }

    #[test]
    fn a_key_in_progress_whose_record_is_decided_by_now_is_a_replay() {
        let shard = router::ShardId(0);
        let record = |state| TransferRecord {
            transfer_id: TransferId::generate(),
            kind: crate::records::TransferKind::Transfer,
            mode: crate::records::Mode::Redis,
            from_user: None,
            from_username: None,
            to_user: None,
            to_username: None,
            amount: Decimal::ONE,
            currency: Currency::Usd,
            state,
            failure_code: None,
            participants: Vec::new(),
            created_at: chrono::Utc::now(),
            decided_at: None,
            refund_of: None,
            reason: None,
            failure_detail: None,
        };
        let answer = |state| GroupAnswer {
            tid: TransferId::generate(),
            verdict: Verdict::Answered(Answer::InProgress(TransferId::generate())),
            record: Some(record(state)),
        };
        assert!(matches!(
            answer(TransferState::Preparing).submitted(shard),
            Ok(Ok(Submitted::InProgress(_)))
        ));
        assert!(matches!(
            answer(TransferState::Committed).submitted(shard),
            Ok(Ok(Submitted::Replayed(_)))
        ));
    }
}
