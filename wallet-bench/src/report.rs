//! What a benchmark run reports: a table on stdout, a JSON file, and an SVG with
//! throughput bars and latency-by-percentile curves.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use super::load::LoadResult;

/// One scenario's figures.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    /// `same-shard`, `2pc`, `redis`, `single-node` or `pgbench`.
    pub protocol: String,
    pub distribution: String,
    /// `in-process`, `http` or `sql`.
    pub via: String,
    pub clients: usize,
    pub transfers_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub committed: u64,
    /// Busy CPU of the whole machine per committed transfer (µs), and the share
    /// of the window the hypervisor stole: see `LoadResult::cpu_us_per_transfer`.
    pub cpu_us_per_transfer: Option<f64>,
    pub steal_pct: Option<f64>,
    /// WAL flushes (fsyncs) of all servers per committed transfer, warm-up
    /// included (the whole scenario's flushes over its committed transfers).
    pub wal_syncs_per_transfer: Option<f64>,
    /// Mean transfers per batch group over the scenario, warm-up included
    /// (`None` when nothing was batched).
    pub transfers_per_group: Option<f64>,
    pub rejected: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// Transfers/s over the single-node baseline's with the same distribution.
    pub ratio_to_baseline: Option<f64>,
    pub baseline: Option<String>,
    /// HTTP scenarios: transfers/s over the same scenario in-process.
    pub ratio_to_in_process: Option<f64>,
    /// Transfers/s of each round, and the two ratios round by round (each
    /// round's scenarios run minutes apart at most, so these show how far the
    /// host's speed moved a ratio).
    pub round_transfers_per_s: Vec<f64>,
    /// `null` for a round whose baseline or in-process twin completed nothing.
    pub round_ratios_to_baseline: Vec<Option<f64>>,
    pub round_ratios_to_in_process: Vec<Option<f64>>,
    /// `…+rules` scenarios (daily limits and fraud rules configured, none
    /// triggering): transfers/s over the same scenario without rules, overall
    /// and round by round.
    pub ratio_to_without_rules: Option<f64>,
    pub round_ratios_to_without_rules: Vec<Option<f64>>,
    /// `…+events` scenarios (a relay publishing to nats-server): transfers/s
    /// over the same scenario without a broker, overall and round by round,
    /// and the relay's figures.
    pub ratio_to_without_events: Option<f64>,
    pub round_ratios_to_without_events: Vec<Option<f64>>,
    pub relay: Option<crate::events::RelayFigures>,
    pub invariants_ok: bool,
    pub violations: Vec<String>,
    /// (percentile, ms) points for the plot.
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

impl ScenarioReport {
    pub fn new(
        name: String,
        protocol: &str,
        distribution: &str,
        via: &str,
        clients: usize,
        r: &LoadResult,
    ) -> ScenarioReport {
        let ms = |q: f64| r.latency_us.value_at_quantile(q) as f64 / 1000.0;
        ScenarioReport {
            name,
            protocol: protocol.to_owned(),
            distribution: distribution.to_owned(),
            via: via.to_owned(),
            clients,
            transfers_per_s: r.transfers_per_s(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: r.latency_us.max() as f64 / 1000.0,
            committed: r.committed,
            cpu_us_per_transfer: r.cpu_us_per_transfer(),
            steal_pct: r.cpu.map(|c| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                100.0 * c.steal_s / (r.window.as_secs_f64() * cores as f64)
            }),
            wal_syncs_per_transfer: None,
            transfers_per_group: None,
            rejected: r.rejected.clone(),
            errors: r.failed.clone(),
            ratio_to_baseline: None,
            baseline: None,
            ratio_to_in_process: None,
            round_transfers_per_s: Vec::new(),
            round_ratios_to_baseline: Vec::new(),
            round_ratios_to_in_process: Vec::new(),
            ratio_to_without_rules: None,
            round_ratios_to_without_rules: Vec::new(),
            ratio_to_without_events: None,
            round_ratios_to_without_events: Vec::new(),
            relay: None,
            invariants_ok: false,
            violations: Vec::new(),
            curve: curve(&r.latency_us),
        }
    }
}

/// " (rounds 0.61-0.68x)" when there was more than one round.
/// A round without a ratio shows as such.
fn spread(ratios: &[Option<f64>]) -> String {
    let known = ratios.iter().flatten().copied();
    let lo = known.clone().fold(f64::INFINITY, f64::min);
    let hi = known.fold(f64::NEG_INFINITY, f64::max);
    if !ratios.is_empty() && ratios.iter().all(Option::is_none) {
        " (no round has a ratio)".into()
    } else if ratios.iter().any(Option::is_none) {
        format!(" (rounds {lo:.2}-{hi:.2}x; a round without a ratio)")
    } else if ratios.len() > 1 {
        format!(" (rounds {lo:.2}-{hi:.2}x)")
    } else {
        String::new()
    }
}

/// Where the plot's percentile axis starts: p50, in "nines" (-log10(1 - p)).
const NINES_FROM: f64 = std::f64::consts::LOG10_2;

/// Latency at percentiles spaced evenly on a "nines" axis, p50 to p99.9.
fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    (0..=60)
        .map(|i| {
            let nines = NINES_FROM + (3.0 - NINES_FROM) * f64::from(i) / 60.0;
            let q = 1.0 - 10f64.powf(-nines);
            (nines, h.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

/// Where and how the run happened.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    /// 8 KiB writes followed by fdatasync, per second, on the data directory's disk.
    pub fdatasync_per_s: f64,
    pub postgres: BTreeMap<String, String>,
}

impl Machine {
    pub fn read(data_dir: &Path, postgres: BTreeMap<String, String>) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_gib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.trim().trim_end_matches(" kB").parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            memory_gib,
            fdatasync_per_s: fsync_rate(data_dir).unwrap_or(0.0),
            postgres,
        }
    }
}

/// Like `pg_test_fsync`'s fdatasync line: rewrite one 8 KiB block and fdatasync it,
/// for one second.
fn fsync_rate(dir: &Path) -> std::io::Result<f64> {
    use std::io::{Seek, SeekFrom, Write};
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5au8; 8192];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok(rate)
}

#[derive(Clone, Debug, Serialize)]
pub struct Parameters {
    pub shards: usize,
    pub users: usize,
    pub opening_balance: String,
    pub clients: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub seed: u64,
    pub amounts: &'static str,
    /// The coordinator's batching: most transfers per group (1: off), groups
    /// per lane at once, and the cross-shard lane's longest wait for returning
    /// clients.
    pub batch_max: usize,
    pub batch_workers: usize,
    pub batch_linger_us: u64,
    /// Rounds of the whole scenario list; `duration_s` and `warmup_s` are per
    /// scenario per round.
    pub rounds: usize,
}

/// A goal from the issue, and whether this run met it.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub started_at: String,
    pub command: String,
    pub machine: Machine,
    pub parameters: Parameters,
    pub scenarios: Vec<ScenarioReport>,
    /// Healthy traffic beside one fault (`wallet bench --only isolation`).
    pub isolation: Vec<super::isolation::IsolationReport>,
    /// A shard added under load (`wallet bench --only rebalance`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<super::moving::RebalanceBench>,
    pub goals: Vec<Goal>,
    pub invariants_ok: bool,
}

impl Report {
    /// The goals of the current issues: at the default 16 clients, 2PC at
    /// least 0.6x and same-shard at least 0.85x of single-node; at 64
    /// clients, 1.0x and 1.5x; Redis mode at least 0.5x with a hot-merchant
    /// p99 under 100 ms; HTTP at least 0.7x of in-process; and the isolation
    /// goals.
    pub fn goals(
        scenarios: &[ScenarioReport],
        isolation: &[super::isolation::IsolationReport],
        clients: usize,
    ) -> Vec<Goal> {
        let find = |name: &str| scenarios.iter().find(|s| s.name == name);
        let mut goals = Vec::new();
        let mut ratio_goal = |name: &str, min: f64, p99_max: Option<f64>| {
            if let Some(s) = find(name) {
                // No ratio (the baseline completed nothing) never meets a goal.
                let ratio = s.ratio_to_baseline.unwrap_or(0.0);
                let p99_ok = s.committed > 0 && p99_max.is_none_or(|m| s.p99_ms < m);
                goals.push(Goal {
                    goal: match p99_max {
                        Some(m) => format!("{name}: >= {min}x single-node, p99 < {m} ms"),
                        None => format!("{name}: >= {min}x single-node"),
                    },
                    measured: format!(
                        "{ratio:.2}x{}, p99 {:.1} ms",
                        spread(&s.round_ratios_to_baseline),
                        s.p99_ms
                    ),
                    met: ratio >= min && p99_ok,
                });
            }
        };
        let (two_pc, same_shard) = if clients >= 64 {
            (1.0, 1.5)
        } else {
            (0.6, 0.85)
        };
        ratio_goal("2pc/uniform/in-process", two_pc, Some(50.0));
        ratio_goal("same-shard/uniform/in-process", same_shard, None);
        ratio_goal("redis/uniform/in-process", 0.5, None);
        if let Some(s) = find("redis/hot/in-process") {
            goals.push(Goal {
                goal: "redis/hot/in-process: p99 < 100 ms".into(),
                measured: format!("p99 {:.1} ms", s.p99_ms),
                met: s.committed > 0 && s.p99_ms < 100.0,
            });
        }
        for s in scenarios.iter() {
            if let Some(r) = s.ratio_to_without_rules {
                goals.push(Goal {
                    goal: format!("{}: >= 0.9x without rules", s.name),
                    measured: format!("{r:.2}x{}", spread(&s.round_ratios_to_without_rules)),
                    met: r >= 0.9,
                });
            }
        }
        for s in scenarios.iter() {
            if let Some(r) = s.ratio_to_without_events {
                goals.push(Goal {
                    goal: format!("{}: >= 0.85x without events", s.name),
                    measured: format!("{r:.2}x{}", spread(&s.round_ratios_to_without_events)),
                    met: r >= 0.85,
                });
            }
        }
        for s in scenarios.iter().filter(|s| s.via == "http") {
            if let Some(r) = s.ratio_to_in_process {
                goals.push(Goal {
                    goal: format!("{}: >= 0.7x in-process", s.name),
                    measured: format!("{r:.2}x{}", spread(&s.round_ratios_to_in_process)),
                    met: r >= 0.7,
                });
            }
        }
        for i in isolation {
            goals.push(Goal {
                goal: format!("{}: {}", i.name, i.goal),
                measured: format!(
                    "{:.2}x, p99 {:.1} ms (before: p99 {:.1} ms)",
                    i.ratio, i.healthy_p99_ms_during, i.healthy_p99_ms_before
                ),
                met: i.met,
            });
        }
        goals
    }

    pub fn print(&self) {
        let m = &self.machine;
        println!(
            "\nmachine: {} cores ({}), {:.1} GiB, {:.0} fdatasync/s on the data disk",
            m.cores, m.cpu, m.memory_gib, m.fdatasync_per_s
        );
        let settings: Vec<String> = m.postgres.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("postgres: {}", settings.join(" "));
        let p = &self.parameters;
        println!(
            "load: {} shards, {} users, {} clients closed-loop, {} rounds of every scenario, each {}s warm-up + {}s measured, seed {}, amounts {}",
            p.shards, p.users, p.clients, p.rounds, p.warmup_s, p.duration_s, p.seed, p.amounts
        );
        println!(
            "coordinator: groups of up to {} transfers, {} groups per lane at once, cross-shard lane waits up to {} µs for returning clients{}\n",
            p.batch_max,
            p.batch_workers,
            p.batch_linger_us,
            if p.batch_max <= 1 {
                " (every transfer a group of one)"
            } else {
                ""
            }
        );
        println!(
            "{:<32} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7} {:>8} {:>10}",
            "scenario",
            "xfers/s",
            "cpu µs/x",
            "x/group",
            "p50 ms",
            "p99 ms",
            "p99.9",
            "max ms",
            "vs base",
            "errors",
            "reject",
            "vs inproc",
            "invariants"
        );
        for s in &self.scenarios {
            println!(
                "{:<32} {:>10.0} {:>9} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>9} {:>7} {:>7} {:>8} {:>10}",
                s.name,
                s.transfers_per_s,
                s.cpu_us_per_transfer.map_or("-".into(), |c| format!("{c:.0}")),
                s.transfers_per_group.map_or("-".into(), |g| format!("{g:.1}")),
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                s.max_ms,
                s.ratio_to_baseline
                    .map_or("-".into(), |r| format!("{r:.2}x")),
                s.errors.values().sum::<u64>(),
                s.rejected.values().sum::<u64>(),
                s.ratio_to_in_process
                    .map_or("-".into(), |r| format!("{r:.2}x")),
                if s.invariants_ok { "ok" } else { "VIOLATED" },
            );
        }
        for s in &self.scenarios {
            for v in &s.violations {
                println!("  {}: {v}", s.name);
            }
            if !s.errors.is_empty() {
                println!("  {} errors: {:?}", s.name, s.errors);
            }
        }
        println!();
        for g in &self.goals {
            println!(
                "goal {:<52} {:<22} {}",
                g.goal,
                g.measured,
                if g.met { "met" } else { "NOT met" }
            );
        }
        println!(
            "\ninvariant checker after every scenario: {}",
            if self.invariants_ok {
                "passed"
            } else {
                "FAILED"
            }
        );
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("write {}", path.display()))
    }

    /// Throughput bars on the left, latency by percentile on the right.
    pub fn write_svg(&self, path: &Path) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, (1400, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (left, right) = root.split_horizontally(560);
        let n = self.scenarios.len().max(1);
        let max_tps = self
            .scenarios
            .iter()
            .map(|s| s.transfers_per_s)
            .fold(1.0, f64::max);
        let names: Vec<String> = self.scenarios.iter().map(|s| s.name.clone()).collect();
        let mut bars = ChartBuilder::on(&left)
            .caption("Throughput (transfers/s)", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(230)
            .build_cartesian_2d(0.0..max_tps * 1.1, 0.0..n as f64)
            .map_err(plot_err)?;
        bars.configure_mesh()
            .disable_y_mesh()
            .y_labels(n * 2 + 1)
            .y_label_formatter(&|y| {
                let i = (*y - 0.5).round();
                if (*y - 0.5 - i).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() {
                    names[names.len() - 1 - i as usize].clone()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(plot_err)?;
        for (i, s) in self.scenarios.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            let color = Palette99::pick(i).to_rgba();
            bars.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y + 0.15), (s.transfers_per_s, y + 0.85)],
                color.filled(),
            )))
            .map_err(plot_err)?;
            bars.draw_series(std::iter::once(Text::new(
                format!("{:.0}", s.transfers_per_s),
                (s.transfers_per_s + max_tps * 0.01, y + 0.7),
                ("sans-serif", 12),
            )))
            .map_err(plot_err)?;
        }
        let max_ms = self
            .scenarios
            .iter()
            .flat_map(|s| s.curve.iter().map(|(_, ms)| *ms))
            .fold(1.0, f64::max);
        let mut lines = ChartBuilder::on(&right)
            .caption("Latency by percentile (ms, log scale)", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(NINES_FROM..3.0, (0.1..max_ms * 1.5).log_scale())
            .map_err(plot_err)?;
        lines
            .configure_mesh()
            .x_labels(6)
            .x_label_formatter(&|x: &f64| {
                let p = 100.0 * (1.0 - 10f64.powf(-x));
                format!("p{}", (p * 10.0).round() / 10.0)
            })
            .x_desc("percentile")
            .draw()
            .map_err(plot_err)?;
        for (i, s) in self.scenarios.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            lines
                .draw_series(LineSeries::new(s.curve.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        lines
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
        Ok(())
    }
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn round_ratios_show_their_range_and_any_round_without_one() {
        assert_eq!(spread(&[]), "");
        assert_eq!(spread(&[Some(0.7)]), "", "one round: the ratio says it all");
        assert_eq!(
            spread(&[Some(0.72), Some(0.61), Some(0.68)]),
            " (rounds 0.61-0.72x)"
        );
        assert_eq!(
            spread(&[Some(0.72), None, Some(0.68)]),
            " (rounds 0.68-0.72x; a round without a ratio)"
        );
        assert_eq!(spread(&[None, None]), " (no round has a ratio)");
    }
}
