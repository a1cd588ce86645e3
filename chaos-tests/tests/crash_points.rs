//! A coordinator that dies at each step of 2PC (a failpoint ends the protocol
//! there, then the coordinator is dropped and a new one started on the same
//! shards): recovery reaches the decided outcome, no invariant breaks, and a retry
//! with the same Idempotency-Key gets a final answer.
//!
//! Before the decision the outcome is abort (presumed abort); the retry then runs
//! a fresh attempt, which commits. From the decision on, the outcome is commit and
//! the retry replays it.

use std::time::Duration;

use chaos_tests::checker::wait_quiescent;
use coordinator::testkit::{test_limits, TestCluster};
use reqwest::StatusCode;
use serde_json::json;

mod common;
use common::Http;

/// Failpoints are process-wide: one scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn crash_at(point: &'static str, decided_commit: bool) {
    let _serial = SERIAL.lock().await;
    let mut config = TestCluster::provision(4, test_limits()).await;
    config.agent.lock_timeout_ms = 500;
    config.limits.in_doubt_after_ms = 1_000;
    let cluster = TestCluster::serve(config).await;
    let routing = cluster.coordinator.cluster().routing();
    let shard = |n: &str| routing.map.shard_of(&router::UserId::for_username(n));
    let payee = (0..1000)
        .map(|i| format!("payee{i}"))
        .find(|n| shard(n) != shard("payer"))
        .expect("a payee on another shard");
    let http = Http::new(&cluster);
    let payer_token = http.user("payer", Some("100.00")).await;
    let payee_token = http.user(&payee, None).await;
    let body = json!({"to": payee, "amount": "10.00", "currency": "USD"});

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
    let original: Vec<_> = snap
        .decisions
        .values()
        .filter(|d| d.kind == "transfer")
        .collect();
    assert_eq!(original.len(), 1, "{point}");
    assert_eq!(
        original[0].state,
        if decided_commit {
            "committed"
        } else {
            "aborted"
        },
        "{point}"
    );

    let (status, headers, retried) = http
        .post("/v1/transfer", Some(&payer_token), Some("crash-key"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{point}: {retried}");
    let replayed = headers.get("idempotent-replayed").is_some();
    let same_id =
        retried["transfer_id"].as_str() == Some(original[0].transfer_id.to_string().as_str());
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
async fn a_coordinator_dead_after_the_claim_leaves_an_abort_and_the_retry_commits() {
    crash_at("2pc-after-claim", false).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_preparing_the_debit_shard_is_rolled_back() {
    crash_at("2pc-after-prepare-debit", false).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_preparing_the_credit_shard_is_rolled_back() {
    crash_at("2pc-after-prepare-credit", false).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_preparing_all_shards_is_rolled_back() {
    crash_at("2pc-after-prepare-all", false).await;
}

#[tokio::test]
async fn a_coordinator_dead_just_before_the_decision_is_rolled_back() {
    crash_at("2pc-before-decision", false).await;
}

#[tokio::test]
async fn a_coordinator_dead_after_deciding_is_committed_by_recovery() {
    crash_at("2pc-after-decision", true).await;
}

#[tokio::test]
async fn a_coordinator_dead_between_commit_prepared_calls_is_committed_by_recovery() {
    crash_at("2pc-between-commit-prepared", true).await;
}

#[tokio::test]
async fn a_coordinator_dead_before_replying_has_committed_and_the_retry_replays() {
    crash_at("2pc-before-reply", true).await;
}

#[tokio::test]
async fn a_deposit_cut_after_the_provider_approved_is_settled_by_recovery_under_the_same_reference()
{
    let _serial = SERIAL.lock().await;
    let mut config = TestCluster::provision(4, test_limits()).await;
    config.agent.lock_timeout_ms = 500;
    config.limits.in_doubt_after_ms = 1_000;
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
