//! The benchmark's own cluster: one PostgreSQL server per shard, one more for the
//! single-node baseline (same settings), a redis-server, and 100,000 users loaded
//! in bulk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use local_cluster::{free_port, provision, NatsServer, PgServer, PgServerConfig, RedisServer};
use router::{bucket_of, ShardId, ShardMap, UserId};
use rust_decimal::Decimal;
use shard_agent::bulk::{BulkDefaults, BulkUser};
use shard_agent::records::UserRow;
use shard_agent::{Currency, ShardAgent};

use coordinator::auth::{new_token, token_hash, PasswordPolicy, PasswordWork};
use coordinator::cluster::Cluster;
use coordinator::config::{Config, Limits, LockMode};
use coordinator::events::{EventsConfig, EventsMode};
use coordinator::inputs::Username;
use coordinator::redis_lock::RedisConfig;

/// Every bench user's password; the users can log in with it.
pub const PASSWORD: &str = "bench-password";
pub const CURRENCY: Currency = Currency::Usd;

/// One loaded user, as the load generator sees it.
#[derive(Clone, Debug)]
pub struct BenchUser {
    pub row: UserRow,
    pub shard: ShardId,
    /// A live session token, for the HTTP path.
    pub token: String,
}

pub struct BenchCluster {
    pub shard_servers: Vec<PgServer>,
    pub baseline_server: PgServer,
    /// Started only when a Redis-mode scenario runs.
    pub redis: Option<RedisServer>,
    /// Started only when an `+events` scenario runs.
    pub nats: Option<NatsServer>,
    pub config: Config,
    pub agents: Vec<ShardAgent>,
    pub users: Arc<Vec<BenchUser>>,
}

impl BenchCluster {
    pub async fn start(
        dir: &Path,
        opts: &super::BenchOptions,
        opening_balance: Decimal,
        with_redis: bool,
        with_nats: bool,
    ) -> anyhow::Result<BenchCluster> {
        let (shards, users) = (opts.shards, opts.users);
        let mut shard_servers = Vec::with_capacity(shards);
        for i in 0..shards {
            shard_servers.push(start_server(dir, &format!("shard{i}")).await?);
        }
        let baseline_server = start_server(dir, "baseline").await?;
        let redis = match with_redis {
            true => Some(
                tokio::task::spawn_blocking(|| RedisServer::start(0))
                    .await?
                    .context("start redis-server")?,
            ),
            false => None,
        };
        let nats = match with_nats {
            true => {
                let store = dir.join("nats");
                Some(
                    tokio::task::spawn_blocking(move || NatsServer::start(0, &store))
                        .await?
                        .context("start nats-server")?,
                )
            }
            false => None,
        };
        let refs: Vec<&PgServer> = shard_servers.iter().collect();
        let (catalog_dsn, entries) = provision(&refs, shards, "bench").await?;
        let limits = Limits {
            batch_max: opts.batch_max,
            batch_workers: opts.batch_workers,
            batch_linger_us: opts.batch_linger_us,
            ..Limits::default()
        };
        let config = Config {
            listen: "127.0.0.1:0"
                .parse()
                .expect("invariant: a literal socket address"),
            catalog_dsn: catalog_dsn.into(),
            shards: entries.clone(),
            agent: Default::default(),
            limits: limits.clone(),
            admin_token: None,
            lock_mode: LockMode::TwoPc,
            redis: redis.as_ref().map(|r| RedisConfig {
                url: r.url(),
                ..RedisConfig::default()
            }),
            payment_provider: Some(coordinator::payments::ProviderConfig::Sandbox),
            http: Default::default(),
            rate_limits: coordinator::config::RateLimits::off(),
            rules: Default::default(),
            events: Default::default(),
        };
        // Opening the cluster bootstraps the catalog's bucket map: route by it.
        let routing = Cluster::open(&config.catalog_dsn, &entries, config.agent.clone())
            .await?
            .routing();
        let agents: Vec<ShardAgent> = routing.agents.values().cloned().collect();
        let users = load_users(&agents, &routing.map, users, opening_balance, &limits).await?;
        Ok(BenchCluster {
            shard_servers,
            baseline_server,
            redis,
            nats,
            config,
            agents,
            users: Arc::new(users),
        })
    }

    /// The same cluster's config in the given lock mode.
    pub fn config_for(&self, mode: LockMode) -> Config {
        Config {
            lock_mode: mode,
            ..self.config.clone()
        }
    }

    /// Events to this run's nats-server (none if it has none).
    pub fn events_config(&self) -> EventsConfig {
        match &self.nats {
            Some(n) => EventsConfig {
                mode: EventsMode::Nats,
                url: Some(n.url()),
                ..EventsConfig::default()
            },
            None => EventsConfig::default(),
        }
    }
}

async fn start_server(dir: &Path, name: &str) -> anyhow::Result<PgServer> {
    let mut config = PgServerConfig::new(name, dir.join(name), free_port()?);
    config.die_with_parent = true;
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || PgServer::start(config))
        .await?
        .with_context(|| format!("start PostgreSQL server {name}"))
}

/// `bench000000`, `bench000001`, …; user 0 is `merchant`, the hot recipient.
pub fn username(i: usize) -> String {
    if i == 0 {
        "merchant".to_owned()
    } else {
        format!("bench{i:06}")
    }
}

async fn load_users(
    agents: &[ShardAgent],
    map: &ShardMap,
    count: usize,
    opening_balance: Decimal,
    limits: &Limits,
) -> anyhow::Result<Vec<BenchUser>> {
    let policy = PasswordWork::new(
        PasswordPolicy {
            memory_kib: limits.argon2_memory_kib,
            iterations: limits.argon2_iterations,
        },
        1,
        1,
    );
    let defaults = BulkDefaults {
        currency: CURRENCY,
        opening_balance,
        password_hash: policy.hash(PASSWORD.to_owned()).await?,
        session_ttl_s: limits.session_ttl_s,
    };
    let now = chrono::Utc::now();
    let mut users = Vec::with_capacity(count);
    let mut per_shard: HashMap<ShardId, Vec<BulkUser>> = HashMap::new();
    for i in 0..count {
        let name = username(i);
        let user_id = UserId::for_username(&name);
        let shard = map.shard_of(&user_id);
        let token = new_token(
            &Username::parse(&name).expect("invariant: bench usernames are valid usernames"),
        );
        per_shard.entry(shard).or_default().push(BulkUser {
            user_id,
            bucket: bucket_of(&user_id),
            username: name.clone(),
            session_token_hash: Some(token_hash(&token)),
        });
        users.push(BenchUser {
            row: UserRow {
                user_id,
                email: format!("{name}@bench.invalid"),
                username: name,
                currency: CURRENCY,
                created_at: now,
            },
            shard,
            token,
        });
    }
    let loads = agents.iter().map(|agent| {
        let batch = per_shard.remove(&agent.id()).unwrap_or_default();
        let defaults = defaults.clone();
        let agent = agent.clone();
        async move { agent.bulk_load_users(&batch, &defaults).await }
    });
    for r in futures::future::join_all(loads).await {
        r?;
    }
    Ok(users)
}
