//! `wallet bench`: throughput and latency of the wallet against a single
//! PostgreSQL node, side by side in one run on one machine.
//!
//! It starts its own cluster (one PostgreSQL server per shard, one more for the
//! baseline with the same settings, a redis-server), loads the users in bulk, then
//! runs each scenario as a closed-loop load: in-process through
//! [`Coordinator::transfer`] (protocol cost only) and through the real HTTP API.
//! After every scenario the invariant checker must pass on a quiescent cluster.
//!
//! - [`setup`]: servers and bulk load; [`load`]: the load generator and its
//!   account pickers; [`drivers`]: in-process and HTTP; [`baseline`]: the
//!   single-node peers; [`isolation`]: healthy traffic beside a frozen shard
//!   or a locked account; [`report`]: table, JSON and SVG.

pub mod baseline;
pub mod drivers;
pub mod events;
pub mod isolation;
pub mod load;
pub mod moving;
pub mod report;
pub mod setup;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use checker::wait_quiescent;
use rust_decimal::Decimal;
use tracing::info;

use coordinator::batch::GroupStats;
use coordinator::config::{Config, LockMode};
use coordinator::payments::Sandbox;
use coordinator::service::Coordinator;
use load::{Distribution, LoadResult, LoadSpec, Picker, Placement};
use report::{Machine, Parameters, Report, ScenarioReport};
use setup::BenchCluster;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub shards: usize,
    pub users: usize,
    pub clients: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub seed: u64,
    /// The coordinator's `batch_max`, `batch_workers` and `batch_linger_us`
    /// (config.rs `Limits`).
    pub batch_max: usize,
    pub batch_workers: usize,
    pub batch_linger_us: u64,
    /// Times the whole list of scenarios runs; each scenario's figures are over
    /// its rounds together, its ratios also given round by round.
    pub rounds: usize,
    /// Run only scenarios whose name contains one of these (all when empty).
    pub only: Vec<String>,
    pub json: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    /// Where the servers' data lives (a fresh temporary directory when unset).
    pub data_dir: Option<PathBuf>,
    pub command: String,
    /// The rebalance scenario's `--max-parallel` and `--rate`.
    pub move_parallel: usize,
    pub move_rate: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    SameShard,
    TwoPc,
    Redis,
    SingleNode,
    Pgbench,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::SameShard => "same-shard",
            Protocol::TwoPc => "2pc",
            Protocol::Redis => "redis",
            Protocol::SingleNode => "single-node",
            Protocol::Pgbench => "pgbench",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    InProcess,
    Http,
    Sql,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::InProcess => "in-process",
            Via::Http => "http",
            Via::Sql => "sql",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    protocol: Protocol,
    distribution: Distribution,
    via: Via,
    /// With the wallet's rules configured ([`bench_rules`]); the name ends
    /// in `+rules`.
    rules: bool,
    /// With events published to a local nats-server (every scenario writes
    /// the outbox; only these run a relay that publishes it); the name ends
    /// in `+events`.
    events: bool,
}

impl Scenario {
    fn name(&self) -> String {
        match self.protocol {
            Protocol::Pgbench => "pgbench/tpcb-like".into(),
            p => format!(
                "{}/{}/{}{}",
                p.as_str(),
                self.distribution.as_str(),
                self.via.as_str(),
                if self.rules {
                    "+rules"
                } else if self.events {
                    "+events"
                } else {
                    ""
                }
            ),
        }
    }
}

/// The longest an `+events` scenario waits for its relay to publish what is
/// waiting, before the load and after it.
const DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// The rules of the `+rules` scenarios: a daily limit and all three kinds of
/// fraud rule, set so that none refuses a bench transfer (amounts are at most
/// 1.00, and a user pays a few times a minute at most), so the figures are
/// the cost of checking them: the limit on the locked row, the velocity
/// rule's read of the payer's recent transfers, the amount rule in memory.
/// The new-recipient rule reads history only above its amount, so it costs
/// nothing here.
pub fn bench_rules() -> shard_agent::rules::WalletRules {
    serde_json::from_str(
        r#"{"daily_limits": {"USD": "100000.00"},
            "fraud_rules": [
              {"name": "burst", "rule": "velocity", "max_transfers": 1000, "window_s": 60, "action": "block"},
              {"name": "large", "rule": "amount", "over": {"USD": "10000.00"}, "action": "block"},
              {"name": "stranger", "rule": "new_recipient", "over": {"USD": "5000.00"}, "action": "block"}
            ]}"#,
    )
    .expect("invariant: the bench's rules are valid JSON of WalletRules")
}

/// The scenarios, in the order each round runs them: each next to what its
/// ratio compares it with (the single-node baseline of its distribution; an
/// HTTP scenario's in-process twin), so a host whose speed drifts over minutes
/// moves both sides of a ratio alike.
fn scenarios() -> Vec<Scenario> {
    use Distribution::*;
    use Protocol::*;
    use Via::*;
    let s = |protocol, distribution, via| Scenario {
        protocol,
        distribution,
        via,
        rules: false,
        events: false,
    };
    let with_rules = |protocol| Scenario {
        rules: true,
        ..s(protocol, Uniform, InProcess)
    };
    let with_events = |protocol| Scenario {
        events: true,
        ..s(protocol, Uniform, InProcess)
    };
    vec![
        s(SingleNode, Uniform, Sql),
        s(SameShard, Uniform, InProcess),
        with_rules(SameShard),
        with_events(SameShard),
        s(SameShard, Uniform, Http),
        s(TwoPc, Uniform, InProcess),
        with_rules(TwoPc),
        with_events(TwoPc),
        s(TwoPc, Uniform, Http),
        s(Redis, Uniform, InProcess),
        with_rules(Redis),
        s(Redis, Uniform, Http),
        s(Pgbench, Uniform, Sql),
        s(SingleNode, Zipf, Sql),
        s(SameShard, Zipf, InProcess),
        s(TwoPc, Zipf, InProcess),
        s(Redis, Zipf, InProcess),
        s(SingleNode, Hot, Sql),
        s(TwoPc, Hot, InProcess),
        s(Redis, Hot, InProcess),
    ]
}

/// A coordinator of one lock mode, with its HTTP server once a scenario needs it.
struct Front {
    coordinator: Arc<Coordinator>,
    http: Option<(String, tokio::task::JoinHandle<()>)>,
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some((_, task)) = &self.http {
            task.abort();
        }
    }
}

impl Front {
    async fn start(config: &Config) -> anyhow::Result<Front> {
        let coordinator = Arc::new(Coordinator::start(config, Arc::new(Sandbox::default())).await?);
        Ok(Front {
            coordinator,
            http: None,
        })
    }

    async fn http_base(&mut self, config: &Config) -> anyhow::Result<String> {
        if let Some((base, _)) = &self.http {
            return Ok(base.clone());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let coordinator = self.coordinator.clone();
        let config = config.clone();
        let task = tokio::spawn(async move {
            let _ = coordinator::serve::serve_coordinator(
                listener,
                coordinator,
                &config,
                std::future::pending(),
            )
            .await;
        });
        self.http = Some((base.clone(), task));
        Ok(base)
    }
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<bool> {
    let wanted = |s: &Scenario| {
        opts.only.is_empty() || opts.only.iter().any(|o| s.name().contains(o.as_str()))
    };
    // Every scenario's ratio needs the single-node baseline of its distribution.
    let distributions: Vec<Distribution> = scenarios()
        .iter()
        .filter(|s| wanted(s))
        .map(|s| s.distribution)
        .collect();
    let selected: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| {
            wanted(s)
                || (s.protocol == Protocol::SingleNode && distributions.contains(&s.distribution))
        })
        .collect();
    let faults: Vec<isolation::Fault> = isolation::Fault::ALL
        .into_iter()
        .filter(|f| opts.only.is_empty() || opts.only.iter().any(|o| f.name().contains(o.as_str())))
        .collect();
    // The rebalance scenario changes the cluster it measures: it runs once,
    // after everything else.
    let rebalance_wanted =
        opts.only.is_empty() || opts.only.iter().any(|o| "rebalance".contains(o.as_str()));
    anyhow::ensure!(
        !selected.is_empty() || !faults.is_empty() || rebalance_wanted,
        "no scenario matches {:?}",
        opts.only
    );
    let temp;
    let dir = match &opts.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("wallet-bench-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let opening = Decimal::new(1000, 0);
    let with_redis = selected.iter().any(|s| s.protocol == Protocol::Redis);
    let with_nats = selected.iter().any(|s| s.events);
    println!(
        "wallet bench: starting {} shards + 1 baseline node{} in {}",
        opts.shards,
        match (with_redis, with_nats) {
            (true, true) => " + redis + nats",
            (true, false) => " + redis",
            (false, true) => " + nats",
            (false, false) => "",
        },
        dir.display()
    );
    let cluster = BenchCluster::start(&dir, &opts, opening, with_redis, with_nats)
        .await
        .context("start the benchmark cluster")?;
    println!(
        "loaded {} users onto {} shards",
        cluster.users.len(),
        opts.shards
    );
    let baseline_dsn = baseline::load(&cluster.baseline_server, &cluster.users, opening).await?;
    let postgres = baseline::settings(&baseline_dsn).await.unwrap_or_default();
    let machine = Machine::read(&dir, postgres);

    let mut fronts: BTreeMap<&'static str, Front> = BTreeMap::new();
    // Each scenario's rounds, merged as they come.
    let mut runs: Vec<Option<ScenarioRuns>> = selected.iter().map(|_| None).collect();
    let mut committed_cluster = 0u64;
    let mut committed_baseline = 0u64;
    let rounds = opts.rounds.max(1);
    for round in 0..rounds {
        for (i, scenario) in selected.iter().enumerate() {
            let name = scenario.name();
            println!(
                "[round {}/{rounds}, {}/{}] {name}…",
                round + 1,
                i + 1,
                selected.len()
            );
            if scenario.protocol == Protocol::Pgbench && baseline::pgbench_binary().is_none() {
                println!("    skipped: pgbench is not installed next to initdb");
                continue;
            }
            let spec = LoadSpec {
                clients: opts.clients,
                warmup: opts.warmup,
                duration: opts.duration,
                seed: opts
                    .seed
                    .wrapping_add(i as u64)
                    .wrapping_add((round as u64) << 32),
                key_prefix: format!("bench{i}r{round}"),
            };
            let placement = match scenario.protocol {
                Protocol::SameShard => Placement::SameShard,
                Protocol::TwoPc | Protocol::Redis => Placement::CrossShard,
                Protocol::SingleNode | Protocol::Pgbench => Placement::Any,
            };
            let picker = Arc::new(Picker::new(
                cluster.users.clone(),
                scenario.distribution,
                placement,
                opts.seed,
            ));
            let wal_before = wal_syncs(&cluster, &baseline_dsn).await;
            let (mut groups_before, mut coordinator) = (None, None);
            let mut relay_figures = None;
            let result = match (scenario.protocol, scenario.via) {
                (Protocol::Pgbench, _) => {
                    baseline::pgbench(
                        &cluster.baseline_server,
                        &dir,
                        opts.clients,
                        opts.warmup,
                        opts.duration,
                    )
                    .await?
                }
                (Protocol::SingleNode, _) => {
                    let driver =
                        Arc::new(baseline::Baseline::connect(&baseline_dsn, opts.clients).await?);
                    load::run(driver, picker, &spec).await
                }
                (protocol, via) => {
                    let mode = if protocol == Protocol::Redis {
                        LockMode::Redis
                    } else {
                        LockMode::TwoPc
                    };
                    let mut config = cluster.config_for(mode);
                    let key = match (mode, scenario.rules, scenario.events) {
                        (LockMode::TwoPc, false, false) => "2pc",
                        (LockMode::TwoPc, true, _) => "2pc+rules",
                        (LockMode::TwoPc, false, true) => "2pc+events",
                        (LockMode::Redis, false, _) => "redis",
                        (LockMode::Redis, true, _) => "redis+rules",
                    };
                    if scenario.rules {
                        config.rules = bench_rules();
                    }
                    if scenario.events {
                        config.events = cluster.events_config();
                    }
                    let front = match fronts.entry(key) {
                        std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(Front::start(&config).await?)
                        }
                    };
                    groups_before = Some(front.coordinator.batch_stats());
                    coordinator = Some(front.coordinator.clone());
                    // The relay first publishes what other scenarios left in
                    // the outboxes, so the figures are this load's alone.
                    let relay = scenario.events.then(|| front.coordinator.relay().clone());
                    if relay.is_some() {
                        events::drain(&cluster.agents, DRAIN_MAX).await?;
                    }
                    let watch = relay.clone().map(events::RelayWatch::start);
                    let result = match via {
                        Via::Http => {
                            let base = front.http_base(&config).await?;
                            let driver = Arc::new(drivers::Http::new(&base, opts.clients)?);
                            load::run(driver, picker, &spec).await
                        }
                        _ => {
                            let driver = Arc::new(drivers::InProcess {
                                coordinator: front.coordinator.clone(),
                            });
                            load::run(driver, picker, &spec).await
                        }
                    };
                    if let Some(watch) = watch {
                        relay_figures = Some(watch.finish(&cluster.agents, DRAIN_MAX).await);
                        // Its relay must not publish other scenarios' events
                        // while they are measured.
                        fronts.remove(key);
                    }
                    result
                }
            };
            let groups = match (groups_before, coordinator.map(|c| c.batch_stats())) {
                (Some(before), Some(after)) => Some(after.since(before)),
                _ => None,
            };
            let wal_after = wal_syncs(&cluster, &baseline_dsn).await;
            let violations = match scenario.protocol {
                Protocol::Pgbench => Vec::new(),
                Protocol::SingleNode => {
                    committed_baseline += result.committed_total;
                    baseline::check(
                        &baseline_dsn,
                        cluster.users.len(),
                        opening,
                        committed_baseline,
                    )
                    .await?
                }
                _ => {
                    committed_cluster += result.committed_total;
                    check_cluster(&cluster, committed_cluster).await?
                }
            };
            let violations: Vec<String> = violations
                .into_iter()
                .map(|v| format!("round {}: {v}", round + 1))
                .collect();
            let wal = match (wal_before, wal_after) {
                (Some(before), Some(after)) => Some(after - before),
                _ => None,
            };
            let mut this_round = ScenarioReport::new(
                name.clone(),
                scenario.protocol.as_str(),
                scenario.distribution.as_str(),
                scenario.via.as_str(),
                opts.clients,
                &result,
            );
            fill(
                &mut this_round,
                groups,
                wal,
                result.committed_total,
                violations,
            );
            let tps = this_round.transfers_per_s;
            info!(scenario = %name, round, tps, "scenario round done");
            print_round(&this_round);
            if let Some(f) = &relay_figures {
                println!(
                    "    relay: {} events published at {:.0}/s, at most {} waiting (oldest {:.1} s), caught up {} ms after the load",
                    f.published, f.publish_rate_per_s, f.max_unpublished, f.max_lag_s, f.drain_after_load_ms
                );
            }
            let this = ScenarioRuns {
                relay: relay_figures.into_iter().collect(),
                result,
                groups,
                wal,
                round_tps: vec![tps],
                violations: this_round.violations,
            };
            runs[i] = Some(match runs[i].take() {
                None => this,
                Some(earlier) => earlier.merge(this),
            });
        }
    }
    let mut isolated = Vec::with_capacity(faults.len());
    for (i, fault) in faults.into_iter().enumerate() {
        println!("[isolation {}] {}…", i + 1, fault.name());
        let config = cluster.config_for(LockMode::TwoPc);
        let front = match fronts.entry(LockMode::TwoPc.as_str()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(Front::start(&config).await?),
        };
        let mut report = isolation::run(
            fault,
            &cluster,
            front.coordinator.clone(),
            &opts,
            opts.seed.wrapping_add(1000 + i as u64),
        )
        .await?;
        committed_cluster += report.committed_total;
        report.violations = check_cluster(&cluster, committed_cluster).await?;
        println!(
            "    healthy {:.0} -> {:.0} transfers/s ({:.2}x), p99 {:.1} -> {:.1} ms; victims during: {} committed, {} failed, {} refused (before: {} refused); {}",
            report.healthy_tps_before,
            report.healthy_tps_during,
            report.ratio,
            report.healthy_p99_ms_before,
            report.healthy_p99_ms_during,
            report.victim_committed_during,
            report.victim_failed_during,
            report.victim_rejected_during,
            report.victim_rejected_before,
            if report.violations.is_empty() { "invariants hold" } else { "INVARIANTS VIOLATED" }
        );
        isolated.push(report);
    }
    let mut reports: Vec<ScenarioReport> = selected
        .iter()
        .zip(runs)
        .filter_map(|(scenario, runs)| {
            let runs = runs?;
            let mut report = ScenarioReport::new(
                scenario.name(),
                scenario.protocol.as_str(),
                scenario.distribution.as_str(),
                scenario.via.as_str(),
                opts.clients,
                &runs.result,
            );
            fill(
                &mut report,
                runs.groups,
                runs.wal,
                runs.result.committed_total,
                runs.violations,
            );
            report.round_transfers_per_s = runs.round_tps;
            report.relay = events::RelayFigures::merge(&runs.relay);
            Some(report)
        })
        .collect();
    let all = reports.clone();
    for report in &mut reports {
        relate(report, &all);
    }
    for r in reports
        .iter()
        .filter(|r| r.ratio_to_without_events.is_some())
    {
        let rounds: Vec<String> = r
            .round_ratios_to_without_events
            .iter()
            .map(|x| x.map_or("-".into(), |x| format!("{x:.2}")))
            .collect();
        let relay = r.relay.clone().unwrap_or_default();
        println!(
            "events cost: {} runs at {:.2}x of its twin without events (rounds: {}); relay {:.0} events/s, lag at most {:.1} s",
            r.name,
            r.ratio_to_without_events.unwrap_or_default(),
            rounds.join(", "),
            relay.publish_rate_per_s,
            relay.max_lag_s
        );
    }
    for r in reports
        .iter()
        .filter(|r| r.ratio_to_without_rules.is_some())
    {
        let rounds: Vec<String> = r
            .round_ratios_to_without_rules
            .iter()
            .map(|x| x.map_or("-".into(), |x| format!("{x:.2}")))
            .collect();
        println!(
            "rules cost: {} runs at {:.2}x of its twin without rules (rounds: {})",
            r.name,
            r.ratio_to_without_rules.unwrap_or_default(),
            rounds.join(", ")
        );
    }
    let rebalance = if rebalance_wanted {
        let config = cluster.config_for(LockMode::TwoPc);
        let front = match fronts.entry(LockMode::TwoPc.as_str()) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(Front::start(&config).await?),
        };
        Some(moving::run(&dir, &cluster, front.coordinator.clone(), &opts).await?)
    } else {
        None
    };
    drop(fronts);
    let invariants_ok = rebalance.as_ref().is_none_or(|r| r.verified)
        && reports.iter().all(|r| r.invariants_ok)
        && isolated.iter().all(|r| r.violations.is_empty());
    let report = Report {
        started_at: chrono::Utc::now().to_rfc3339(),
        command: opts.command.clone(),
        machine,
        parameters: Parameters {
            shards: opts.shards,
            users: opts.users,
            opening_balance: opening.to_string(),
            clients: opts.clients,
            warmup_s: opts.warmup.as_secs_f64(),
            duration_s: opts.duration.as_secs_f64(),
            seed: opts.seed,
            amounts: "uniform 0.01-1.00 USD",
            batch_max: opts.batch_max,
            batch_workers: opts.batch_workers,
            batch_linger_us: opts.batch_linger_us,
            rounds,
        },
        goals: Report::goals(&reports, &isolated, opts.clients),
        scenarios: reports,
        isolation: isolated,
        rebalance,
        invariants_ok,
    };
    report.print();
    if let Some(r) = &report.rebalance {
        r.print();
    }
    if let Some(path) = &opts.json {
        report.write_json(path)?;
        println!("JSON: {}", path.display());
    }
    if let Some(path) = &opts.svg {
        report.write_svg(path)?;
        println!("plot: {}", path.display());
    }
    drop(cluster);
    Ok(invariants_ok)
}

/// What a scenario's report takes from outside its load result: the checker's
/// verdict, its batch groups, and its WAL flushes (over `committed_total`, the
/// committed transfers warm-up included).
fn fill(
    report: &mut ScenarioReport,
    groups: Option<GroupStats>,
    wal: Option<i64>,
    committed_total: u64,
    violations: Vec<String>,
) {
    report.invariants_ok = violations.is_empty();
    report.violations = violations;
    report.transfers_per_group = groups.and_then(|g| g.transfers_per_group());
    report.wal_syncs_per_transfer = match wal {
        Some(w) if committed_total > 0 => Some(w as f64 / committed_total as f64),
        _ => None,
    };
}

/// One scenario's line as a round ends.
fn print_round(report: &ScenarioReport) {
    println!(
        "    {:.0} transfers/s, p50 {:.2} ms, p99 {:.2} ms, {} CPU µs and {} fsyncs per transfer (steal {}), {} transfers per group, invariants {}",
        report.transfers_per_s,
        report.p50_ms,
        report.p99_ms,
        report
            .cpu_us_per_transfer
            .map_or("-".into(), |c| format!("{c:.0}")),
        report
            .wal_syncs_per_transfer
            .map_or("-".into(), |w| format!("{w:.2}")),
        report
            .steal_pct
            .map_or("-".into(), |p| format!("{p:.0}%")),
        report
            .transfers_per_group
            .map_or("-".into(), |g| format!("{g:.1}")),
        if report.invariants_ok {
            "ok"
        } else {
            "VIOLATED"
        }
    );
}

/// A scenario's rounds so far, merged.
struct ScenarioRuns {
    result: LoadResult,
    /// `+events` scenarios: the relay's figures of each round.
    relay: Vec<events::RelayFigures>,
    groups: Option<GroupStats>,
    /// WAL flushes of every server over the rounds.
    wal: Option<i64>,
    /// Transfers/s of each round, in order.
    round_tps: Vec<f64>,
    violations: Vec<String>,
}

impl ScenarioRuns {
    fn merge(mut self, later: ScenarioRuns) -> ScenarioRuns {
        self.result.merge(later.result);
        self.groups = match (self.groups, later.groups) {
            (Some(a), Some(b)) => Some(a.plus(b)),
            _ => None,
        };
        self.wal = match (self.wal, later.wal) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.round_tps.extend(later.round_tps);
        self.relay.extend(later.relay);
        self.violations.extend(later.violations);
        self
    }
}

/// The invariant checker on a quiescent cluster, plus: every transfer a client saw
/// committed is committed in the ledger.
/// WAL flushes of every server of the run, shards and baseline node together
/// (the idle ones add only their background flushes). `None` if one cannot be read.
async fn wal_syncs(cluster: &BenchCluster, baseline_dsn: &str) -> Option<i64> {
    let mut total = baseline::wal_syncs(baseline_dsn).await.ok()?;
    for agent in &cluster.agents {
        total += agent.wal_syncs().await.ok()?;
    }
    Some(total)
}

async fn check_cluster(cluster: &BenchCluster, acknowledged: u64) -> anyhow::Result<Vec<String>> {
    let snap = wait_quiescent(&cluster.agents, Duration::from_secs(60)).await?;
    let mut v = snap.violations(true);
    let committed = snap
        .decisions
        .values()
        .filter(|d| d.kind == "transfer" && d.state == "committed")
        .count() as u64;
    if committed < acknowledged {
        v.push(format!(
            "{acknowledged} transfers were answered as committed, the ledger holds {committed}"
        ));
    }
    Ok(v)
}

/// Ratios: to the single-node baseline with the same distribution, and for HTTP
/// scenarios to the same scenario in-process; overall, and round by round.
fn relate(report: &mut ScenarioReport, all: &[ScenarioReport]) {
    // Each round's ratio, when both sides ran every round; `None` for a round
    // whose other side completed nothing.
    let per_round = |base: &ScenarioReport| -> Vec<Option<f64>> {
        if base.round_transfers_per_s.len() != report.round_transfers_per_s.len() {
            return Vec::new();
        }
        report
            .round_transfers_per_s
            .iter()
            .zip(&base.round_transfers_per_s)
            .map(|(r, b)| (*b > 0.0).then(|| r / b))
            .collect()
    };
    if report.protocol != "single-node" {
        if let Some(b) = all
            .iter()
            .find(|b| b.protocol == "single-node" && b.distribution == report.distribution)
        {
            // A baseline that completed nothing gives no ratio, not an infinite one.
            if b.transfers_per_s > 0.0 {
                report.ratio_to_baseline = Some(report.transfers_per_s / b.transfers_per_s);
                report.round_ratios_to_baseline = per_round(b);
                report.baseline = Some(b.name.clone());
            }
        }
    } else {
        report.ratio_to_baseline = Some(1.0);
        report.baseline = Some(report.name.clone());
    }
    if let Some(twin) = report.name.strip_suffix("+events") {
        if let Some(base) = all.iter().find(|b| b.name == twin) {
            if base.transfers_per_s > 0.0 {
                report.ratio_to_without_events =
                    Some(report.transfers_per_s / base.transfers_per_s);
                report.round_ratios_to_without_events = per_round(base);
            }
        }
    }
    if let Some(twin) = report.name.strip_suffix("+rules") {
        if let Some(base) = all.iter().find(|b| b.name == twin) {
            if base.transfers_per_s > 0.0 {
                report.ratio_to_without_rules = Some(report.transfers_per_s / base.transfers_per_s);
                report.round_ratios_to_without_rules = per_round(base);
            }
        }
    }
    if report.via == "http" {
        if let Some(inproc) = all.iter().find(|b| {
            b.via == "in-process"
                && b.protocol == report.protocol
                && b.distribution == report.distribution
        }) {
            if inproc.transfers_per_s > 0.0 {
                report.ratio_to_in_process = Some(report.transfers_per_s / inproc.transfers_per_s);
                report.round_ratios_to_in_process = per_round(inproc);
            }
        }
    }
}
