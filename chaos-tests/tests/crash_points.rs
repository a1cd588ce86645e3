//! A coordinator that dies at each step of 2PC (a failpoint ends the protocol
//! there, then the coordinator is dropped and a new one started on the same
//! shards): recovery reaches the decided outcome, no invariant breaks, and a retry
//! with the same Idempotency-Key gets a final answer.
//!
//! Before the decision the outcome is abort (presumed abort); the retry then runs
//! a fresh attempt, which commits. From the decision on, the outcome is commit and
//! the retry replays it. Every path of the protocol is crashed: the batched
//! protocol (the default), and with batching off the fast path in both lock
//! orders and the slow path a retry takes after a retryable abort.

use std::time::Duration;

use chaos_tests::checker::wait_quiescent;
use reqwest::StatusCode;
use serde_json::json;
use testkit::{test_limits, TestCluster};

mod common;
use common::Http;

/// Failpoints are process-wide: one scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Which way the transfer runs (coordinator/src/two_pc.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Fast path, the payer's ID the lower: the home transaction opens first.
    PayerFirst,
    /// Fast path, the payee's ID the lower: the payee's leg is prepared first.
    PayeeFirst,
    /// Slow path: the key exists (here: a first attempt failed with a retryable
    /// abort), so the retry claims it and prepares both legs.
    Slow,
    /// Batched (coordinator/src/batch.rs): the transfer runs as a group of one.
    Batched,
}

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

async fn crash_at(point: &'static str, path: Path, decided_commit: bool) {
    let _serial = SERIAL.lock().await;
    let mut config = TestCluster::provision(4, test_limits()).await;
    config.agent.lock_timeout_ms = 500;
    config.limits.in_doubt_after_ms = 1_000;
    if path != Path::Batched {
        config.limits.batch_max = 1;
    }
    let TwoUsers {
        cluster,
        http,
        payer_token,
        payee_token,
        body,
        ..
    } = two_users(config, path == Path::PayerFirst).await;

    if path == Path::Slow {
        fail::cfg("shard-before-prepare-transaction", "return").expect("configure failpoint");
        let (status, _, failed) = http
            .post(
                "/v1/transfer",
                Some(&payer_token),
                Some("crash-key"),
                body.clone(),
            )
            .await;
        fail::remove("shard-before-prepare-transaction");
        assert_eq!(
            (status, failed["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("shard_unavailable")),
            "{point}: the first attempt fails with a retryable abort: {failed}"
        );
    }
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
    // Before the decision, a fast-path attempt leaves no record at all (its payee
    // leg was rolled back through a tombstone) and a slow-path one an abort.
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

// Batched.

#[tokio::test]
async fn a_coordinator_dead_after_checking_a_group_leaves_nothing() {
    crash_at("batch-after-check", Path::Batched, false).await;
}

#[tokio::test]
async fn a_group_prepared_without_its_decision_is_tombstoned_and_rolled_back() {
    crash_at("batch-after-prepare", Path::Batched, false).await;
}

#[tokio::test]
async fn a_group_whose_decision_committed_is_committed_by_recovery() {
    crash_at("batch-after-decision", Path::Batched, true).await;
}

#[tokio::test]
async fn a_coordinator_dead_before_answering_a_committed_group_replays() {
    crash_at("batch-before-reply", Path::Batched, true).await;
}

// Fast path.

#[tokio::test]
async fn a_coordinator_dead_with_the_home_transaction_open_leaves_nothing() {
    crash_at("2pc-after-home-leg", Path::PayerFirst, false).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_preparing_the_credit_under_an_open_home_transaction_is_rolled_back(
) {
    crash_at("2pc-after-prepare-credit", Path::PayerFirst, false).await;
}

#[tokio::test]
async fn a_credit_prepared_first_whose_home_never_committed_is_tombstoned_and_rolled_back() {
    crash_at("2pc-after-prepare-credit", Path::PayeeFirst, false).await;
}

#[tokio::test]
async fn a_coordinator_dead_just_before_the_home_commit_is_rolled_back() {
    crash_at("2pc-before-decision", Path::PayeeFirst, false).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_the_home_commit_is_committed_by_recovery() {
    crash_at("2pc-after-decision", Path::PayerFirst, true).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_the_one_statement_home_commit_is_committed_by_recovery() {
    crash_at("2pc-after-decision", Path::PayeeFirst, true).await;
}

#[tokio::test]
async fn a_coordinator_dead_before_replying_has_committed_and_the_retry_replays() {
    crash_at("2pc-before-reply", Path::PayeeFirst, true).await;
}

#[tokio::test]
async fn a_coordinator_dead_before_committing_the_open_home_transaction_is_rolled_back() {
    crash_at("2pc-before-decision", Path::PayerFirst, false).await;
}

#[tokio::test]
async fn a_coordinator_dead_before_replying_after_an_open_home_commit_replays() {
    crash_at("2pc-before-reply", Path::PayerFirst, true).await;
}

/// A home leg refused by the home shard itself (here: the payer's row is locked
/// past `lock_timeout`) rolled back for sure, so the payee's leg it prepared is
/// rolled back at once instead of holding the payee's row until recovery.
#[tokio::test]
async fn a_home_leg_that_times_out_on_the_payer_releases_the_payee_at_once() {
    let mut config = TestCluster::provision(4, test_limits()).await;
    config.agent.lock_timeout_ms = 300;
    // Recovery would settle the leg only after a minute: whatever happens within
    // this test is the coordinator's doing.
    config.limits.in_doubt_after_ms = 60_000;
    // The unbatched fast path's home leg is what this test times out.
    config.limits.batch_max = 1;
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
        "the payee's leg was rolled back by the coordinator"
    );
    holder.batch_execute("ROLLBACK").await.expect("release");

    let (status, _, done) = http
        .post("/v1/transfer", Some(&payer_token), Some("busy-key"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{done}");
    assert_eq!(http.balance(&payer_token).await, "90.00");
    assert_eq!(http.balance(&payee_token).await, "10.00");
}

// Slow path.

#[tokio::test]
async fn a_coordinator_dead_after_the_claim_leaves_an_abort_and_the_retry_commits() {
    crash_at("2pc-after-claim", Path::Slow, false).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_preparing_the_debit_shard_is_rolled_back() {
    crash_at("2pc-after-prepare-debit", Path::Slow, false).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_preparing_all_shards_is_rolled_back() {
    crash_at("2pc-after-prepare-all", Path::Slow, false).await;
}

#[tokio::test]
async fn a_coordinator_dead_between_commit_prepared_calls_is_committed_by_recovery() {
    crash_at("2pc-between-commit-prepared", Path::Slow, true).await;
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
    config.agent.deposit_lease_ms = 0;
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
