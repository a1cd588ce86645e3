//! One shard: its connection pool and the limits every call runs under.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Object, Pool, RecyclingMethod, Runtime, Timeouts};
use router::ShardId;

use crate::error::{ShardError, ShardResult};
use crate::functions::{self, Stamp};
use crate::tls::Connector;

/// Limits for one shard's connections. Units are in the names.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AgentConfig {
    pub pool_size_max: usize,
    /// A leg that waits longer than this for a row lock gives up: PostgreSQL cannot
    /// see a deadlock that spans two shards, so this is what breaks one.
    pub lock_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Upper bound on any one call from the coordinator to this shard, including
    /// waiting for a pooled connection; a black-holed shard fails instead of hanging.
    pub call_timeout_ms: u64,
    /// How long a deposit's or withdrawal's settler keeps recovery from
    /// settling it while it waits on the payment provider
    /// (`external::settle_external`). Must cover the provider call and the
    /// apply that follows: the coordinator raises it to at least
    /// `payment_timeout_ms + call_timeout_ms` + 1 s. A settler that died is
    /// replaced by recovery once it runs out. Formerly `deposit_lease_ms`,
    /// which is still read.
    #[serde(alias = "deposit_lease_ms")]
    pub settle_lease_ms: u64,
    /// The wallet's rules every group's check enforces on this shard. Set by
    /// the coordinator from its own configuration, never read from the
    /// `agent` section.
    #[serde(skip)]
    pub rules: std::sync::Arc<crate::rules::WalletRules>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            pool_size_max: 16,
            lock_timeout_ms: 2_000,
            statement_timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            call_timeout_ms: 8_000,
            settle_lease_ms: 30_000,
            rules: std::sync::Arc::default(),
        }
    }
}

/// The settings every connection to a shard starts with, whatever the server's
/// or the database's defaults say:
/// - `default_transaction_isolation = read committed`: every compare-and-set of
///   the protocol (the decision, recovery's tombstone, the guarded debit) must
///   see what a transaction it waited on committed. Under `repeatable read` the
///   loser of such a race reads its old snapshot and commits as well.
/// - `default_transaction_read_only = off`, so a server default cannot turn a
///   decision into an error after the legs were prepared.
/// - `standard_conforming_strings = on`: the one-message legs quote the values
///   they splice by doubling single quotes, which is the whole escaping only
///   under this setting (PostgreSQL's default since 9.1).
/// - the lock and statement bounds of `AgentConfig`, and a bound on a session
///   left idle inside a transaction.
fn session_options(config: &AgentConfig) -> String {
    format!(
        "-c default_transaction_isolation=read\\ committed -c default_transaction_read_only=off \
         -c standard_conforming_strings=on -c lock_timeout={} -c statement_timeout={} \
         -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
        config.lock_timeout_ms, config.statement_timeout_ms
    )
}

/// A connection left inside a transaction this long (a coordinator that froze
/// mid-protocol) is closed by the server, which rolls the transaction back and
/// frees its row locks. Prepared transactions are not affected.
const IDLE_IN_TRANSACTION_MS: u64 = 60_000;

/// Sends SQL to one shard. Cloning is cheap (the pool is shared).
#[derive(Clone)]
pub struct ShardAgent {
    id: ShardId,
    pool: Pool,
    config: AgentConfig,
    /// Kept for cancel requests, which must travel like the connections do.
    connector: Connector,
}

impl std::fmt::Debug for ShardAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardAgent").field("id", &self.id).finish()
    }
}

impl ShardAgent {
    /// Builds the pool; no connection is made until the first call.
    pub fn new(id: ShardId, dsn: &str, config: AgentConfig) -> ShardResult<ShardAgent> {
        // The error names the setting at fault and shows the DSN only redacted.
        let mut connector = Connector::from_dsn(dsn).map_err(|e| ShardError::Unavailable {
            shard: id,
            reason: e.to_string(),
        })?;
        let pg = connector.config_mut();
        pg.options(session_options(&config));
        pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(10));
        pg.application_name("wallet-shard-agent");
        let manager = connector.manager(ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        });
        let wait = Some(Duration::from_millis(config.call_timeout_ms));
        let pool = Pool::builder(manager)
            .max_size(config.pool_size_max)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts {
                wait,
                create: Some(Duration::from_millis(config.connect_timeout_ms)),
                recycle: Some(Duration::from_millis(config.connect_timeout_ms)),
            })
            .build()
            .map_err(|e| ShardError::Unavailable {
                shard: id,
                reason: format!("build pool: {e}"),
            })?;
        Ok(ShardAgent {
            id,
            pool,
            config,
            connector,
        })
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Whether this shard's connections are encrypted (its DSN's `sslmode`).
    pub fn uses_tls(&self) -> bool {
        self.connector.uses_tls()
    }

    /// Pool statistics: (connections open, connections idle, tasks waiting).
    pub fn pool_status(&self) -> (usize, usize, usize) {
        let s = self.pool.status();
        (s.size, s.available, s.waiting)
    }

    /// A round trip to the shard, for readiness checks.
    pub async fn ping(&self) -> ShardResult<()> {
        self.timed("ping", async {
            let conn = self.conn().await?;
            conn.simple_query("SELECT 1")
                .await
                .map_err(self.pg("ping"))?;
            Ok(())
        })
        .await
    }

    /// The isolation level a new transaction on this agent's connections gets.
    pub async fn session_isolation(&self) -> ShardResult<String> {
        self.timed("read isolation", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one("SHOW default_transaction_isolation", &[])
                .await
                .map_err(self.pg("read isolation"))?;
            Ok(row.get(0))
        })
        .await
    }

    /// Checks now that the shard runs this build's SQL functions. Every
    /// connection is checked before its first use anyway; the coordinator calls
    /// this at start, so that a shard of another version stops it before it
    /// serves. [`ShardError::FunctionsMismatch`] when the shard's are not this
    /// build's.
    pub async fn check_functions(&self) -> ShardResult<()> {
        self.timed("check SQL functions", async {
            let conn = self.conn().await?;
            self.check_functions_on(&conn).await
        })
        .await
    }

    pub(crate) async fn conn(&self) -> ShardResult<Conn> {
        let obj = self.pool.get().await.map_err(|e| ShardError::Unavailable {
            shard: self.id,
            // With its causes, which say why a connection could not be made
            // (a TLS certificate refused, the server's pg_hba.conf).
            reason: format!("get connection: {}", crate::tls::describe(&e)),
        })?;
        // A connection the pool has just made has never been recycled. Until
        // its check passes it is treated like one inside a transaction: if the
        // check fails or the call is cut short, it is dropped, not pooled, so
        // no connection is ever used unchecked.
        let fresh = Object::metrics(&obj).recycle_count == 0;
        let mut conn = Conn {
            obj: Some(obj),
            in_txn: fresh,
        };
        if fresh {
            self.check_functions_on(&conn).await?;
            conn.in_txn = false;
        }
        Ok(conn)
    }

    /// A coordinator never runs against SQL functions of another version than
    /// the ones it was compiled with, nor against functions edited by hand.
    async fn check_functions_on(&self, conn: &Conn) -> ShardResult<()> {
        match functions::check(conn.client())
            .await
            .map_err(self.pg("check SQL functions"))?
        {
            None => Ok(()),
            Some(found) => Err(ShardError::FunctionsMismatch {
                shard: self.id,
                expected: Stamp::compiled(),
                found,
            }),
        }
    }

    /// Runs one call under `call_timeout_ms`. A timeout leaves the statement's outcome
    /// unknown, which is why it maps to `Unavailable`, never to a definite failure.
    pub(crate) async fn timed<T, F>(&self, context: &'static str, fut: F) -> ShardResult<T>
    where
        F: Future<Output = ShardResult<T>>,
    {
        match tokio::time::timeout(Duration::from_millis(self.config.call_timeout_ms), fut).await {
            Ok(result) => result,
            Err(_) => Err(ShardError::Unavailable {
                shard: self.id,
                reason: format!(
                    "{context}: no answer within {} ms",
                    self.config.call_timeout_ms
                ),
            }),
        }
    }

    /// Runs `body` in one transaction under `call_timeout_ms`, after
    /// `wallet_own`'s write check of `buckets`: committed if it
    /// returns `Ok`, rolled back otherwise (and, if cut short, its connection
    /// is dropped, which rolls it back as well).
    pub(crate) async fn in_txn<T>(
        &self,
        context: &'static str,
        buckets: &[i32],
        body: impl AsyncFnOnce(&Conn) -> ShardResult<T>,
    ) -> ShardResult<T> {
        self.timed(context, async {
            let mut conn = self.conn().await?;
            conn.in_txn_begin("BEGIN ISOLATION LEVEL READ COMMITTED", self.id)
                .await?;
            let owned = conn.own(self.id, buckets, true).await;
            match async {
                owned?;
                body(&conn).await
            }
            .await
            {
                Ok(value) => {
                    conn.batch_execute("COMMIT")
                        .await
                        .map_err(self.pg(context))?;
                    conn.ended();
                    Ok(value)
                }
                Err(e) => {
                    conn.rollback_quietly().await;
                    Err(e)
                }
            }
        })
        .await
    }

    /// Runs the reads of `body` in one read-only snapshot that first passes
    /// `wallet_own`'s read check of `buckets`: a bucket's rows leave a shard
    /// in the transaction that forgets the bucket, so a check that passes
    /// sees every row it passed for (a moved user never reads as missing).
    pub(crate) async fn owned_read<T>(
        &self,
        buckets: &[i32],
        body: impl AsyncFnOnce(&Conn) -> ShardResult<T>,
    ) -> ShardResult<T> {
        let mut conn = self.conn().await?;
        conn.in_txn_begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", self.id)
            .await?;
        let result = match conn.own(self.id, buckets, false).await {
            Ok(()) => body(&conn).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(value) => {
                conn.batch_execute("COMMIT")
                    .await
                    .map_err(self.pg("end read"))?;
                conn.ended();
                Ok(value)
            }
            Err(e) => {
                conn.rollback_quietly().await;
                Err(e)
            }
        }
    }

    /// [`Conn::owned_autocommit`] on `conn`, for this shard.
    pub(crate) async fn owned_autocommit(
        &self,
        conn: &mut Conn,
        buckets: &[i32],
        stmt: &tokio_postgres::Statement,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        on_err: impl Fn(tokio_postgres::Error) -> ShardError,
    ) -> ShardResult<Vec<tokio_postgres::Row>> {
        conn.owned_autocommit(self.id, Durability::Flushed, buckets, stmt, params, on_err)
            .await
    }

    pub(crate) fn pg(&self, context: &'static str) -> impl Fn(tokio_postgres::Error) -> ShardError {
        let shard = self.id;
        move |e| ShardError::from_pg(shard, context, e)
    }
}

/// The statement every write transaction on a user's rows runs first
/// (sql/shard/functions/wallet_own.sql); `$1` is the users' buckets.
pub(crate) const OWN_WRITE: &str = "SELECT wallet_own($1, true)";
/// The same check for a view: a bucket being fenced may still be read.
pub(crate) const OWN_READ: &str = "SELECT wallet_own($1, false)";
/// How an owned write's transaction commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// Waits for its WAL flush, as every write of money does.
    Flushed,
    /// Does not wait for its WAL flush: for a write that a crash may forget
    /// without harm. Money never commits this way.
    NoFlushWait,
}

impl Durability {
    /// The statement that opens the transaction: READ COMMITTED, which
    /// `wallet_own` requires so that its state read sees the latest fence.
    fn begin(self) -> &'static str {
        match self {
            Durability::Flushed => "BEGIN ISOLATION LEVEL READ COMMITTED",
            Durability::NoFlushWait => {
                "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL synchronous_commit TO off"
            }
        }
    }
}

/// The buckets of `users`, as `wallet_own` takes them.
pub(crate) fn buckets_of<'a>(users: impl IntoIterator<Item = &'a router::UserId>) -> Vec<i32> {
    users
        .into_iter()
        .map(|u| i32::from(router::bucket_of(u).0))
        .collect()
}

/// A pooled connection that is thrown away, not returned to the pool, when it is
/// dropped inside an explicit transaction: a cancelled future (client gone, timeout)
/// must never hand the next user a connection with a half-done transaction on it.
/// Closing the socket makes PostgreSQL roll that transaction back.
pub(crate) struct Conn {
    obj: Option<Object>,
    in_txn: bool,
}

impl Conn {
    pub(crate) fn client(&self) -> &tokio_postgres::Client {
        self.obj
            .as_ref()
            .expect("invariant: a Conn holds its object until it is dropped")
    }

    pub(crate) async fn begin(&mut self, shard: ShardId) -> ShardResult<()> {
        self.in_txn_begin("BEGIN", shard).await
    }

    /// Opens an explicit transaction with `statement` (e.g. an isolation level).
    pub(crate) async fn in_txn_begin(
        &mut self,
        statement: &str,
        shard: ShardId,
    ) -> ShardResult<()> {
        self.in_txn = true;
        self.client()
            .batch_execute(statement)
            .await
            .map_err(|e| ShardError::from_pg(shard, "begin", e))
    }

    /// Marks a transaction as open that the next message itself begins (a
    /// multi-statement message starting with BEGIN): if the call is cut short, the
    /// connection is discarded instead of returned to the pool mid-transaction.
    pub(crate) fn mark_in_txn(&mut self) {
        self.in_txn = true;
    }

    /// Marks the explicit transaction finished (committed, rolled back or prepared).
    pub(crate) fn ended(&mut self) {
        self.in_txn = false;
    }

    /// `wallet_own` on this connection (inside the caller's transaction when
    /// `write`): [`ShardError::NotOwner`] unless the shard serves `buckets`.
    pub(crate) async fn own(
        &self,
        shard: ShardId,
        buckets: &[i32],
        write: bool,
    ) -> ShardResult<()> {
        let stmt = self
            .prepare_cached(if write { OWN_WRITE } else { OWN_READ })
            .await
            .map_err(|e| ShardError::from_pg(shard, "prepare ownership check", e))?;
        self.execute(&stmt, &[&buckets])
            .await
            .map_err(|e| ShardError::from_pg(shard, "ownership check", e))?;
        Ok(())
    }

    /// Runs `stmt` as a transaction of its own (committed as `durability`
    /// says) that first passes `wallet_own`'s
    /// write check of `buckets`, all in one round trip: BEGIN, the check, the
    /// statement and COMMIT are pipelined. A refused check is
    /// [`ShardError::NotOwner`] and the statement then writes nothing (it runs
    /// in an aborted transaction, and the COMMIT rolls back). `on_err` maps the
    /// statement's own error.
    pub(crate) async fn owned_autocommit(
        &mut self,
        shard: ShardId,
        durability: Durability,
        buckets: &[i32],
        stmt: &tokio_postgres::Statement,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        on_err: impl Fn(tokio_postgres::Error) -> ShardError,
    ) -> ShardResult<Vec<tokio_postgres::Row>> {
        let own = self
            .prepare_cached(OWN_WRITE)
            .await
            .map_err(|e| ShardError::from_pg(shard, "prepare ownership check", e))?;
        self.mark_in_txn();
        let own_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&buckets];
        let (begun, owned, rows, committed) = tokio::join!(
            self.batch_execute(durability.begin()),
            self.execute(&own, &own_params),
            self.query(stmt, params),
            self.batch_execute("COMMIT")
        );
        if committed.is_ok() {
            self.ended();
        }
        begun.map_err(|e| ShardError::from_pg(shard, "begin", e))?;
        owned.map_err(|e| ShardError::from_pg(shard, "ownership check", e))?;
        let rows = rows.map_err(on_err)?;
        committed.map_err(|e| ShardError::from_pg(shard, "commit", e))?;
        Ok(rows)
    }

    /// Rolls back after a failure; a connection that cannot even do that is dropped.
    pub(crate) async fn rollback_quietly(&mut self) {
        if self.client().batch_execute("ROLLBACK").await.is_ok() {
            self.in_txn = false;
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = Object;
    fn deref(&self) -> &Object {
        self.obj
            .as_ref()
            .expect("invariant: a Conn holds its object until it is dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.in_txn {
            if let Some(obj) = self.obj.take() {
                drop(Object::take(obj));
            }
        }
    }
}
