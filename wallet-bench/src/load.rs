//! The closed-loop load generator every scenario and the baseline share: each
//! client sends one transfer, waits for its answer, and sends the next. Who pays
//! whom is drawn by a seeded [`Picker`]; latencies go into an HDR histogram.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution as _, Zipf};
use router::ShardId;
use rust_decimal::Decimal;
use serde::Serialize;

use super::setup::BenchUser;

/// How payer and payee are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// Every user equally likely, as payer and as payee.
    Uniform,
    /// Zipf(1.0) over a seeded ranking of users, for payer and payee alike.
    Zipf,
    /// One merchant receives every transfer; payers are uniform.
    Hot,
}

impl Distribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Zipf => "zipf",
            Distribution::Hot => "hot",
        }
    }
}

/// Whether payer and payee share a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    SameShard,
    CrossShard,
    /// The single-node baseline: any two distinct users.
    Any,
}

/// Draws (payer, payee) index pairs into the user list.
pub struct Picker {
    users: Arc<Vec<BenchUser>>,
    by_shard: HashMap<ShardId, Vec<usize>>,
    /// Zipf rank (1-based) - 1 → user index.
    ranking: Vec<usize>,
    zipf: Zipf<f64>,
    distribution: Distribution,
    placement: Placement,
}

/// The merchant of the hot-recipient distribution is user 0.
const MERCHANT: usize = 0;
/// Rejection sampling bound: a draw that keeps missing the wanted placement
/// falls back to a uniform pick that satisfies it.
const DRAWS_MAX: usize = 64;

impl Picker {
    pub fn new(
        users: Arc<Vec<BenchUser>>,
        distribution: Distribution,
        placement: Placement,
        seed: u64,
    ) -> Picker {
        let mut by_shard: HashMap<ShardId, Vec<usize>> = HashMap::new();
        for (i, u) in users.iter().enumerate() {
            by_shard.entry(u.shard).or_default().push(i);
        }
        let mut ranking: Vec<usize> = (0..users.len()).collect();
        ranking.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x5a1f));
        let zipf = Zipf::new(users.len() as u64, 1.0)
            .expect("invariant: at least one user and a positive exponent");
        Picker {
            users,
            by_shard,
            ranking,
            zipf,
            distribution,
            placement,
        }
    }

    pub fn pick(&self, rng: &mut StdRng) -> (usize, usize) {
        match self.distribution {
            Distribution::Hot => (self.payer_for(MERCHANT, rng), MERCHANT),
            Distribution::Uniform => {
                let from = rng.gen_range(1..self.users.len());
                (
                    from,
                    self.payee_for(from, rng, |rng| rng.gen_range(0..self.users.len())),
                )
            }
            Distribution::Zipf => {
                let from = self.zipf_draw(rng);
                (from, self.payee_for(from, rng, |rng| self.zipf_draw(rng)))
            }
        }
    }

    fn zipf_draw(&self, rng: &mut StdRng) -> usize {
        let rank = self.zipf.sample(rng) as usize;
        self.ranking[rank.clamp(1, self.ranking.len()) - 1]
    }

    fn fits(&self, from: usize, to: usize) -> bool {
        from != to
            && match self.placement {
                Placement::SameShard => self.users[from].shard == self.users[to].shard,
                Placement::CrossShard => self.users[from].shard != self.users[to].shard,
                Placement::Any => true,
            }
    }

    fn payee_for(
        &self,
        from: usize,
        rng: &mut StdRng,
        draw: impl Fn(&mut StdRng) -> usize,
    ) -> usize {
        for _ in 0..DRAWS_MAX {
            let to = draw(rng);
            if self.fits(from, to) {
                return to;
            }
        }
        loop {
            let to = rng.gen_range(0..self.users.len());
            if self.fits(from, to) {
                return to;
            }
        }
    }

    /// A uniform payer for `to` (never `to` itself), placed as asked.
    fn payer_for(&self, to: usize, rng: &mut StdRng) -> usize {
        let home = self.users[to].shard;
        loop {
            let from = match self.placement {
                Placement::SameShard => {
                    let same = &self.by_shard[&home];
                    same[rng.gen_range(0..same.len())]
                }
                _ => rng.gen_range(0..self.users.len()),
            };
            if self.fits(from, to) {
                return from;
            }
        }
    }
}

/// Chooses each transfer's payer and payee, as indexes into `users()`.
pub trait Pick: Send + Sync + 'static {
    fn users(&self) -> &Arc<Vec<BenchUser>>;
    fn pick(&self, rng: &mut StdRng) -> (usize, usize);
}

impl Pick for Picker {
    fn users(&self) -> &Arc<Vec<BenchUser>> {
        &self.users
    }

    fn pick(&self, rng: &mut StdRng) -> (usize, usize) {
        Picker::pick(self, rng)
    }
}

/// The answer to one transfer.
#[derive(Clone, Debug)]
pub enum Outcome {
    Committed,
    /// A business rule refused it (e.g. insufficient funds): the protocol ran.
    Rejected(String),
    /// Anything else: a fault, a timeout, an HTTP error.
    Failed(String),
}

/// Sends one transfer and waits for its outcome.
pub trait Driver: Send + Sync + 'static {
    fn transfer(
        &self,
        client: usize,
        key: String,
        from: &BenchUser,
        to: &BenchUser,
        amount: Decimal,
    ) -> impl Future<Output = Outcome> + Send;
}

#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub clients: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub seed: u64,
    /// Prefixes every Idempotency-Key, so no two scenarios share one.
    pub key_prefix: String,
}

/// What one closed-loop run measured, counting only answers that arrived in the
/// measured window (after the warm-up).
pub struct LoadResult {
    /// Microseconds per transfer, whatever its outcome.
    pub latency_us: Histogram<u64>,
    pub committed: u64,
    pub rejected: BTreeMap<String, u64>,
    pub failed: BTreeMap<String, u64>,
    pub window: Duration,
    /// Committed transfers including the warm-up: what the checker must find.
    pub committed_total: u64,
    /// The whole machine's CPU over the measured window (`None` off Linux).
    pub cpu: Option<CpuWindow>,
}

impl LoadResult {
    pub fn transfers_per_s(&self) -> f64 {
        self.committed as f64 / self.window.as_secs_f64()
    }

    /// Busy CPU time of the whole machine (every process: servers, coordinator,
    /// load) per committed transfer, in microseconds. Unlike transfers/s it does
    /// not drop when a noisy neighbour steals the host's cores.
    pub fn cpu_us_per_transfer(&self) -> Option<f64> {
        let cpu = self.cpu?;
        (self.committed > 0).then(|| cpu.busy_s * 1e6 / self.committed as f64)
    }

    /// Adds another run of the same scenario (a later round): its windows,
    /// counts, latencies and CPU add up, so the merged figures are over the
    /// rounds' measured windows together. CPU is known only if every round's is.
    pub fn merge(&mut self, other: LoadResult) {
        self.latency_us
            .add(&other.latency_us)
            .expect("invariant: every histogram of the bench has the same bounds (new_histogram)");
        self.committed += other.committed;
        for (k, v) in other.rejected {
            *self.rejected.entry(k).or_default() += v;
        }
        for (k, v) in other.failed {
            *self.failed.entry(k).or_default() += v;
        }
        self.window += other.window;
        self.committed_total += other.committed_total;
        self.cpu = match (self.cpu, other.cpu) {
            (Some(a), Some(b)) => Some(CpuWindow {
                busy_s: a.busy_s + b.busy_s,
                steal_s: a.steal_s + b.steal_s,
            }),
            _ => None,
        };
    }
}

/// CPU seconds, summed over cores, spent busy and stolen by the hypervisor.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuWindow {
    pub busy_s: f64,
    pub steal_s: f64,
}

/// `/proc/stat`'s first line as (busy, steal) seconds. Its unit is USER_HZ, which
/// Linux fixes at 100 for user space on every architecture it reports it for.
fn cpu_now() -> Option<CpuWindow> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(stat.lines().next()?)
}

fn parse_cpu_line(line: &str) -> Option<CpuWindow> {
    const USER_HZ: f64 = 100.0;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let [user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = v[..] else {
        return None;
    };
    Some(CpuWindow {
        busy_s: (user + nice + system + irq + softirq) as f64 / USER_HZ,
        steal_s: steal as f64 / USER_HZ,
    })
}

/// When a run's measured window ends: fixed for a timed run, or moved to
/// "now" by whoever runs the load until something else is done
/// ([`run_until`]).
pub struct Stop(std::sync::Mutex<Instant>);

impl Stop {
    /// A stop at `at`.
    pub fn at(at: Instant) -> Arc<Stop> {
        Arc::new(Stop(std::sync::Mutex::new(at)))
    }

    /// Ends the window now.
    pub fn now(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn get(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until the stop, however often it is moved.
    async fn reached(&self) {
        loop {
            let at = self.get();
            let now = Instant::now();
            if now >= at {
                return;
            }
            tokio::time::sleep_until(at.min(now + Duration::from_millis(50)).into()).await;
        }
    }
}

/// Samples the CPU counters at the start and the end of the measured window.
async fn cpu_over(measure_from: Instant, stop: Arc<Stop>) -> Option<CpuWindow> {
    tokio::time::sleep_until(measure_from.into()).await;
    let first = cpu_now()?;
    stop.reached().await;
    let last = cpu_now()?;
    Some(CpuWindow {
        busy_s: last.busy_s - first.busy_s,
        steal_s: last.steal_s - first.steal_s,
    })
}

/// Runs `spec.clients` closed loops against `driver` for warm-up plus duration.
pub async fn run<D: Driver, P: Pick>(
    driver: Arc<D>,
    picker: Arc<P>,
    spec: &LoadSpec,
) -> LoadResult {
    let stop = Stop::at(Instant::now() + spec.warmup + spec.duration);
    run_until(driver, picker, spec, stop).await
}

/// Runs `spec.clients` closed loops against `driver` until `stop`, measuring
/// after the warm-up (`spec.duration` is not used: the window is what
/// `stop` makes it).
pub async fn run_until<D: Driver, P: Pick>(
    driver: Arc<D>,
    picker: Arc<P>,
    spec: &LoadSpec,
    stop: Arc<Stop>,
) -> LoadResult {
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let users = picker.users().clone();
    let cpu = tokio::spawn(cpu_over(measure_from, stop.clone()));
    let mut tasks = Vec::with_capacity(spec.clients);
    for client in 0..spec.clients {
        let (driver, picker, users) = (driver.clone(), picker.clone(), users.clone());
        let prefix = spec.key_prefix.clone();
        let mut rng = StdRng::seed_from_u64(spec.seed.wrapping_add(client as u64 * 7919));
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = ClientTally::new();
            let mut seq = 0u64;
            while Instant::now() < stop.get() {
                let (from, to) = picker.pick(&mut rng);
                let amount = Decimal::new(rng.gen_range(1..=100), 2);
                let key = format!("{prefix}-{client}-{seq}");
                seq += 1;
                let began = Instant::now();
                let outcome = driver
                    .transfer(client, key, &users[from], &users[to], amount)
                    .await;
                let ended = Instant::now();
                if matches!(outcome, Outcome::Committed) {
                    out.committed_total += 1;
                }
                if began >= measure_from && ended <= stop.get() {
                    out.record(ended - began, outcome);
                }
            }
            out
        }));
    }
    let cpu = cpu
        .await
        .expect("invariant: the CPU sampler does not panic");
    let mut result = LoadResult {
        latency_us: new_histogram(),
        committed: 0,
        rejected: BTreeMap::new(),
        failed: BTreeMap::new(),
        window: stop.get().saturating_duration_since(measure_from),
        committed_total: 0,
        cpu,
    };
    for t in tasks {
        let tally = t.await.expect("invariant: load clients do not panic");
        result
            .latency_us
            .add(&tally.latency_us)
            .expect("invariant: histograms share their bounds");
        result.committed += tally.committed;
        result.committed_total += tally.committed_total;
        for (k, v) in tally.rejected {
            *result.rejected.entry(k).or_default() += v;
        }
        for (k, v) in tally.failed {
            *result.failed.entry(k).or_default() += v;
        }
    }
    result
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("invariant: valid histogram bounds")
}

struct ClientTally {
    latency_us: Histogram<u64>,
    committed: u64,
    committed_total: u64,
    rejected: BTreeMap<String, u64>,
    failed: BTreeMap<String, u64>,
}

impl ClientTally {
    fn new() -> ClientTally {
        ClientTally {
            latency_us: new_histogram(),
            committed: 0,
            committed_total: 0,
            rejected: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    fn record(&mut self, took: Duration, outcome: Outcome) {
        self.latency_us
            .saturating_record(took.as_micros().max(1) as u64);
        match outcome {
            Outcome::Committed => self.committed += 1,
            Outcome::Rejected(code) => *self.rejected.entry(code).or_default() += 1,
            Outcome::Failed(why) => *self.failed.entry(why).or_default() += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_counters_are_read_from_the_first_line_of_proc_stat() {
        let w = parse_cpu_line("cpu  250432 7 88682 210051 10413 3 9828 25159 0 0")
            .expect("a kernel's cpu line parses");
        assert_eq!(
            w,
            CpuWindow {
                busy_s: (250432 + 7 + 88682 + 3 + 9828) as f64 / 100.0,
                steal_s: 251.59,
            }
        );
        assert_eq!(
            parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"),
            None,
            "a per-core line"
        );
        assert_eq!(parse_cpu_line("cpu 1 2 3"), None, "too few fields");
        assert_eq!(parse_cpu_line("cpu 1 x 3 4 5 6 7 8"), None);
        if cfg!(target_os = "linux") {
            assert!(cpu_now().is_some_and(|c| c.busy_s > 0.0));
        }
    }

    fn one_round(latencies_us: &[u64], window_s: u64, busy_s: Option<f64>) -> LoadResult {
        let mut latency_us = new_histogram();
        for &l in latencies_us {
            latency_us.record(l).expect("within the histogram's bounds");
        }
        LoadResult {
            latency_us,
            committed: latencies_us.len() as u64,
            rejected: BTreeMap::from([("insufficient_funds".to_owned(), 1)]),
            failed: BTreeMap::new(),
            window: Duration::from_secs(window_s),
            committed_total: latencies_us.len() as u64 + 10,
            cpu: busy_s.map(|busy_s| CpuWindow {
                busy_s,
                steal_s: 0.5,
            }),
        }
    }

    #[test]
    fn rounds_merge_into_one_result_over_their_windows_together() {
        let mut r = one_round(&[1_000, 2_000, 3_000], 2, Some(3.0));
        r.merge(one_round(&[10_000], 1, Some(1.0)));
        assert_eq!(r.committed, 4);
        assert_eq!(r.committed_total, 24);
        assert_eq!(r.window, Duration::from_secs(3));
        assert!((r.transfers_per_s() - 4.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.latency_us.len(), 4);
        assert!(r.latency_us.max() >= 10_000);
        assert_eq!(r.rejected["insufficient_funds"], 2);
        assert_eq!(
            r.cpu,
            Some(CpuWindow {
                busy_s: 4.0,
                steal_s: 1.0
            })
        );
        assert_eq!(r.cpu_us_per_transfer(), Some(1e6));
        r.merge(one_round(&[500], 1, None));
        assert_eq!(r.cpu, None, "one round without CPU counters: no CPU figure");
    }

    use router::UserId;
    use shard_agent::records::UserRow;

    fn users(n: usize, shards: u16) -> Arc<Vec<BenchUser>> {
        Arc::new(
            (0..n)
                .map(|i| BenchUser {
                    row: UserRow {
                        user_id: UserId::for_username(&format!("u{i}")),
                        username: format!("u{i}"),
                        email: String::new(),
                        currency: shard_agent::Currency::Usd,
                        created_at: chrono::Utc::now(),
                    },
                    shard: ShardId((i % usize::from(shards)) as u16),
                    token: String::new(),
                })
                .collect(),
        )
    }

    proptest! {
        #[test]
        fn picks_respect_the_placement(seed in any::<u64>(), dist in 0..3usize, place in 0..3usize) {
            let all = users(500, 4);
            let distribution = [Distribution::Uniform, Distribution::Zipf, Distribution::Hot][dist];
            let placement = [Placement::SameShard, Placement::CrossShard, Placement::Any][place];
            let picker = Picker::new(all.clone(), distribution, placement, seed);
            let mut rng = StdRng::seed_from_u64(seed);
            for _ in 0..200 {
                let (from, to) = picker.pick(&mut rng);
                prop_assert_ne!(from, to);
                match placement {
                    Placement::SameShard => prop_assert_eq!(all[from].shard, all[to].shard),
                    Placement::CrossShard => prop_assert_ne!(all[from].shard, all[to].shard),
                    Placement::Any => {}
                }
                if distribution == Distribution::Hot {
                    prop_assert_eq!(to, MERCHANT);
                }
            }
        }
    }

    #[test]
    fn zipf_concentrates_on_a_few_users_and_uniform_does_not() {
        let all = users(10_000, 4);
        let top_share = |distribution| {
            let picker = Picker::new(all.clone(), distribution, Placement::Any, 3);
            let mut rng = StdRng::seed_from_u64(3);
            let mut counts = HashMap::new();
            for _ in 0..20_000 {
                *counts.entry(picker.pick(&mut rng).0).or_insert(0u32) += 1;
            }
            let mut c: Vec<u32> = counts.into_values().collect();
            c.sort_unstable_by(|a, b| b.cmp(a));
            f64::from(c.iter().take(10).sum::<u32>()) / 20_000.0
        };
        // Zipf(1.0) over 10,000: the top 10 ranks draw about 29% of picks.
        assert!(top_share(Distribution::Zipf) > 0.2);
        assert!(top_share(Distribution::Uniform) < 0.01);
    }
}
