//! The shared test fixture: real PostgreSQL servers started once per test process
//! (they die with it), and a fresh, migrated set of shard databases plus a running
//! coordinator and HTTP server for each test. Used by this crate's and
//! chaos-tests' integration tests; never by production code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use shard_agent::local::{free_port, PgServer, PgServerConfig};
use shard_agent::ShardAgent;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::config::{Config, Limits};
use crate::payments::Sandbox;
use crate::service::Coordinator;

/// One PostgreSQL server per shard, as in production.
pub const TEST_SERVERS: usize = 4;

static SERVERS: OnceLock<Vec<PgServer>> = OnceLock::new();
static NEXT_CLUSTER: AtomicUsize = AtomicUsize::new(0);

/// The servers of this test process, started on first use.
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

/// Logs to the test's captured output, filtered by `RUST_LOG` (default: warnings).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Limits that make tests quick: cheap password hashing, fast recovery.
pub fn test_limits() -> Limits {
    Limits {
        in_doubt_after_ms: 3_000,
        recovery_interval_ms: 200,
        epoch_poll_ms: 500,
        argon2_memory_kib: 256,
        argon2_iterations: 1,
        payment_timeout_ms: 300,
        ..Limits::default()
    }
}

/// A cluster of fresh databases with a coordinator serving HTTP on 127.0.0.1:0.
pub struct TestCluster {
    pub config: Config,
    pub coordinator: Arc<Coordinator>,
    pub addr: SocketAddr,
    server: JoinHandle<()>,
}

impl TestCluster {
    pub async fn start(shards: usize, limits: Limits) -> TestCluster {
        init_tracing();
        let config = Self::provision(shards, limits).await;
        Self::serve(config).await
    }

    /// Fresh databases for one cluster, without starting a coordinator.
    pub async fn provision(shards: usize, limits: Limits) -> Config {
        let servers: Vec<&PgServer> = tokio::task::spawn_blocking(|| servers().iter().collect())
            .await
            .expect("start test servers");
        let n = NEXT_CLUSTER.fetch_add(1, Ordering::SeqCst);
        let (catalog_dsn, shards) = crate::dev::provision(&servers, shards, &format!("t{n}"))
            .await
            .expect("provision test databases");
        Config {
            listen: "127.0.0.1:0".parse().expect("static address"),
            catalog_dsn,
            shards,
            agent: Default::default(),
            limits,
            admin_token: Some("test-admin-token".into()),
        }
    }

    /// Starts a coordinator and an HTTP server on `config`'s databases.
    pub async fn serve(config: Config) -> TestCluster {
        let coordinator = Arc::new(
            Coordinator::start(&config, Arc::new(Sandbox))
                .await
                .expect("start coordinator"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test API");
        let addr = listener.local_addr().expect("local addr");
        let router = api::app(
            AppState {
                coordinator: coordinator.clone(),
                admin_token: config.admin_token.as_deref().map(Arc::from),
            },
            config.limits.request_body_bytes_max,
            config.limits.concurrent_requests_max,
        );
        let server = tokio::spawn(async move {
            let _ = api::serve(listener, router, std::future::pending()).await;
        });
        TestCluster {
            config,
            coordinator,
            addr,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// One agent per shard, outside the coordinator (for checks and setup).
    pub fn agents(&self) -> Vec<ShardAgent> {
        self.coordinator
            .cluster()
            .routing()
            .agents
            .values()
            .cloned()
            .collect()
    }

    /// Stops serving and drops the coordinator, as a crash would (nothing is
    /// flushed or finished), then starts a new one on the same databases.
    pub async fn restart(self) -> TestCluster {
        let config = self.config.clone();
        drop(self);
        TestCluster::serve(config).await
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.server.abort();
    }
}
