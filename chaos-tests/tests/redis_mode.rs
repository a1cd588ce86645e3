//! Redis-lock mode against a real redis-server: fencing refuses a holder whose
//! lock expired, recovery completes a transfer cut between its legs, Redis being
//! down moves no money, and a Redis restart under load breaks no invariant.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use chaos_tests::checker::wait_quiescent;
use chaos_tests::run::check;
use chaos_tests::workload::{Client, Outcome, WorkloadConfig};
use coordinator::testkit::{test_limits, with_redis, TestCluster};
use reqwest::StatusCode;
use shard_agent::local::RedisServer;

mod common;
use common::Http;

/// Failpoints are process-wide: one scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Redis-mode cluster on a redis-server of its own, which the test may kill
/// and restart without disturbing other tests' locks.
async fn cluster_with_own_redis() -> (TestCluster, RedisServer) {
    let mut config = with_redis(TestCluster::provision(4, test_limits()).await).await;
    let redis = tokio::task::spawn_blocking(|| RedisServer::start(0))
        .await
        .expect("join")
        .expect("redis");
    if let Some(r) = config.redis.as_mut() {
        r.url = redis.url();
    }
    (TestCluster::serve(config).await, redis)
}

/// A payer and a payee on different shards.
fn cross_pair(cluster: &TestCluster, prefix: &str) -> (String, String) {
    let routing = cluster.coordinator.cluster().routing();
    let shard = |n: &str| routing.map.shard_of(&router::UserId::for_username(n));
    let payer = format!("{prefix}_payer");
    let payee = (0..1000)
        .map(|i| format!("{prefix}_payee{i}"))
        .find(|n| shard(n) != shard(&payer))
        .expect("a payee elsewhere");
    (payer, payee)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_shard_transfers_run_under_locks_and_readyz_says_so() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start_redis(4, test_limits()).await;
    let http = Http::new(&cluster);
    let ready = http.get("/readyz", None).await;
    assert_eq!(
        (ready["lock_mode"].as_str(), ready["redis_ok"].as_bool()),
        (Some("redis"), Some(true))
    );
    let (payer, payee) = cross_pair(&cluster, "happy");
    let a = http.user(&payer, Some("50.00")).await;
    let b = http.user(&payee, None).await;
    let (s, _, first) = http.transfer(&a, "k1", &payee, "12.34").await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    let (s, h, again) = http.transfer(&a, "k1", &payee, "12.34").await;
    assert_eq!(
        (s, h.get("idempotent-replayed").is_some(), &again),
        (StatusCode::CREATED, true, &first)
    );
    let (s, _, reused) = http.transfer(&a, "k1", &payee, "1.00").await;
    assert_eq!(
        (s, reused["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("idempotency_key_reused")
        )
    );
    let (s, _, poor) = http.transfer(&a, "k2", &payee, "100.00").await;
    assert_eq!(
        (s, poor["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("insufficient_funds"))
    );
    let (s, _, ghost) = http.transfer(&a, "k3", "nobody_here", "1.00").await;
    assert_eq!(
        (s, ghost["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("recipient_not_found"))
    );
    assert_eq!(
        (http.balance(&a).await, http.balance(&b).await),
        ("37.66".into(), "12.34".into())
    );
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(10))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lock_lets_the_next_holder_in_and_fences_the_stale_one_off() {
    let _serial = SERIAL.lock().await;
    let mut config = with_redis(TestCluster::provision(4, test_limits()).await).await;
    if let Some(r) = config.redis.as_mut() {
        r.lock_ttl_ms = 800;
        r.lock_wait_ms = 400;
    }
    // Long enough that recovery does not abort the stalled transfer first (which
    // would also keep its money still, by the decision's compare-and-set): here the
    // fencing token must be what refuses it.
    config.limits.in_doubt_after_ms = 20_000;
    let cluster = TestCluster::serve(config).await;
    let http = Arc::new(Http::new(&cluster));
    let (payer, payee) = cross_pair(&cluster, "fence");
    let a = http.user(&payer, Some("100.00")).await;
    let b = http.user(&payee, None).await;

    // The first holder stalls for 4 s after taking its locks, far past their TTL;
    // the second holder's request does not stall (`1*`: first hit only).
    fail::cfg("redis-stall-after-lock", "1*return(4000)").expect("arm failpoint");
    let stale = {
        let (http, a, payee) = (http.clone(), a.clone(), payee.clone());
        tokio::spawn(async move { http.transfer(&a, "stale", &payee, "10.00").await })
    };
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let (s, _, fresh) = http.transfer(&a, "fresh", &payee, "20.00").await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "the next holder proceeds once the lock expired: {fresh}"
    );
    fail::remove("redis-stall-after-lock");
    let (s, headers, refused) = stale.await.expect("stale request task");
    assert_eq!(
        (s, refused["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("lock_unavailable")),
        "{refused}"
    );
    assert!(headers.get("retry-after").is_some());
    assert_eq!(
        (http.balance(&a).await, http.balance(&b).await),
        ("80.00".into(), "20.00".into()),
        "the stale write was refused"
    );

    // Its abort was caused by a fault: a retry with the same key runs afresh.
    let (s, _, retried) = http.transfer(&a, "stale", &payee, "10.00").await;
    assert_eq!(s, StatusCode::CREATED, "{retried}");
    assert_eq!(http.balance(&a).await, "70.00");
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(10))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_debit_and_credit_is_completed_by_recovery() {
    let _serial = SERIAL.lock().await;
    let mut config = with_redis(TestCluster::provision(4, test_limits()).await).await;
    config.limits.in_doubt_after_ms = 1_000;
    config.agent.lock_timeout_ms = 500;
    let cluster = TestCluster::serve(config).await;
    let http = Http::new(&cluster);
    let (payer, payee) = cross_pair(&cluster, "cut");
    let a = http.user(&payer, Some("100.00")).await;
    let b = http.user(&payee, None).await;

    fail::cfg("redis-between-legs", "return").expect("arm failpoint");
    let (s, _, cut) = http.transfer(&a, "cut-key", &payee, "30.00").await;
    fail::remove("redis-between-legs");
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{cut}");
    // Money in flight: debited, not yet credited. Readers of the payee see neither.
    assert_eq!(
        (http.balance(&a).await, http.balance(&b).await),
        ("70.00".into(), "0.00".into())
    );

    let cluster = cluster.restart().await;
    let http = Http::new(&cluster);
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(20))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new());
    assert_eq!(
        http.balance(&b).await,
        "30.00",
        "recovery applied the pending credit"
    );
    let (s, h, replay) = http.transfer(&a, "cut-key", &payee, "30.00").await;
    assert_eq!(
        (s, h.get("idempotent-replayed").is_some()),
        (StatusCode::CREATED, true),
        "{replay}"
    );
    assert_eq!(http.balance(&a).await, "70.00", "moved exactly once");
    assert!(cluster.coordinator.recovery().status().forwarded >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_gives_503_lock_unavailable_and_moves_nothing() {
    let _serial = SERIAL.lock().await;
    let (cluster, mut redis) = cluster_with_own_redis().await;
    let http = Http::new(&cluster);
    let (payer, payee) = cross_pair(&cluster, "down");
    let a = http.user(&payer, Some("10.00")).await;
    let b = http.user(&payee, None).await;
    redis.kill9();
    let (s, headers, body) = http.transfer(&a, "k", &payee, "1.00").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("lock_unavailable")),
        "{body}"
    );
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        (http.balance(&a).await, http.balance(&b).await),
        ("10.00".into(), "0.00".into())
    );
    assert_eq!(http.get("/readyz", None).await["status"], "degraded");
    tokio::task::block_in_place(|| redis.restart()).expect("restart redis");
    let (s, _, body) = http.transfer(&a, "k", &payee, "1.00").await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "the same key succeeds once Redis is back: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_under_load_keeps_every_invariant() {
    let _serial = SERIAL.lock().await;
    let (cluster, mut redis) = cluster_with_own_redis().await;
    let client = Client::new(cluster.url(""), Duration::from_secs(5));
    let users = Arc::new(client.setup_users("rr", 40, "100.00").await.expect("users"));
    let config = WorkloadConfig {
        tasks: 12,
        transfers: 0,
        seed: 9,
        attempts_max: 40,
        request_timeout: Duration::from_secs(5),
        amount_cents_max: 3_000,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let work = {
        let (client, users, config, stop) =
            (client.clone(), users.clone(), config.clone(), stop.clone());
        tokio::spawn(async move { client.run_until(users, &config, stop).await })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        tokio::task::block_in_place(|| redis.restart()).expect("restart redis");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let records = work.await.expect("workload");
    assert!(
        records.iter().all(|r| r.outcome != Outcome::Unknown),
        "every request got a definite answer"
    );
    let acked = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Acknowledged(_)))
        .count();
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(20))
        .await
        .expect("read shards");
    println!(
        "redis restarts under load: {} requests, {acked} acknowledged",
        records.len()
    );
    assert!(acked > 0);
    assert_eq!(check(&snap, &records, &users), Vec::<String>::new());
}
