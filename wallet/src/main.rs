//! `wallet`: the one entry point. `wallet dev` runs a local cluster; `wallet serve`
//! runs the API against shards someone else runs.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use coordinator::config::{Config, LockMode};
use coordinator::events::EventsMode;
use tracing_subscriber::EnvFilter;

mod shards;

#[derive(Parser)]
#[command(
    name = "wallet",
    version,
    about = "Sharded wallet: transfers across PostgreSQL shards with 2PC"
)]
struct Cli {
    /// Log lines as text for a terminal, or as one JSON object per line for a
    /// log pipeline.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster: PostgreSQL shards of its own plus the API.
    Dev {
        #[command(subcommand)]
        action: Option<DevAction>,
        /// Address the API listens on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Number of shards (one PostgreSQL server each).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        shards: u16,
        /// Where the shards' data and cluster.json live; reused by the next run.
        #[arg(long, default_value = ".wallet-dev")]
        data_dir: PathBuf,
        /// Cross-shard protocol; `redis` also starts a local redis-server.
        #[arg(long, value_enum, default_value = "2pc")]
        lock_mode: LockMode,
        /// Where events go: `nats` also starts a local nats-server with
        /// JetStream; `none` keeps them for the notification feed only.
        #[arg(long, value_enum, default_value = "none")]
        events: EventsMode,
    },
    /// Rebalancing: list, add, drain and remove shards, and move buckets
    /// between them online.
    Shards(shards::ShardsCli),
    /// Serve the API against running shards described by a config file (the
    /// cluster.json `wallet dev` writes has this format).
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Do not apply schema migrations at start.
        #[arg(long)]
        no_migrate: bool,
        /// Overrides the config's lock_mode (`redis` needs its `redis` section).
        #[arg(long, value_enum)]
        lock_mode: Option<LockMode>,
        /// Overrides the config's events.mode (`nats` needs events.url);
        /// without either, events feed notifications only (`none`).
        #[arg(long, value_enum)]
        events: Option<EventsMode>,
    },
    /// Benchmark: throughput and latency against a single PostgreSQL node, side
    /// by side in one run. Starts its own servers; needs nothing running.
    Bench {
        /// Shards (one PostgreSQL server each, plus one for the baseline).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=16))]
        shards: u16,
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// Concurrent closed-loop clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Measured time per scenario and round, e.g. 5s.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Unmeasured time before each scenario's measurement, every round.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: std::time::Duration,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Most transfers the coordinator runs as one group (1: no batching).
        #[arg(long, default_value_t = coordinator::config::Limits::default().batch_max as u64, value_parser = clap::value_parser!(u64).range(1..=1000))]
        batch_max: u64,
        /// Groups of one lane running at once.
        #[arg(long, default_value_t = coordinator::config::Limits::default().batch_workers as u64, value_parser = clap::value_parser!(u64).range(1..=64))]
        batch_workers: u64,
        /// Longest wait, in microseconds, of the cross-shard lane for the
        /// clients of its last group (0: never waits).
        #[arg(long, default_value_t = coordinator::config::Limits::default().batch_linger_us, value_parser = clap::value_parser!(u64).range(0..=100_000))]
        batch_linger_us: u64,
        /// Times the whole list of scenarios runs; every figure is over the
        /// rounds together, and the ratios are also given round by round.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Run only the scenarios whose name contains this (repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the throughput and latency plot (SVG) here.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Keep the servers' data here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The rebalance scenario's moves at once (`wallet shards rebalance --max-parallel`).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
        move_parallel: u64,
        /// The rebalance scenario's throttle in users per second (`--rate`); none when unset.
        #[arg(long)]
        move_rate: Option<f64>,
    },
}

#[derive(Subcommand)]
enum DevAction {
    /// Start one more local PostgreSQL server for the dev cluster, migrate
    /// it, and print its DSN (for `wallet shards add`) on the last line.
    SpawnShard {
        name: String,
        #[arg(long, default_value = ".wallet-dev")]
        data_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The benchmark prints its own report; a log line per transfer on the terminal
    // would measure the terminal. RUST_LOG still overrides.
    let default_filter = match cli.command {
        Command::Bench { .. } => "warn,deadpool=error",
        // The CLI prints its own report; logs only say what went wrong.
        Command::Shards(_)
        | Command::Dev {
            action: Some(_), ..
        } => "warn,deadpool=error",
        _ => "info,tower_http=warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        // Spans' fields (the transfer ID among them) go with every event.
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_env_filter(filter)
            .init(),
    }
    match cli.command {
        Command::Dev {
            action: Some(DevAction::SpawnShard { name, data_dir }),
            ..
        } => {
            let spawned = wallet_dev::spawn_shard(&data_dir, &name).await?;
            println!(
                "spawned shard {name}: PostgreSQL on 127.0.0.1:{}, database {}, migrated\n\
                 add it with: wallet shards add {name} --dsn {} --data-dir {}",
                spawned.port,
                spawned.database,
                spawned.dsn,
                data_dir.display()
            );
            println!("{}", spawned.dsn);
            Ok(())
        }
        Command::Shards(cli) => {
            let code = shards::run(cli).await?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Dev {
            action: None,
            listen,
            shards,
            data_dir,
            lock_mode,
            events,
        } => {
            wallet_dev::run(wallet_dev::DevOptions {
                listen,
                shards: usize::from(shards),
                data_dir,
                lock_mode,
                events,
            })
            .await
        }
        Command::Serve {
            config,
            listen,
            no_migrate,
            lock_mode,
            events,
        } => serve(config, listen, no_migrate, lock_mode, events).await,
        Command::Bench {
            shards,
            users,
            clients,
            duration,
            warmup,
            seed,
            batch_max,
            batch_workers,
            batch_linger_us,
            rounds,
            only,
            json,
            svg,
            data_dir,
            move_parallel,
            move_rate,
        } => {
            anyhow::ensure!(users >= 100, "--users must be at least 100");
            anyhow::ensure!(clients >= 1, "--clients must be at least 1");
            let passed = wallet_bench::run(wallet_bench::BenchOptions {
                shards: usize::from(shards),
                users,
                clients,
                warmup,
                duration,
                seed,
                batch_max: batch_max as usize,
                batch_workers: batch_workers as usize,
                batch_linger_us,
                rounds: rounds as usize,
                only,
                json,
                svg,
                data_dir,
                command: std::env::args().collect::<Vec<_>>().join(" "),
                move_parallel: move_parallel as usize,
                move_rate,
            })
            .await?;
            if !passed {
                anyhow::bail!("the invariant checker failed after at least one scenario");
            }
            Ok(())
        }
    }
}

async fn serve(
    path: PathBuf,
    listen: Option<SocketAddr>,
    no_migrate: bool,
    lock_mode: Option<LockMode>,
    events: Option<EventsMode>,
) -> anyhow::Result<()> {
    let mut config = Config::load(&path)?;
    if let Some(addr) = listen {
        config.listen = addr;
    }
    if let Some(mode) = lock_mode {
        config.lock_mode = mode;
    }
    if let Some(mode) = events {
        config.events.mode = mode;
    }
    coordinator::serve::run(config, !no_migrate, coordinator::serve::shutdown_signal()).await
}
