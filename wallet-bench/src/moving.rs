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
    // Clients run in windows of a second until the moves are done.
    let started = Instant::now();
    let mut during: Option<LoadResult> = None;
    let mut window = 0;
    while !moving.is_finished() {
        let r = load::run(
            driver.clone(),
            picker.clone(),
            &spec(
                &format!("during{window}"),
                Duration::ZERO,
                Duration::from_secs(1),
            ),
        )
        .await;
        window += 1;
        during = Some(match during.take() {
            None => r,
            Some(mut d) => {
                d.merge(r);
                d
            }
        });
    }
    let report = moving.await??;
    let move_s = started.elapsed().as_secs_f64();
    let verdict = admin.verify().await?;
    let during = during.context("the move ended before any window ran")?;
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
            "  verify: {}",
            if self.verified {
                "OK".to_owned()
            } else {
                format!("FAILED: {:?}", self.problems)
            }
        );
    }
}
