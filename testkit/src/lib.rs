//! The test fixture for whole clusters: on the shared servers of
//! `local_cluster::testing`, a fresh, migrated set of shard databases plus a
//! running coordinator and HTTP server for each test. Used by the coordinator's
//! and chaos-tests' integration tests (as a dev-dependency); never by production
//! code.

use std::net::SocketAddr;
use std::sync::Arc;

use coordinator::config::{Config, Limits, LockMode};
use coordinator::payments::Sandbox;
use coordinator::redis_lock::RedisConfig;
use coordinator::service::Coordinator;
use local_cluster::{testing, PgServer};
use shard_agent::ShardAgent;
use tokio::task::JoinHandle;

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

/// Switches `config` to Redis-lock mode on the shared test Redis, with a key
/// prefix of its own and short lock timings.
pub async fn with_redis(mut config: Config) -> Config {
    let redis = tokio::task::spawn_blocking(testing::redis)
        .await
        .expect("start test redis");
    config.lock_mode = LockMode::Redis;
    config.redis = Some(RedisConfig {
        url: redis.url(),
        key_prefix: format!("{}:", testing::unique_prefix()),
        lock_ttl_ms: 2_000,
        lock_wait_ms: 1_000,
        response_timeout_ms: 1_000,
    });
    config
}

/// A cluster of fresh databases with a coordinator serving HTTP on 127.0.0.1:0.
pub struct TestCluster {
    pub config: Config,
    pub coordinator: Arc<Coordinator>,
    /// The payment provider, shared with the coordinator.
    pub sandbox: Arc<Sandbox>,
    pub addr: SocketAddr,
    server: JoinHandle<()>,
}

impl TestCluster {
    pub async fn start(shards: usize, limits: Limits) -> TestCluster {
        init_tracing();
        let config = Self::provision(shards, limits).await;
        Self::serve(config).await
    }

    /// Like [`TestCluster::start`], in Redis-lock mode on the shared test Redis.
    pub async fn start_redis(shards: usize, limits: Limits) -> TestCluster {
        init_tracing();
        let config = Self::provision(shards, limits).await;
        Self::serve(with_redis(config).await).await
    }

    /// Fresh databases for one cluster, without starting a coordinator.
    pub async fn provision(shards: usize, limits: Limits) -> Config {
        let servers: Vec<&PgServer> = testing::servers_async().await.iter().collect();
        let (catalog_dsn, shards) =
            local_cluster::provision(&servers, shards, &testing::unique_prefix())
                .await
                .expect("provision test databases");
        Config {
            listen: "127.0.0.1:0".parse().expect("static address"),
            catalog_dsn: catalog_dsn.into(),
            shards,
            agent: Default::default(),
            limits,
            admin_token: Some("test-admin-token".into()),
            lock_mode: Default::default(),
            redis: None,
            payment_provider: Some(coordinator::payments::ProviderConfig::Sandbox),
            http: Default::default(),
            rate_limits: coordinator::config::RateLimits::off(),
            rules: Default::default(),
            events: Default::default(),
        }
    }

    /// Starts a coordinator and an HTTP server on `config`'s databases.
    pub async fn serve(config: Config) -> TestCluster {
        Self::serve_with(config, Arc::new(Sandbox::default())).await
    }

    /// Like [`TestCluster::serve`], with a given sandbox (kept across restarts,
    /// like a real provider outlives our processes).
    pub async fn serve_with(config: Config, sandbox: Arc<Sandbox>) -> TestCluster {
        Self::serve_inner(config, sandbox.clone(), sandbox).await
    }

    /// Like [`TestCluster::serve`], with another payment provider (the
    /// `sandbox` field is then an unused one).
    pub async fn serve_provider(
        config: Config,
        provider: Arc<dyn coordinator::payments::PaymentProvider>,
    ) -> TestCluster {
        Self::serve_inner(config, provider, Arc::new(Sandbox::default())).await
    }

    async fn serve_inner(
        config: Config,
        provider: Arc<dyn coordinator::payments::PaymentProvider>,
        sandbox: Arc<Sandbox>,
    ) -> TestCluster {
        init_tracing();
        let coordinator = Arc::new(
            Coordinator::start(&config, provider)
                .await
                .expect("start coordinator"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test API");
        let addr = listener.local_addr().expect("local addr");
        let served = coordinator.clone();
        let served_config = config.clone();
        let server = tokio::spawn(async move {
            let _ = coordinator::serve::serve_coordinator(
                listener,
                served,
                &served_config,
                std::future::pending(),
            )
            .await;
        });
        TestCluster {
            config,
            coordinator,
            sandbox,
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
        let (config, sandbox) = (self.config.clone(), self.sandbox.clone());
        drop(self);
        TestCluster::serve_with(config, sandbox).await
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Open keep-alive connections hold the coordinator after the server task
        // ends; its recovery loop must not outlive a restart, or it races the new
        // coordinator's (a Redis-mode test saw the old one forward a credit).
        self.coordinator.stop_background();
        self.server.abort();
    }
}
