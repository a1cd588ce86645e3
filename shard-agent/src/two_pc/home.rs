//! The home shard's side of a cross-shard transfer on the fast path (`wallet_home_leg`,
//! the "last-agent" optimization): the payer's leg is never prepared. It
//! commits in one local transaction together with the Idempotency-Key and the
//! transfer record, and that commit is the decision. Only the payee's leg is a
//! prepared transaction.
//!
//! Two shapes, chosen by the coordinator so that account rows are always locked in
//! user-ID order:
//! - payee first ([`ShardAgent::home_leg`]): the payee's leg is already prepared (or
//!   refused); one statement claims the key, debits and records the outcome.
//! - payer first ([`ShardAgent::open_home_leg`]): one message opens a transaction that
//!   claims the key and debits, and leaves it open while the payee's leg is
//!   prepared; [`OpenHome::commit`] then inserts the record and commits.
//!
//! Crash rule: until the home transaction commits there is no record, and a payee
//! leg left prepared is rolled back by recovery through [`ShardAgent::tombstone`],
//! whose compare-and-set cannot race the home transaction (both hold the
//! transfer's advisory lock). After it commits, recovery commits the payee's leg.

use tracing::instrument;

use crate::agent::{Conn, ShardAgent};
use crate::error::{ShardError, ShardResult};
use crate::idempotency::{broken_skip_idempotency, read_transfer};
use crate::records::{FailureCode, TransferId, TransferRecord, TransferState, TRANSFER_COLUMNS};
use crate::transfer_local::TransferOrder;
use crate::two_pc::prepare::literal;

/// SQLSTATEs `wallet_home_leg` raises.
const PAYER_MISSING: &str = "WL008";
const KEY_EXISTS: &str = "WL009";
const TOMBSTONED: &str = "WL010";

/// The payer's leg of one attempt, with the GID of the payee's prepared leg, which
/// the record stores (never rebuilt).
#[derive(Clone, Debug)]
pub struct HomeLeg<'a> {
    pub tid: TransferId,
    pub order: &'a TransferOrder,
    pub participants: Vec<String>,
}

/// How the home shard answered.
#[derive(Clone, Debug)]
pub enum HomeOutcome {
    /// The record is committed; its state is the transfer's outcome.
    Recorded(TransferRecord),
    /// The Idempotency-Key exists: nothing was written; replay it the slow way.
    KeyExists,
    /// Recovery aborted this attempt first (it found the payee's leg prepared and
    /// no record): nothing was written.
    Tombstoned,
}

/// The answer of [`ShardAgent::open_home_leg`].
pub enum Opened<'a> {
    /// The debit is applied in a transaction still open: prepare the payee's leg,
    /// then commit or roll back.
    Open(OpenHome<'a>),
    /// Finished already: the debit was refused (recorded as aborted), or nothing
    /// was written.
    Done(HomeOutcome),
}

/// A home transaction holding the applied debit and the claimed key, not yet
/// committed. Dropped without [`OpenHome::commit`], its connection is closed and
/// PostgreSQL rolls it back.
pub struct OpenHome<'a> {
    agent: &'a ShardAgent,
    leg: &'a HomeLeg<'a>,
    conn: Conn,
}

/// What recovery's compare-and-set on the home shard found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tombstone {
    /// No record: the attempt is now aborted for good (a tombstone is written).
    Written,
    /// A record exists, in this state ('preparing', 'committed' or 'aborted').
    Record(TransferState),
    /// The home transaction is running right now: ask again later.
    Busy,
}

impl ShardAgent {
    /// The payer's leg when the payee's leg is already settled: one statement that
    /// claims the key, applies the debit unless `failure` says the transfer is
    /// aborted already, and commits the record. This commit is the decision.
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %leg.tid, failure = ?failure))]
    pub async fn home_leg(
        &self,
        leg: &HomeLeg<'_>,
        failure: Option<FailureCode>,
    ) -> ShardResult<HomeOutcome> {
        self.timed("home leg", async {
            let key = broken_skip_idempotency(&leg.order.key);
            let conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(&format!(
                    "SELECT {TRANSFER_COLUMNS} FROM wallet_home_leg($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, true)"
                ))
                .await
                .map_err(self.pg("prepare home leg"))?;
            let order = leg.order;
            let row = conn
                .query_one(
                    &stmt,
                    &[
                        &leg.tid.0,
                        key.user.as_uuid(),
                        &key.key,
                        &key.fingerprint,
                        &order.from.0,
                        &order.from_username,
                        &order.to.0,
                        &order.to_username,
                        &order.amount.value(),
                        &order.amount.currency().code(),
                        &leg.participants,
                        &failure.map(FailureCode::as_str),
                    ],
                )
                .await;
            match row {
                Ok(row) => Ok(HomeOutcome::Recorded(TransferRecord::from_row(
                    self.id(),
                    &row,
                )?)),
                Err(e) => self.home_refusal(e, leg),
            }
        })
        .await
    }

    /// The payer's leg first: one message, `BEGIN; SELECT … FROM wallet_home_leg(…)`,
    /// that claims the key and applies the debit and leaves the transaction open.
    /// A refused debit is recorded as aborted and committed at once.
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %leg.tid))]
    pub async fn open_home_leg<'a>(&'a self, leg: &'a HomeLeg<'a>) -> ShardResult<Opened<'a>> {
        self.timed("open home leg", async {
            let key = broken_skip_idempotency(&leg.order.key);
            let order = leg.order;
            // One simple-query message, so that the SELECT runs only if BEGIN did:
            // in autocommit it would commit a debit without its record. Every value
            // is typed and validated (UUIDs, a Decimal, a currency code, usernames
            // of [a-z0-9_.-], a key of visible ASCII, GIDs we built) and quoted.
            let participants = leg
                .participants
                .iter()
                .map(|g| literal(g))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "BEGIN; SELECT transfer_id FROM wallet_home_leg({tid}::uuid, {key_user}::uuid, {key}, '\\x{fingerprint}'::bytea, {from}::uuid, {from_name}, {to}::uuid, {to_name}, {amount}::numeric, {currency}, ARRAY[{participants}]::text[], NULL, false)",
                tid = literal(&leg.tid.0.to_string()),
                key_user = literal(&key.user.as_uuid().to_string()),
                key = literal(&key.key),
                fingerprint = hex(&key.fingerprint),
                from = literal(&order.from.0.to_string()),
                from_name = literal(&order.from_username),
                to = literal(&order.to.0.to_string()),
                to_name = literal(&order.to_username),
                amount = literal(&order.amount.value().to_string()),
                currency = literal(order.amount.currency().code()),
            );
            let mut conn = self.conn().await?;
            conn.mark_in_txn();
            let answer = conn.simple_query(&sql).await;
            let rows = match answer {
                Ok(messages) => messages
                    .iter()
                    .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                    .count(),
                Err(e) => {
                    conn.rollback_quietly().await;
                    return self.home_refusal(e, leg).map(Opened::Done);
                }
            };
            if rows == 0 {
                return Ok(Opened::Open(OpenHome {
                    agent: self,
                    leg,
                    conn,
                }));
            }
            // The debit was refused and the abort recorded: commit it and answer.
            conn.batch_execute("COMMIT")
                .await
                .map_err(self.pg("commit refused home leg"))?;
            conn.ended();
            let record = read_transfer(&conn, self.id(), leg.tid)
                .await?
                .ok_or_else(|| self.corrupt(format!("transfer {} vanished", leg.tid)))?;
            Ok(Opened::Done(HomeOutcome::Recorded(record)))
        })
        .await
    }

    fn home_refusal(
        &self,
        e: tokio_postgres::Error,
        leg: &HomeLeg<'_>,
    ) -> ShardResult<HomeOutcome> {
        match e.code().map(|c| c.code()) {
            Some(KEY_EXISTS) => Ok(HomeOutcome::KeyExists),
            Some(TOMBSTONED) => Ok(HomeOutcome::Tombstoned),
            Some(PAYER_MISSING) => {
                Err(self.corrupt(format!("payer {} has no account", leg.order.from)))
            }
            _ => Err(ShardError::from_pg(self.id(), "home leg", e)),
        }
    }

    /// Recovery's compare-and-set for a prepared leg whose transfer has no record
    /// on this (its home) shard: see [`Tombstone`].
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %tid))]
    pub async fn tombstone(&self, tid: TransferId) -> ShardResult<Tombstone> {
        self.timed("tombstone", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one("SELECT wallet_tombstone($1) AS outcome", &[&tid.0])
                .await
                .map_err(self.pg("tombstone"))?;
            let outcome: &str = row.get("outcome");
            match outcome {
                "tombstoned" => Ok(Tombstone::Written),
                "busy" => Ok(Tombstone::Busy),
                "preparing" => Ok(Tombstone::Record(TransferState::Preparing)),
                "committed" => Ok(Tombstone::Record(TransferState::Committed)),
                "aborted" => Ok(Tombstone::Record(TransferState::Aborted)),
                other => Err(self.corrupt(format!("transfer {tid} has state {other:?}"))),
            }
        })
        .await
    }
}

impl OpenHome<'_> {
    /// Records the transfer as committed and commits: the decision. An error leaves
    /// the outcome unknown (the COMMIT may have run); recovery reads it.
    #[instrument(skip_all, fields(shard = %self.agent.id(), transfer_id = %self.leg.tid))]
    pub async fn commit(mut self) -> ShardResult<TransferRecord> {
        let agent = self.agent;
        agent
            .timed("commit home leg", async {
                let order = self.leg.order;
                let stmt = self
                    .conn
                    .prepare_cached(&format!(
                        "INSERT INTO transfers (transfer_id, kind, mode, from_user, from_username, to_user,
                                                to_username, amount, currency, state, participants, decided_at)
                         VALUES ($1, 'transfer', '2pc', $2, $3, $4, $5, $6, $7, 'committed', $8,
                                 statement_timestamp())
                         RETURNING {TRANSFER_COLUMNS}"
                    ))
                    .await
                    .map_err(agent.pg("prepare home record"))?;
                // Pipelined: the INSERT and the COMMIT go out together. If the INSERT
                // fails, PostgreSQL turns the COMMIT into a rollback.
                let (amount, currency) = (order.amount.value(), order.amount.currency().code());
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 8] = [
                    &self.leg.tid.0,
                    &order.from.0,
                    &order.from_username,
                    &order.to.0,
                    &order.to_username,
                    &amount,
                    &currency,
                    &self.leg.participants,
                ];
                let (row, committed) = tokio::join!(
                    self.conn.query_one(&stmt, &params),
                    self.conn.batch_execute("COMMIT"),
                );
                let row = row.map_err(agent.pg("record home leg"))?;
                committed.map_err(agent.pg("commit home leg"))?;
                self.conn.ended();
                TransferRecord::from_row(agent.id(), &row)
            })
            .await
    }

    /// Undoes the debit and the key: nothing of this attempt remains. Bounded by
    /// the call timeout: a connection that does not answer is closed instead,
    /// which rolls the transaction back as well.
    pub async fn rollback(mut self) {
        let agent = self.agent;
        let _ = agent
            .timed("roll back home leg", async {
                self.conn.rollback_quietly().await;
                Ok(())
            })
            .await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
