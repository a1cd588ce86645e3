//! Redis-lock mode against a real redis-server: fencing refuses a holder whose
//! lock expired, recovery completes a transfer cut between its legs, Redis being
//! down moves no money, and a Redis restart under load breaks no invariant.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use chaos_tests::checker::wait_quiescent;
use chaos_tests::run::check;
use chaos_tests::workload::{Client, Outcome, WorkloadConfig};
use local_cluster::RedisServer;
use reqwest::StatusCode;
use testkit::{test_limits, with_redis, TestCluster};

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
        refund_percent: 0,
        dispute_percent: 0,
        admin_token: None,
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

/// Sets the cluster's fencing high-water key in `redis` to `value`, as a Redis
/// that came back from a failover or a restore with another state would hold.
async fn set_fence_key(cluster: &TestCluster, redis: &RedisServer, value: i64) {
    let prefix = &cluster
        .config
        .redis
        .as_ref()
        .expect("redis mode")
        .key_prefix;
    let client = redis::Client::open(redis.url()).expect("redis client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    redis::cmd("SET")
        .arg(format!("{prefix}fence"))
        .arg(value)
        .query_async::<()>(&mut c)
        .await
        .expect("set the fence key");
}

/// Waits until the coordinator's Redis connection is back after a restart (its
/// first command on the old connection fails, as a client's retry would see).
async fn wait_redis_ok(http: &Http) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while http.get("/readyz", None).await["redis_ok"] != true {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_us() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("invariant: the clock is after 1970");
    i64::try_from(since_epoch.as_micros()).expect("invariant: microseconds since 1970 fit in i64")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_survives_a_redis_restart_with_its_fence_state_ahead_or_behind() {
    let _serial = SERIAL.lock().await;
    let (cluster, mut redis) = cluster_with_own_redis().await;
    let http = Http::new(&cluster);
    let (payer, payee) = cross_pair(&cluster, "ahead");
    let a = http.user(&payer, Some("100.00")).await;
    let b = http.user(&payee, None).await;
    // A second payer who has never been fenced, on another shard than the payee.
    let routing = cluster.coordinator.cluster().routing();
    let payee_shard = routing.map.shard_of(&router::UserId::for_username(&payee));
    let fresh = (0..1000)
        .map(|i| format!("behind_payer{i}"))
        .find(|n| routing.map.shard_of(&router::UserId::for_username(n)) != payee_shard)
        .expect("a payer elsewhere");
    let c = http.user(&fresh, Some("100.00")).await;

    // Tokens an hour ahead of the clock get stored on both accounts.
    set_fence_key(&cluster, &redis, now_us() + 3_600_000_000).await;
    let (s, _, body) = http.transfer(&a, "ahead-1", &payee, "10.00").await;
    assert_eq!(s, StatusCode::CREATED, "{body}");

    // Redis restarts empty: its clock is an hour behind the stored fences. The
    // token source is seeded from the shards before it grants anything, so the
    // next transfer's debit and credit both pass their fences.
    tokio::task::block_in_place(|| redis.restart()).expect("restart redis");
    wait_redis_ok(&http).await;
    let (s, _, body) = http.transfer(&a, "after-restart", &payee, "5.00").await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(
        (http.balance(&a).await, http.balance(&b).await),
        ("85.00".into(), "15.00".into()),
        "the credit landed at once"
    );

    // Redis comes back with its high-water key present but behind the payee's
    // fence. The fresh payer's debit passes; the payee's credit is refused by
    // its fence: the transfer is committed, the credit in doubt. It is never
    // silent and recovery lands it, once the floor was raised.
    set_fence_key(&cluster, &redis, 1).await;
    let (s, _, body) = http.transfer(&c, "behind-1", &payee, "2.00").await;
    assert_eq!(s, StatusCode::CREATED, "committed at the debit: {body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while http.balance(&b).await != "17.00" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused credit never landed: payee at {}",
            http.balance(&b).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http.balance(&c).await, "98.00");
    let status = cluster.coordinator.recovery().status();
    assert!(status.forwarded >= 1, "{status:?}");

    // The floor stays raised: the next transfer lands at once.
    let (s, _, body) = http.transfer(&a, "after-behind", &payee, "1.00").await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(http.balance(&b).await, "18.00");
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(20))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_credit_that_cannot_land_is_shown_in_doubt_and_lands_once_redis_is_back() {
    let _serial = SERIAL.lock().await;
    let (cluster, mut redis) = cluster_with_own_redis().await;
    let http = Http::new(&cluster);
    let (payer, payee) = cross_pair(&cluster, "shown");
    let a = http.user(&payer, Some("50.00")).await;
    let b = http.user(&payee, None).await;
    // The payer's fence an hour ahead, then the token source behind it: the
    // debit is refused, a definite 503 with nothing moved, and the floor is
    // raised above the payer's fence, so a retry with the same key passes.
    set_fence_key(&cluster, &redis, now_us() + 3_600_000_000).await;
    let (s, _, body) = http.transfer(&a, "ahead", &payee, "1.00").await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    set_fence_key(&cluster, &redis, 1).await;
    let (s, _, body) = http.transfer(&a, "retry-me", &payee, "2.00").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("lock_unavailable")),
        "{body}"
    );
    let (s, _, body) = http.transfer(&a, "retry-me", &payee, "2.00").await;
    assert_eq!(s, StatusCode::CREATED, "the retry passes: {body}");
    assert_eq!(
        (http.balance(&a).await, http.balance(&b).await),
        ("47.00".into(), "3.00".into())
    );

    // A credit cut after its debit (the coordinator's reply is lost), then Redis
    // goes down: recovery cannot lock the payee, so the credit stays pending.
    fail::cfg("redis-between-legs", "return").expect("arm failpoint");
    let (s, _, body) = http.transfer(&a, "cut", &payee, "4.00").await;
    fail::remove("redis-between-legs");
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    redis.kill9();
    let admin = "test-admin-token";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let view = loop {
        let view = http.get("/v1/admin/in-doubt", Some(admin)).await;
        if view["pending_credits_in_doubt"] == 1 {
            break view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck credit never showed as in doubt: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let failing: i64 = view["recovery"]["pending_credits"]
        .as_object()
        .expect("per-shard pending credits")
        .values()
        .map(|s| s["failing"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(failing, 1, "its failed attempt is counted: {view}");
    assert_eq!(http.balance(&b).await, "3.00");

    // Redis is back, empty: the token source is seeded from the shards and
    // recovery lands the credit.
    tokio::task::block_in_place(|| redis.restart()).expect("restart redis");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while http.balance(&b).await != "7.00" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pending credit never landed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(20))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}

/// A grant locks all of a transfer's accounts in one round trip or none: a
/// transfer that finds one account locked holds nothing while it waits, and
/// each grant's token is above every earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_locks_every_account_of_a_transfer_or_none() {
    let _serial = SERIAL.lock().await;
    let mut config = with_redis(TestCluster::provision(2, test_limits()).await).await;
    if let Some(r) = config.redis.as_mut() {
        r.lock_wait_ms = 300;
    }
    let cluster = TestCluster::serve(config).await;
    let locks = cluster.coordinator.locks().expect("a lock service").clone();
    let (a, b) = (
        router::UserId::for_username("grant_a"),
        router::UserId::for_username("grant_b"),
    );
    let holding_b = locks.acquire(&[b]).await.expect("b alone");
    let err = locks
        .acquire(&[a, b])
        .await
        .expect_err("b is held, so neither is granted");
    assert!(
        matches!(err, coordinator::redis_lock::LockError::NotGranted { .. }),
        "{err}"
    );
    let holding_a = locks
        .acquire(&[a])
        .await
        .expect("a was not left locked by the refused grant");
    assert!(holding_a.fence(a) > holding_b.fence(b), "tokens only grow");
    assert_eq!(holding_a.fence(b), None, "a grant fences only its accounts");
    locks.release(holding_a).await;
    locks.release(holding_b).await;
    let both = locks.acquire(&[b, a]).await.expect("both, once free");
    assert_eq!(both.fence(a), both.fence(b), "one token per grant");
    locks.release(both).await;
}
