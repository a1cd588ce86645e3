//! Load through the real HTTP API: 32 concurrent clients, 5,000 transfers among
//! 500 users on 4 shards; afterwards the invariants of ARCHITECTURE.md must hold and
//! every acknowledged transfer must be committed, every failed one must not be.
//! Figures are printed, never asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos_tests::checker::wait_quiescent;
use chaos_tests::workload::{summarize, Client, Outcome, WorkloadConfig};
use testkit::{test_limits, TestCluster};

const USERS: usize = 500;
const SETUP_TASKS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_concurrent_transfers_keep_every_invariant() {
    load(TestCluster::start(4, test_limits()).await, "2pc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_concurrent_transfers_keep_every_invariant_in_redis_mode() {
    load(TestCluster::start_redis(4, test_limits()).await, "redis").await;
}

async fn load(cluster: TestCluster, mode: &str) {
    let client = Client::new(cluster.url(""), Duration::from_secs(20));
    let per_task = USERS / SETUP_TASKS;
    let setups = (0..SETUP_TASKS).map(|t| {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .setup_users(&format!("load{t}_"), per_task, "100.00")
                .await
        })
    });
    let mut users = Vec::with_capacity(USERS);
    for s in futures::future::join_all(setups).await {
        users.extend(s.expect("setup task").expect("set up users"));
    }
    let config = WorkloadConfig {
        tasks: 32,
        transfers: 5_000,
        seed: 42,
        attempts_max: 8,
        request_timeout: Duration::from_secs(20),
        amount_cents_max: 3_000,
        refund_percent: 0,
        dispute_percent: 0,
        admin_token: None,
    };
    let started = Instant::now();
    let users_for_model = users.clone();
    let records = client.run(Arc::new(users), &config).await;
    let elapsed = started.elapsed();
    let summary = summarize(&records);
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(30))
        .await
        .expect("read shards");

    // The stored invariants, acknowledged => committed, failed => nothing moved,
    // and every balance against the client's own history.
    let violations = chaos_tests::run::check(&snap, &records, &users_for_model);
    println!(
        "load ({mode}): {} transfers in {:.1}s ({:.0}/s through HTTP, debug build): {} acknowledged, {} failed (insufficient funds), {} unknown, {} retries; totals {:?}",
        summary.attempted,
        elapsed.as_secs_f64(),
        summary.attempted as f64 / elapsed.as_secs_f64(),
        summary.acknowledged,
        summary.failed,
        summary.unknown,
        summary.retries,
        snap.totals().user_balances,
    );
    assert_eq!(violations, Vec::<String>::new());
    assert_eq!(summary.attempted, 5_000);
    assert_eq!(
        summary.unknown, 0,
        "without faults every request gets a definite answer"
    );
    assert!(
        summary.acknowledged > 4_000,
        "most transfers are funded: {summary:?}"
    );
    let unexpected: Vec<_> = records
        .iter()
        .filter(
            |r| matches!(&r.outcome, Outcome::Failed { code, .. } if code != "insufficient_funds"),
        )
        .take(5)
        .collect();
    assert!(
        unexpected.is_empty(),
        "only insufficient_funds may fail: {unexpected:?}"
    );
    assert_eq!(
        snap.totals().user_balances.get("USD").copied(),
        Some(rust_decimal::Decimal::from(USERS as i64 * 100))
    );
}
