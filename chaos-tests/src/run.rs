//! One chaos run: a cluster, a workload through the HTTP API, faults from a
//! seeded schedule, then healing and the checker. Replayable from its seed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde::Serialize;
use shard_agent::ShardAgent;
use tracing::info;
use uuid::Uuid;

use crate::checker::{wait_quiescent, Snapshot};
use crate::cluster::{ChaosCluster, ClusterOptions};
use crate::proxy;
use crate::scenario::{Fault, Kind, Scenario};
use crate::workload::{summarize, Client, Outcome, Record, Summary, User, WorkloadConfig};

/// Every request must reach a definite answer within this long after healing.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(45);
const DEPOSIT: &str = "100.00";

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub duration: Duration,
    pub seed: u64,
    pub clients: usize,
    pub users: usize,
    pub cluster: ClusterOptions,
    /// Where to write every request and its final outcome, one JSON object a line.
    pub history: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MidRun {
    /// Snapshots of all shards read while faults ran.
    pub readings: u32,
    /// Readings in which totals did not add up (a transfer half-committed across
    /// shards, seen shard by shard): reported, not failed on.
    pub inconsistent: u32,
    /// Readings that could not be taken (a shard down or cut off).
    pub unreadable: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub lock_mode: String,
    pub about: String,
    pub seed: u64,
    pub duration_s: f64,
    pub operations: Summary,
    pub resolved_by_replay: usize,
    pub faults: BTreeMap<String, u32>,
    pub coordinator_starts: u32,
    pub mid_run: MidRun,
    pub heal_to_quiet_ms: u128,
    /// Events the consumer read from the broker's stream after healing.
    pub events_in_stream: usize,
    pub violations: Vec<String>,
    pub expected_violations: bool,
    /// The verdict: no violations, or (for a broken variant) some.
    pub passed: bool,
    pub data_dir: String,
}

pub async fn run(scenario: &Scenario, opts: &RunOptions) -> anyhow::Result<Report> {
    info!(scenario = %scenario.name, seed = opts.seed, "chaos run");
    let cluster_options = ClusterOptions {
        rules: scenario.rules(),
        ..opts.cluster.clone()
    };
    let mut cluster = ChaosCluster::start(&cluster_options).await?;
    cluster
        .start_coordinator(&scenario.failpoints_running(0))
        .await?;
    let client = Client::new(cluster.api_url(), Duration::from_secs(4));
    let users = Arc::new(client.setup_users("chaos", opts.users, DEPOSIT).await?);
    let config = WorkloadConfig {
        tasks: opts.clients,
        transfers: 0,
        seed: opts.seed,
        attempts_max: 30,
        request_timeout: Duration::from_secs(4),
        amount_cents_max: 4_000,
        refund_percent: 10,
        dispute_percent: 4,
        admin_token: Some("chaos-admin".to_owned()),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let workload = {
        let (client, users, config, stop) =
            (client.clone(), users.clone(), config.clone(), stop.clone());
        tokio::spawn(async move { client.run_until(users, &config, stop).await })
    };
    let sampler = tokio::spawn(sample(cluster.direct.clone(), stop.clone()));

    let started = Instant::now();
    let mut faults = BTreeMap::new();
    inject(scenario, opts, &mut cluster, &mut faults).await?;
    stop.store(true, Ordering::Relaxed);
    let heal_started = Instant::now();
    heal(scenario, &mut cluster).await?;

    let mut violations = Vec::new();
    let mut records = match tokio::time::timeout(LIVENESS_BOUND, workload).await {
        Ok(r) => r?,
        Err(_) => {
            violations.push(format!(
                "liveness: clients still waiting {LIVENESS_BOUND:?} after healing"
            ));
            Vec::new()
        }
    };
    let mid_run = sampler.await?;
    let operations = summarize(&records);
    // Unknown outcomes are resolved by replaying their keys, all at once and under
    // one deadline: liveness is "every request answered within the bound".
    let unknown: Vec<usize> = (0..records.len())
        .filter(|&i| records[i].outcome == Outcome::Unknown)
        .collect();
    let replays = futures::future::join_all(
        unknown
            .iter()
            .map(|&i| client.replay(&records[i], &users, LIVENESS_BOUND)),
    )
    .await;
    let mut resolved = 0;
    for (&i, outcome) in unknown.iter().zip(replays) {
        if outcome == Outcome::Unknown {
            violations.push(format!(
                "liveness: key {} has no definite outcome {LIVENESS_BOUND:?} after healing",
                records[i].key
            ));
        } else {
            resolved += 1;
        }
        records[i].outcome = outcome;
    }
    // What became of every dispute the clients saw opened: a refunded one
    // moved its amount back to the payer, which the balance model must know.
    let opened: Vec<(Uuid, String, String)> = records
        .iter()
        .filter_map(|r| match (r.dispute_of, &r.outcome) {
            (Some(_), Outcome::Acknowledged(id)) => Some((*id, r.from.clone(), r.to.clone())),
            _ => None,
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for (id, payer, payee) in opened {
        let Some(user) = users.iter().find(|u| u.name == payer) else {
            continue;
        };
        match client.dispute_state(user, id).await {
            Some(d) if d["status"] == "refunded" => {
                let refund = d["refund_transfer_id"]
                    .as_str()
                    .and_then(|t| Uuid::parse_str(t).ok());
                records.push(Record {
                    key: format!("dispute-{id}"),
                    from: payee,
                    to: payer,
                    amount: d["amount"].as_str().unwrap_or_default().to_owned(),
                    refund_of: None,
                    dispute_of: None,
                    attempts: 1,
                    outcome: refund.map_or(Outcome::Unknown, Outcome::Acknowledged),
                });
            }
            Some(_) => {}
            None => violations.push(format!("disputes: {id} cannot be read by its payer")),
        }
    }
    // What became of every transfer held for review: an admin released it
    // (committed: it moved money), rejected it, it expired, or it still waits
    // (none of which moved any).
    for r in records.iter_mut() {
        let Outcome::Held(id) = r.outcome else {
            continue;
        };
        let Some(user) = users.iter().find(|u| u.name == r.from) else {
            continue;
        };
        r.outcome = match client.transfer_state(user, id).await {
            Some(t) if t["status"] == "committed" => Outcome::Acknowledged(id),
            Some(t) => Outcome::Failed {
                code: t["failure_code"].as_str().unwrap_or("held").to_owned(),
                transfer_id: Some(id),
            },
            None => {
                violations.push(format!("held transfers: {id} cannot be read by its payer"));
                Outcome::Unknown
            }
        };
    }
    if let Some(path) = &opts.history {
        write_history(path, &records)?;
    }
    let quiet_within =
        Duration::from_millis(opts.cluster.in_doubt_after_ms) + Duration::from_secs(20);
    let snap = wait_quiescent(&cluster.direct, quiet_within).await?;
    let heal_to_quiet_ms = heal_started.elapsed().as_millis();
    violations.extend(check(&snap, &records, &users));
    let (events_in_stream, events_violations) = crate::events::consume(&cluster, &records).await;
    violations.extend(events_violations);
    if let Kind::Rebalance { .. } = scenario.kind {
        let admin =
            rebalance::Admin::open(&cluster.config.catalog_dsn, cluster.config.agent.clone())
                .await?;
        let verdict = admin.verify().await?;
        violations.extend(verdict.problems.into_iter().map(|p| format!("verify: {p}")));
        if verdict.moves_open > 0 {
            violations.push(format!(
                "{} moves left open after healing",
                verdict.moves_open
            ));
        }
    }
    let expected = scenario.expect_violations();
    Ok(Report {
        scenario: scenario.name.clone(),
        lock_mode: opts.cluster.lock_mode.as_str().into(),
        about: scenario.about.clone(),
        seed: opts.seed,
        duration_s: started.elapsed().as_secs_f64(),
        operations,
        resolved_by_replay: resolved,
        faults,
        coordinator_starts: cluster.coordinator_starts(),
        mid_run,
        heal_to_quiet_ms,
        events_in_stream,
        passed: violations.is_empty() != expected,
        expected_violations: expected,
        violations,
        data_dir: cluster.data_dir().display().to_string(),
    })
}

/// Injects the scenario's faults until the duration is over. A coordinator that a
/// failpoint aborted is restarted whatever the scenario.
async fn inject(
    scenario: &Scenario,
    opts: &RunOptions,
    cluster: &mut ChaosCluster,
    faults: &mut BTreeMap<String, u32>,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x5eed_fa17);
    let end = Instant::now() + opts.duration;
    let mut crashes = 0;
    let mut mover = match scenario.kind {
        Kind::Rebalance { .. } => Some(Mover::new(cluster).await?),
        _ => None,
    };
    let mut next_fault = Instant::now() + Duration::from_millis(rng.gen_range(300..1_200));
    while Instant::now() < end {
        if cluster.coordinator_exit().is_some() {
            crashes += 1;
            *faults
                .entry("coordinator-abort-at-failpoint".into())
                .or_default() += 1;
            cluster
                .start_coordinator(&scenario.failpoints_running(crashes))
                .await?;
        }
        if let Some(mover) = mover.as_mut() {
            mover.step(cluster, &mut rng, faults).await?;
        }
        let fault = match scenario.kind {
            Kind::Repeat(f) => Some(f),
            Kind::Random | Kind::Rebalance { faults: true } => {
                let faults = Fault::for_mode(opts.cluster.lock_mode);
                Some(faults[rng.gen_range(0..faults.len())])
            }
            _ => None,
        };
        if let (Some(fault), true) = (fault, Instant::now() >= next_fault) {
            let shard = rng.gen_range(0..cluster.servers.len());
            apply(
                fault,
                shard,
                fault.hold(&mut rng),
                scenario,
                crashes,
                cluster,
            )
            .await?;
            *faults.entry(fault.name().into()).or_default() += 1;
            next_fault = Instant::now() + Duration::from_millis(rng.gen_range(300..1_500));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(mover) = mover.as_mut() {
        mover.kill();
    }
    Ok(())
}

/// The rebalance scenarios' mover: one shard goes draining and back to
/// active, again and again, and a `chaos move` process carries out the
/// resulting moves, 20 at a time; some of those processes are kill -9'd at a
/// random moment, and the next one resumes their journal.
struct Mover {
    catalog: shard_agent::moves::MoveCatalog,
    child: Option<std::process::Child>,
    /// The shard whose buckets go and come back, and whether it is draining.
    shard: router::ShardId,
    draining: bool,
    runs: u32,
}

impl Mover {
    async fn new(cluster: &ChaosCluster) -> anyhow::Result<Mover> {
        Ok(Mover {
            catalog: shard_agent::moves::MoveCatalog::connect(&cluster.config.catalog_dsn).await?,
            child: None,
            shard: router::ShardId(0),
            draining: false,
            runs: 0,
        })
    }

    async fn step(
        &mut self,
        cluster: &ChaosCluster,
        rng: &mut StdRng,
        faults: &mut BTreeMap<String, u32>,
    ) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait()?.is_none() {
                return Ok(());
            }
            self.child = None;
        }
        // The previous run ended (or was killed): every few runs, turn
        // around, so that buckets go and come back; then start the next.
        self.runs += 1;
        if self.runs % 4 == 1 {
            self.draining = !self.draining;
            let state = if self.draining { "draining" } else { "active" };
            // The catalog may be behind a partition: try again next step.
            if self
                .catalog
                .set_shard_state(self.shard, state)
                .await
                .is_err()
            {
                self.draining = !self.draining;
                self.runs -= 1;
                return Ok(());
            }
        }
        let mut child = cluster.spawn_mover(20)?;
        *faults.entry("mover-runs".into()).or_default() += 1;
        if rng.gen_bool(0.4) {
            // Killed part-way: at a random moment of its moves.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(20..1_500))).await;
            let _ = child.kill();
            let _ = child.wait();
            *faults.entry("kill-mover".into()).or_default() += 1;
        } else {
            self.child = Some(child);
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Applies one fault for `hold`, then undoes it.
async fn apply(
    fault: Fault,
    shard: usize,
    hold: Duration,
    scenario: &Scenario,
    crashes: u32,
    cluster: &mut ChaosCluster,
) -> anyhow::Result<()> {
    match fault {
        Fault::KillCoordinator => {
            cluster.kill_coordinator();
            tokio::time::sleep(hold).await;
            cluster
                .start_coordinator(&scenario.failpoints_running(crashes))
                .await?;
        }
        Fault::KillRedis => {
            if let Some(redis) = cluster.redis.as_mut() {
                redis.kill9();
                tokio::time::sleep(hold).await;
                tokio::task::block_in_place(|| redis.restart())?;
            }
        }
        Fault::KillBroker => {
            cluster.nats.kill9();
            tokio::time::sleep(hold).await;
            tokio::task::block_in_place(|| cluster.nats.restart())?;
        }
        Fault::KillShard => {
            tokio::task::block_in_place(|| cluster.servers[shard].kill9())?;
            tokio::time::sleep(hold).await;
            tokio::task::block_in_place(|| cluster.servers[shard].restart())?;
        }
        Fault::HoldRows => {
            let (client, conn) =
                tokio_postgres::connect(&cluster.direct_dsns[shard], tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(conn);
            client
                .batch_execute(
                    "BEGIN; SELECT 1 FROM accounts WHERE user_id IN (
                         SELECT user_id FROM accounts WHERE kind = 'user' ORDER BY random() LIMIT 3)
                     FOR UPDATE",
                )
                .await?;
            tokio::time::sleep(hold).await;
            client.batch_execute("ROLLBACK").await?;
            drop(client);
            conn.abort();
        }
        Fault::PauseShard => {
            cluster.servers[shard].pause()?;
            tokio::time::sleep(hold).await;
            cluster.servers[shard].resume()?;
        }
        Fault::Partition | Fault::DropLinks | Fault::SlowLinks => {
            let mode = match fault {
                Fault::Partition => proxy::Fault::BlackHole,
                Fault::DropLinks => proxy::Fault::Drop,
                _ => proxy::Fault::Delay {
                    ms: 20 + hold.as_millis() as u64 % 80,
                },
            };
            cluster.proxies[shard].set(mode);
            tokio::time::sleep(hold).await;
            cluster.proxies[shard].set(proxy::Fault::Pass);
        }
    }
    Ok(())
}

/// Undoes every fault and restarts the coordinator with the healed failpoints.
async fn heal(scenario: &Scenario, cluster: &mut ChaosCluster) -> anyhow::Result<()> {
    for p in &cluster.proxies {
        p.set(proxy::Fault::Pass);
    }
    for s in &mut cluster.servers {
        s.resume()?;
        if !s.is_running() {
            tokio::task::block_in_place(|| s.restart())?;
        }
    }
    if let Some(redis) = cluster.redis.as_mut() {
        if !redis.is_running() {
            tokio::task::block_in_place(|| redis.restart())?;
        }
    }
    cluster.kill_coordinator();
    cluster
        .start_coordinator(&scenario.failpoints_healed())
        .await?;
    if let Kind::Rebalance { .. } = scenario.kind {
        // Healed: the moves a killed mover left open are finished (or rolled
        // back), and no new one starts.
        let mut child = cluster.spawn_mover(0)?;
        let status = tokio::task::block_in_place(|| child.wait())?;
        anyhow::ensure!(
            status.success(),
            "the last mover run failed ({status}); see mover.log"
        );
    }
    Ok(())
}

/// Reads totals every second while faults run, for the report only.
async fn sample(agents: Vec<ShardAgent>, stop: Arc<AtomicBool>) -> MidRun {
    let mut mid = MidRun::default();
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_secs(3), Snapshot::take(&agents)).await {
            Ok(Ok(snap)) => {
                mid.readings += 1;
                if !snap.violations(false).is_empty() {
                    mid.inconsistent += 1;
                }
            }
            _ => mid.unreadable += 1,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    mid
}

/// The stored invariants, the client's view (acknowledged => committed, failed =>
/// nothing moved), and a model of every user's balance built from the history.
pub fn check(snap: &Snapshot, records: &[Record], users: &[User]) -> Vec<String> {
    let mut v = snap.violations(true);
    // A dispute moves nothing itself (its refund, if any, is a record of its
    // own), and its acknowledged ID is not a transfer's.
    let money: Vec<&Record> = records.iter().filter(|r| r.dispute_of.is_none()).collect();
    let acked: Vec<_> = money
        .iter()
        .filter_map(|r| match r.outcome {
            Outcome::Acknowledged(id) => Some(id),
            _ => None,
        })
        .collect();
    let failed: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Failed { transfer_id, .. } => *transfer_id,
            _ => None,
        })
        .collect();
    v.extend(snap.unacknowledged(&acked));
    v.extend(snap.failed_but_moved(&failed));
    let mut model: HashMap<&str, Decimal> = users
        .iter()
        .map(|u| (u.name.as_str(), DEPOSIT.parse().expect("static amount")))
        .collect();
    for r in &money {
        if let Outcome::Acknowledged(_) = r.outcome {
            let amount: Decimal = r.amount.parse().expect("the workload formats amounts");
            *model.entry(&r.from).or_default() -= amount;
            *model.entry(&r.to).or_default() += amount;
        }
    }
    let actual: HashMap<&str, Decimal> = snap
        .audits
        .iter()
        .flat_map(|(_, a)| a.balances_by_user.iter().map(|(n, b)| (n.as_str(), *b)))
        .collect();
    // Invariant 6: each user is served by exactly one shard.
    let mut served: HashMap<&str, Vec<u16>> = HashMap::new();
    for (shard, a) in &snap.audits {
        for (name, _) in &a.balances_by_user {
            served.entry(name.as_str()).or_default().push(*shard);
        }
    }
    let mut routing: Vec<String> = users
        .iter()
        .filter_map(|u| match served.get(u.name.as_str()).map(Vec::as_slice) {
            Some([_]) => None,
            None | Some([]) => Some(format!("invariant 6: {} is served by no shard", u.name)),
            Some(many) => Some(format!(
                "invariant 6: {} is served by shards {many:?}",
                u.name
            )),
        })
        .collect();
    routing.sort();
    v.extend(routing.into_iter().take(20));
    let mut mismatches: Vec<_> = model
        .iter()
        .filter(|(name, want)| actual.get(*name) != Some(want))
        .map(|(name, want)| {
            format!(
                "model: {name} has {:?}, the client's history says {want}",
                actual.get(name)
            )
        })
        .collect();
    mismatches.sort();
    v.extend(mismatches.into_iter().take(20));
    v
}

/// Writes the history: one JSON object a line (key, from, to, amount, attempts,
/// outcome), so a run can be audited or diffed after the fact.
fn write_history(path: &std::path::Path, records: &[Record]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in records {
        serde_json::to_writer(&mut out, r)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
