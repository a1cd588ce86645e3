//! A coordinator that dies at each step of 2PC (a failpoint ends the protocol
//! there, then the coordinator is dropped and a new one started on the same
//! shards): recovery reaches the decided outcome, no invariant breaks, and a retry
//! with the same Idempotency-Key gets a final answer.
//!
//! Before the decision the outcome is abort (presumed abort); the retry then runs
//! a fresh attempt, which commits. From the decision on, the outcome is commit and
//! the retry replays it. Every step of the one protocol (a cross-shard group;
//! here a group of one) has its failpoint, and each is crashed.

use std::time::Duration;

use chaos_tests::checker::wait_quiescent;
use reqwest::StatusCode;
use serde_json::json;
use testkit::{test_limits, TestCluster};

mod common;
use common::Http;

/// Failpoints are process-wide: one scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// "payer" with 100.00 and a payee with nothing, on two shards, the payer's user
/// ID the lower or the higher as asked, and the body of a 10.00 transfer.
struct TwoUsers {
    cluster: TestCluster,
    http: Http,
    payee: String,
    payer_token: String,
    payee_token: String,
    body: serde_json::Value,
}

async fn two_users(config: coordinator::config::Config, payer_lower: bool) -> TwoUsers {
    let cluster = TestCluster::serve(config).await;
    let routing = cluster.coordinator.cluster().routing();
    let id = |n: &str| router::UserId::for_username(n);
    let shard = |n: &str| routing.map.shard_of(&id(n));
    let payee = (0..1000)
        .map(|i| format!("payee{i}"))
        .find(|n| {
            shard(n) != shard("payer") && (id("payer").as_uuid() < id(n).as_uuid()) == payer_lower
        })
        .expect("a payee on another shard, in the wanted ID order");
    let http = Http::new(&cluster);
    let payer_token = http.user("payer", Some("100.00")).await;
    let payee_token = http.user(&payee, None).await;
    let body = json!({"to": payee, "amount": "10.00", "currency": "USD"});
    TwoUsers {
        cluster,
        http,
        payee,
        payer_token,
        payee_token,
        body,
    }
}

async fn crash_at(point: &'static str, decided_commit: bool) {
    crash_in(false, point, decided_commit).await
}

/// `crash_at` in Redis-lock mode (`redis`) or 2PC mode.
async fn crash_in(redis: bool, point: &'static str, decided_commit: bool) {
    let _serial = SERIAL.lock().await;
    let mut config = TestCluster::provision(4, test_limits()).await;
    if redis {
        config = testkit::with_redis(config).await;
    }
    config.agent.lock_timeout_ms = 500;
    config.limits.in_doubt_after_ms = 1_000;
    let TwoUsers {
        cluster,
        http,
        payer_token,
        payee_token,
        body,
        ..
    } = two_users(config, true).await;

    fail::cfg(point, "return").expect("configure failpoint");
    let (status, _, crashed) = http
        .post(
            "/v1/transfer",
            Some(&payer_token),
            Some("crash-key"),
            body.clone(),
        )
        .await;
    fail::remove(point);
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{point}: {crashed}"
    );

    // The coordinator dies; a new one starts and its recovery finishes the transfer.
    let cluster = cluster.restart().await;
    let agents = cluster.agents();
    let snap = wait_quiescent(&agents, Duration::from_secs(30))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new(), "{point}");
    let http = Http::new(&cluster);
    let (payer_after, payee_after) = if decided_commit {
        ("90.00", "10.00")
    } else {
        ("100.00", "0.00")
    };
    assert_eq!(
        http.balance(&payer_token).await,
        payer_after,
        "{point}: recovery reached the decided outcome"
    );
    assert_eq!(http.balance(&payee_token).await, payee_after, "{point}");
    // Before the decision a group leaves no record at all: its prepared parts
    // were rolled back through a tombstone.
    let committed: Vec<_> = snap
        .decisions
        .values()
        .filter(|d| d.kind == "transfer" && d.state == "committed")
        .collect();
    assert_eq!(committed.len(), usize::from(decided_commit), "{point}");

    let (status, headers, retried) = http
        .post("/v1/transfer", Some(&payer_token), Some("crash-key"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{point}: {retried}");
    let replayed = headers.get("idempotent-replayed").is_some();
    let same_id = committed.first().is_some_and(|c| {
        retried["transfer_id"].as_str() == Some(c.transfer_id.to_string().as_str())
    });
    assert_eq!(
        (replayed, same_id),
        (decided_commit, decided_commit),
        "{point}: replay iff it was committed"
    );
    assert_eq!(
        http.balance(&payer_token).await,
        "90.00",
        "{point}: money moved exactly once"
    );
    assert_eq!(http.balance(&payee_token).await, "10.00", "{point}");
    let snap = wait_quiescent(&agents, Duration::from_secs(30))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new(), "{point}");
}

#[tokio::test]
async fn a_coordinator_dead_after_checking_a_group_leaves_nothing() {
    crash_at("batch-after-check", false).await;
}

#[tokio::test]
async fn a_group_prepared_without_its_decision_is_tombstoned_and_rolled_back() {
    crash_at("batch-after-prepare", false).await;
}

#[tokio::test]
async fn a_group_whose_decision_committed_is_committed_by_recovery() {
    crash_at("batch-after-decision", true).await;
}

#[tokio::test]
async fn a_coordinator_dead_before_answering_a_committed_group_replays() {
    crash_at("batch-before-reply", true).await;
}

// Redis-lock mode's cross-shard groups, step by step: before the debit
// statement nothing of the transfer exists (no key, no record), so the retry
// runs afresh; from the debit on it is committed (recovery applies the
// pending credit, and the retry replays).

#[tokio::test]
async fn redis_mode_a_coordinator_dead_holding_its_locks_leaves_nothing() {
    crash_in(true, "redis-after-lock", false).await;
}

#[tokio::test]
async fn redis_mode_a_coordinator_dead_between_debit_and_credit_is_forwarded() {
    crash_in(true, "redis-between-legs", true).await;
}

#[tokio::test]
async fn redis_mode_a_coordinator_dead_before_replying_replays() {
    crash_in(true, "redis-before-reply", true).await;
}

/// The relay killed between publishing and marking (the failpoint ends each
/// round after JetStream's acks, before the rows are marked), then the
/// coordinator replaced: the next relay publishes those events again, and
/// JetStream drops the copies by message ID, so the stream holds every event
/// exactly once.
#[tokio::test]
async fn a_relay_dead_between_publish_and_mark_publishes_again_and_nothing_twice() {
    use chaos_tests::checker::events::{
        delivery_violations, outboxes, read_stream, wait_published,
    };
    let _serial = SERIAL.lock().await;
    let store = tempfile::tempdir().expect("tempdir");
    let nats = local_cluster::NatsServer::start(0, store.path()).expect("start nats-server");
    let mut config = TestCluster::provision(2, test_limits()).await;
    config.events = coordinator::events::EventsConfig {
        mode: coordinator::events::EventsMode::Nats,
        url: Some(nats.url()),
        lease_ms: 2_000,
        publish_timeout_ms: 1_000,
        ..Default::default()
    };
    fail::cfg("relay-after-publish", "return").expect("arm failpoint");
    let TwoUsers {
        cluster,
        http,
        payer_token,
        body,
        ..
    } = two_users(config, true).await;
    for i in 0..3 {
        let (status, _, reply) = http
            .post(
                "/v1/transfer",
                Some(&payer_token),
                Some(&format!("relay-{i}")),
                body.clone(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{reply}");
    }
    let agents = cluster.agents();
    let outbox = outboxes(&agents).await.expect("outboxes");
    assert_eq!(
        outbox.len(),
        1 + 2 * 3,
        "a deposit and two events per transfer"
    );
    // Published (in the stream) but never marked (still in the outbox).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stream = read_stream(&nats.url(), "WALLET_EVENTS", Duration::from_secs(10))
            .await
            .unwrap_or_default();
        if stream.len() == outbox.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay publishes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lag = agents[0].outbox_lag().await.expect("lag").unpublished
        + agents[1].outbox_lag().await.expect("lag").unpublished;
    assert_eq!(
        lag,
        outbox.len() as i64,
        "nothing marked while the failpoint is on"
    );

    fail::remove("relay-after-publish");
    let cluster = cluster.restart().await;
    let agents = cluster.agents();
    wait_published(&agents, Duration::from_secs(30))
        .await
        .expect("the new relay marks them");
    let stream = read_stream(&nats.url(), "WALLET_EVENTS", Duration::from_secs(10))
        .await
        .expect("read the stream");
    assert_eq!(delivery_violations(&stream, &outbox), Vec::<String>::new());
    assert_eq!(stream.len(), outbox.len());
    let snap = wait_quiescent(&agents, Duration::from_secs(30))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}

/// Every failpoint of each protocol has its crash test above.
#[test]
fn every_step_of_the_protocol_is_crashed() {
    let tested = [
        "batch-after-check",
        "batch-after-prepare",
        "batch-after-decision",
        "batch-before-reply",
    ];
    assert_eq!(coordinator::batch::FAILPOINTS, tested);
    let tested = [
        "redis-after-lock",
        "redis-between-legs",
        "redis-before-reply",
    ];
    assert_eq!(coordinator::batch::REDIS_FAILPOINTS, tested);
}

/// A transfer whose payer's row is held past `lock_timeout` (here by an open
/// transaction) fails its group's check, then its check alone: it is answered
/// 503 `shard_busy` with nothing prepared anywhere, and the same key commits
/// once the row is free.
#[tokio::test]
async fn a_transfer_whose_payer_row_is_held_is_busy_and_leaves_nothing_prepared() {
    let mut config = TestCluster::provision(4, test_limits()).await;
    config.agent.lock_timeout_ms = 300;
    // Recovery would settle the leg only after a minute: whatever happens within
    // this test is the coordinator's doing.
    config.limits.in_doubt_after_ms = 60_000;
    let TwoUsers {
        cluster,
        http,
        payee,
        payer_token,
        payee_token,
        body,
    } = two_users(config, false).await;
    let routing = cluster.coordinator.cluster().routing();
    let id = |n: &str| router::UserId::for_username(n);
    let shard = |n: &str| routing.map.shard_of(&id(n));

    let dsn = |n: &str| {
        cluster
            .config
            .shards
            .iter()
            .find(|s| s.id == shard(n))
            .expect("the shard is configured")
            .dsn
            .clone()
    };
    let (holder, conn) = tokio_postgres::connect(&dsn("payer"), tokio_postgres::NoTls)
        .await
        .expect("connect to the payer's shard");
    tokio::spawn(conn);
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM accounts WHERE user_id = '{}' FOR UPDATE",
            id("payer").as_uuid()
        ))
        .await
        .expect("lock the payer's account");
    let (status, _, busy) = http
        .post(
            "/v1/transfer",
            Some(&payer_token),
            Some("busy-key"),
            body.clone(),
        )
        .await;
    assert_eq!(
        (status, busy["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shard_busy")),
        "{busy}"
    );
    let payee_agent = routing.agent(shard(&payee)).expect("payee's agent");
    assert_eq!(
        payee_agent.prepared_stats().await.expect("stats").count,
        0,
        "nothing of the transfer is prepared on the payee's shard"
    );
    holder.batch_execute("ROLLBACK").await.expect("release");

    let (status, _, done) = http
        .post("/v1/transfer", Some(&payer_token), Some("busy-key"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{done}");
    assert_eq!(http.balance(&payer_token).await, "90.00");
    assert_eq!(http.balance(&payee_token).await, "10.00");
}

#[tokio::test]
async fn a_deposit_cut_after_the_provider_approved_is_settled_by_recovery_under_the_same_reference()
{
    let _serial = SERIAL.lock().await;
    let mut config = TestCluster::provision(4, test_limits()).await;
    config.agent.lock_timeout_ms = 500;
    config.limits.in_doubt_after_ms = 1_000;
    // The cut settler's lease must run out before recovery may settle it: the
    // shortest the coordinator allows, 300 ms provider bound + 2 s call bound
    // + 1 s.
    config.agent.call_timeout_ms = 2_000;
    config.agent.settle_lease_ms = 0;
    let cluster = TestCluster::serve(config).await;
    let http = Http::new(&cluster);
    let token = http.user("depositor", None).await;
    let body = json!({"amount": "50.00", "currency": "USD", "payment_token": "sandbox_ok"});

    // The provider approves, then settling is cut before it commits.
    fail::cfg("external-after-provider", "1*return").expect("arm failpoint");
    let (status, _, cut) = http
        .post("/v1/deposit", Some(&token), Some("dep-key"), body.clone())
        .await;
    fail::remove("external-after-provider");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{cut}");
    let (status, _, early) = http
        .post("/v1/deposit", Some(&token), Some("dep-key"), body.clone())
        .await;
    assert_eq!(
        (status, early["code"].as_str()),
        (StatusCode::CONFLICT, Some("request_in_progress"))
    );
    assert_eq!(http.balance(&token).await, "0.00");

    let cluster = cluster.restart().await;
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(20))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new());
    let http = Http::new(&cluster);
    assert_eq!(
        http.balance(&token).await,
        "50.00",
        "recovery settled the approved deposit"
    );
    let (status, headers, replay) = http
        .post("/v1/deposit", Some(&token), Some("dep-key"), body)
        .await;
    assert_eq!(
        (status, headers.get("idempotent-replayed").is_some()),
        (StatusCode::CREATED, true),
        "{replay}"
    );
    let calls = cluster.sandbox.calls();
    assert_eq!(
        calls.len(),
        2,
        "the provider was asked twice: by the request and by recovery"
    );
    assert_eq!(calls[0], calls[1], "both times under the same reference");
    assert_eq!(
        replay["transfer_id"].as_str(),
        Some(calls[0].to_string().as_str())
    );
    assert_eq!(cluster.coordinator.recovery().status().settled_external, 1);
}

/// A withdrawal cut after its provider paid out keeps its amount held across
/// the coordinator's death (nothing else may spend it), and recovery settles
/// it under the same reference: debited once, hold released.
#[tokio::test]
async fn a_withdrawal_cut_after_the_payout_keeps_its_hold_until_recovery_settles_it() {
    let _serial = SERIAL.lock().await;
    let mut config = TestCluster::provision(4, test_limits()).await;
    config.agent.lock_timeout_ms = 500;
    config.limits.in_doubt_after_ms = 1_000;
    config.agent.call_timeout_ms = 2_000;
    config.agent.settle_lease_ms = 0;
    let cluster = TestCluster::serve(config).await;
    let http = Http::new(&cluster);
    let token = http.user("withdrawer", Some("50.00")).await;
    http.user("withdrawee", None).await;
    let body = json!({"amount": "30.00", "currency": "USD", "payment_token": "sandbox_ok"});

    fail::cfg("external-after-provider", "1*return").expect("arm failpoint");
    let (status, _, cut) = http
        .post("/v1/withdrawal", Some(&token), Some("wd-key"), body.clone())
        .await;
    fail::remove("external-after-provider");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{cut}");
    assert_eq!(http.balance(&token).await, "50.00", "not debited yet");
    // The 30.00 stay held: only 20.00 may move meanwhile.
    let (status, _, over) = http
        .post(
            "/v1/transfer",
            Some(&token),
            Some("wd-over"),
            json!({"to": "withdrawee", "amount": "25.00", "currency": "USD"}),
        )
        .await;
    assert_eq!(
        (status, over["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("insufficient_funds")),
        "{over}"
    );

    let cluster = cluster.restart().await;
    let snap = wait_quiescent(&cluster.agents(), Duration::from_secs(20))
        .await
        .expect("read shards");
    assert_eq!(snap.violations(true), Vec::<String>::new());
    let http = Http::new(&cluster);
    assert_eq!(
        http.balance(&token).await,
        "20.00",
        "recovery settled the payout once"
    );
    let (status, headers, replay) = http
        .post("/v1/withdrawal", Some(&token), Some("wd-key"), body)
        .await;
    assert_eq!(
        (status, headers.get("idempotent-replayed").is_some()),
        (StatusCode::CREATED, true),
        "{replay}"
    );
    // The hold is gone: all 20.00 may move.
    let (status, _, all) = http
        .post(
            "/v1/transfer",
            Some(&token),
            Some("wd-all"),
            json!({"to": "withdrawee", "amount": "20.00", "currency": "USD"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{all}");
}
