//! The chaos suite as CI runs it: every failpoint scenario once, every process and
//! network fault once, a short randomized run, the rebalance scenarios, and
//! each deliberately broken variant, which the checker must catch. Runs are short here; README explains
//! how to run a long soak with the `chaos` binary.

use std::time::Duration;

use chaos_tests::cluster::ClusterOptions;
use chaos_tests::report::summary;
use chaos_tests::run::{run, RunOptions};
use chaos_tests::scenario::{self, Kind};
use coordinator::config::LockMode;

/// Each run owns 4 PostgreSQL servers and a coordinator: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options(seed: u64, duration: Duration, lock_mode: LockMode) -> RunOptions {
    RunOptions {
        duration,
        seed,
        clients: 12,
        users: 40,
        history: None,
        cluster: ClusterOptions {
            shards: 4,
            exe: env!("CARGO_BIN_EXE_chaos").into(),
            in_doubt_after_ms: 2_000,
            data_dir: None,
            lock_mode,
            batch_max: coordinator::config::Limits::default().batch_max,
            rules: Default::default(),
        },
    }
}

async fn run_scenarios(lock_mode: LockMode, filter: impl Fn(&Kind) -> bool, duration: Duration) {
    let _serial = SERIAL.lock().await;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_122);
    let mut failed = Vec::new();
    for s in scenario::all(lock_mode)
        .into_iter()
        .filter(|s| filter(&s.kind))
    {
        let report = run(&s, &options(seed, duration, lock_mode))
            .await
            .unwrap_or_else(|e| panic!("run {}: {e:#}", s.name));
        println!("{}", summary(&report));
        if !report.passed {
            failed.push(report.scenario.clone());
        }
        if report.expected_violations {
            assert!(
                !report.violations.is_empty(),
                "{}: the checker must report the broken variant",
                s.name
            );
        }
    }
    assert!(
        failed.is_empty(),
        "scenarios failed (seed {seed}): {failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_scenario_keeps_every_invariant() {
    run_scenarios(
        LockMode::TwoPc,
        |k| matches!(k, Kind::Failpoint(_)),
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_and_network_fault_keeps_every_invariant() {
    run_scenarios(
        LockMode::TwoPc,
        |k| matches!(k, Kind::Repeat(_)),
        Duration::from_secs(4),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_randomized_run_keeps_every_invariant() {
    run_scenarios(
        LockMode::TwoPc,
        |k| matches!(k, Kind::Random),
        Duration::from_secs(8),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_every_deliberately_broken_variant() {
    run_scenarios(
        LockMode::TwoPc,
        |k| matches!(k, Kind::Broken { .. }),
        Duration::from_secs(4),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redis_mode_scenario_keeps_every_invariant() {
    let not_broken = |k: &Kind| !matches!(k, Kind::Broken { .. });
    run_scenarios(LockMode::Redis, not_broken, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_every_deliberately_broken_variant_in_redis_mode() {
    run_scenarios(
        LockMode::Redis,
        |k| matches!(k, Kind::Broken { .. }),
        Duration::from_secs(4),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rebalance_scenarios_keep_every_invariant() {
    run_scenarios(
        LockMode::TwoPc,
        |k| matches!(k, Kind::Rebalance { .. }),
        Duration::from_secs(8),
    )
    .await;
}
