//! `chaos`: the fault-injection harness.
//!
//!     chaos list
//!     chaos run --scenario random --duration 60s --seed 7 --json report.json
//!     chaos run --all --duration 5s
//!
//! `chaos serve --config FILE` is the coordinator process the harness starts (the
//! wallet's server with failpoints compiled in, armed from `FAILPOINTS`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use chaos_tests::cluster::ClusterOptions;
use chaos_tests::report::summary;
use chaos_tests::run::{run, Report, RunOptions};
use chaos_tests::scenario;
use clap::{Parser, Subcommand};
use coordinator::config::LockMode;

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "Crash, cut and delay every part of the wallet, then prove no money was created, lost or moved twice"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the scenarios.
    List {
        #[arg(long, value_enum, default_value = "2pc")]
        lock_mode: LockMode,
    },
    /// Run one scenario (or all of them) and check every invariant.
    Run {
        #[arg(long, required_unless_present = "all")]
        scenario: Option<String>,
        /// Run every scenario in turn.
        #[arg(long)]
        all: bool,
        /// How long faults are injected, e.g. 60s, 10m.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Seed of the workload and the fault schedule; a random one is logged if absent.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        users: usize,
        #[arg(long, default_value_t = 3_000)]
        in_doubt_after_ms: u64,
        /// Write the report(s) as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep the servers' data and the coordinator log in this directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Write every request and its outcome here, one JSON object a line
        /// (with --all, one file per scenario, the scenario's name appended).
        #[arg(long)]
        history: Option<PathBuf>,
        /// The cross-shard protocol under test.
        #[arg(long, value_enum, default_value = "2pc")]
        lock_mode: LockMode,
    },
    /// (internal) The coordinator process started by `run`.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// (internal) The rebalancing CLI's work, as a process the rebalance
    /// scenarios start and kill -9: resumes the journal's open moves and
    /// starts at most `max_moves` new ones.
    #[command(hide = true)]
    Move {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 20)]
        max_moves: usize,
        #[arg(long, default_value_t = 2)]
        max_parallel: usize,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,chaos_tests=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::List { lock_mode } => {
            for s in scenario::all(lock_mode) {
                println!("{:<38} {}", s.name, s.about);
            }
            Ok(())
        }
        Command::Serve { config } => {
            require_failpoints()?;
            let _failpoints = fail::FailScenario::setup();
            let config = coordinator::config::Config::load(&config)?;
            runtime.block_on(coordinator::serve::run(
                config,
                false,
                coordinator::serve::shutdown_signal(),
            ))
        }
        Command::Move {
            config,
            max_moves,
            max_parallel,
        } => {
            let _failpoints = fail::FailScenario::setup();
            let config = coordinator::config::Config::load(&config)?;
            runtime.block_on(async {
                let admin =
                    rebalance::Admin::open(&config.catalog_dsn, config.agent.clone()).await?;
                let opts = rebalance::MoveOptions {
                    max_moves: Some(max_moves),
                    max_parallel,
                    ..rebalance::MoveOptions::default()
                };
                let report = admin.rebalance(&opts, &rebalance::mover::Quiet).await?;
                println!("{}", serde_json::to_string(&report)?);
                anyhow::Ok(())
            })
        }
        Command::Run {
            scenario,
            all,
            duration,
            seed,
            clients,
            users,
            in_doubt_after_ms,
            json,
            data_dir,
            lock_mode,
            history,
        } => {
            require_failpoints()?;
            let seed = seed.unwrap_or_else(rand::random);
            eprintln!("chaos: seed {seed} (replay with --seed {seed})");
            let scenarios = match (all, scenario) {
                (true, _) => scenario::all(lock_mode),
                (false, Some(name)) => {
                    vec![scenario::find(lock_mode, &name).with_context(|| {
                        format!(
                            "no scenario {name:?} in {} mode; see `chaos list`",
                            lock_mode.as_str()
                        )
                    })?]
                }
                (false, None) => bail!("pass --scenario NAME or --all"),
            };
            let exe = std::env::current_exe()?;
            let mut reports: Vec<Report> = Vec::new();
            for s in &scenarios {
                let opts = RunOptions {
                    duration,
                    seed,
                    clients,
                    users,
                    history: history.as_ref().map(|h| match scenarios.len() {
                        1 => h.clone(),
                        _ => PathBuf::from(format!("{}.{}", h.display(), s.name.replace(':', "_"))),
                    }),
                    cluster: ClusterOptions {
                        shards: 4,
                        exe: exe.clone(),
                        in_doubt_after_ms,
                        data_dir: data_dir.as_ref().map(|d| d.join(s.name.replace(':', "_"))),
                        lock_mode,
                        batch_max: coordinator::config::Limits::default().batch_max,
                        rules: Default::default(),
                    },
                };
                let report = runtime.block_on(run(s, &opts))?;
                println!("{}", summary(&report));
                reports.push(report);
            }
            if let Some(path) = json {
                let body = if reports.len() == 1 {
                    serde_json::to_string_pretty(&reports[0])?
                } else {
                    serde_json::to_string_pretty(&reports)?
                };
                std::fs::write(&path, body).with_context(|| format!("write {}", path.display()))?;
            }
            let failed: Vec<_> = reports
                .iter()
                .filter(|r| !r.passed)
                .map(|r| r.scenario.as_str())
                .collect();
            if !failed.is_empty() {
                bail!("failed: {}", failed.join(", "));
            }
            Ok(())
        }
    }
}

/// A chaos run without failpoints would pass every broken variant's scenario for
/// the wrong reason (the bug is simply absent), so it is refused.
fn require_failpoints() -> anyhow::Result<()> {
    if !coordinator::FAILPOINTS_COMPILED {
        bail!(
            "this chaos binary was built without failpoints; \
             build it with `cargo build --release -p chaos-tests --features failpoints`"
        );
    }
    Ok(())
}
