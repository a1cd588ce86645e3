//! Deployment configuration: where the catalog and shards are, and every limit.
//! The same JSON file is what `wallet dev` writes and `wallet serve --config` reads.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use shard_agent::catalog::ShardEntry;
use shard_agent::rules::WalletRules;
use shard_agent::AgentConfig;

use crate::events::EventsConfig;
use crate::payments::ProviderConfig;
use crate::redis_lock::RedisConfig;
use crate::secrets::{Dsn, Secret};

/// `agent.statement_timeout_ms` must stay below this (an hour): the events
/// prune relies on no money statement running that long
/// (`shard_agent::events`, `OUTBOX_AFTER_EVENT_MAX`).
const STATEMENT_TIMEOUT_MS_LIMIT: u64 = 3_600_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub listen: SocketAddr,
    /// May be an `env:`/`file:` reference, as may each shard's `dsn` (see `crate::secrets`).
    pub catalog_dsn: Dsn,
    /// The shards to record in an empty catalog; a populated catalog wins.
    pub shards: Vec<ShardEntry>,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub limits: Limits,
    /// Bearer token for `/v1/admin/*`; the admin routes are off without one.
    /// May be an `env:`/`file:` reference.
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// How cross-shard transfers are carried out.
    #[serde(default)]
    pub lock_mode: LockMode,
    /// Required when `lock_mode` is `redis`.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Where deposits and withdrawals go: `{"type": "sandbox"}` (test money) or
    /// `{"type": "http", "base_url": …, "api_key": …}`. `wallet serve` refuses
    /// to start without it; `wallet dev` writes `sandbox`.
    #[serde(default)]
    pub payment_provider: Option<ProviderConfig>,
    /// The HTTP server's own bounds: timeouts, connections, client address.
    #[serde(default)]
    pub http: HttpLimits,
    /// Requests per client address, per username and per user; 429 beyond.
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// The wallet's rules: `daily_limits` (a default daily outgoing limit per
    /// currency) and `fraud_rules`, both at the top level. None unless
    /// configured.
    #[serde(flatten)]
    pub rules: WalletRules,
    /// Where the outbox's events go: `{"mode": "none"}` (the default: the
    /// notification feed only) or `{"mode": "nats", "url": "nats://…"}`.
    #[serde(default)]
    pub events: EventsConfig,
}

/// Bounds of the HTTP server, so that slow or idle clients cannot hold what
/// others need.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// A connection must deliver a request's headers within this, else it is
    /// closed (idle keep-alive connections too).
    pub header_read_timeout_ms: u64,
    /// A request's body must arrive within this, else 408 `request_timeout`.
    /// Bodies are read before a request takes one of `concurrent_requests_max`.
    pub body_read_timeout_ms: u64,
    /// A whole request, from its headers to its answer; 504 `gateway_timeout`
    /// beyond (a transfer keeps running and its key tells its outcome).
    pub request_timeout_ms: u64,
    /// Open connections at once; more wait in the kernel's accept backlog.
    pub connections_max: usize,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub shutdown_drain_ms: u64,
    /// Behind a proxy: the header the proxy sets to the client's address (e.g.
    /// `x-forwarded-for`; its last entry is used, the one the proxy appended).
    /// Unset: the TCP peer's address. Never trust a header no proxy overwrites.
    pub trusted_client_ip_header: Option<String>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout_ms: 5_000,
            body_read_timeout_ms: 5_000,
            request_timeout_ms: 30_000,
            connections_max: 8_192,
            shutdown_drain_ms: 10_000,
            trusted_client_ip_header: None,
        }
    }
}

/// Rate limits (GCRA: a sustained rate and a burst), each answered with 429
/// `rate_limited` and `Retry-After`. A rate of 0 turns that limit off.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Login attempts per username per minute, whether or not the user exists
    /// and whether or not the password is right.
    pub login_per_username_per_minute: u32,
    pub login_per_username_burst: u32,
    /// Sign-ups and logins per client address per minute.
    pub auth_per_address_per_minute: u32,
    pub auth_per_address_burst: u32,
    /// Money routes (transfer, deposit, withdrawal, account and transfer views)
    /// per user (by session token) per second.
    pub money_per_user_per_second: u32,
    pub money_per_user_burst: u32,
}

impl RateLimits {
    /// Every limit off: for load generators and test clusters whose one client
    /// address stands for thousands of users.
    pub fn off() -> RateLimits {
        RateLimits {
            login_per_username_per_minute: 0,
            login_per_username_burst: 0,
            auth_per_address_per_minute: 0,
            auth_per_address_burst: 0,
            money_per_user_per_second: 0,
            money_per_user_burst: 0,
        }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            login_per_username_per_minute: 5,
            login_per_username_burst: 5,
            auth_per_address_per_minute: 60,
            auth_per_address_burst: 20,
            money_per_user_per_second: 50,
            money_per_user_burst: 200,
        }
    }
}

/// The deployment-wide choice of cross-shard protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum LockMode {
    /// Two-phase commit: atomic across shards, no other moving part.
    #[default]
    #[serde(rename = "2pc")]
    #[value(name = "2pc")]
    TwoPc,
    /// Redis locks with fencing tokens and forward recovery.
    #[serde(rename = "redis")]
    #[value(name = "redis")]
    Redis,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::TwoPc => "2pc",
            LockMode::Redis => "redis",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Recovery leaves younger prepared transactions alone: their coordinator may
    /// still be working on them. Must exceed the slowest live prepare.
    pub in_doubt_after_ms: u64,
    pub recovery_interval_ms: u64,
    /// A recovery pass first asks every shard, at once, for its prepared
    /// transactions; a shard silent this long is skipped for the whole pass.
    pub recovery_probe_timeout_ms: u64,
    /// A recovery pass running longer is cut; the next pass goes on.
    pub recovery_pass_max_ms: u64,
    /// How often each coordinator checks the catalog epoch for a new bucket map.
    pub epoch_poll_ms: u64,
    pub session_ttl_s: u64,
    pub payment_timeout_ms: u64,
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    /// Password hashes (argon2, `argon2_memory_kib` each) computed at once;
    /// 0: one per core.
    pub password_workers: usize,
    /// Logins and sign-ups that may wait for a password worker; more get 503
    /// `overloaded` at once.
    pub password_queue_max: usize,
    pub request_body_bytes_max: usize,
    /// Requests served at once; more wait (bounded by the HTTP server's backlog).
    pub concurrent_requests_max: usize,
    /// Most transfers run together in one group (`crate::batch`); 1 makes
    /// every transfer a group of one.
    pub batch_max: usize,
    /// Cross-shard groups running at once (a shard's same-shard groups run one
    /// at a time). One: what arrives while a group runs forms the next, so
    /// groups stay large; with two, the wallet bench measured about the same
    /// throughput at 15 % more CPU per transfer in-process, and less over HTTP,
    /// where staggered arrivals start many small groups.
    pub batch_workers: usize,
    /// How long the cross-shard lane may wait for the clients of its last group
    /// to come back before it starts the next group with fewer (0: never
    /// waits). The wallet bench over HTTP, 2PC: 0.46x of in-process with no
    /// wait, 0.58x with 1 ms, 0.67-0.74x with 2 ms; in-process unchanged.
    pub batch_linger_us: u64,
    /// Transfers that may wait for one batch lane; more get 503 `shard_busy`
    /// at once (nothing claimed, so a retry with the same key runs afresh).
    pub batch_queue_max: usize,
    /// How long a request whose user's bucket is being moved waits, reloading
    /// the map and trying again, before it is answered 409 `bucket_moving`
    /// (nothing written; a retry with the same key runs afresh). A move's
    /// cutover pauses a bucket for at most its own bound (500 ms by default).
    #[serde(default = "move_wait_ms_default")]
    pub move_wait_ms: u64,
}

fn move_wait_ms_default() -> u64 {
    5_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            in_doubt_after_ms: 10_000,
            recovery_interval_ms: 1_000,
            recovery_probe_timeout_ms: 500,
            recovery_pass_max_ms: 5_000,
            epoch_poll_ms: 2_000,
            session_ttl_s: 24 * 3600,
            payment_timeout_ms: 2_000,
            // OWASP's minimum for argon2id: 19 MiB, 2 iterations.
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            password_workers: 0,
            password_queue_max: 64,
            request_body_bytes_max: 16 * 1024,
            concurrent_requests_max: 512,
            batch_max: 32,
            batch_workers: 1,
            batch_linger_us: 2_000,
            batch_queue_max: crate::batch::LANE_QUEUE_MAX,
            move_wait_ms: move_wait_ms_default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parse config {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("config {path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error("config {path}: {source}")]
    Secret {
        path: String,
        #[source]
        source: crate::secrets::SettingError,
    },
}

/// Added to `payment_timeout_ms + call_timeout_ms` for the shortest deposit
/// lease the coordinator runs with (see [`Config::agent_config`]).
pub const SETTLE_LEASE_MARGIN_MS: u64 = 1_000;

impl Config {
    /// The shard agents' settings, with the deposit lease raised to cover the
    /// longest a live settler can still be working (its provider call, then the
    /// apply): a lease that ran out while its settler waits would let recovery
    /// ask the provider too, and decide on "busy".
    pub fn agent_config(&self) -> AgentConfig {
        let mut agent = self.agent.clone();
        agent.settle_lease_ms = agent
            .settle_lease_ms
            .max(self.limits.payment_timeout_ms + agent.call_timeout_ms + SETTLE_LEASE_MARGIN_MS);
        agent.rules = std::sync::Arc::new(self.rules.clone());
        agent
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut config: Config =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                path: shown.clone(),
                source,
            })?;
        crate::secrets::resolve_config(&mut config).map_err(|source| ConfigError::Secret {
            path: shown.clone(),
            source,
        })?;
        config.validate().map_err(|problem| ConfigError::Invalid {
            path: shown,
            problem,
        })?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.shards.is_empty() {
            return Err("at least one shard is required".into());
        }
        self.events.validate()?;
        // PostgreSQL reads a lock_timeout of 0 as "wait forever": every lock
        // wait must have its bound.
        if self.agent.lock_timeout_ms == 0 {
            return Err("agent.lock_timeout_ms must be at least 1".into());
        }
        if self.limits.in_doubt_after_ms <= self.agent.lock_timeout_ms {
            return Err("limits.in_doubt_after_ms must exceed agent.lock_timeout_ms".into());
        }
        if self.lock_mode == LockMode::Redis && self.redis.is_none() {
            return Err("lock_mode \"redis\" needs a \"redis\" section with its url".into());
        }
        if let Some(r) = &self.redis {
            if r.lock_ttl_ms <= r.lock_wait_ms || r.lock_ttl_ms == 0 {
                return Err("redis.lock_ttl_ms must exceed redis.lock_wait_ms".into());
            }
        }
        if self.limits.recovery_probe_timeout_ms == 0 || self.limits.recovery_pass_max_ms == 0 {
            return Err(
                "limits.recovery_probe_timeout_ms and limits.recovery_pass_max_ms must be positive"
                    .into(),
            );
        }
        if self.agent.call_timeout_ms <= self.agent.lock_timeout_ms {
            // A lock wait must end as a lock timeout (the row's trouble), not as
            // a call timeout, which reads as the whole shard not answering.
            return Err("agent.call_timeout_ms must exceed agent.lock_timeout_ms".into());
        }
        if self.agent.statement_timeout_ms <= self.agent.lock_timeout_ms {
            return Err("agent.statement_timeout_ms must exceed agent.lock_timeout_ms".into());
        }
        if self.agent.statement_timeout_ms >= STATEMENT_TIMEOUT_MS_LIMIT {
            // The events prune keeps an event while its outbox row is at most
            // an hour younger; the two are inserted by one statement's call.
            return Err("agent.statement_timeout_ms must be under an hour".into());
        }
        if self.limits.batch_queue_max == 0 {
            return Err("limits.batch_queue_max must be at least 1".into());
        }
        let h = &self.http;
        if h.header_read_timeout_ms == 0
            || h.body_read_timeout_ms == 0
            || h.request_timeout_ms == 0
            || h.connections_max == 0
        {
            return Err("http timeouts and http.connections_max must be positive".into());
        }
        if self.limits.password_queue_max == 0 {
            return Err("limits.password_queue_max must be at least 1".into());
        }
        if self.agent.pool_size_max == 0 {
            return Err("agent.pool_size_max must be at least 1".into());
        }
        self.rules.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_docker_compose_config_loads_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose-config.json");
        let config = Config::load(&path).expect("deploy/compose-config.json is a valid config");
        assert_eq!(config.shards.len(), 4);
        assert_eq!(config.lock_mode, LockMode::TwoPc);
        assert_eq!(
            config.payment_provider,
            Some(crate::payments::ProviderConfig::Sandbox),
            "the compose demo says which provider it uses"
        );
        let redis = config
            .redis
            .expect("the compose file runs Redis for --lock-mode redis");
        assert!(redis.url.starts_with("redis://redis:"));
    }

    #[test]
    fn redis_mode_without_a_redis_section_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose-config.json");
        let mut config = Config::load(&path).expect("valid");
        config.lock_mode = LockMode::Redis;
        config.redis = None;
        assert!(config.validate().is_err());
    }

    #[test]
    fn a_lock_timeout_of_zero_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose-config.json");
        let mut config = Config::load(&path).expect("valid");
        config.agent.lock_timeout_ms = 0;
        let refused = config
            .validate()
            .expect_err("0 means no bound to PostgreSQL");
        assert!(refused.contains("lock_timeout_ms"), "{refused}");
    }

    #[test]
    fn a_statement_timeout_of_an_hour_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose-config.json");
        let mut config = Config::load(&path).expect("valid");
        config.agent.statement_timeout_ms = STATEMENT_TIMEOUT_MS_LIMIT - 1;
        config.validate().expect("just under an hour is fine");
        config.agent.statement_timeout_ms = STATEMENT_TIMEOUT_MS_LIMIT;
        let refused = config
            .validate()
            .expect_err("the events prune relies on statements under an hour");
        assert!(refused.contains("statement_timeout_ms"), "{refused}");
    }
}
