//! `wallet`: the one entry point. `wallet dev` runs a local cluster; `wallet serve`
//! runs the API against shards someone else runs.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use coordinator::config::{Config, LockMode};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "wallet",
    version,
    about = "Sharded wallet: transfers across PostgreSQL shards with 2PC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster: PostgreSQL shards of its own plus the API.
    Dev {
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
    },
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
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn")),
        )
        .init();
    match Cli::parse().command {
        Command::Dev {
            listen,
            shards,
            data_dir,
            lock_mode,
        } => {
            coordinator::dev::run(coordinator::dev::DevOptions {
                listen,
                shards: usize::from(shards),
                data_dir,
                lock_mode,
            })
            .await
        }
        Command::Serve {
            config,
            listen,
            no_migrate,
            lock_mode,
        } => serve(config, listen, no_migrate, lock_mode).await,
    }
}

async fn serve(
    path: PathBuf,
    listen: Option<SocketAddr>,
    no_migrate: bool,
    lock_mode: Option<LockMode>,
) -> anyhow::Result<()> {
    let mut config = Config::load(&path)?;
    if let Some(addr) = listen {
        config.listen = addr;
    }
    if let Some(mode) = lock_mode {
        config.lock_mode = mode;
    }
    coordinator::serve::run(config, !no_migrate, coordinator::dev::shutdown_signal()).await
}
