//! A cluster the harness owns completely: its own PostgreSQL servers (one per
//! shard), a fault proxy in front of each, and the coordinator as a separate
//! process it can kill -9 and restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use coordinator::config::{Config, Limits, LockMode};
use coordinator::events::{EventsConfig, EventsMode};
use coordinator::redis_lock::RedisConfig;
use local_cluster::{free_port, NatsServer, PgServer, PgServerConfig, RedisServer};
use shard_agent::catalog::ShardEntry;
use shard_agent::rules::WalletRules;
use shard_agent::{AgentConfig, ShardAgent};

use crate::proxy::Proxy;

/// Short, so the lock-expiry scenarios can outlive a lock without outliving
/// `in_doubt_after` (then the fence, not recovery, must stop the stale holder).
pub const LOCK_TTL_MS: u64 = 800;

/// How long a coordinator process may take to answer /healthz after a start.
const COORDINATOR_START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub shards: usize,
    /// The executable with a `serve --config FILE` subcommand (the chaos binary).
    pub exe: PathBuf,
    pub in_doubt_after_ms: u64,
    /// Where data and logs go; a fresh temporary directory when `None`.
    pub data_dir: Option<PathBuf>,
    pub lock_mode: LockMode,
    /// The coordinator's `batch_max` (1: every transfer a group of one).
    pub batch_max: usize,
    /// The wallet's rules for the coordinator, and for the checker's agents
    /// (the checker reads the default daily limit from them).
    pub rules: WalletRules,
}

pub struct ChaosCluster {
    _tmp: Option<tempfile::TempDir>,
    pub dir: PathBuf,
    pub servers: Vec<PgServer>,
    pub proxies: Vec<Proxy>,
    /// Agents that bypass the proxies, for the checker.
    pub direct: Vec<ShardAgent>,
    /// Their DSNs, for faults made with SQL (`Fault::HoldRows`).
    pub direct_dsns: Vec<String>,
    pub config: Config,
    /// Redis-lock mode only.
    pub redis: Option<RedisServer>,
    /// The broker the coordinator's relay publishes events to (every
    /// scenario runs with events on; the consumer checks them at the end).
    pub nats: NatsServer,
    config_path: PathBuf,
    exe: PathBuf,
    coordinator: Option<Child>,
    coordinator_starts: u32,
}

impl ChaosCluster {
    pub async fn start(opts: &ClusterOptions) -> anyhow::Result<ChaosCluster> {
        let (tmp, dir) = match &opts.data_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new().prefix("wallet-chaos-").tempdir()?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let servers = start_servers(&dir, opts.shards).await?;
        let refs: Vec<&PgServer> = servers.iter().collect();
        let (catalog_dsn, direct_entries) =
            local_cluster::provision(&refs, opts.shards, "chaos").await?;
        let agent = AgentConfig {
            lock_timeout_ms: 1_000,
            connect_timeout_ms: 1_000,
            call_timeout_ms: 3_000,
            rules: std::sync::Arc::new(opts.rules.clone()),
            ..AgentConfig::default()
        };
        let mut proxies = Vec::with_capacity(opts.shards);
        let mut proxied = Vec::with_capacity(opts.shards);
        let mut direct = Vec::with_capacity(opts.shards);
        for (entry, server) in direct_entries.iter().zip(&servers) {
            let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], server.port()))).await?;
            proxied.push(ShardEntry {
                dsn: entry.dsn.replace(
                    &format!("port={}", server.port()),
                    &format!("port={}", proxy.addr().port()),
                ),
                ..entry.clone()
            });
            direct.push(ShardAgent::new(entry.id, &entry.dsn, agent.clone())?);
            proxies.push(proxy);
        }
        let redis = match opts.lock_mode {
            LockMode::TwoPc => None,
            LockMode::Redis => Some(tokio::task::spawn_blocking(|| RedisServer::start(0)).await??),
        };
        let nats_store = dir.join("nats");
        let nats = tokio::task::spawn_blocking(move || NatsServer::start(0, &nats_store)).await??;
        let config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            catalog_dsn: catalog_dsn.into(),
            shards: proxied,
            agent,
            limits: Limits {
                in_doubt_after_ms: opts.in_doubt_after_ms,
                recovery_interval_ms: 250,
                argon2_memory_kib: 256,
                argon2_iterations: 1,
                payment_timeout_ms: 300,
                batch_max: opts.batch_max,
                ..Limits::default()
            },
            admin_token: Some("chaos-admin".into()),
            lock_mode: opts.lock_mode,
            redis: redis.as_ref().map(|r| RedisConfig {
                url: r.url(),
                key_prefix: "chaos:".into(),
                lock_ttl_ms: LOCK_TTL_MS,
                lock_wait_ms: 400,
                response_timeout_ms: 1_000,
            }),
            payment_provider: Some(coordinator::payments::ProviderConfig::Sandbox),
            http: Default::default(),
            rate_limits: coordinator::config::RateLimits::off(),
            rules: opts.rules.clone(),
            events: EventsConfig {
                mode: EventsMode::Nats,
                url: Some(nats.url()),
                // Short, so a lease a killed coordinator held passes quickly.
                lease_ms: 2_000,
                publish_timeout_ms: 1_000,
                ..EventsConfig::default()
            },
        };
        let config_path = dir.join("coordinator.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
        Ok(ChaosCluster {
            _tmp: tmp,
            dir,
            servers,
            proxies,
            direct,
            direct_dsns: direct_entries.iter().map(|e| e.dsn.clone()).collect(),
            config,
            redis,
            nats,
            config_path,
            exe: opts.exe.clone(),
            coordinator: None,
            coordinator_starts: 0,
        })
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.config.listen)
    }

    /// Starts the coordinator process with `failpoints` armed (FAILPOINTS syntax)
    /// and waits until it answers /healthz.
    pub async fn start_coordinator(&mut self, failpoints: &str) -> anyhow::Result<()> {
        if self.coordinator.is_some() {
            bail!("coordinator already running");
        }
        self.coordinator_starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("coordinator.log"))?;
        let child = Command::new(&self.exe)
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("FAILPOINTS", failpoints)
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_COORDINATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start coordinator {}", self.exe.display()))?;
        self.coordinator = Some(child);
        let url = format!("{}/healthz", self.api_url());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()?;
        let deadline = tokio::time::Instant::now() + COORDINATOR_START_TIMEOUT;
        loop {
            if let Some(status) = self.coordinator_exit() {
                bail!(
                    "coordinator exited during start ({status}); see {}",
                    self.dir.join("coordinator.log").display()
                );
            }
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("coordinator did not answer /healthz within {COORDINATOR_START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// If the coordinator process has exited (a failpoint aborted it), reaps it.
    pub fn coordinator_exit(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.coordinator.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.coordinator = None;
                Some(status)
            }
            _ => None,
        }
    }

    pub fn coordinator_running(&self) -> bool {
        self.coordinator.is_some()
    }

    /// kill -9 of the coordinator, then reaps it.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the mover process (`chaos move`): it resumes the journal's open
    /// moves and starts at most `max_moves` new ones, through the proxies like
    /// the coordinator. Its output goes to `mover.log`.
    pub fn spawn_mover(&self, max_moves: usize) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mover.log"))?;
        Command::new(&self.exe)
            .arg("move")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--max-moves")
            .arg(max_moves.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start mover {}", self.exe.display()))
    }

    pub fn coordinator_starts(&self) -> u32 {
        self.coordinator_starts
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        self.kill_coordinator();
    }
}

async fn start_servers(dir: &Path, shards: usize) -> anyhow::Result<Vec<PgServer>> {
    let mut handles = Vec::with_capacity(shards);
    for i in 0..shards {
        let data = dir.join(format!("shard{i}"));
        handles.push(tokio::task::spawn_blocking(
            move || -> anyhow::Result<PgServer> {
                let mut config = PgServerConfig::new(format!("shard{i}"), data, free_port()?);
                config.die_with_parent = true;
                Ok(PgServer::start(config)?)
            },
        ));
    }
    let mut servers = Vec::with_capacity(shards);
    for h in handles {
        servers.push(h.await??);
    }
    Ok(servers)
}
