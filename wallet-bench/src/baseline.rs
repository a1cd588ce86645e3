//! The peers a sceptic would pick instead, on one more PostgreSQL server with the
//! shards' settings (fsync and synchronous_commit on):
//!
//! (a) the same transfer as one local transaction on one node — debit with a
//!     balance check, credit, two ledger rows — written as a careful team would
//!     (prepared statements, rows locked in a fixed order so concurrent transfers
//!     never deadlock), driven by the same load generator as the wallet;
//! (b) pgbench's built-in tpcb-like script on the same node.
//!
//! This is not a shard: the wallet's own SQL all lives in `shard-agent`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::SinkExt;
use hdrhistogram::Histogram;
use local_cluster::{create_database, pg_bindir, PgServer};
use rust_decimal::Decimal;
use tokio_postgres::{Client, NoTls, Statement};

use super::load::{new_histogram, Driver, LoadResult, Outcome};
use super::setup::BenchUser;

const SCHEMA: &str = "
CREATE TABLE accounts (
    user_id  uuid PRIMARY KEY,
    balance  numeric NOT NULL CHECK (balance >= 0)
);
CREATE TABLE ledger (
    entry_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transfer_key   text NOT NULL,
    user_id        uuid NOT NULL REFERENCES accounts (user_id),
    amount         numeric NOT NULL,
    balance_after  numeric NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_by_user ON ledger (user_id, entry_id);";

const DEBIT: &str =
    "UPDATE accounts SET balance = balance - $1 WHERE user_id = $2 AND balance >= $1 RETURNING balance";
const CREDIT: &str =
    "UPDATE accounts SET balance = balance + $1 WHERE user_id = $2 RETURNING balance";
const ENTRIES: &str = "INSERT INTO ledger (transfer_key, user_id, amount, balance_after)
                       VALUES ($1, $2, $3, $4), ($1, $5, $6, $7)";

/// Creates the `baseline` database with one account per bench user.
pub async fn load(
    server: &PgServer,
    users: &[BenchUser],
    opening: Decimal,
) -> anyhow::Result<String> {
    create_database(server, "baseline").await?;
    let dsn = server.dsn("baseline");
    let client = connect(&dsn).await?;
    client.batch_execute(SCHEMA).await?;
    let mut rows = String::with_capacity(users.len() * 50);
    for u in users {
        let _ = writeln!(rows, "{}\t{opening}", u.row.user_id.as_uuid());
    }
    let sink = client
        .copy_in::<_, Cursor<Vec<u8>>>("COPY accounts (user_id, balance) FROM STDIN")
        .await?;
    futures::pin_mut!(sink);
    sink.send(Cursor::new(rows.into_bytes())).await?;
    sink.finish().await?;
    client.batch_execute("VACUUM ANALYZE accounts").await?;
    Ok(dsn)
}

/// The baseline node's WAL flushes so far (`pg_stat_wal.wal_sync`).
pub async fn wal_syncs(dsn: &str) -> anyhow::Result<i64> {
    let client = connect(dsn).await?;
    let row = client
        .query_one("SELECT wal_sync FROM pg_stat_wal", &[])
        .await?;
    Ok(row.get("wal_sync"))
}

/// Plain TCP on purpose: the baseline node is the bench's own local server on
/// loopback, and the sharded side it is compared with runs without TLS too.
async fn connect(dsn: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .context("connect to the baseline node")?;
    tokio::spawn(connection);
    Ok(client)
}

/// One connection per load client, statements prepared once.
pub struct Baseline {
    conns: Vec<(Client, Statement, Statement, Statement)>,
}

impl Baseline {
    pub async fn connect(dsn: &str, clients: usize) -> anyhow::Result<Baseline> {
        let mut conns = Vec::with_capacity(clients);
        for _ in 0..clients {
            let c = connect(dsn).await?;
            let (d, cr, e) = (
                c.prepare(DEBIT).await?,
                c.prepare(CREDIT).await?,
                c.prepare(ENTRIES).await?,
            );
            conns.push((c, d, cr, e));
        }
        Ok(Baseline { conns })
    }
}

impl Driver for Baseline {
    fn transfer(
        &self,
        client: usize,
        key: String,
        from: &BenchUser,
        to: &BenchUser,
        amount: Decimal,
    ) -> impl Future<Output = Outcome> + Send {
        let (c, debit, credit, entries) = &self.conns[client];
        let (from, to) = (*from.row.user_id.as_uuid(), *to.row.user_id.as_uuid());
        async move {
            let attempt = async {
                c.batch_execute("BEGIN").await?;
                // Lock the two rows in user-ID order: no deadlock between A→B and B→A.
                let (from_after, to_after) = if from < to {
                    let d = c.query_opt(debit, &[&amount, &from]).await?;
                    let Some(d) = d else { return Ok(None) };
                    let cr = c.query_one(credit, &[&amount, &to]).await?;
                    (d.get::<_, Decimal>(0), cr.get::<_, Decimal>(0))
                } else {
                    let cr = c.query_one(credit, &[&amount, &to]).await?;
                    let Some(d) = c.query_opt(debit, &[&amount, &from]).await? else {
                        return Ok(None);
                    };
                    (d.get::<_, Decimal>(0), cr.get::<_, Decimal>(0))
                };
                c.execute(
                    entries,
                    &[&key, &from, &-amount, &from_after, &to, &amount, &to_after],
                )
                .await?;
                c.batch_execute("COMMIT").await?;
                Ok::<_, tokio_postgres::Error>(Some(()))
            };
            match attempt.await {
                Ok(Some(())) => Outcome::Committed,
                Ok(None) => {
                    let _ = c.batch_execute("ROLLBACK").await;
                    Outcome::Rejected("insufficient_funds".into())
                }
                Err(e) => {
                    let _ = c.batch_execute("ROLLBACK").await;
                    Outcome::Failed(
                        e.code()
                            .map_or_else(|| "connection".to_owned(), |s| s.code().to_owned()),
                    )
                }
            }
        }
    }
}

/// The baseline's own invariants: money is conserved, nothing is negative, and
/// every committed transfer left exactly its two ledger rows.
pub async fn check(
    dsn: &str,
    users: usize,
    opening: Decimal,
    committed: u64,
) -> anyhow::Result<Vec<String>> {
    let client = connect(dsn).await?;
    let row = client
        .query_one(
            "SELECT (SELECT sum(balance) FROM accounts), (SELECT count(*) FROM accounts WHERE balance < 0),
                    (SELECT coalesce(sum(amount), 0) FROM ledger), (SELECT count(*) FROM ledger)",
            &[],
        )
        .await?;
    let (total, negative, ledger_sum, entries): (Decimal, i64, Decimal, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let mut v = Vec::new();
    let expected = opening * Decimal::from(users);
    if total != expected {
        v.push(format!(
            "baseline: balances sum to {total}, expected {expected}"
        ));
    }
    if negative != 0 {
        v.push(format!("baseline: {negative} negative balances"));
    }
    if ledger_sum != Decimal::ZERO {
        v.push(format!("baseline: ledger sums to {ledger_sum}"));
    }
    if entries as u64 != 2 * committed {
        v.push(format!(
            "baseline: {entries} ledger rows for {committed} committed transfers"
        ));
    }
    Ok(v)
}

/// Peer (b): `pgbench -b tpcb-like` at scale 1 (100,000 accounts) on the baseline
/// node, its per-transaction log read back so its percentiles are computed like ours.
pub async fn pgbench(
    server: &PgServer,
    work_dir: &Path,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let bin = pgbench_binary().context("no pgbench next to initdb")?;
    create_database(server, "pgbench").await?;
    let port = server.port().to_string();
    let common = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
    let init = tokio::process::Command::new(&bin)
        .args(common)
        .args(["-i", "-s", "1", "-q", "pgbench"])
        .output()
        .await
        .with_context(|| format!("run {}", bin.display()))?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    // A fresh log directory: a later round must not read an earlier one's log.
    let log_dir = work_dir.join("pgbench-log");
    if log_dir.exists() {
        std::fs::remove_dir_all(&log_dir)?;
    }
    std::fs::create_dir_all(&log_dir)?;
    let prefix = log_dir.join("tx");
    let total_s = (warmup + duration).as_secs().max(1).to_string();
    let clients_s = clients.to_string();
    let run = tokio::process::Command::new(&bin)
        .args(common)
        .args([
            "-b",
            "tpcb-like",
            "-M",
            "prepared",
            "-n",
            "-j",
            "2",
            "-c",
            &clients_s,
            "-T",
            &total_s,
            "-l",
        ])
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg("pgbench")
        .output()
        .await?;
    if !run.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&run.stderr));
    }
    read_pgbench_logs(&log_dir, warmup, duration)
}

/// pgbench from the PostgreSQL the servers run, when it is installed.
pub fn pgbench_binary() -> Option<std::path::PathBuf> {
    let bin = pg_bindir().ok()?.join("pgbench");
    bin.exists().then_some(bin)
}

/// Each log line: `client transaction latency_us script epoch_s epoch_us`
/// (the end time of the transaction). Transactions ending in the warm-up are dropped.
fn read_pgbench_logs(
    dir: &Path,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let mut ends: Vec<(u64, u64)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                continue;
            }
            let (Ok(lat), Ok(s), Ok(us)) = (
                f[2].parse::<u64>(),
                f[4].parse::<u64>(),
                f[5].parse::<u64>(),
            ) else {
                continue;
            };
            ends.push((s * 1_000_000 + us, lat));
        }
    }
    let Some(first) = ends.iter().map(|(end, lat)| end.saturating_sub(*lat)).min() else {
        bail!("pgbench wrote no transaction log");
    };
    let from = first + warmup.as_micros() as u64;
    let to = from + duration.as_micros() as u64;
    let mut latency_us: Histogram<u64> = new_histogram();
    let mut committed = 0;
    for (end, lat) in &ends {
        if *end >= from && *end <= to && end.saturating_sub(*lat) >= from {
            latency_us.saturating_record((*lat).max(1));
            committed += 1;
        }
    }
    Ok(LoadResult {
        latency_us,
        committed,
        rejected: BTreeMap::new(),
        failed: BTreeMap::new(),
        window: duration,
        committed_total: ends.len() as u64,
        // pgbench's window is read back from its log afterwards, not sampled.
        cpu: None,
    })
}

/// The settings that decide durability and memory, as the server reports them.
pub async fn settings(dsn: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let client = connect(dsn).await?;
    let mut out = BTreeMap::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
        "max_prepared_transactions",
    ] {
        let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
        out.insert(name.to_owned(), row.get::<_, String>(0));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_logs_count_only_the_measured_window() {
        let dir = tempfile::tempdir().expect("temp dir");
        // client tx latency_us script epoch_s epoch_us: one transaction per 100 ms
        // for 3 s, the first starting at t = 1000 s.
        let mut log = String::new();
        for i in 0..30u64 {
            let end_us = 1_000_000_000 + (i + 1) * 100_000;
            log.push_str(&format!(
                "0 {i} 2000 0 {} {}\n",
                end_us / 1_000_000,
                end_us % 1_000_000
            ));
        }
        log.push_str("garbage line\n");
        std::fs::write(dir.path().join("tx.123"), log).expect("write log");
        let r = read_pgbench_logs(dir.path(), Duration::from_secs(1), Duration::from_secs(1))
            .expect("parse");
        // Window [first start + 1 s, + 2 s]: transactions ending at 1.1 … 2.0 s
        // that also started inside it.
        assert_eq!(r.committed, 10);
        assert_eq!(r.committed_total, 30);
        assert_eq!(r.latency_us.max(), 2000);
    }
}
