//! The catalog's side of rebalancing: the shard registry (`shards`), the
//! epoch, and the move journal (`bucket_moves`), whose rows are each move's
//! step and afterwards its audit record. The `rebalance` crate drives the
//! moves; every statement it sends to the catalog is here.

use chrono::{DateTime, Utc};
use router::{Epoch, ShardId, ShardMap};
use rust_decimal::Decimal;
use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::CatalogError;

type Result<T> = std::result::Result<T, CatalogError>;

fn q(context: &'static str) -> impl Fn(tokio_postgres::Error) -> CatalogError {
    move |source| CatalogError::Query { context, source }
}

/// A shard as the catalog records it.
#[derive(Clone, Debug)]
pub struct ShardRow {
    pub id: ShardId,
    pub name: String,
    /// As recorded: may hold a password, or an `env:`/`file:` reference.
    pub dsn: String,
    pub weight: u32,
    /// active, draining or removed.
    pub state: String,
}

/// The catalog, as rebalancing reads and writes it.
pub struct MoveCatalog {
    client: Client,
    dsn: String,
    /// The connection of switches ([`MoveCatalog::journal_switch`]).
    switcher: tokio::sync::Mutex<Option<Client>>,
}

impl MoveCatalog {
    /// Connects to a migrated catalog.
    pub async fn connect(dsn: &str) -> Result<MoveCatalog> {
        Ok(MoveCatalog {
            client: crate::catalog::connect_client(dsn).await?,
            dsn: dsn.to_owned(),
            switcher: tokio::sync::Mutex::new(None),
        })
    }

    /// Takes the catalog's rebalance lock for as long as this connection
    /// lives (a killed mover's connection closes, which releases it): two
    /// movers must never drive the same journal. False if another holds it.
    pub async fn lock_mover(&self) -> Result<bool> {
        Ok(self
            .client
            .query_one("SELECT pg_try_advisory_lock(1464598531, 0)", &[])
            .await
            .map_err(q("take the rebalance lock"))?
            .get(0))
    }

    /// Every shard ever registered, removed ones included.
    pub async fn shard_rows(&self) -> Result<Vec<ShardRow>> {
        Ok(self
            .client
            .query(
                "SELECT shard_id, name, dsn, weight, state FROM shards ORDER BY shard_id",
                &[],
            )
            .await
            .map_err(q("read shards"))?
            .iter()
            .map(|r| ShardRow {
                id: ShardId(r.get::<_, i32>(0) as u16),
                name: r.get(1),
                dsn: r.get(2),
                weight: r.get::<_, i32>(3) as u32,
                state: r.get(4),
            })
            .collect())
    }

    pub async fn epoch(&self) -> Result<u64> {
        let epoch: i64 = self
            .client
            .query_one("SELECT epoch FROM catalog_epoch", &[])
            .await
            .map_err(q("read epoch"))?
            .get(0);
        Ok(epoch as u64)
    }

    /// The map as of now (its epoch and table read in one snapshot).
    pub async fn map(&self) -> Result<ShardMap> {
        let rows = self
            .client
            .query(
                "SELECT b.shard_id, e.epoch FROM bucket_map b CROSS JOIN catalog_epoch e ORDER BY b.bucket",
                &[],
            )
            .await
            .map_err(q("read bucket map"))?;
        let epoch = rows.first().map_or(0, |r| r.get::<_, i64>(1));
        let table = rows
            .iter()
            .map(|r| ShardId(r.get::<_, i32>(0) as u16))
            .collect();
        Ok(ShardMap::from_table(Epoch(epoch as u64), table)?)
    }

    pub async fn insert_shard(
        &self,
        id: ShardId,
        name: &str,
        dsn: &str,
        weight: u32,
    ) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO shards (shard_id, name, dsn, weight, state) VALUES ($1, $2, $3, $4, 'active')",
                &[&i32::from(id.0), &name, &dsn, &(weight as i32)],
            )
            .await
            .map_err(q("insert shard"))?;
        Ok(())
    }

    pub async fn set_shard_state(&self, id: ShardId, state: &str) -> Result<()> {
        self.client
            .execute(
                "UPDATE shards SET state = $2 WHERE shard_id = $1",
                &[&i32::from(id.0), &state],
            )
            .await
            .map_err(q("set shard state"))?;
        Ok(())
    }

    /// Raises the epoch with the map unchanged, so every coordinator reloads
    /// the shard list.
    pub async fn bump_epoch(&self) -> Result<()> {
        self.client
            .execute(
                "UPDATE catalog_epoch SET epoch = epoch + 1, updated_at = now()",
                &[],
            )
            .await
            .map_err(q("raise epoch"))?;
        Ok(())
    }

    /// Moves from or to `id` not cleaned or rolled back.
    pub async fn open_moves_of(&self, id: ShardId) -> Result<i64> {
        Ok(self
            .client
            .query_one(
                "SELECT count(*) FROM bucket_moves
                  WHERE step NOT IN ('cleaned', 'rolled_back') AND $1 IN (from_shard, to_shard)",
                &[&i32::from(id.0)],
            )
            .await
            .map_err(q("count open moves"))?
            .get(0))
    }

    /// Journals planned moves, one per (bucket, from, to), except for buckets
    /// with an open move already (which is resumed instead).
    pub async fn journal_plan(&self, moves: &[(u16, ShardId, ShardId)]) -> Result<()> {
        let buckets: Vec<i32> = moves.iter().map(|m| i32::from(m.0)).collect();
        let from: Vec<i32> = moves.iter().map(|m| i32::from(m.1 .0)).collect();
        let to: Vec<i32> = moves.iter().map(|m| i32::from(m.2 .0)).collect();
        self.client
            .execute(
                "INSERT INTO bucket_moves (bucket, from_shard, to_shard, step)
                 SELECT *, 'planned' FROM unnest($1::int[], $2::int[], $3::int[])
                 ON CONFLICT (bucket) WHERE step NOT IN ('cleaned', 'rolled_back') DO NOTHING",
                &[&buckets, &from, &to],
            )
            .await
            .map_err(q("journal the plan"))?;
        Ok(())
    }
}

/// A move's journal row.
#[derive(Clone, Debug, Serialize)]
pub struct MoveRow {
    pub move_id: i64,
    pub bucket: u16,
    #[serde(skip)]
    pub from_id: ShardId,
    #[serde(skip)]
    pub to_id: ShardId,
    pub from: String,
    pub to: String,
    pub step: String,
    pub attempts: i32,
    pub epoch_before: Option<i64>,
    pub epoch_after: Option<i64>,
    pub rows: Option<serde_json::Value>,
    pub balance_sum: Option<Decimal>,
    pub held_sum: Option<Decimal>,
    pub pause_ms: Option<i32>,
    pub verifier: Option<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub fenced_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// How long the bucket has been fenced, by the catalog's clock, when the
    /// row was read (`None` unless fenced).
    #[serde(skip)]
    pub paused_ms: Option<i64>,
}

const MOVE_COLUMNS: &str = "m.move_id, m.bucket, m.from_shard, m.to_shard, f.name AS from_name,
    t.name AS to_name, m.step, m.attempts, m.epoch_before, m.epoch_after, m.rows, m.balance_sum,
    m.held_sum, m.pause_ms, m.verifier, m.error, m.created_at, m.updated_at, m.fenced_at,
    m.finished_at,
    (extract(epoch FROM clock_timestamp() - m.fenced_at) * 1000)::bigint AS paused_ms";

fn from_row(r: &tokio_postgres::Row) -> MoveRow {
    MoveRow {
        move_id: r.get("move_id"),
        bucket: r.get::<_, i32>("bucket") as u16,
        from_id: ShardId(r.get::<_, i32>("from_shard") as u16),
        to_id: ShardId(r.get::<_, i32>("to_shard") as u16),
        from: r.get("from_name"),
        to: r.get("to_name"),
        step: r.get("step"),
        attempts: r.get("attempts"),
        epoch_before: r.get("epoch_before"),
        epoch_after: r.get("epoch_after"),
        rows: r.get("rows"),
        balance_sum: r.get("balance_sum"),
        held_sum: r.get("held_sum"),
        pause_ms: r.get("pause_ms"),
        verifier: r.get("verifier"),
        error: r.get("error"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        fenced_at: r.get("fenced_at"),
        finished_at: r.get("finished_at"),
        paused_ms: r.get("paused_ms"),
    }
}

impl MoveCatalog {
    /// Moves not cleaned or rolled back, oldest first.
    pub async fn open_moves(&self) -> Result<Vec<MoveRow>> {
        self.moves_where("m.step NOT IN ('cleaned', 'rolled_back')", i64::MAX)
            .await
    }

    /// The latest `limit` moves, newest first.
    pub async fn recent_moves(&self, limit: i64) -> Result<Vec<MoveRow>> {
        let mut rows = self.moves_where("true", limit).await?;
        rows.reverse();
        Ok(rows)
    }

    async fn moves_where(&self, filter: &str, limit: i64) -> Result<Vec<MoveRow>> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT * FROM (
                       SELECT {MOVE_COLUMNS} FROM bucket_moves m
                         JOIN shards f ON f.shard_id = m.from_shard
                         JOIN shards t ON t.shard_id = m.to_shard
                        WHERE {filter} ORDER BY m.move_id DESC LIMIT $1) x
                     ORDER BY move_id"
                ),
                &[&limit],
            )
            .await
            .map_err(q("read moves"))?;
        Ok(rows.iter().map(from_row).collect())
    }

    pub async fn read_move(&self, move_id: i64) -> Result<MoveRow> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT {MOVE_COLUMNS} FROM bucket_moves m
                       JOIN shards f ON f.shard_id = m.from_shard
                       JOIN shards t ON t.shard_id = m.to_shard
                      WHERE m.move_id = $1"
                ),
                &[&move_id],
            )
            .await
            .map_err(q("read move"))?;
        Ok(from_row(&row))
    }

    /// Moves a journal row from step `from` to `to`; false if it was not at `from`.
    pub async fn journal_step(&self, move_id: i64, from: &str, to: &str) -> Result<bool> {
        let n = self
            .client
            .execute(
                "UPDATE bucket_moves
                    SET step = $3, updated_at = now(),
                        fenced_at = CASE WHEN $3 = 'fenced' THEN now() ELSE fenced_at END,
                        finished_at = CASE WHEN $3 IN ('cleaned', 'rolled_back') THEN now() END
                  WHERE move_id = $1 AND step = $2",
                &[&move_id, &from, &to],
            )
            .await
            .map_err(q("journal step"))?;
        Ok(n == 1)
    }

    /// A cutover that could not finish: back to planned, one attempt more,
    /// with the reason; or, after `attempts_max`, rolled back for good.
    pub async fn journal_retry(
        &self,
        move_id: i64,
        error: &str,
        attempts_max: i32,
    ) -> Result<bool> {
        let row = self
            .client
            .query_opt(
                "UPDATE bucket_moves
                    SET attempts = attempts + 1, error = $2, updated_at = now(), fenced_at = NULL,
                        step = CASE WHEN attempts + 1 >= $3 THEN 'rolled_back' ELSE 'planned' END,
                        finished_at = CASE WHEN attempts + 1 >= $3 THEN now() END
                  WHERE move_id = $1 AND step IN ('planned', 'fenced', 'copied')
                 RETURNING step",
                &[&move_id, &error, &attempts_max],
            )
            .await
            .map_err(q("journal retry"))?;
        // No row: the move verified meanwhile (it only goes forward now).
        Ok(row.is_some_and(|r| r.get::<_, String>(0) == "planned"))
    }

    /// Step "verified": the verifier's counts and sums.
    pub async fn journal_verified(
        &self,
        move_id: i64,
        rows: &serde_json::Value,
        balance_sum: Decimal,
        held_sum: Decimal,
        verifier: &str,
    ) -> Result<bool> {
        let n = self
            .client
            .execute(
                "UPDATE bucket_moves
                    SET step = 'verified', updated_at = now(), rows = $2, balance_sum = $3,
                        held_sum = $4, verifier = $5
                  WHERE move_id = $1 AND step = 'copied'",
                &[&move_id, rows, &balance_sum, &held_sum, &verifier],
            )
            .await
            .map_err(q("journal verified"))?;
        Ok(n == 1)
    }

    /// Step "switched", in one catalog transaction: the bucket's new owner,
    /// a new epoch, and the journal with the pause. Returns the new epoch;
    /// repeating it after it committed changes nothing.
    pub async fn journal_switch(&self, m: &MoveRow) -> Result<i64> {
        // A connection of its own: the shared one serves parallel moves, whose
        // statements must not land inside this transaction. Switches take the
        // epoch's row lock anyway, so they share one such connection in turn.
        let mut slot = self.switcher.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(crate::catalog::connect_client(&self.dsn).await?);
        }
        let client = slot
            .as_mut()
            .expect("invariant: the slot was filled just above");
        let txn = client.transaction().await.map_err(q("begin switch"))?;
        let step: String = txn
            .query_one(
                "SELECT step FROM bucket_moves WHERE move_id = $1 FOR UPDATE",
                &[&m.move_id],
            )
            .await
            .map_err(q("lock move"))?
            .get(0);
        if step != "verified" {
            let epoch: Option<i64> = txn
                .query_one(
                    "SELECT epoch_after FROM bucket_moves WHERE move_id = $1",
                    &[&m.move_id],
                )
                .await
                .map_err(q("read move"))?
                .get(0);
            return Ok(epoch.unwrap_or(0));
        }
        let before: i64 = txn
            .query_one("SELECT epoch FROM catalog_epoch FOR UPDATE", &[])
            .await
            .map_err(q("lock epoch"))?
            .get(0);
        let after = before + 1;
        txn.execute(
            "UPDATE bucket_map SET shard_id = $2, epoch = $3 WHERE bucket = $1",
            &[&i32::from(m.bucket), &i32::from(m.to_id.0), &after],
        )
        .await
        .map_err(q("switch bucket"))?;
        txn.execute(
            "UPDATE catalog_epoch SET epoch = $1, updated_at = now()",
            &[&after],
        )
        .await
        .map_err(q("raise epoch"))?;
        txn.execute(
            "UPDATE bucket_moves
                SET step = 'switched', updated_at = now(), epoch_before = $2, epoch_after = $3,
                    pause_ms = (extract(epoch FROM clock_timestamp() - fenced_at) * 1000)::int
              WHERE move_id = $1",
            &[&m.move_id, &before, &after],
        )
        .await
        .map_err(q("journal switched"))?;
        txn.commit().await.map_err(q("commit switch"))?;
        Ok(after)
    }
}
