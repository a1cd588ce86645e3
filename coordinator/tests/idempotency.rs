//! Idempotency-Key semantics through the API, for local and cross-shard transfers.

mod common;

use common::{pair, Api};
use reqwest::StatusCode;
use testkit::{test_limits, TestCluster};

#[tokio::test]
async fn a_replay_with_the_same_key_and_body_returns_the_identical_response() {
    let c = TestCluster::start(4, test_limits()).await;
    let api = Api::new(&c);
    for same in [true, false] {
        let (a, b) = pair(&c, if same { "rs" } else { "rx" }, same);
        let ta = api.user(&a, "USD").await;
        api.user(&b, "USD").await;
        api.deposit(&ta, "50", "USD").await;
        let first = api.transfer(&ta, "key-1", &b, "5.00", "USD").await;
        assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
        assert!(first.headers.get("idempotent-replayed").is_none());
        let again = api.transfer(&ta, "key-1", &b, "5.00", "USD").await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert_eq!(again.body, first.body, "the replay is the same response");
        assert_eq!(again.headers["idempotent-replayed"], "true");
        assert_eq!(api.balance(&ta).await, "45.00", "money moved once");
    }
}

#[tokio::test]
async fn a_stored_rejection_is_replayed_and_never_turns_into_a_success() {
    let c = TestCluster::start(4, test_limits()).await;
    let api = Api::new(&c);
    let (a, b) = pair(&c, "rej", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    let first = api.transfer(&ta, "key-r", &b, "5.00", "USD").await;
    assert_eq!(first.code(), "insufficient_funds");
    api.deposit(&ta, "50", "USD").await;
    let again = api.transfer(&ta, "key-r", &b, "5.00", "USD").await;
    assert_eq!(
        again.code(),
        "insufficient_funds",
        "a retry replays the stored failure"
    );
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body);
    assert_eq!(api.balance(&ta).await, "50.00");
}

#[tokio::test]
async fn reusing_a_key_with_a_different_body_returns_422() {
    let c = TestCluster::start(4, test_limits()).await;
    let api = Api::new(&c);
    let (a, b) = pair(&c, "reuse", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    api.deposit(&ta, "50", "USD").await;
    assert_eq!(
        api.transfer(&ta, "key-x", &b, "5.00", "USD").await.status,
        StatusCode::CREATED
    );
    let other = api.transfer(&ta, "key-x", &b, "6.00", "USD").await;
    assert_eq!(
        (other.status, other.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );
    let deposit_with_it = api
        .post(
            "/v1/deposit",
            Some(&ta),
            Some("key-x"),
            serde_json::json!({"amount": "5.00", "currency": "USD", "payment_token": "sandbox_ok"}),
        )
        .await;
    assert_eq!(
        deposit_with_it.code(),
        "idempotency_key_reused",
        "keys are per user, across operations"
    );
    assert_eq!(api.balance(&ta).await, "45.00");
}

#[tokio::test]
async fn keys_are_scoped_to_the_user_who_sent_them() {
    let c = TestCluster::start(4, test_limits()).await;
    let api = Api::new(&c);
    let (a, b) = pair(&c, "scope", false);
    let ta = api.user(&a, "USD").await;
    let tb = api.user(&b, "USD").await;
    api.deposit(&ta, "10", "USD").await;
    api.deposit(&tb, "10", "USD").await;
    assert_eq!(
        api.transfer(&ta, "shared", &b, "1.00", "USD").await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        api.transfer(&tb, "shared", &a, "2.00", "USD").await.status,
        StatusCode::CREATED
    );
    assert_eq!(api.balance(&ta).await, "11.00");
}

#[tokio::test]
async fn twenty_concurrent_requests_with_one_key_make_exactly_one_transfer() {
    let c = TestCluster::start(4, test_limits()).await;
    let api = std::sync::Arc::new(Api::new(&c));
    for same in [true, false] {
        let (a, b) = pair(&c, if same { "cs" } else { "cx" }, same);
        let ta = api.user(&a, "USD").await;
        let tb = api.user(&b, "USD").await;
        api.deposit(&ta, "100", "USD").await;
        let replies = futures::future::join_all((0..20).map(|_| {
            let (api, ta, b) = (api.clone(), ta.clone(), b.clone());
            async move { api.transfer(&ta, "burst", &b, "7.00", "USD").await }
        }))
        .await;
        let ids: std::collections::BTreeSet<String> = replies
            .iter()
            .filter_map(|r| r.body["transfer_id"].as_str().map(str::to_owned))
            .collect();
        for r in &replies {
            assert!(
                r.status == StatusCode::CREATED
                    || (r.status == StatusCode::CONFLICT && r.code() == "request_in_progress"),
                "unexpected {} {:?}",
                r.status,
                r.body
            );
        }
        assert!(replies.iter().any(|r| r.status == StatusCode::CREATED));
        assert_eq!(
            ids.len(),
            1,
            "every answer names the same single transfer: {ids:?}"
        );
        assert_eq!(api.balance(&ta).await, "93.00", "same_shard={same}");
        assert_eq!(api.balance(&tb).await, "7.00");
        let history = api.get("/v1/account", Some(&ta)).await;
        let debits = history.body["transactions"]
            .as_array()
            .expect("array")
            .iter()
            .filter(|t| {
                t["kind"] == "transfer" && t["amount"].as_str().is_some_and(|a| a.starts_with('-'))
            })
            .count();
        assert_eq!(debits, 1);
    }
}
