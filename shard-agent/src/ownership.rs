//! The shard's side of moving a bucket: its ownership rows (`owned_buckets`,
//! checked by `wallet_own` in every write) and the steps a move runs here.
//!
//! A bucket's rows are its users' rows: `users` and `accounts` by the user's
//! bucket, and by user the ledger entries of their account, their events
//! (the notification feed reads them) and outbox rows (events not yet
//! published, which the target's relay publishes after the switch), the transfers
//! whose home they are (payer, or the user of a deposit or withdrawal), their
//! idempotency keys and sessions, and the pending credits of those
//! transfers. Tombstones carry no user, so a move copies all of them: a
//! tombstone only ever forbids a transfer ID, and IDs are unique.
//!
//! Every step here is safe to repeat, and each checks the bucket's state on
//! this shard before it touches data, so a step replayed after a crash, or a
//! step of a move that was rolled back, never deletes rows the shard serves.

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tokio_postgres::types::ToSql;

use crate::agent::{Conn, ShardAgent};
use crate::error::{ShardError, ShardResult};

/// Advisory lock class of a bucket (the same number as in wallet_own.sql).
const BUCKET_LOCK_CLASS: i32 = 1_464_598_530;

/// Each table a bucket's rows live in, in the order they are copied (every
/// row after the rows it references), with the filter that selects them.
/// Deletes run in the reverse order.
///
/// Each filter matches `= ANY (ARRAY(subquery))` rather than `IN
/// (subquery)`: the bucket's few users become an array first, and the table
/// is then read by its index, one probe per user. With `IN` the planner
/// often joined by hashing and read the whole table instead, once per
/// statement of every move.
pub(crate) const TABLES: &[(&str, &str)] = &[
    ("users", "bucket = $1"),
    ("accounts", "kind = 'user' AND bucket = $1"),
    (
        "ledger_entries",
        "account_id = ANY (ARRAY(SELECT account_id FROM accounts WHERE kind = 'user' AND bucket = $1))",
    ),
    (
        "events",
        "user_id = ANY (ARRAY(SELECT user_id FROM users WHERE bucket = $1))",
    ),
    ("event_outbox", "bucket = $1"),
    (
        "transfers",
        "coalesce(from_user, to_user) = ANY (ARRAY(SELECT user_id FROM users WHERE bucket = $1))",
    ),
    (
        "idempotency_keys",
        "user_id = ANY (ARRAY(SELECT user_id FROM users WHERE bucket = $1))",
    ),
    (
        "sessions",
        "user_id = ANY (ARRAY(SELECT user_id FROM users WHERE bucket = $1))",
    ),
    (
        "disputes",
        "payee_user = ANY (ARRAY(SELECT user_id FROM users WHERE bucket = $1))",
    ),
    (
        "pending_credits",
        "transfer_id = ANY (ARRAY(SELECT transfer_id FROM transfers
                          WHERE coalesce(from_user, to_user) = ANY (ARRAY(SELECT user_id FROM users WHERE bucket = $1))))",
    ),
];

/// One bucket's ownership row on a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    pub bucket: u16,
    pub state: String,
    pub move_id: Option<i64>,
}

/// The answer of [`ShardAgent::fence_bucket`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// Fenced now, or by this move before.
    Yes,
    /// The bucket is not this shard's to fence (its state, or `None`).
    NotOwned(Option<String>),
}

impl ShardAgent {
    /// Records, once, that this shard owns `buckets` (the catalog's map at
    /// `epoch`); from then on `wallet_own` refuses every other bucket. Does
    /// nothing on a shard whose ownership is already recorded: moves keep it
    /// from there. Returns whether it recorded anything.
    pub async fn init_ownership(&self, buckets: &[u16], epoch: u64) -> ShardResult<bool> {
        self.timed("record ownership", async {
            let mut conn = self.conn().await?;
            conn.in_txn_begin("BEGIN", self.id()).await?;
            let result = async {
                conn.batch_execute("LOCK TABLE bucket_ownership_init IN EXCLUSIVE MODE")
                    .await
                    .map_err(self.pg("lock ownership"))?;
                let done = conn
                    .query_opt("SELECT 1 FROM bucket_ownership_init", &[])
                    .await
                    .map_err(self.pg("read ownership"))?
                    .is_some();
                if done {
                    return Ok(false);
                }
                let list: Vec<i32> = buckets.iter().map(|&b| i32::from(b)).collect();
                let epoch = epoch as i64;
                conn.execute(
                    "INSERT INTO owned_buckets (bucket, state, epoch)
                     SELECT b, 'owned', $2 FROM unnest($1::int[]) AS b",
                    &[&list, &epoch],
                )
                .await
                .map_err(self.pg("record owned buckets"))?;
                conn.execute(
                    "INSERT INTO bucket_ownership_init (epoch) VALUES ($1)",
                    &[&epoch],
                )
                .await
                .map_err(self.pg("record ownership"))?;
                Ok(true)
            }
            .await;
            finish(&mut conn, self, result).await
        })
        .await
    }

    /// Every ownership row here, or `None` if ownership was never recorded.
    pub async fn ownership(&self) -> ShardResult<Option<Vec<Owned>>> {
        self.timed("read ownership", async {
            let conn = self.conn().await?;
            let init = conn
                .query_opt("SELECT 1 FROM bucket_ownership_init", &[])
                .await
                .map_err(self.pg("read ownership"))?;
            if init.is_none() {
                return Ok(None);
            }
            let rows = conn
                .query(
                    "SELECT bucket, state, move_id FROM owned_buckets ORDER BY bucket",
                    &[],
                )
                .await
                .map_err(self.pg("read owned buckets"))?;
            Ok(Some(
                rows.iter()
                    .map(|r| Owned {
                        bucket: r.get::<_, i32>(0) as u16,
                        state: r.get(1),
                        move_id: r.get(2),
                    })
                    .collect(),
            ))
        })
        .await
    }

    /// Step "fenced" on the source: waits at most `lock_wait_ms` for the
    /// writes in flight on `bucket` (prepared legs included), then turns it
    /// from owned to fenced for `move_id`, after which every write of it here
    /// is refused. A wait that runs out is [`ShardError::LockTimeout`], and
    /// the bucket stays owned.
    pub async fn fence_bucket(
        &self,
        bucket: u16,
        move_id: i64,
        lock_wait_ms: u64,
    ) -> ShardResult<Fenced> {
        self.timed("fence bucket", async {
            let mut conn = self.conn().await?;
            conn.in_txn_begin("BEGIN ISOLATION LEVEL READ COMMITTED", self.id())
                .await?;
            let result = async {
                conn.batch_execute(&format!("SET LOCAL lock_timeout = {lock_wait_ms}"))
                    .await
                    .map_err(self.pg("set fence wait"))?;
                conn.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)",
                    &[&BUCKET_LOCK_CLASS, &i32::from(bucket)],
                )
                .await
                .map_err(self.pg("wait for the bucket's writes"))?;
                // A leg prepared before this shard's ownership was recorded
                // may hold no bucket lock: the fence cannot see it, so it
                // waits (as for a held lock) until recovery resolves it.
                let unseen: i64 = conn
                    .query_one(
                        "SELECT count(*) FROM pg_prepared_xacts p, bucket_ownership_init i
                          WHERE p.database = current_database() AND p.prepared <= i.at",
                        &[],
                    )
                    .await
                    .map_err(self.pg("count older prepared legs"))?
                    .get(0);
                if unseen > 0 {
                    return Err(ShardError::LockTimeout { shard: self.id() });
                }
                let row = conn
                    .query_opt(
                        "UPDATE owned_buckets SET state = CASE WHEN state = 'owned' THEN 'fenced' ELSE state END,
                                                  move_id = CASE WHEN state = 'owned' THEN $2 ELSE move_id END
                          WHERE bucket = $1
                         RETURNING state, move_id",
                        &[&i32::from(bucket), &move_id],
                    )
                    .await
                    .map_err(self.pg("fence bucket"))?;
                Ok(match row {
                    Some(r) if r.get::<_, String>(0) == "fenced"
                        && r.get::<_, Option<i64>>(1) == Some(move_id) =>
                    {
                        Fenced::Yes
                    }
                    Some(r) => Fenced::NotOwned(Some(r.get(0))),
                    None => Fenced::NotOwned(None),
                })
            }
            .await;
            finish(&mut conn, self, result).await
        })
        .await
    }

    /// The state of `bucket` here and the move that set it, if it has a row.
    pub async fn bucket_state(&self, bucket: u16) -> ShardResult<Option<(String, Option<i64>)>> {
        self.timed("read bucket state", async {
            let conn = self.conn().await?;
            Ok(conn
                .query_opt(
                    "SELECT state, move_id FROM owned_buckets WHERE bucket = $1",
                    &[&i32::from(bucket)],
                )
                .await
                .map_err(self.pg("read bucket state"))?
                .map(|r| (r.get(0), r.get(1))))
        })
        .await
    }

    /// Sets the state of `bucket` from one of `from` to `to` for `move_id`
    /// (`to` = "owned" clears the move). Returns whether a row changed.
    pub async fn set_bucket_state(
        &self,
        bucket: u16,
        move_id: i64,
        from: &[&str],
        to: &str,
        epoch: u64,
    ) -> ShardResult<bool> {
        self.timed("set bucket state", async {
            let conn = self.conn().await?;
            let from: Vec<&str> = from.to_vec();
            let n = conn
                .execute(
                    "UPDATE owned_buckets
                        SET state = $4, epoch = greatest(epoch, $5),
                            move_id = CASE WHEN $4 = 'owned' THEN NULL ELSE move_id END
                      WHERE bucket = $1 AND move_id = $2 AND state = ANY ($3)",
                    &[&i32::from(bucket), &move_id, &from, &to, &(epoch as i64)],
                )
                .await
                .map_err(self.pg("set bucket state"))?;
            Ok(n == 1)
        })
        .await
    }

    /// Step "copied" on the target: deletes whatever an earlier attempt left
    /// of `bucket` here, then copies every row of it from `source` and records
    /// the bucket as incoming for `move_id`, in one transaction. Refused
    /// ([`ShardError::NotOwner`]-like corrupt error) if this shard serves the
    /// bucket. Returns the rows copied per table.
    pub async fn copy_bucket_from(
        &self,
        source: &ShardAgent,
        bucket: u16,
        move_id: i64,
        epoch: u64,
    ) -> ShardResult<BTreeMap<String, i64>> {
        self.timed("copy bucket", async {
            let mut conn = self.conn().await?;
            let src = source.conn().await?;
            conn.in_txn_begin("BEGIN ISOLATION LEVEL READ COMMITTED", self.id())
                .await?;
            let result = async {
                let b = i32::from(bucket);
                let state = conn
                    .query_opt(
                        "SELECT state FROM owned_buckets WHERE bucket = $1 FOR UPDATE",
                        &[&b],
                    )
                    .await
                    .map_err(self.pg("read bucket state"))?
                    .map(|r| r.get::<_, String>(0));
                if matches!(state.as_deref(), Some(s) if s != "incoming") {
                    return Err(self.corrupt(format!(
                        "bucket {bucket} is {} here: a copy would overwrite it",
                        state.unwrap_or_default()
                    )));
                }
                // Copy only a bucket this move has fenced on the source: an
                // owned one could still be written after its copy.
                let at_source = src
                    .query_opt(
                        "SELECT state, move_id FROM owned_buckets WHERE bucket = $1",
                        &[&b],
                    )
                    .await
                    .map_err(source.pg("read the source's bucket state"))?
                    .map(|r| (r.get::<_, String>(0), r.get::<_, Option<i64>>(1)));
                if at_source != Some(("fenced".to_owned(), Some(move_id))) {
                    return Err(self.corrupt(format!(
                        "bucket {bucket} is {at_source:?} on the source, not fenced by move {move_id}: nothing copied"
                    )));
                }
                // Rows of the bucket are here only with its incoming row: a
                // copy writes both in one transaction, and so does every
                // delete. A first attempt has nothing to clear.
                if state.is_some() {
                    delete_bucket_rows(&conn, self, b).await?;
                    conn.execute("DELETE FROM owned_buckets WHERE bucket = $1", &[&b])
                        .await
                        .map_err(self.pg("forget an earlier copy"))?;
                }
                let mut copied = BTreeMap::new();
                for (table, filter) in TABLES {
                    let cols = columns(&conn, self, table).await?;
                    let out = format!(
                        "COPY (SELECT {cols} FROM {table} WHERE {} {}) TO STDOUT (FORMAT binary)",
                        filter.replace("$1", &b.to_string()),
                        match *table {
                            "ledger_entries" => "ORDER BY entry_id",
                            // The target numbers them again, in this order,
                            // which keeps each user's in seq order for the relay.
                            "event_outbox" => "ORDER BY outbox_no",
                            _ => "",
                        },
                    );
                    let input = format!("COPY {table} ({cols}) FROM STDIN (FORMAT binary)");
                    let stream = src
                        .copy_out(out.as_str())
                        .await
                        .map_err(source.pg("copy out"))?;
                    let sink = conn
                        .copy_in::<_, bytes::Bytes>(input.as_str())
                        .await
                        .map_err(self.pg("copy in"))?;
                    futures::pin_mut!(stream);
                    futures::pin_mut!(sink);
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(source.pg("copy out"))?;
                        sink.send(chunk).await.map_err(self.pg("copy in"))?;
                    }
                    let n = sink.finish().await.map_err(self.pg("finish copy"))?;
                    copied.insert((*table).to_owned(), n as i64);
                }
                // Tombstones: all of them, see the module's comment.
                let tombs = src
                    .query(
                        "SELECT transfer_id, aborted_at FROM transfer_tombstones",
                        &[],
                    )
                    .await
                    .map_err(source.pg("read tombstones"))?;
                let ids: Vec<uuid::Uuid> = tombs.iter().map(|r| r.get(0)).collect();
                let at: Vec<chrono::DateTime<chrono::Utc>> = tombs.iter().map(|r| r.get(1)).collect();
                conn.execute(
                    "INSERT INTO transfer_tombstones (transfer_id, aborted_at)
                     SELECT * FROM unnest($1::uuid[], $2::timestamptz[]) ON CONFLICT DO NOTHING",
                    &[&ids, &at],
                )
                .await
                .map_err(self.pg("copy tombstones"))?;
                conn.execute(
                    "INSERT INTO owned_buckets (bucket, state, epoch, move_id) VALUES ($1, 'incoming', $2, $3)",
                    &[&b, &(epoch as i64), &move_id],
                )
                .await
                .map_err(self.pg("record incoming bucket"))?;
                Ok(copied)
            }
            .await;
            finish(&mut conn, self, result).await
        })
        .await
    }

    /// Refreshes the planner's statistics of every table a move writes
    /// (`ANALYZE`). A shard that starts empty keeps, in each pooled
    /// connection, plans made for empty tables (the functions' generic plans,
    /// the foreign-key checks) until its statistics change: without this, the
    /// rows a rebalance copies in are read by sequential scans until
    /// autovacuum's next analyze, a minute or more later.
    pub async fn refresh_planner_stats(&self) -> ShardResult<()> {
        self.timed("refresh planner statistics", async {
            let conn = self.conn().await?;
            let tables: Vec<&str> = TABLES
                .iter()
                .map(|(table, _)| *table)
                .chain(["transfer_tombstones", "owned_buckets"])
                .collect();
            conn.batch_execute(&format!("ANALYZE {}", tables.join(", ")))
                .await
                .map_err(self.pg("analyze"))?;
            Ok(())
        })
        .await
    }

    /// Deletes every row of `bucket` here and its ownership row, if the row
    /// is in one of `states` for `move_id` (the source's "moved" after a
    /// switch; the target's "incoming" when a move rolls back). Returns
    /// whether it deleted; false when there was nothing of the move to clean.
    pub async fn drop_bucket(
        &self,
        bucket: u16,
        move_id: i64,
        states: &[&str],
    ) -> ShardResult<bool> {
        self.timed("drop bucket", async {
            let mut conn = self.conn().await?;
            conn.in_txn_begin("BEGIN ISOLATION LEVEL READ COMMITTED", self.id())
                .await?;
            let result = async {
                let b = i32::from(bucket);
                let states: Vec<&str> = states.to_vec();
                let mine = conn
                    .query_opt(
                        "SELECT 1 FROM owned_buckets WHERE bucket = $1 AND move_id = $2 AND state = ANY ($3)
                         FOR UPDATE",
                        &[&b, &move_id, &states],
                    )
                    .await
                    .map_err(self.pg("read bucket state"))?
                    .is_some();
                if !mine {
                    return Ok(false);
                }
                delete_bucket_rows(&conn, self, b).await?;
                conn.execute("DELETE FROM owned_buckets WHERE bucket = $1", &[&b])
                    .await
                    .map_err(self.pg("forget bucket"))?;
                Ok(true)
            }
            .await;
            finish(&mut conn, self, result).await
        })
        .await
    }
}

/// Deletes the rows of bucket `b`, each table after the tables whose rows
/// reference it.
async fn delete_bucket_rows(conn: &Conn, agent: &ShardAgent, b: i32) -> ShardResult<()> {
    for (table, filter) in TABLES.iter().rev() {
        let params: [&(dyn ToSql + Sync); 1] = [&b];
        conn.execute(&format!("DELETE FROM {table} WHERE {filter}"), &params)
            .await
            .map_err(agent.pg("delete bucket rows"))?;
    }
    Ok(())
}

/// The columns a move copies of `table`: all but a generated identity, which
/// the target numbers itself (in the source's order). Read once per process:
/// a move runs only between shards of one schema version (this build's,
/// which every shard is migrated to before it opens).
async fn columns(conn: &Conn, agent: &ShardAgent, table: &str) -> ShardResult<String> {
    static CACHE: std::sync::Mutex<BTreeMap<String, String>> =
        std::sync::Mutex::new(BTreeMap::new());
    if let Some(cols) = CACHE
        .lock()
        .expect("invariant: the column cache's lock is never held across a panic")
        .get(table)
    {
        return Ok(cols.clone());
    }
    let rows = conn
        .query(
            "SELECT attname FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                AND attidentity = ''
              ORDER BY attnum",
            &[&table],
        )
        .await
        .map_err(agent.pg("read columns"))?;
    let cols = rows
        .iter()
        .map(|r| format!("\"{}\"", r.get::<_, String>(0)))
        .collect::<Vec<_>>()
        .join(", ");
    CACHE
        .lock()
        .expect("invariant: the column cache's lock is never held across a panic")
        .insert(table.to_owned(), cols.clone());
    Ok(cols)
}

/// Commits on `Ok`, rolls back on `Err`.
pub(crate) async fn finish<T>(
    conn: &mut Conn,
    agent: &ShardAgent,
    result: ShardResult<T>,
) -> ShardResult<T> {
    match result {
        Ok(v) => {
            conn.batch_execute("COMMIT")
                .await
                .map_err(agent.pg("commit"))?;
            conn.ended();
            Ok(v)
        }
        Err(e) => {
            conn.rollback_quietly().await;
            Err(e)
        }
    }
}
