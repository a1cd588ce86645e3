//! Disputes against real shards over HTTP: the hold on the payee's account,
//! both parties' view, an admin's refund or rejection, and a dispute racing a
//! refund of the same transfer. Same-shard and cross-shard, both lock modes.

mod common;

use common::{account, cluster_with, key, pair, Api, Reply, ADMIN};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn dispute(api: &Api, token: &str, tid: &str) -> Reply {
    api.post(
        "/v1/disputes",
        Some(token),
        None,
        json!({"transfer_id": tid, "reason": "never arrived"}),
    )
    .await
}

async fn resolve(api: &Api, id: &str, outcome: &str) -> Reply {
    api.post(
        &format!("/v1/admin/disputes/{id}/resolve"),
        Some(ADMIN),
        None,
        json!({ "outcome": outcome }),
    )
    .await
}

/// Pays `amount` from a to b and returns the transfer's ID.
async fn pay(api: &Api, from: &str, to: &str, amount: &str) -> String {
    let t = api.transfer(from, &key(), to, amount, "USD").await;
    assert_eq!(t.status, StatusCode::CREATED, "{:?}", t.body);
    t.body["transfer_id"].as_str().expect("id").to_owned()
}

fn kinds(view: &Value) -> Vec<(String, String)> {
    view["transactions"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or("").to_owned(),
                e["amount"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, a)| ((*k).to_owned(), (*a).to_owned()))
        .collect()
}

/// A dispute holds the amount on the payee's account (balance unchanged,
/// available lower, a `hold` entry); both parties see it; a rejection
/// releases it; a refund moves it back to the payer.
#[tokio::test]
async fn a_dispute_holds_then_a_rejection_releases_and_a_refund_pays_back() {
    for redis in [false, true] {
        let (c, api) = cluster_with("{}", redis).await;
        for same in [true, false] {
            let prefix = format!("dp{}{}", u8::from(redis), u8::from(same));
            let (a, b) = pair(&c, &prefix, same);
            let ta = api.user(&a, "USD").await;
            let tb = api.user(&b, "USD").await;
            let stranger = api.user(&format!("{prefix}_x"), "USD").await;
            api.deposit(&ta, "100.00", "USD").await;
            let tid = pay(&api, &ta, &b, "30.00").await;
            // Only the payer may dispute.
            assert_eq!(dispute(&api, &tb, &tid).await.code(), "transfer_not_found");
            let opened = dispute(&api, &ta, &tid).await;
            assert_eq!(opened.status, StatusCode::CREATED, "{:?}", opened.body);
            assert_eq!(opened.body["status"], "open");
            assert_eq!(opened.body["amount"], "30.00");
            assert_eq!(
                (opened.body["payer"].as_str(), opened.body["payee"].as_str()),
                (Some(a.as_str()), Some(b.as_str()))
            );
            let id = opened.body["dispute_id"].as_str().expect("id").to_owned();
            let again = dispute(&api, &ta, &tid).await;
            assert_eq!(again.status, StatusCode::CONFLICT);
            assert_eq!(again.code(), "dispute_exists");
            let held = account(&api, &tb).await;
            assert_eq!(
                (held["balance"].as_str(), held["available"].as_str()),
                (Some("30.00"), Some("0.00"))
            );
            assert_eq!(
                kinds(&held),
                pairs(&[("hold", "-30.00"), ("transfer", "30.00")])
            );
            // The hold blocks the payee's own transfers.
            let blocked = api.transfer(&tb, &key(), &a, "1.00", "USD").await;
            assert_eq!(blocked.code(), "insufficient_funds");
            for (token, ok) in [(&ta, true), (&tb, true), (&stranger, false)] {
                let r = api.get(&format!("/v1/disputes/{id}"), Some(token)).await;
                if ok {
                    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
                    assert_eq!(r.body["transfer_id"], tid.as_str());
                } else {
                    assert_eq!(r.code(), "dispute_not_found");
                }
            }
            // Rejected: the hold is released, the payee keeps the money.
            let rejected = resolve(&api, &id, "reject").await;
            assert_eq!(rejected.status, StatusCode::OK, "{:?}", rejected.body);
            assert_eq!(rejected.body["status"], "rejected");
            assert_eq!(
                resolve(&api, &id, "refund").await.code(),
                "dispute_resolved"
            );
            let released = account(&api, &tb).await;
            assert_eq!(released["available"], "30.00");
            assert_eq!(
                kinds(&released)[0],
                ("release".to_owned(), "30.00".to_owned())
            );
            // A new dispute of the same transfer, refunded this time.
            let second = dispute(&api, &ta, &tid).await;
            assert_eq!(second.status, StatusCode::CREATED, "{:?}", second.body);
            let id2 = second.body["dispute_id"].as_str().expect("id").to_owned();
            let refunded = resolve(&api, &id2, "refund").await;
            assert_eq!(refunded.status, StatusCode::OK, "{:?}", refunded.body);
            assert_eq!(refunded.body["status"], "refunded");
            assert!(refunded.body["refund_transfer_id"].is_string());
            assert_eq!(
                resolve(&api, &id2, "reject").await.code(),
                "dispute_resolved"
            );
            assert_eq!(api.balance(&ta).await, "100.00");
            let payee = account(&api, &tb).await;
            assert_eq!(
                (payee["balance"].as_str(), payee["available"].as_str()),
                (Some("0.00"), Some("0.00"))
            );
            assert_eq!(
                kinds(&payee)[..2],
                // Newest first: the hold is released, then the money leaves.
                pairs(&[("dispute_refund", "-30.00"), ("release", "30.00")])[..]
            );
            assert_eq!(
                kinds(&account(&api, &ta).await)[0],
                ("dispute_refund".to_owned(), "30.00".to_owned())
            );
            // The original shows it, and nothing is left to dispute or refund.
            let view = api.get(&format!("/v1/transfer/{tid}"), Some(&ta)).await;
            assert_eq!(view.body["refunded"], "30.00", "{:?}", view.body);
            assert_eq!(dispute(&api, &ta, &tid).await.code(), "nothing_to_dispute");
        }
    }
}

/// Refusals: the window, a bad outcome, no admin, unknown IDs.
#[tokio::test]
async fn disputes_refuse_what_they_should() {
    let (c, api) = cluster_with(r#"{"dispute_window_days": 0}"#, false).await;
    let (a, b) = pair(&c, "dpr", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    api.deposit(&ta, "10.00", "USD").await;
    let tid = pay(&api, &ta, &b, "1.00").await;
    let late = dispute(&api, &ta, &tid).await;
    assert_eq!(late.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(late.code(), "dispute_window_passed");
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(
        dispute(&api, &ta, &unknown).await.code(),
        "transfer_not_found"
    );
    assert_eq!(
        api.get(&format!("/v1/disputes/{unknown}"), Some(&ta))
            .await
            .code(),
        "dispute_not_found"
    );
    assert_eq!(
        api.get("/v1/disputes/nonsense", Some(&ta)).await.code(),
        "dispute_not_found"
    );
    assert_eq!(
        resolve(&api, &unknown, "refund").await.code(),
        "dispute_not_found"
    );
    assert_eq!(
        resolve(&api, &unknown, "maybe").await.code(),
        "invalid_request"
    );
    let no_admin = api
        .post(
            &format!("/v1/admin/disputes/{unknown}/resolve"),
            Some(&ta),
            None,
            json!({"outcome": "reject"}),
        )
        .await;
    assert_eq!(no_admin.status, StatusCode::UNAUTHORIZED);
    let empty = api
        .post(
            "/v1/disputes",
            Some(&ta),
            None,
            json!({"transfer_id": tid, "reason": " "}),
        )
        .await;
    assert_eq!(empty.code(), "invalid_request");
}

/// A dispute and a full refund of one transfer, at once, many times: exactly
/// one of them gets the money, whichever comes first.
#[tokio::test]
async fn a_dispute_and_a_refund_of_one_transfer_race_and_one_wins() {
    for redis in [false, true] {
        let (c, api) = cluster_with("{}", redis).await;
        let (a, b) = pair(&c, &format!("dprace{}", u8::from(redis)), false);
        let ta = api.user(&a, "USD").await;
        let tb = api.user(&b, "USD").await;
        api.deposit(&ta, "100.00", "USD").await;
        let (mut disputes_won, mut refunds_won) = (0, 0);
        for _ in 0..10 {
            let tid = pay(&api, &ta, &b, "5.00").await;
            let k = key();
            let (d, r) = tokio::join!(
                dispute(&api, &ta, &tid),
                api.post(
                    "/v1/refunds",
                    Some(&tb),
                    Some(&k),
                    json!({"transfer_id": tid})
                )
            );
            match (d.status, r.status) {
                (StatusCode::CREATED, _) => {
                    assert_eq!(r.code(), "refund_exceeds_original", "{:?}", r.body);
                    disputes_won += 1;
                }
                (_, StatusCode::CREATED) => {
                    assert_eq!(d.code(), "nothing_to_dispute", "{:?}", d.body);
                    refunds_won += 1;
                }
                other => panic!("neither won: {other:?} {:?} {:?}", d.body, r.body),
            }
        }
        assert_eq!(disputes_won + refunds_won, 10);
        // Every transfer's money is either back with the payer or held.
        let payee = account(&api, &tb).await;
        assert_eq!(payee["balance"], format!("{}.00", 5 * disputes_won));
        assert_eq!(payee["available"], "0.00");
    }
}

/// A dispute may hold more than the payee can spend (they paid part of it on
/// before the dispute): available goes below zero and blocks their transfers
/// until money comes in or the dispute is resolved; every invariant holds
/// throughout.
#[tokio::test]
async fn a_dispute_may_hold_more_than_is_available_and_every_invariant_holds() {
    let (c, api) = cluster_with("{}", false).await;
    let (a, b) = pair(&c, "dpneg", false);
    let (_, x) = pair(&c, "dpneg2", true);
    let ta = api.user(&a, "USD").await;
    let tb = api.user(&b, "USD").await;
    api.user(&x, "USD").await;
    api.deposit(&ta, "100.00", "USD").await;
    let tid = pay(&api, &ta, &b, "30.00").await;
    pay(&api, &tb, &x, "20.00").await;
    let opened = dispute(&api, &ta, &tid).await;
    assert_eq!(opened.body["amount"], "30.00");
    let id = opened.body["dispute_id"].as_str().expect("id").to_owned();
    let view = account(&api, &tb).await;
    assert_eq!(
        (view["balance"].as_str(), view["available"].as_str()),
        (Some("10.00"), Some("-20.00"))
    );
    assert_eq!(
        api.transfer(&tb, &key(), &x, "0.01", "USD").await.code(),
        "insufficient_funds"
    );
    let invariants = || async {
        let snap = checker::Snapshot::take(&c.agents())
            .await
            .expect("snapshot");
        snap.violations(true)
    };
    assert_eq!(invariants().await, Vec::<String>::new());
    // Not enough to refund yet.
    assert_eq!(
        resolve(&api, &id, "refund").await.code(),
        "insufficient_funds"
    );
    api.deposit(&tb, "25.00", "USD").await;
    let refunded = resolve(&api, &id, "refund").await;
    assert_eq!(refunded.status, StatusCode::OK, "{:?}", refunded.body);
    let view = account(&api, &tb).await;
    assert_eq!(
        (view["balance"].as_str(), view["available"].as_str()),
        (Some("5.00"), Some("5.00"))
    );
    assert_eq!(api.balance(&ta).await, "100.00");
    assert_eq!(invariants().await, Vec::<String>::new());
}

/// Three admins decide one dispute at once, in both lock modes: exactly one
/// decision applies, the others are told it is resolved.
#[tokio::test]
async fn concurrent_decisions_on_one_dispute_apply_once() {
    for redis in [false, true] {
        let (c, api) = cluster_with("{}", redis).await;
        let (a, b) = pair(&c, &format!("dpdec{}", u8::from(redis)), false);
        let ta = api.user(&a, "USD").await;
        let tb = api.user(&b, "USD").await;
        api.deposit(&ta, "50.00", "USD").await;
        for _ in 0..5 {
            let tid = pay(&api, &ta, &b, "10.00").await;
            let id = dispute(&api, &ta, &tid).await.body["dispute_id"]
                .as_str()
                .expect("id")
                .to_owned();
            let (r1, r2, r3) = tokio::join!(
                resolve(&api, &id, "refund"),
                resolve(&api, &id, "refund"),
                resolve(&api, &id, "reject")
            );
            let replies = [&r1, &r2, &r3];
            let applied = replies
                .iter()
                .filter(|r| r.status == StatusCode::OK)
                .count();
            let told = replies
                .iter()
                .filter(|r| r.code() == "dispute_resolved")
                .count();
            assert_eq!(
                (applied, told),
                (1, 2),
                "redis={redis}: {:?}",
                replies.map(|r| &r.body)
            );
        }
        let (pa, pb) = (api.balance(&ta).await, api.balance(&tb).await);
        let total: rust_decimal::Decimal = pa.parse::<rust_decimal::Decimal>().expect("balance")
            + pb.parse::<rust_decimal::Decimal>().expect("balance");
        assert_eq!(total, rust_decimal::Decimal::from(50));
        let snap = checker::Snapshot::take(&c.agents())
            .await
            .expect("snapshot");
        assert_eq!(snap.violations(true), Vec::<String>::new());
    }
}
