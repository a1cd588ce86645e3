//! Fault isolation, measured: healthy transfers beside one fault, against the
//! same load without it, in one run.
//!
//! Two faults, each with "victim" clients that keep running into it while the
//! healthy clients transfer among users the fault does not touch:
//! - **frozen shard**: the last shard's server is SIGSTOPped (postmaster and
//!   every backend), and the victims pay users on it;
//! - **locked account**: one user's account row is held by an in-doubt
//!   prepared leg, and that user keeps sending.
//!
//! Each runs a reference phase (healthy and victim clients, no fault) and a
//! fault phase (the same clients, the fault on), and reports the healthy
//! clients' transfers/s and p99 in both and their ratio.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use router::ShardId;
use rust_decimal::Decimal;
use serde::Serialize;
use shard_agent::{Amount, Gid};

use super::drivers::InProcess;
use super::load::{self, LoadResult, LoadSpec, Pick};
use super::setup::{BenchCluster, BenchUser, CURRENCY};
use super::BenchOptions;
use coordinator::service::Coordinator;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    FrozenShard,
    LockedAccount,
}

impl Fault {
    pub const ALL: [Fault; 2] = [Fault::FrozenShard, Fault::LockedAccount];

    pub fn name(self) -> &'static str {
        match self {
            Fault::FrozenShard => "isolation/frozen-shard",
            Fault::LockedAccount => "isolation/locked-account",
        }
    }

    /// The share of their throughput healthy transfers must keep, and the p99
    /// they must stay under (the goals).
    fn goal(self) -> (f64, Option<f64>) {
        match self {
            Fault::FrozenShard => (0.7, Some(500.0)),
            Fault::LockedAccount => (0.8, None),
        }
    }
}

/// One fault's figures.
#[derive(Clone, Debug, Serialize)]
pub struct IsolationReport {
    pub name: String,
    pub fault: String,
    pub healthy_clients: usize,
    pub victim_clients: usize,
    pub healthy_tps_before: f64,
    pub healthy_tps_during: f64,
    /// `healthy_tps_during / healthy_tps_before`.
    pub ratio: f64,
    pub healthy_p99_ms_before: f64,
    pub healthy_p99_ms_during: f64,
    pub healthy_failed_during: u64,
    pub victim_committed_during: u64,
    pub victim_failed_during: u64,
    /// Victim transfers refused by a business rule (the locked account's owner
    /// runs out of money in a long reference phase), before and during.
    pub victim_rejected_before: u64,
    pub victim_rejected_during: u64,
    pub goal: String,
    pub met: bool,
    /// The invariant checker's findings on the quiescent cluster afterwards.
    pub violations: Vec<String>,
    /// Committed transfers of both phases, warm-ups included: the checker's due.
    #[serde(skip)]
    pub committed_total: u64,
}

/// One victim client per this many healthy clients (at least one): enough to
/// keep running into the fault.
const HEALTHY_PER_VICTIM: usize = 4;

/// Cross-shard pairs that touch neither `avoid_shard` nor `avoid_user`.
struct Healthy {
    users: Arc<Vec<BenchUser>>,
    avoid_shard: Option<ShardId>,
    avoid_user: Option<usize>,
}

impl Pick for Healthy {
    fn users(&self) -> &Arc<Vec<BenchUser>> {
        &self.users
    }

    fn pick(&self, rng: &mut StdRng) -> (usize, usize) {
        let ok =
            |i: usize| Some(self.users[i].shard) != self.avoid_shard && Some(i) != self.avoid_user;
        loop {
            let (from, to) = (
                rng.gen_range(0..self.users.len()),
                rng.gen_range(0..self.users.len()),
            );
            if ok(from) && ok(to) && self.users[from].shard != self.users[to].shard {
                return (from, to);
            }
        }
    }
}

/// Transfers that run into the fault: from `payer` (to anyone on another
/// shard), or from anyone off `payee_shard` to someone on it.
struct Victim {
    users: Arc<Vec<BenchUser>>,
    payer: Option<usize>,
    payee_shard: Option<ShardId>,
}

impl Pick for Victim {
    fn users(&self) -> &Arc<Vec<BenchUser>> {
        &self.users
    }

    fn pick(&self, rng: &mut StdRng) -> (usize, usize) {
        loop {
            let from = self
                .payer
                .unwrap_or_else(|| rng.gen_range(0..self.users.len()));
            let to = rng.gen_range(0..self.users.len());
            let (fs, ts) = (self.users[from].shard, self.users[to].shard);
            let fits = match self.payee_shard {
                Some(s) => fs != s && ts == s,
                None => fs != ts,
            };
            if fits {
                return (from, to);
            }
        }
    }
}

/// Runs both phases of `fault` against `coordinator` (2PC, in-process).
pub async fn run(
    fault: Fault,
    cluster: &BenchCluster,
    coordinator: Arc<Coordinator>,
    opts: &BenchOptions,
    seed: u64,
) -> anyhow::Result<IsolationReport> {
    let users = cluster.users.clone();
    let frozen = ShardId((cluster.agents.len() - 1) as u16);
    // The locked account: the first user of shard 0 other than user 0 (the
    // hot-recipient scenario's merchant).
    let locked = users
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, u)| u.shard == ShardId(0))
        .map(|(i, _)| i)
        .ok_or_else(|| anyhow::anyhow!("no user on shard 0"))?;
    let (healthy, victim) = match fault {
        Fault::FrozenShard => (
            Healthy {
                users: users.clone(),
                avoid_shard: Some(frozen),
                avoid_user: None,
            },
            Victim {
                users: users.clone(),
                payer: None,
                payee_shard: Some(frozen),
            },
        ),
        Fault::LockedAccount => (
            Healthy {
                users: users.clone(),
                avoid_shard: None,
                avoid_user: Some(locked),
            },
            Victim {
                users: users.clone(),
                payer: Some(locked),
                payee_shard: None,
            },
        ),
    };
    let (healthy, victim) = (Arc::new(healthy), Arc::new(victim));
    let victims = opts.clients.div_ceil(HEALTHY_PER_VICTIM).max(1);
    let driver = Arc::new(InProcess { coordinator });
    let spec = |clients, tag: &str, n: u64| LoadSpec {
        clients,
        warmup: opts.warmup,
        duration: opts.duration,
        seed: seed.wrapping_add(n),
        key_prefix: format!("{}-{tag}", fault.name().replace('/', "-")),
    };
    let (healthy_before, victim_before) = (spec(opts.clients, "hb", 1), spec(victims, "vb", 2));
    let (healthy_during, victim_during) = (spec(opts.clients, "hd", 3), spec(victims, "vd", 4));

    let before = tokio::join!(
        load::run(driver.clone(), healthy.clone(), &healthy_before),
        load::run(driver.clone(), victim.clone(), &victim_before),
    );

    let held = match fault {
        Fault::FrozenShard => {
            cluster.shard_servers[frozen.0 as usize].pause()?;
            None
        }
        Fault::LockedAccount => Some(hold_account(cluster, &users[locked]).await?),
    };
    let during = tokio::join!(
        load::run(driver.clone(), healthy, &healthy_during),
        load::run(driver, victim, &victim_during),
    );
    match (fault, held) {
        (Fault::FrozenShard, _) => cluster.shard_servers[frozen.0 as usize].resume()?,
        (Fault::LockedAccount, Some((agent, gid))) => {
            agent.rollback_prepared(&gid).await.map(|_| ())?
        }
        (Fault::LockedAccount, None) => {}
    }
    Ok(report(fault, opts.clients, victims, before, during))
}

/// Holds `user`'s account row with an in-doubt prepared credit leg, as a
/// coordinator that died mid-transfer would leave it (until recovery, after
/// `in_doubt_after`, resolves it).
async fn hold_account(
    cluster: &BenchCluster,
    user: &BenchUser,
) -> anyhow::Result<(shard_agent::ShardAgent, Gid)> {
    let agent = cluster
        .agents
        .iter()
        .find(|a| a.id() == user.shard)
        .ok_or_else(|| anyhow::anyhow!("no agent for {}", user.shard))?
        .clone();
    let gid = local_cluster::testing::in_doubt_credit(
        &agent,
        user.shard,
        user.row.user_id,
        Amount::new(Decimal::new(1, 2), CURRENCY)?,
    )
    .await?;
    Ok((agent, gid))
}

fn report(
    fault: Fault,
    clients: usize,
    victims: usize,
    before: (LoadResult, LoadResult),
    during: (LoadResult, LoadResult),
) -> IsolationReport {
    let p99_ms = |r: &LoadResult| r.latency_us.value_at_quantile(0.99) as f64 / 1000.0;
    let (tps_before, tps_during) = (before.0.transfers_per_s(), during.0.transfers_per_s());
    let ratio = if tps_before > 0.0 {
        tps_during / tps_before
    } else {
        0.0
    };
    let (min, p99_max) = fault.goal();
    let p99_during = p99_ms(&during.0);
    let met = ratio >= min && p99_max.is_none_or(|m| p99_during < m);
    IsolationReport {
        name: fault.name().into(),
        fault: match fault {
            Fault::FrozenShard => "the last shard's server SIGSTOPped; victims pay its users",
            Fault::LockedAccount => {
                "one account held by an in-doubt prepared leg; its owner keeps sending"
            }
        }
        .into(),
        healthy_clients: clients,
        victim_clients: victims,
        healthy_tps_before: tps_before,
        healthy_tps_during: tps_during,
        ratio,
        healthy_p99_ms_before: p99_ms(&before.0),
        healthy_p99_ms_during: p99_during,
        healthy_failed_during: during.0.failed.values().sum(),
        victim_committed_during: during.1.committed,
        victim_failed_during: during.1.failed.values().sum(),
        victim_rejected_before: before.1.rejected.values().sum(),
        victim_rejected_during: during.1.rejected.values().sum(),
        goal: match p99_max {
            Some(m) => format!("healthy transfers keep >= {min}x, p99 < {m} ms"),
            None => format!("healthy transfers keep >= {min}x"),
        },
        met,
        violations: Vec::new(),
        committed_total: before.0.committed_total
            + before.1.committed_total
            + during.0.committed_total
            + during.1.committed_total,
    }
}
