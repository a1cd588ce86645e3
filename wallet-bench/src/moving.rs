//! `wallet bench --only rebalance`: a shard added to the loaded cluster while
//! clients transfer. It runs last, once: it changes the cluster it measures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use coordinator::service::Coordinator;
use rebalance::mover::{MoveOptions, Quiet};
use rebalance::Admin;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::drivers::InProcess;
use crate::load::{self, Distribution, LoadResult, LoadSpec, Picker, Placement};
use crate::setup::BenchCluster;

/// What the rebalance scenario measured.
#[derive(Clone, Debug, Serialize)]
pub struct RebalanceBench {
    pub shards_before: usize,
    pub max_parallel: usize,
    pub rate_users_per_s: Option<f64>,
    pub buckets_moved: usize,
    pub users_moved: i64,
    pub money_moved: Decimal,
    pub move_s: f64,
    pub users_per_s: f64,
    pub money_per_s: Decimal,
    /// Per bucket, from its fence to its switch.
    pub pause_ms_median: i32,
    pub pause_ms_p99: i32,
    pub pause_ms_max: i32,
    /// Cutovers rolled back (over their bound) and tried again.
    pub cutover_retries: i64,
    pub tps_before: f64,
    pub tps_during: f64,
    /// `tps_during / tps_before` (goal: at least 0.7).
    pub tps_ratio: f64,
    pub p99_ms_before: f64,
    pub p99_ms_during: f64,
    /// The same load after the move, on the cluster with the added shard.
    pub tps_after: f64,
    pub p99_ms_after: f64,
    /// Busy CPU of the whole machine per committed transfer, in µs: before,
    /// during (the mover's work included) and after the move.
    pub cpu_us_before: Option<f64>,
    pub cpu_us_during: Option<f64>,
    pub cpu_us_after: Option<f64>,
    pub failed_during: u64,
    pub verified: bool,
    pub problems: Vec<String>,
}

pub async fn run(
    dir: &std::path::Path,
    cluster: &BenchCluster,
    coordinator: Arc<Coordinator>,
    opts: &super::BenchOptions,
) -> anyhow::Result<RebalanceBench> {
    let mut config = local_cluster::PgServerConfig::new(
        "shard-added",
        dir.join("shard-added"),
        local_cluster::free_port()?,
    );
    config.die_with_parent = true;
    let server = tokio::task::spawn_blocking(move || local_cluster::PgServer::start(config))
        .await?
        .context("start the added shard's server")?;
    local_cluster::create_database(&server, "bench_added").await?;
    let dsn = server.dsn("bench_added");
    let admin = Admin::open(&cluster.config.catalog_dsn, cluster.config.agent.clone()).await?;
    let picker = Arc::new(Picker::new(
        cluster.users.clone(),
        Distribution::Uniform,
        Placement::Any,
        opts.seed,
    ));
    let driver = Arc::new(InProcess { coordinator });
    let spec = |tag: &str, warmup: Duration, duration: Duration| LoadSpec {
        clients: opts.clients,
        warmup,
        duration,
        seed: opts.seed ^ 0x7eba,
        key_prefix: format!("rebalance-{tag}"),
    };
    println!("[rebalance] before…");
    let before = load::run(
        driver.clone(),
        picker.clone(),
        &spec("before", opts.warmup, opts.duration),
    )
    .await;
    admin.add("added", &dsn, 1).await?;
    let plan = admin.plan().await?;
    println!(
        "[rebalance] moving {} buckets ({} users) onto the added shard…",
        plan.buckets, plan.users
    );
    let moving = {
        let admin = admin.clone();
        let opts = MoveOptions {
            max_parallel: opts.move_parallel,
            rate_users_per_s: opts.move_rate,
            ..MoveOptions::default()
        };
        tokio::spawn(async move { admin.rebalance(&opts, &Quiet).await })
    };
    // The clients run without a break from the first move to the last, so
    // that every transfer a cutover holds up is counted where it ends.
    let stop = load::Stop::at(Instant::now() + Duration::from_secs(24 * 3600));
    let started = Instant::now();
    let load_during = {
        let (driver, picker, stop) = (driver.clone(), picker.clone(), stop.clone());
        let spec = spec("during", Duration::ZERO, Duration::ZERO);
        tokio::spawn(async move { load::run_until(driver, picker, &spec, stop).await })
    };
    let report = moving.await;
    stop.now();
    let move_s = started.elapsed().as_secs_f64();
    let during = load_during.await?;
    let report = report??;
    let verdict = admin.verify().await?;
    // The same load on the cluster as the move left it (one shard more),
    // to tell what the move costs from what the new layout costs.
    println!("[rebalance] after…");
    let after = load::run(
        driver.clone(),
        picker.clone(),
        &spec("after", opts.warmup, opts.duration),
    )
    .await;
    let p99 = |r: &LoadResult| r.latency_us.value_at_quantile(0.99) as f64 / 1000.0;
    let failed_during = during.failed.values().sum();
    let mut problems = verdict.problems;
    problems.extend(report.errors.iter().cloned());
    Ok(RebalanceBench {
        shards_before: opts.shards,
        max_parallel: opts.move_parallel,
        rate_users_per_s: opts.move_rate,
        buckets_moved: report.cleaned,
        users_moved: report.users,
        money_moved: report.money,
        move_s,
        users_per_s: report.users as f64 / move_s,
        money_per_s: report.money / Decimal::try_from(move_s).unwrap_or(Decimal::ONE),
        pause_ms_median: report.pause_ms_median,
        pause_ms_p99: report.pause_ms_p99,
        pause_ms_max: report.pause_ms_max,
        cutover_retries: report.retries,
        tps_before: before.transfers_per_s(),
        tps_during: during.transfers_per_s(),
        tps_ratio: during.transfers_per_s() / before.transfers_per_s().max(1e-9),
        p99_ms_before: p99(&before),
        p99_ms_during: p99(&during),
        tps_after: after.transfers_per_s(),
        p99_ms_after: p99(&after),
        cpu_us_before: before.cpu_us_per_transfer(),
        cpu_us_during: during.cpu_us_per_transfer(),
        cpu_us_after: after.cpu_us_per_transfer(),
        failed_during,
        verified: verdict.ok && report.errors.is_empty(),
        problems,
    })
}

impl RebalanceBench {
    pub fn print(&self) {
        println!(
            "\nrebalance: a shard added to {} under load (--max-parallel {}, --rate {}): {} buckets, {} users, {} money in {:.1} s ({:.0} users/s, {:.2} money/s)",
            self.shards_before,
            self.max_parallel,
            self.rate_users_per_s.map_or("none".to_owned(), |r| r.to_string()),
            self.buckets_moved,
            self.users_moved,
            self.money_moved,
            self.move_s,
            self.users_per_s,
            self.money_per_s
        );
        println!(
            "  pause per bucket: median {} ms, p99 {} ms, max {} ms; {} cutovers retried",
            self.pause_ms_median, self.pause_ms_p99, self.pause_ms_max, self.cutover_retries
        );
        println!(
            "  transfers/s before {:.0}, during {:.0} ({:.2}x, goal >= 0.7x); p99 before {:.1} ms, during {:.1} ms; {} failed during",
            self.tps_before,
            self.tps_during,
            self.tps_ratio,
            self.p99_ms_before,
            self.p99_ms_during,
            self.failed_during
        );
        println!(
            "  after the move ({} shards, nothing moving): transfers/s {:.0} ({:.2}x of before), p99 {:.1} ms",
            self.shards_before + 1,
            self.tps_after,
            self.tps_after / self.tps_before.max(1e-9),
            self.p99_ms_after
        );
        let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
        println!(
            "  machine CPU per transfer: before {} µs, during {} µs (the mover's share included), after {} µs",
            us(self.cpu_us_before),
            us(self.cpu_us_during),
            us(self.cpu_us_after)
        );
        println!(
            "  verify: {}",
            if self.verified {
                "OK".to_owned()
            } else {
                format!("FAILED: {:?}", self.problems)
            }
        );
    }
}
