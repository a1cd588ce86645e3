//! A transfer between two users of the same shard: one local transaction, no 2PC.
//!
//! The fast path is one statement, `wallet_transfer_local` (sql/shard/functions): claim,
//! lock, decide and move in one round trip. A key that already exists makes it
//! raise and leave nothing behind; the slow path below then replays the key's
//! outcome (or starts a fresh attempt after a retryable abort) statement by
//! statement. Both lock the two account rows in user-ID order, the order every
//! protocol locks in, so no two transfers deadlock. Crash rule: all or nothing,
//! by PostgreSQL.

use router::UserId;
use rust_decimal::Decimal;
use tracing::instrument;

use crate::agent::ShardAgent;
use crate::error::{ShardError, ShardResult};
use crate::idempotency::{broken_skip_idempotency, claim, Claim, IdempotencyKey, NewTransfer};
use crate::money::Amount;
use crate::records::{
    FailureCode, Mode, TransferId, TransferKind, TransferRecord, TRANSFER_COLUMNS,
};

/// SQLSTATE `wallet_transfer_local` raises when the Idempotency-Key exists.
const KEY_EXISTS: &str = "WL009";
/// SQLSTATE `wallet_transfer_local` raises when the payer has no account.
const PAYER_MISSING: &str = "WL008";

/// A transfer request as the coordinator hands it to a shard.
#[derive(Clone, Debug)]
pub struct TransferOrder {
    pub from: UserId,
    pub from_username: String,
    pub to: UserId,
    pub to_username: String,
    pub amount: Amount,
    pub key: IdempotencyKey,
}

/// The final answer of a money movement, as the client will see it.
#[derive(Clone, Debug)]
pub enum Submitted {
    /// This request created (and decided) the transfer.
    New(TransferRecord),
    /// An earlier request with the same key decided it; this is its outcome.
    Replayed(TransferRecord),
    InProgress(TransferRecord),
    KeyReused,
}

impl Submitted {
    pub(crate) fn from_claim(claim: Claim) -> Option<Submitted> {
        match claim {
            Claim::Started(_) => None,
            Claim::Replay(r) => Some(Submitted::Replayed(r)),
            Claim::InProgress(r) => Some(Submitted::InProgress(r)),
            Claim::KeyReused => Some(Submitted::KeyReused),
        }
    }
}

impl TransferOrder {
    pub fn new_transfer(&self, mode: Mode) -> NewTransfer {
        NewTransfer {
            kind: TransferKind::Transfer,
            mode,
            from_user: Some(self.from),
            from_username: Some(self.from_username.clone()),
            to_user: Some(self.to),
            to_username: Some(self.to_username.clone()),
            amount: self.amount.value(),
            currency: self.amount.currency(),
            legs: None,
            payment_token: None,
        }
    }
}

impl ShardAgent {
    #[instrument(skip_all, fields(shard = %self.id(), from = %order.from, to = %order.to, transfer_id = tracing::field::Empty))]
    pub async fn transfer_local(&self, order: &TransferOrder) -> ShardResult<Submitted> {
        if let Some(done) = self.transfer_local_fast(order).await? {
            return Ok(done);
        }
        self.timed("local transfer", async {
            let shard = self.id();
            let mut conn = self.conn().await?;
            conn.begin(shard).await?;
            let result = self.transfer_local_in_txn(&mut conn, order).await;
            match result {
                Ok(submitted) => {
                    conn.batch_execute("COMMIT")
                        .await
                        .map_err(self.pg("commit local transfer"))?;
                    conn.ended();
                    Ok(submitted)
                }
                Err(e) => {
                    conn.rollback_quietly().await;
                    Err(e)
                }
            }
        })
        .await
    }

    /// One round trip for a key never seen before; `None` when the key exists.
    async fn transfer_local_fast(&self, order: &TransferOrder) -> ShardResult<Option<Submitted>> {
        self.timed("local transfer", async {
            let key = broken_skip_idempotency(&order.key);
            let tid = TransferId::generate();
            tracing::Span::current().record("transfer_id", tracing::field::display(tid));
            let conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(&format!(
                    "SELECT {TRANSFER_COLUMNS} FROM wallet_transfer_local($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                ))
                .await
                .map_err(self.pg("prepare local transfer"))?;
            let row = conn
                .query_one(
                    &stmt,
                    &[
                        &tid.0,
                        key.user.as_uuid(),
                        &key.key,
                        &key.fingerprint,
                        &order.from.0,
                        &order.from_username,
                        &order.to.0,
                        &order.to_username,
                        &order.amount.value(),
                        &order.amount.currency().code(),
                    ],
                )
                .await;
            match row {
                Ok(row) => Ok(Some(Submitted::New(TransferRecord::from_row(self.id(), &row)?))),
                Err(e) if e.code().is_some_and(|c| c.code() == KEY_EXISTS) => Ok(None),
                Err(e) if e.code().is_some_and(|c| c.code() == PAYER_MISSING) => {
                    Err(self.corrupt(format!("payer {} has no account", order.from)))
                }
                Err(e) => Err(ShardError::from_pg(self.id(), "local transfer", e)),
            }
        })
        .await
    }

    async fn transfer_local_in_txn(
        &self,
        conn: &mut crate::agent::Conn,
        order: &TransferOrder,
    ) -> ShardResult<Submitted> {
        let shard = self.id();
        let record = match claim(
            conn,
            shard,
            &order.key,
            &order.new_transfer(Mode::Local),
            true,
        )
        .await?
        {
            Claim::Started(r) => r,
            other => {
                return Ok(
                    Submitted::from_claim(other).expect("invariant: only Started maps to None")
                )
            }
        };
        let tid = record.transfer_id;
        tracing::Span::current().record("transfer_id", tracing::field::display(tid));
        let rows = conn
            .query(
                "SELECT user_id, currency, balance FROM accounts
                 WHERE user_id = ANY($1) ORDER BY user_id FOR UPDATE",
                &[&vec![order.from.0, order.to.0]],
            )
            .await
            .map_err(self.pg("lock accounts"))?;
        let find = |u: UserId| {
            rows.iter()
                .find(|r| r.get::<_, uuid::Uuid>("user_id") == u.0)
                .map(|r| {
                    (
                        r.get::<_, String>("currency"),
                        r.get::<_, Decimal>("balance"),
                    )
                })
        };
        let amount = order.amount.value();
        let code = order.amount.currency().code();
        let Some((payer_currency, payer_balance)) = find(order.from) else {
            return Err(self.corrupt(format!("payer {} has no account", order.from)));
        };
        let failure = match find(order.to) {
            None => Some(FailureCode::RecipientNotFound),
            Some((cur, _)) if cur.trim() != code || payer_currency.trim() != code => {
                Some(FailureCode::CurrencyMismatch)
            }
            Some(_) if payer_balance < amount => Some(FailureCode::InsufficientFunds),
            Some(_) => None,
        };
        if failure.is_none() {
            let stmt = conn
                .prepare_cached(
                    "WITH d AS (UPDATE accounts SET balance = balance - $1 WHERE user_id = $2
                                RETURNING account_id, balance),
                          c AS (UPDATE accounts SET balance = balance + $1 WHERE user_id = $3
                                RETURNING account_id, balance)
                     INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
                     SELECT account_id, $4::uuid, 'transfer_debit', $5::numeric, balance, $6::text FROM d
                     UNION ALL
                     SELECT account_id, $4::uuid, 'transfer_credit', $1::numeric, balance, $7::text FROM c",
                )
                .await
                .map_err(self.pg("prepare local transfer"))?;
            let written = conn
                .execute(
                    &stmt,
                    &[
                        &amount,
                        &order.from.0,
                        &order.to.0,
                        &tid.0,
                        &-amount,
                        &order.to_username,
                        &order.from_username,
                    ],
                )
                .await
                .map_err(self.pg("apply local transfer"))?;
            if written != 2 {
                return Err(self.corrupt(format!(
                    "local transfer {tid} wrote {written} ledger entries"
                )));
            }
        }
        let (state, failure_code) = match failure {
            None => ("committed", None),
            Some(code) => ("aborted", Some(code.as_str())),
        };
        let row = conn
            .query_one(
                &format!(
                    "UPDATE transfers SET state = $2, failure_code = $3, decided_at = now()
                     WHERE transfer_id = $1 RETURNING {TRANSFER_COLUMNS}"
                ),
                &[&tid.0, &state, &failure_code],
            )
            .await
            .map_err(self.pg("decide local transfer"))?;
        Ok(Submitted::New(TransferRecord::from_row(shard, &row)?))
    }
}
