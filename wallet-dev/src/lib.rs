//! `wallet dev`: a local cluster on this machine. It starts its own PostgreSQL
//! servers (one per shard), creates and migrates the databases, bootstraps the
//! catalog, writes `cluster.json`, and serves the API until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use coordinator::config::{Config, Limits, LockMode};
use coordinator::events::{EventsConfig, EventsMode};
use coordinator::redis_lock::RedisConfig;
use local_cluster::{free_port, provision, NatsServer, PgServer, PgServerConfig, RedisServer};

pub const CLUSTER_FILE: &str = "cluster.json";
/// The field of cluster.json that lists the shards `wallet dev spawn-shard`
/// started (each a [`Spawned`]), which every later `wallet dev` run starts
/// too. The coordinator's config ignores it.
pub const SPAWNED_FIELD: &str = "spawned_shards";

/// A PostgreSQL server `wallet dev spawn-shard` started for one more shard.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Spawned {
    pub name: String,
    pub port: u16,
    pub database: String,
    /// What `wallet shards add --dsn` takes.
    pub dsn: String,
}

pub struct DevOptions {
    pub listen: SocketAddr,
    pub shards: usize,
    pub data_dir: PathBuf,
    pub lock_mode: LockMode,
    pub events: EventsMode,
}

/// Runs the dev cluster until Ctrl-C or SIGTERM.
pub async fn run(opts: DevOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("create {}", opts.data_dir.display()))?;
    let cluster_file = opts.data_dir.join(CLUSTER_FILE);
    let previous = read_previous(&cluster_file)?;
    if let Some(prev) = &previous {
        if prev.shards.len() != opts.shards {
            bail!(
                "{} holds a {}-shard cluster; pass --shards {} or another --data-dir (changing the shard count is a rebalance)",
                opts.data_dir.display(),
                prev.shards.len(),
                prev.shards.len()
            );
        }
    }
    let mut servers = Vec::with_capacity(opts.shards);
    for i in 0..opts.shards {
        let port = match previous.as_ref().and_then(|p| port_of(&p.shards[i].dsn)) {
            Some(port) => port,
            None => free_port()?,
        };
        let mut config = PgServerConfig::new(
            format!("shard{i}"),
            opts.data_dir.join(format!("shard{i}")),
            port,
        );
        config.die_with_parent = true;
        let server = tokio::task::spawn_blocking(move || PgServer::start(config))
            .await?
            .with_context(|| format!("start PostgreSQL for shard {i}"))?;
        println!(
            "  shard {i}: PostgreSQL on 127.0.0.1:{} (pid {})",
            server.port(),
            server.pid().unwrap_or(0)
        );
        servers.push(server);
    }
    // The servers of shards added since (`spawn-shard`): the catalog names
    // them, so they must run before the coordinator opens it.
    let mut spawned_servers = Vec::new();
    let spawned = read_spawned(&opts.data_dir)?;
    for spawned in &spawned {
        let server = start_spawned(&opts.data_dir, &spawned.name, spawned.port, true).await?;
        println!(
            "  {}: PostgreSQL on 127.0.0.1:{} (pid {}, spawned)",
            spawned.name,
            server.port(),
            server.pid().unwrap_or(0)
        );
        spawned_servers.push(server);
    }
    let refs: Vec<&PgServer> = servers.iter().collect();
    let (catalog_dsn, shards) = provision(&refs, opts.shards, "wallet").await?;
    let admin_token = previous
        .as_ref()
        .and_then(|p| p.admin_token.clone())
        .unwrap_or_else(|| coordinator::auth::random_secret().into());
    // Redis-lock mode: a local redis-server of our own, dying with us.
    let redis_server = match opts.lock_mode {
        LockMode::TwoPc => None,
        LockMode::Redis => {
            let server = tokio::task::spawn_blocking(|| RedisServer::start(0)).await??;
            println!("  redis: redis-server on 127.0.0.1:{}", server.port());
            Some(server)
        }
    };
    // Events to NATS: a local nats-server with JetStream of our own, its
    // stream kept under the data directory, dying with us.
    let nats_server = match opts.events {
        EventsMode::None => None,
        EventsMode::Nats => {
            let store = opts.data_dir.join("nats");
            let server =
                tokio::task::spawn_blocking(move || NatsServer::start(0, &store)).await??;
            println!(
                "  nats: nats-server (JetStream) on 127.0.0.1:{}",
                server.port()
            );
            Some(server)
        }
    };
    let config = Config {
        listen: opts.listen,
        catalog_dsn: catalog_dsn.into(),
        shards,
        agent: Default::default(),
        limits: Limits::default(),
        admin_token: Some(admin_token),
        lock_mode: opts.lock_mode,
        redis: redis_server.as_ref().map(|r| RedisConfig {
            url: r.url(),
            ..RedisConfig::default()
        }),
        payment_provider: Some(coordinator::payments::ProviderConfig::Sandbox),
        http: Default::default(),
        rate_limits: Default::default(),
        rules: Default::default(),
        events: EventsConfig {
            mode: opts.events,
            url: nats_server.as_ref().map(|n| n.url()),
            ..EventsConfig::default()
        },
    };
    write_cluster_file(&cluster_file, serde_json::to_value(&config)?, &spawned)?;
    coordinator::serve::serve(
        &config,
        || print_banner(&config, &cluster_file),
        coordinator::serve::shutdown_signal(),
    )
    .await?;
    println!("stopping the shards…");
    drop(redis_server);
    drop(nats_server);
    // Shards spawned while the cluster ran are stopped with it too: adopted,
    // then dropped (which shuts an adopted server down).
    let started: Vec<String> = spawned.iter().map(|s| s.name.clone()).collect();
    for late in read_spawned(&opts.data_dir)?
        .into_iter()
        .filter(|s| !started.contains(&s.name))
    {
        if let Ok(server) = start_spawned(&opts.data_dir, &late.name, late.port, true).await {
            spawned_servers.push(server);
        }
    }
    drop(spawned_servers);
    drop(servers);
    println!("stopped");
    Ok(())
}

/// `wallet dev spawn-shard NAME`: starts one more PostgreSQL server for the
/// dev cluster in `data_dir` (left running when this returns; the next
/// `wallet dev` run adopts it, and stops it when it stops), creates and
/// migrates its database, records it in cluster.json ([`SPAWNED_FIELD`]), and returns its
/// DSN for `wallet shards add`.
pub async fn spawn_shard(data_dir: &Path, name: &str) -> anyhow::Result<Spawned> {
    if name.is_empty()
        || name.len() > 40
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("shard name {name:?}: use 1-40 letters, digits, '-' or '_'");
    }
    if !data_dir.join(CLUSTER_FILE).exists() {
        bail!(
            "{} holds no dev cluster (no {CLUSTER_FILE}): run `wallet dev --data-dir {}` first",
            data_dir.display(),
            data_dir.display()
        );
    }
    let mut spawned = read_spawned(data_dir)?;
    if spawned.iter().any(|s| s.name == name) {
        bail!("{name:?} was spawned already; `wallet dev` starts it with the cluster");
    }
    let port = free_port()?;
    let server = start_spawned(data_dir, name, port, false).await?;
    let database = format!("wallet_{}", name.to_ascii_lowercase().replace('-', "_"));
    local_cluster::create_database(&server, &database)
        .await
        .with_context(|| format!("create database {database}"))?;
    shard_agent_migrate(&server.dsn(&database)).await?;
    let entry = Spawned {
        name: name.to_owned(),
        port: server.port(),
        dsn: format!("postgres://postgres@127.0.0.1:{}/{database}", server.port()),
        database,
    };
    spawned.push(entry.clone());
    let path = data_dir.join(CLUSTER_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let description: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    write_cluster_file(&path, description, &spawned)?;
    server.detach();
    Ok(entry)
}

async fn shard_agent_migrate(dsn: &str) -> anyhow::Result<()> {
    shard_agent::migrate::migrate_shard(dsn)
        .await
        .context("migrate the new shard")?;
    Ok(())
}

async fn start_spawned(
    data_dir: &Path,
    name: &str,
    port: u16,
    die_with_parent: bool,
) -> anyhow::Result<PgServer> {
    let mut config = PgServerConfig::new(
        format!("spawned-{name}"),
        data_dir.join(format!("spawned-{name}")),
        port,
    );
    config.die_with_parent = die_with_parent;
    tokio::task::spawn_blocking(move || PgServer::start(config))
        .await?
        .with_context(|| format!("start PostgreSQL for shard {name}"))
}

/// The servers `spawn-shard` started for the cluster in `data_dir`.
pub fn read_spawned(data_dir: &Path) -> anyhow::Result<Vec<Spawned>> {
    let path = data_dir.join(CLUSTER_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let description: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    match description.get(SPAWNED_FIELD) {
        None => Ok(Vec::new()),
        Some(list) => serde_json::from_value(list.clone())
            .with_context(|| format!("{SPAWNED_FIELD} in {}", path.display())),
    }
}

/// Writes cluster.json: `description` (the config) with the spawned shards.
fn write_cluster_file(
    path: &Path,
    mut description: serde_json::Value,
    spawned: &[Spawned],
) -> anyhow::Result<()> {
    if let Some(map) = description.as_object_mut() {
        if spawned.is_empty() {
            map.remove(SPAWNED_FIELD);
        } else {
            map.insert(SPAWNED_FIELD.to_owned(), serde_json::to_value(spawned)?);
        }
    }
    std::fs::write(path, serde_json::to_string_pretty(&description)?)
        .with_context(|| format!("write {}", path.display()))
}

fn read_previous(path: &Path) -> anyhow::Result<Option<Config>> {
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(Config::load(path)?))
}

fn port_of(dsn: &str) -> Option<u16> {
    dsn.split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
}

fn print_banner(config: &Config, cluster_file: &Path) {
    let url = format!("http://{}", config.listen);
    println!(
        "\nwallet dev: {} shards, lock mode {}, API on {url}\n  cluster description: {}\n  OpenAPI: {url}/openapi.json\n\n\
         Try it:\n  curl -s -X POST {url}/v1/user -H 'content-type: application/json' \\\n    \
         -d '{{\"username\":\"alice\",\"email\":\"alice@example.com\",\"password\":\"correct horse\",\"currency\":\"USD\"}}'\n  \
         curl -s -X POST {url}/v1/login -H 'content-type: application/json' \\\n    \
         -d '{{\"username\":\"alice\",\"password\":\"correct horse\"}}'\n  \
         curl -s -X POST {url}/v1/deposit -H \"authorization: Bearer $TOKEN\" -H 'idempotency-key: dep-1' \\\n    \
         -H 'content-type: application/json' -d '{{\"amount\":\"100.00\",\"currency\":\"USD\",\"payment_token\":\"sandbox_ok\"}}'\n  \
         curl -s -X POST {url}/v1/transfer -H \"authorization: Bearer $TOKEN\" -H 'idempotency-key: t-1' \\\n    \
         -H 'content-type: application/json' -d '{{\"to\":\"bob\",\"amount\":\"12.50\",\"currency\":\"USD\"}}'\n\n\
         Ctrl-C stops the API and the shards.",
        config.shards.len(),
        config.lock_mode.as_str(),
        cluster_file.display()
    );
}
