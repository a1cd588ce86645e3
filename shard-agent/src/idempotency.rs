//! Step 1 of every money movement: claim the Idempotency-Key and create the
//! transfer record, atomically, on the payer's (home) shard.
//!
//! The key points at a transfer; the answer a retry gets is built from that
//! transfer's row, so a stored answer can never disagree with the decision record.
//! A key whose transfer was aborted by a *fault* (see `FailureCode::is_retryable`) is
//! re-pointed to a fresh attempt; every other final outcome is replayed as it is.
//!
//! Crash rule: the key and the `preparing` record commit together or not at all. If
//! we crash after this step, recovery aborts the stale `preparing` record (presumed
//! abort) and a retry with the same key starts a fresh attempt.

use router::{ShardId, UserId};
use rust_decimal::Decimal;

use crate::agent::Conn;
use crate::agent::{buckets_of, Durability};
use crate::error::{ShardError, ShardResult};
use crate::gid::Gid;
use crate::money::Currency;
use crate::records::{
    kind_str, mode_str, Mode, TransferId, TransferKind, TransferRecord, TRANSFER_COLUMNS,
};

/// Bounds the loop that re-reads a key whose concurrent claimant rolled back.
const CLAIM_ATTEMPTS_MAX: usize = 3;

/// A client's Idempotency-Key, scoped to the user who sent it.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    pub user: UserId,
    pub key: String,
    /// A digest of the operation and its body: the same key with another body is refused.
    pub fingerprint: Vec<u8>,
}

/// What a new transfer record holds before anything has moved.
#[derive(Clone, Debug)]
pub struct NewTransfer {
    pub kind: TransferKind,
    pub mode: Mode,
    pub from_user: Option<UserId>,
    pub from_username: Option<String>,
    pub to_user: Option<UserId>,
    pub to_username: Option<String>,
    pub amount: Decimal,
    pub currency: Currency,
    /// For 2PC: the home shard and each participant shard. Their GIDs are built
    /// once, with the attempt's transfer ID, and stored.
    pub legs: Option<(ShardId, Vec<ShardId>)>,
    /// Deposits and withdrawals: the client's payment token, for recovery.
    pub payment_token: Option<String>,
}

/// The answer of step 1.
#[derive(Clone, Debug)]
pub enum Claim {
    /// A new attempt was recorded in state `preparing`: go on with the protocol.
    Started(TransferRecord),
    /// The key's transfer already reached a final outcome: answer with it.
    Replay(TransferRecord),
    /// The key's transfer is still being decided.
    InProgress(TransferRecord),
    /// The key was used for a different request.
    KeyReused,
}

pub(crate) async fn claim(
    conn: &mut Conn,
    shard: ShardId,
    key: &IdempotencyKey,
    new: &NewTransfer,
) -> ShardResult<Claim> {
    let pg = |ctx| move |e| ShardError::from_pg(shard, ctx, e);
    let key = &broken_skip_idempotency(key);
    for _ in 0..CLAIM_ATTEMPTS_MAX {
        let tid = TransferId::generate();
        let stmt = conn
            .prepare_cached(&format!(
                "WITH k AS (
                   INSERT INTO idempotency_keys (user_id, idem_key, operation, fingerprint, transfer_id)
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING transfer_id)
                 INSERT INTO transfers (transfer_id, kind, mode, from_user, from_username, to_user,
                                        to_username, amount, currency, state, participants, payment_token)
                 SELECT k.transfer_id, $3, $6, $7, $8, $9, $10, $11, $12, 'preparing', $13, $14 FROM k
                 RETURNING {TRANSFER_COLUMNS}"
            ))
            .await
            .map_err(pg("prepare claim"))?;
        let participants = gids(tid, new);
        let rows = conn
            .owned_autocommit(
                shard,
                Durability::Flushed,
                &buckets_of([&key.user]),
                &stmt,
                &[
                    key.user.as_uuid(),
                    &key.key,
                    &kind_str(new.kind),
                    &key.fingerprint,
                    &tid.0,
                    &mode_str(new.mode),
                    &new.from_user.map(|u| u.0),
                    &new.from_username,
                    &new.to_user.map(|u| u.0),
                    &new.to_username,
                    &new.amount,
                    &new.currency.code(),
                    &participants,
                    &new.payment_token,
                ],
                pg("claim idempotency key"),
            )
            .await?;
        if let Some(row) = rows.first() {
            return Ok(Claim::Started(TransferRecord::from_row(shard, row)?));
        }
        if let Some(claim) = existing(conn, shard, key, new).await? {
            return Ok(claim);
        }
        // The competing claim rolled back between our insert and our read: try again.
    }
    Err(ShardError::Unavailable {
        shard,
        reason: format!("idempotency key contended {CLAIM_ATTEMPTS_MAX} times"),
    })
}

/// A deliberately broken variant for the chaos suite (failpoint
/// `broken-skip-idempotency`): every request gets a fresh key, so retries run
/// again. The checker must catch it; compiled in only with the `failpoints` feature.
pub(crate) fn broken_skip_idempotency(key: &IdempotencyKey) -> IdempotencyKey {
    #[cfg(feature = "failpoints")]
    if fail::eval("broken-skip-idempotency", |_| ()).is_some() {
        return IdempotencyKey {
            key: format!("{}#{}", key.key, uuid::Uuid::new_v4().simple()),
            ..key.clone()
        };
    }
    key.clone()
}

fn gids(tid: TransferId, new: &NewTransfer) -> Vec<String> {
    match &new.legs {
        None => Vec::new(),
        Some((home, participants)) => participants
            .iter()
            .map(|p| Gid::new(tid, *home, *p).to_string())
            .collect(),
    }
}

/// The key exists. Runs in its own transaction; `wallet_key_answer` locks the
/// key so that only one retry can turn a retryable abort into a fresh attempt.
async fn existing(
    conn: &mut Conn,
    shard: ShardId,
    key: &IdempotencyKey,
    new: &NewTransfer,
) -> ShardResult<Option<Claim>> {
    conn.in_txn_begin("BEGIN ISOLATION LEVEL READ COMMITTED", shard)
        .await?;
    let result = match conn.own(shard, &buckets_of([&key.user]), true).await {
        Ok(()) => existing_in_txn(conn, shard, key, new).await,
        Err(e) => Err(e),
    };
    match &result {
        Ok(_) => {
            conn.batch_execute("COMMIT")
                .await
                .map_err(|e| ShardError::from_pg(shard, "commit key lookup", e))?;
            conn.ended();
        }
        Err(_) => conn.rollback_quietly().await,
    }
    result
}

async fn existing_in_txn(
    conn: &mut Conn,
    shard: ShardId,
    key: &IdempotencyKey,
    new: &NewTransfer,
) -> ShardResult<Option<Claim>> {
    let pg = |ctx| move |e| ShardError::from_pg(shard, ctx, e);
    let tid = TransferId::generate();
    // The one rule for a key that exists (`wallet_key_answer`), which groups
    // follow too: it re-points the key to `tid` for a fresh attempt.
    let row = conn
        .query_one(
            "SELECT wallet_key_answer($1, $2, $3, $4, $5)",
            &[
                key.user.as_uuid(),
                &key.key,
                &kind_str(new.kind),
                &key.fingerprint,
                &tid.0,
            ],
        )
        .await
        .map_err(pg("answer an existing idempotency key"))?;
    let answer: Option<String> = row.get(0);
    let existing = |text: &str| -> ShardResult<TransferId> {
        text.parse().map_err(|_| ShardError::CorruptRow {
            shard,
            detail: format!("key answer names transfer {text:?}"),
        })
    };
    match answer
        .as_deref()
        .map(|a| a.split_once(':').unwrap_or((a, "")))
    {
        None => {}
        Some(("key_busy", _)) => return Ok(None),
        Some(("key_reused", _)) => return Ok(Some(Claim::KeyReused)),
        Some(("replay", id)) => {
            return Ok(Some(Claim::Replay(
                pointed_at(conn, shard, existing(id)?).await?,
            )))
        }
        Some(("in_progress", id)) => {
            return Ok(Some(Claim::InProgress(
                pointed_at(conn, shard, existing(id)?).await?,
            )))
        }
        Some(_) => {
            return Err(ShardError::CorruptRow {
                shard,
                detail: format!("unexpected key answer {answer:?}"),
            })
        }
    }
    let row = conn
        .query_one(
            &format!(
                "INSERT INTO transfers (transfer_id, kind, mode, from_user, from_username, to_user,
                                        to_username, amount, currency, state, participants, payment_token)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'preparing', $10, $11)
                 RETURNING {TRANSFER_COLUMNS}"
            ),
            &[
                &tid.0,
                &kind_str(new.kind),
                &mode_str(new.mode),
                &new.from_user.map(|u| u.0),
                &new.from_username,
                &new.to_user.map(|u| u.0),
                &new.to_username,
                &new.amount,
                &new.currency.code(),
                &gids(tid, new),
                &new.payment_token,
            ],
        )
        .await
        .map_err(pg("record retry attempt"))?;
    Ok(Some(Claim::Started(TransferRecord::from_row(shard, &row)?)))
}

/// The transfer a key points at, which must exist.
async fn pointed_at(conn: &Conn, shard: ShardId, tid: TransferId) -> ShardResult<TransferRecord> {
    read_transfer(conn, shard, tid)
        .await?
        .ok_or_else(|| ShardError::CorruptRow {
            shard,
            detail: format!("idempotency key points at missing transfer {tid}"),
        })
}

pub(crate) async fn read_transfer(
    conn: &Conn,
    shard: ShardId,
    tid: TransferId,
) -> ShardResult<Option<TransferRecord>> {
    let row = conn
        .query_opt(
            &format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE transfer_id = $1"),
            &[&tid.0],
        )
        .await
        .map_err(|e| ShardError::from_pg(shard, "read transfer", e))?;
    row.map(|r| TransferRecord::from_row(shard, &r)).transpose()
}

impl crate::agent::ShardAgent {
    /// Step 1 on its own (autocommit), for protocols whose legs run in other
    /// transactions: claims the key and records the transfer as `preparing`.
    #[tracing::instrument(skip_all, fields(shard = %self.id(), user = %key.user))]
    pub async fn claim(&self, key: &IdempotencyKey, new: &NewTransfer) -> ShardResult<Claim> {
        self.timed("claim", async {
            let mut conn = self.conn().await?;
            claim(&mut conn, self.id(), key, new).await
        })
        .await
    }
}
