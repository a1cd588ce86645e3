//! The one shared test fixture at the bottom of the stack: real PostgreSQL servers
//! started once per test process (they die with it), and fresh databases on them.
//! Higher crates (`testkit`) build clusters on top of this.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub use super::create_database;
use super::{free_port, PgServer, PgServerConfig, RedisServer, ServerTls};

/// One PostgreSQL server per shard, as in production.
pub const TEST_SERVERS: usize = 4;

static SERVERS: OnceLock<Vec<PgServer>> = OnceLock::new();
static REDIS: OnceLock<RedisServer> = OnceLock::new();
static NEXT_NAME: AtomicUsize = AtomicUsize::new(0);

/// The servers of this test process, started (in parallel) on first use.
pub fn servers() -> &'static [PgServer] {
    SERVERS.get_or_init(|| {
        let root = test_root();
        let handles: Vec<_> = (0..TEST_SERVERS)
            .map(|i| {
                let dir = root.join(format!("pg{i}"));
                std::thread::spawn(move || {
                    let port = free_port().expect("find a free port for a test server");
                    let mut config = PgServerConfig::new(format!("pg{i}"), dir, port);
                    config.die_with_parent = true;
                    config.max_connections = 300;
                    config.max_prepared_transactions = 300;
                    PgServer::start(config)
                        .unwrap_or_else(|e| panic!("start test PostgreSQL server {i}: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("test server thread panicked"))
            .collect()
    })
}

/// The servers, started from async code without blocking the runtime.
pub async fn servers_async() -> &'static [PgServer] {
    tokio::task::spawn_blocking(servers)
        .await
        .expect("start test servers")
}

/// The `redis-server` of this test process, started on first use. Clusters share
/// it through distinct key prefixes.
pub fn redis() -> &'static RedisServer {
    REDIS.get_or_init(|| {
        RedisServer::start(0).unwrap_or_else(|e| panic!("start test redis-server: {e}"))
    })
}

/// A PostgreSQL server of its own that accepts TLS connections only (see
/// [`ServerTls`]); its [`PgServer::dsn`] asks for `sslmode=verify-full`.
/// Blocks while it starts; it dies with the test process.
pub fn start_tls_server(tls: ServerTls) -> PgServer {
    let name = format!("tls-{}", unique_prefix());
    let port = free_port().expect("find a free port for a test server");
    let mut config = PgServerConfig::new(name.clone(), test_root().join(&name), port);
    config.die_with_parent = true;
    config.tls = Some(tls);
    PgServer::start(config).unwrap_or_else(|e| panic!("start TLS test PostgreSQL server: {e}"))
}

/// A fresh directory of this test process, removed with the process's other
/// files by a later test run (for certificates and other scratch files).
pub fn scratch_dir() -> PathBuf {
    let dir = test_root().join(format!("scratch-{}", unique_prefix()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("create scratch dir {}: {e}", dir.display()));
    dir
}

/// A name unique in this test process, for databases.
pub fn unique_prefix() -> String {
    format!("t{}", NEXT_NAME.fetch_add(1, Ordering::SeqCst))
}

/// `$TMPDIR/wallet-tests/<pid>`, after removing the directories of test processes
/// that are gone (their servers died with them).
fn test_root() -> PathBuf {
    let base = std::env::temp_dir().join("wallet-tests");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let stale = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists());
            if stale {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    base.join(std::process::id().to_string())
}

/// A credit of `amount` to `payee` left prepared on `agent`, as part of a group
/// whose deciding shard is `decider` and which has no decision there: an
/// in-doubt leg holding the payee's row lock until recovery tombstones the
/// group and rolls it back (or someone rolls back its GID). For tests and the
/// bench's isolation scenario. Returns its GID.
pub async fn in_doubt_credit(
    agent: &shard_agent::ShardAgent,
    decider: router::ShardId,
    payee: router::UserId,
    amount: shard_agent::Amount,
) -> shard_agent::ShardResult<shard_agent::Gid> {
    use shard_agent::batch::{BatchLeg, Verdict};
    let group = shard_agent::TransferId::generate();
    let gid = shard_agent::Gid::new(group, decider, agent.id());
    let leg = BatchLeg {
        tid: shard_agent::TransferId::generate(),
        debit: false,
        user: payee,
        user_name: "payee".into(),
        party: router::UserId::for_username("in-doubt-payer"),
        party_name: "in-doubt-payer".into(),
        amount,
        key: None,
        session: None,
        refund_of: None,
        reason: None,
        dispute: None,
        release: false,
    };
    let (txn, found) = agent
        .open_batch(std::slice::from_ref(&leg), &[Verdict::Pass], None)
        .await?;
    if found != [Verdict::Pass] {
        return Err(shard_agent::ShardError::CorruptRow {
            shard: agent.id(),
            detail: format!("an in-doubt credit to {payee} was refused: {found:?}"),
        });
    }
    txn.prepare(group.0, gid, &[gid.to_string()], &[leg], &[Verdict::Pass])
        .await?;
    Ok(gid)
}
