//! `wallet shards`: the rebalancing CLI (the work is in the `rebalance` crate).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use coordinator::config::Config;
use indicatif::{ProgressBar, ProgressStyle};
use rebalance::mover::{MoveOptions, Progress, ATTEMPTS_MAX, FENCE_WAIT_MS, PAUSE_MAX_MS};
use rebalance::Admin;
use rebalance::MoveRow;

/// Where the cluster is: one of the two.
#[derive(Args, Clone, Debug)]

pub struct Target {
    /// A `wallet dev` cluster's data directory (its cluster.json).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// A `wallet serve` deployment's config file.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ShardsCli {
    #[command(flatten)]
    target: Target,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: ShardsCommand,
}

#[derive(Subcommand, Debug)]
enum ShardsCommand {
    /// Shards with their buckets, users and money, and the map's epoch.
    List,
    /// Register a new shard (no buckets yet): checked, migrated, recorded.
    Add {
        name: String,
        #[arg(long)]
        dsn: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// The bucket moves a rebalance would make now.
    Plan,
    /// Carry out the plan online, bucket by bucket; resumes a killed run.
    Rebalance {
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        moves: MoveArgs,
    },
    /// Move every bucket off a shard.
    Drain {
        name: String,
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        moves: MoveArgs,
    },
    /// Forget a drained shard (refused while it owns a bucket or anything in doubt).
    Remove {
        name: String,
        #[arg(long)]
        yes: bool,
    },
    /// Moves in progress and done, with their steps, counts and timings.
    Status {
        /// Most moves shown (the latest).
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Check placement, ledgers and conservation; exit code 0 only if all hold.
    Verify,
}

#[derive(Args, Debug)]
struct MoveArgs {
    /// Moves running at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    max_parallel: u64,
    /// Users moved per second at most (no limit when unset).
    #[arg(long = "rate")]
    rate: Option<f64>,
    /// Longest pause of one bucket's transfers, in ms: a cutover not verified
    /// by then is rolled back and tried again.
    #[arg(long, default_value_t = PAUSE_MAX_MS)]
    pause_max_ms: u64,
    /// Start at most this many new moves this run (the rest wait for the next).
    #[arg(long)]
    max_moves: Option<usize>,
}

impl MoveArgs {
    fn options(&self) -> MoveOptions {
        MoveOptions {
            max_parallel: self.max_parallel as usize,
            rate_users_per_s: self.rate,
            pause_max_ms: self.pause_max_ms,
            fence_wait_ms: FENCE_WAIT_MS.min(self.pause_max_ms / 2),
            attempts_max: ATTEMPTS_MAX,
            max_moves: self.max_moves,
        }
    }
}

/// Runs a `wallet shards` command; the exit code is 0 unless it failed (or,
/// for `verify`, found a problem).
pub async fn run(cli: ShardsCli) -> anyhow::Result<i32> {
    let config = load(&cli.target)?;
    let admin = Admin::open(&config.catalog_dsn, config.agent.clone()).await?;
    let json = cli.json;
    match cli.command {
        ShardsCommand::List => {
            let list = admin.list().await?;
            if json {
                print_json(&list)?;
            } else {
                println!("map epoch {}", list.epoch);
                println!(
                    "{:<12} {:>3} {:<9} {:>6} {:>7} {:>9} {:>16}  dsn",
                    "name", "id", "state", "weight", "buckets", "users", "balance"
                );
                for s in &list.shards {
                    println!(
                        "{:<12} {:>3} {:<9} {:>6} {:>7} {:>9} {:>16}  {}",
                        s.name,
                        s.id,
                        s.state,
                        s.weight,
                        s.buckets,
                        s.users.map_or("?".into(), |u| u.to_string()),
                        s.balance_total.map_or("?".into(), |b| b.to_string()),
                        s.dsn
                    );
                }
            }
        }
        ShardsCommand::Add {
            name,
            dsn,
            weight,
            yes,
        } => {
            confirm(
                yes,
                &format!("Add shard {name:?} ({})?", shard_agent::dsn::redact(&dsn)),
            )?;
            let id = admin.add(&name, &dsn, weight).await?;
            let out = serde_json::json!({
                "name": name, "id": id.0, "dsn": shard_agent::dsn::redact(&dsn),
                "weight": weight, "state": "active", "buckets": 0,
            });
            if json {
                print_json(&out)?;
            } else {
                println!("added shard {name} (id {}) with no buckets; `wallet shards plan` shows what would move to it", id.0);
            }
        }
        ShardsCommand::Plan => {
            let plan = admin.plan().await?;
            if json {
                print_json(&plan)?;
            } else {
                for (flow, n) in &plan.flows {
                    println!("{flow}: {n} buckets");
                }
                println!(
                    "{} buckets, {} users, {} money would move (map epoch {})",
                    plan.buckets, plan.users, plan.money, plan.epoch
                );
            }
            if plan.moves.is_empty() {
                eprintln!(
                    "nothing to do: every bucket is where the ring of the active shards puts it"
                );
                return Ok(2);
            }
        }
        ShardsCommand::Rebalance { yes, moves } => {
            return rebalance(&admin, yes, &moves, json, None).await;
        }
        ShardsCommand::Drain { name, yes, moves } => {
            confirm(
                yes,
                &format!("Drain shard {name:?} (move every bucket off it)?"),
            )?;
            admin.drain(&name).await?;
            return rebalance(&admin, true, &moves, json, Some(&name)).await;
        }
        ShardsCommand::Remove { name, yes } => {
            confirm(yes, &format!("Remove shard {name:?} from the cluster?"))?;
            let row = admin.remove(&name).await?;
            if json {
                print_json(
                    &serde_json::json!({"name": row.name, "id": row.id.0, "state": "removed"}),
                )?;
            } else {
                println!("removed shard {name}; its server can be stopped");
            }
        }
        ShardsCommand::Status { limit } => {
            let moves = admin.catalog().recent_moves(limit).await?;
            let open = moves
                .iter()
                .filter(|m| !matches!(m.step.as_str(), "cleaned" | "rolled_back"))
                .count();
            if json {
                print_json(&serde_json::json!({
                    "open": open,
                    "done": moves.len() - open,
                    "moves": moves,
                }))?;
            } else {
                println!(
                    "{open} moves in progress, {} done (latest {limit})",
                    moves.len() - open
                );
                for m in &moves {
                    println!(
                        "move {:>5} bucket {:>4} {} -> {}: {:<11} attempts {} pause {} rows {} {}",
                        m.move_id,
                        m.bucket,
                        m.from,
                        m.to,
                        m.step,
                        m.attempts,
                        m.pause_ms.map_or("-".into(), |p| format!("{p} ms")),
                        m.rows.as_ref().map_or("-".into(), |r| r.to_string()),
                        m.error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        ShardsCommand::Verify => {
            let verdict = admin.verify().await?;
            if json {
                print_json(&verdict)?;
            } else {
                for p in &verdict.problems {
                    println!("PROBLEM: {p}");
                }
                println!(
                    "{}: {} shards, {} buckets each on exactly one shard: {}, {} users, {} moves open, epoch {}",
                    if verdict.ok { "OK" } else { "FAILED" },
                    verdict.shards,
                    verdict.buckets,
                    verdict.problems.is_empty(),
                    verdict.users,
                    verdict.moves_open,
                    verdict.epoch
                );
            }
            return Ok(if verdict.ok { 0 } else { 1 });
        }
    }
    Ok(0)
}

async fn rebalance(
    admin: &Arc<Admin>,
    yes: bool,
    args: &MoveArgs,
    json: bool,
    drained: Option<&str>,
) -> anyhow::Result<i32> {
    let plan = admin.plan().await?;
    let open = admin.catalog().open_moves().await?;
    if plan.moves.is_empty() && open.is_empty() {
        if json {
            print_json(&rebalance::RebalanceReport::default())?;
        } else {
            println!("nothing to do: every bucket is where the ring of the active shards puts it");
        }
        return Ok(0);
    }
    confirm(
        yes,
        &format!(
            "Move {} buckets ({} users){}?",
            plan.buckets,
            plan.users,
            if open.is_empty() {
                String::new()
            } else {
                format!(", resuming {} unfinished moves", open.len())
            }
        ),
    )?;
    let progress = Bar::new(!json && std::io::stderr().is_terminal());
    let report = admin.rebalance(&args.options(), &progress).await?;
    progress.finish();
    if json {
        print_json(&report)?;
    } else {
        println!(
            "moved {} buckets ({} users, {} money) in {:.1} s: {:.0} users/s; pause per bucket median {} ms, p99 {} ms, max {} ms; {} cutovers retried",
            report.cleaned,
            report.users,
            report.money,
            report.elapsed_ms as f64 / 1000.0,
            report.users_per_s,
            report.pause_ms_median,
            report.pause_ms_p99,
            report.pause_ms_max,
            report.retries
        );
        if let Some(name) = drained {
            println!("{name} owns no bucket now: `wallet shards remove {name}` forgets it");
        }
        for e in &report.errors {
            println!("ERROR: {e}");
        }
    }
    Ok(if report.errors.is_empty() { 0 } else { 1 })
}

/// A progress bar on a terminal, nothing otherwise.
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new(on: bool) -> Bar {
        Bar(on.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} buckets {msg}",
                )
                .expect("invariant: the template is valid"),
            );
            bar
        }))
    }
    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn start(&self, moves: usize) {
        if let Some(bar) = &self.0 {
            bar.set_length(moves as u64);
        }
    }
    fn done(&self, m: &MoveRow) {
        if let Some(bar) = &self.0 {
            bar.inc(1);
            bar.set_message(format!(
                "bucket {} {} -> {} paused {} ms",
                m.bucket,
                m.from,
                m.to,
                m.pause_ms.unwrap_or(0)
            ));
        }
    }
    fn retried(&self, m: &MoveRow, why: &str) {
        if let Some(bar) = &self.0 {
            bar.println(format!("bucket {}: {why}; trying again", m.bucket));
        }
    }
}

/// Asks on a terminal unless `--yes`; without a terminal there is nobody to
/// ask, and the command goes ahead.
fn confirm(yes: bool, question: &str) -> anyhow::Result<()> {
    if yes || !std::io::stdin().is_terminal() {
        return Ok(());
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not confirmed; nothing done");
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn load(target: &Target) -> anyhow::Result<Config> {
    let path = match (&target.data_dir, &target.config) {
        (Some(dir), _) => dir.join(wallet_dev::CLUSTER_FILE),
        (None, Some(file)) => file.clone(),
        (None, None) => bail!("pass --data-dir DIR (a wallet dev cluster) or --config FILE"),
    };
    let mut config = Config::load(&path).with_context(|| format!("read {}", path.display()))?;
    coordinator::secrets::resolve_config(&mut config)?;
    Ok(config)
}
