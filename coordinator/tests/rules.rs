//! The wallet's rules against real shards over HTTP: daily limits, fraud
//! rules, refunds, and how the account view shows them. Each rule is checked
//! same-shard and cross-shard (two protocols, one check), and in Redis mode.

mod common;

use common::{account, cluster_with, key, pair, Api, Reply, ADMIN};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn set_limit(api: &Api, user: &str, daily: Value) -> Reply {
    api.send(
        "PUT",
        &format!("/v1/admin/users/{user}/limits"),
        Some(ADMIN),
        None,
        Some(json!({ "daily": daily })),
    )
    .await
}

async fn refund(api: &Api, token: &str, k: &str, body: Value) -> Reply {
    api.post("/v1/refunds", Some(token), Some(k), body).await
}

/// A configured default limit: a transfer that fits is committed and counted,
/// one that does not is refused with what is left and consumes nothing, on
/// both protocols and in both lock modes.
#[tokio::test]
async fn a_daily_limit_refuses_what_exceeds_it_and_counts_only_committed_transfers() {
    for redis in [false, true] {
        let (c, api) = cluster_with(r#"{"daily_limits": {"USD": "100.00"}}"#, redis).await;
        for same in [true, false] {
            let prefix = format!("lim{}{}", u8::from(redis), u8::from(same));
            let (a, b) = pair(&c, &prefix, same);
            let ta = api.user(&a, "USD").await;
            api.user(&b, "USD").await;
            api.deposit(&ta, "500.00", "USD").await;
            let before = account(&api, &ta).await;
            assert_eq!(
                before["limits"],
                json!({"daily": "100.00", "used_today": "0.00", "remaining": "100.00"})
            );
            let ok = api.transfer(&ta, &key(), &b, "60.00", "USD").await;
            assert_eq!(ok.status, StatusCode::CREATED, "{:?}", ok.body);
            let k = key();
            let over = api.transfer(&ta, &k, &b, "40.01", "USD").await;
            assert_eq!(
                over.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{:?}",
                over.body
            );
            assert_eq!(over.code(), "limit_exceeded");
            assert_eq!(over.body["remaining"], "40.00");
            assert!(over.is_problem());
            // The refusal is the key's answer, replayed as it was.
            let again = api.transfer(&ta, &k, &b, "40.01", "USD").await;
            assert_eq!(again.code(), "limit_exceeded");
            assert_eq!(again.body["remaining"], "40.00");
            // A refusal for funds consumes nothing either.
            let poor = api.transfer(&ta, &key(), &b, "40.00", "USD").await;
            assert_eq!(poor.status, StatusCode::CREATED, "{:?}", poor.body);
            let after = account(&api, &ta).await;
            assert_eq!(
                after["limits"],
                json!({"daily": "100.00", "used_today": "100.00", "remaining": "0.00"})
            );
            assert_eq!(after["balance"], "400.00");
            assert_eq!(after["available"], "400.00");
            // Another currency has no default limit.
            let eur = format!("{prefix}_eur");
            let te = api.user(&eur, "EUR").await;
            assert_eq!(
                account(&api, &te).await["limits"],
                json!({"daily": null, "used_today": "0.00", "remaining": null})
            );
        }
    }
}

/// An admin's override wins over the default, `null` removes it, and the
/// route refuses what it should.
#[tokio::test]
async fn an_admin_sets_and_clears_a_users_limit() {
    let (c, api) = cluster_with(r#"{"daily_limits": {"USD": "100.00"}}"#, false).await;
    let (a, b) = pair(&c, "adm", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    api.deposit(&ta, "500.00", "USD").await;
    let set = set_limit(&api, &a, json!("250.00")).await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    assert_eq!(set.body["limits"]["daily"], "250.00");
    assert_eq!(set.body["currency"], "USD");
    let ok = api.transfer(&ta, &key(), &b, "200.00", "USD").await;
    assert_eq!(ok.status, StatusCode::CREATED, "{:?}", ok.body);
    let over = api.transfer(&ta, &key(), &b, "50.01", "USD").await;
    assert_eq!(over.code(), "limit_exceeded");
    assert_eq!(over.body["remaining"], "50.00");
    // Zero stops every transfer.
    assert_eq!(set_limit(&api, &a, json!("0")).await.status, StatusCode::OK);
    let zero = api.transfer(&ta, &key(), &b, "0.01", "USD").await;
    assert_eq!(zero.code(), "limit_exceeded");
    assert_eq!(zero.body["remaining"], "0.00");
    // Cleared: the default applies again, and 200 are used already.
    let cleared = set_limit(&api, &a, Value::Null).await;
    assert_eq!(cleared.body["limits"]["daily"], "100.00");
    assert_eq!(cleared.body["limits"]["remaining"], "0.00");
    // Refusals.
    let no_admin = api
        .send(
            "PUT",
            &format!("/v1/admin/users/{a}/limits"),
            Some(&ta),
            None,
            Some(json!({"daily": "1"})),
        )
        .await;
    assert_eq!(no_admin.status, StatusCode::UNAUTHORIZED);
    let nobody = set_limit(&api, "nobody_here", json!("1")).await;
    assert_eq!(nobody.status, StatusCode::NOT_FOUND);
    assert_eq!(nobody.code(), "user_not_found");
    for bad in [json!("-1"), json!("ten"), json!("1.001"), json!(5)] {
        let r = set_limit(&api, &a, bad.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {:?}", r.body);
        assert!(r.is_problem());
    }
}

/// 20 transfers at once from one payer, against a limit that fits 10 of
/// them: exactly 10 commit, whichever protocol each runs by.
#[tokio::test]
async fn concurrent_transfers_never_exceed_a_limit_together() {
    for redis in [false, true] {
        let (c, api) = cluster_with(r#"{"daily_limits": {"USD": "100.00"}}"#, redis).await;
        let prefix = format!("race{}", u8::from(redis));
        let (a, same) = pair(&c, &prefix, true);
        let (_, far) = pair(&c, &prefix, false);
        let ta = api.user(&a, "USD").await;
        api.user(&same, "USD").await;
        api.user(&far, "USD").await;
        api.deposit(&ta, "1000.00", "USD").await;
        let sends = (0..20).map(|i| {
            let to = if i % 2 == 0 {
                same.clone()
            } else {
                far.clone()
            };
            let (api, ta) = (&api, &ta);
            async move { api.transfer(ta, &key(), &to, "10.00", "USD").await }
        });
        let replies = futures::future::join_all(sends).await;
        let ok = replies
            .iter()
            .filter(|r| r.status == StatusCode::CREATED)
            .count();
        let limited = replies
            .iter()
            .filter(|r| r.code() == "limit_exceeded")
            .count();
        assert_eq!(
            (ok, limited),
            (10, 10),
            "redis={redis}: {:?}",
            replies.iter().map(|r| &r.body).collect::<Vec<_>>()
        );
        let view = account(&api, &ta).await;
        assert_eq!(view["balance"], "900.00");
        assert_eq!(view["limits"]["used_today"], "100.00");
    }
}

/// Fraud rules: `block` refuses with the rule's name; each kind of rule
/// meets what it should; `POST /v1/fraud_detection` answers what the check
/// would do, moving nothing.
#[tokio::test]
async fn fraud_rules_block_with_the_rule_named_and_the_detection_route_agrees() {
    let rules = r#"{"fraud_rules": [
        {"name": "burst", "rule": "velocity", "max_transfers": 3, "window_s": 60, "action": "block"},
        {"name": "large", "rule": "amount", "over": {"USD": "500.00"}, "action": "block"},
        {"name": "stranger", "rule": "new_recipient", "over": {"USD": "50.00"}, "action": "block"}
    ]}"#;
    for redis in [false, true] {
        let (c, api) = cluster_with(rules, redis).await;
        for same in [true, false] {
            let prefix = format!("fr{}{}", u8::from(redis), u8::from(same));
            let (a, b) = pair(&c, &prefix, same);
            let ta = api.user(&a, "USD").await;
            api.user(&b, "USD").await;
            api.deposit(&ta, "2000.00", "USD").await;
            let detect = |amount: &str| {
                let body = json!({"from": a, "to": b, "amount": amount, "currency": "USD"});
                let api = &api;
                async move {
                    api.post("/v1/fraud_detection", Some(ADMIN), None, body)
                        .await
                }
            };
            let d = detect("600.00").await;
            assert_eq!(d.status, StatusCode::OK, "{:?}", d.body);
            assert_eq!(
                (d.body["decision"].as_str(), d.body["rule"].as_str()),
                (Some("block"), Some("large"))
            );
            let large = api.transfer(&ta, &key(), &b, "600.00", "USD").await;
            assert_eq!(large.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(large.code(), "transfer_blocked");
            assert_eq!(large.body["rule"], "large");
            assert_eq!(detect("60.00").await.body["rule"], "stranger");
            let stranger = api.transfer(&ta, &key(), &b, "60.00", "USD").await;
            assert_eq!(stranger.body["rule"], "stranger");
            // Paid once, no longer a stranger.
            let small = api.transfer(&ta, &key(), &b, "10.00", "USD").await;
            assert_eq!(small.status, StatusCode::CREATED, "{:?}", small.body);
            assert_eq!(detect("60.00").await.body["decision"], "allow");
            let known = api.transfer(&ta, &key(), &b, "60.00", "USD").await;
            assert_eq!(known.status, StatusCode::CREATED, "{:?}", known.body);
            // Two committed; a third makes three, the fourth is one too many.
            let third = api.transfer(&ta, &key(), &b, "1.00", "USD").await;
            assert_eq!(third.status, StatusCode::CREATED, "{:?}", third.body);
            assert_eq!(detect("1.00").await.body["rule"], "burst");
            let fourth = api.transfer(&ta, &key(), &b, "1.00", "USD").await;
            assert_eq!(fourth.code(), "transfer_blocked");
            assert_eq!(fourth.body["rule"], "burst");
            assert_eq!(account(&api, &ta).await["balance"], "1929.00");
        }
        let no_admin = api
            .post(
                "/v1/fraud_detection",
                None,
                None,
                json!({"from": "x_user", "to": "y_user", "amount": "1", "currency": "USD"}),
            )
            .await;
        assert_eq!(no_admin.status, StatusCode::UNAUTHORIZED);
        let bad = api
            .post(
                "/v1/fraud_detection",
                Some(ADMIN),
                None,
                json!({"from": "x_user", "to": "y_user", "amount": "-1", "currency": "USD"}),
            )
            .await;
        assert_eq!(bad.code(), "invalid_amount");
    }
}

/// Refunds: partial, then the rest; never above the original; only by its
/// payee; the original shows them; the ledger calls them refunds.
#[tokio::test]
async fn a_payee_refunds_part_then_the_rest_and_never_more() {
    for redis in [false, true] {
        let (c, api) = cluster_with("{}", redis).await;
        for same in [true, false] {
            let prefix = format!("rf{}{}", u8::from(redis), u8::from(same));
            let (a, b) = pair(&c, &prefix, same);
            let ta = api.user(&a, "USD").await;
            let tb = api.user(&b, "USD").await;
            api.deposit(&ta, "100.00", "USD").await;
            let t = api.transfer(&ta, &key(), &b, "30.00", "USD").await;
            assert_eq!(t.status, StatusCode::CREATED);
            let tid = t.body["transfer_id"].as_str().expect("id").to_owned();
            // Not the payee: the payer, a stranger, an unknown ID.
            let by_payer = refund(&api, &ta, &key(), json!({"transfer_id": tid})).await;
            assert_eq!(by_payer.status, StatusCode::NOT_FOUND);
            assert_eq!(by_payer.code(), "transfer_not_found");
            let unknown = refund(
                &api,
                &tb,
                &key(),
                json!({"transfer_id": uuid::Uuid::new_v4().to_string()}),
            )
            .await;
            assert_eq!(unknown.code(), "transfer_not_found");
            let k = key();
            let part = refund(
                &api,
                &tb,
                &k,
                json!({"transfer_id": tid, "amount": "10.00", "reason": "damaged"}),
            )
            .await;
            assert_eq!(part.status, StatusCode::CREATED, "{:?}", part.body);
            assert_eq!(part.body["kind"], "refund");
            assert_eq!(part.body["refund_of"], tid.as_str());
            assert_eq!(part.body["reason"], "damaged");
            assert_eq!(
                (part.body["from"].as_str(), part.body["to"].as_str()),
                (Some(b.as_str()), Some(a.as_str()))
            );
            // Replayed by its key, not repeated.
            let again = refund(
                &api,
                &tb,
                &k,
                json!({"transfer_id": tid, "amount": "10.00", "reason": "damaged"}),
            )
            .await;
            assert_eq!(again.body["transfer_id"], part.body["transfer_id"]);
            assert_eq!(
                again
                    .headers
                    .get("idempotent-replayed")
                    .map(|v| v.to_str().ok()),
                Some(Some("true"))
            );
            let over = refund(
                &api,
                &tb,
                &key(),
                json!({"transfer_id": tid, "amount": "20.01"}),
            )
            .await;
            assert_eq!(
                over.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{:?}",
                over.body
            );
            assert_eq!(over.code(), "refund_exceeds_original");
            assert_eq!(over.body["remaining"], "20.00");
            let rest = refund(&api, &tb, &key(), json!({"transfer_id": tid})).await;
            assert_eq!(rest.status, StatusCode::CREATED, "{:?}", rest.body);
            assert_eq!(rest.body["amount"], "20.00");
            let nothing_left = refund(&api, &tb, &key(), json!({"transfer_id": tid})).await;
            assert_eq!(nothing_left.code(), "refund_exceeds_original");
            assert_eq!(nothing_left.body["remaining"], "0.00");
            assert_eq!(api.balance(&ta).await, "100.00");
            assert_eq!(api.balance(&tb).await, "0.00");
            // The original shows its refunds, to both of its parties.
            for token in [&ta, &tb] {
                let view = api.get(&format!("/v1/transfer/{tid}"), Some(token)).await;
                assert_eq!(view.status, StatusCode::OK);
                assert_eq!(view.body["refunded"], "30.00", "{:?}", view.body);
                let refunds = view.body["refunds"].as_array().expect("refunds");
                assert_eq!(
                    refunds
                        .iter()
                        .filter(|r| r["status"] == "committed")
                        .count(),
                    2
                );
            }
            // The ledger names them.
            let kinds: Vec<(String, String)> = account(&api, &ta).await["transactions"]
                .as_array()
                .expect("entries")
                .iter()
                .map(|e| {
                    (
                        e["kind"].as_str().unwrap_or("").to_owned(),
                        e["amount"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            assert_eq!(
                kinds,
                [
                    ("refund", "20.00"),
                    ("refund", "10.00"),
                    ("transfer", "-30.00"),
                    ("deposit", "100.00")
                ]
                .map(|(k, a)| (k.to_owned(), a.to_owned()))
            );
            // A refund is not refundable, and a payee without the money cannot refund.
            let rid = part.body["transfer_id"].as_str().expect("id");
            assert_eq!(
                refund(&api, &ta, &key(), json!({"transfer_id": rid}))
                    .await
                    .code(),
                "transfer_not_found"
            );
        }
    }
}

/// 20 refunds of one transfer at once: their sum never exceeds it.
#[tokio::test]
async fn concurrent_refunds_never_exceed_the_original() {
    for redis in [false, true] {
        let (c, api) = cluster_with("{}", redis).await;
        let (a, b) = pair(&c, &format!("crf{}", u8::from(redis)), false);
        let ta = api.user(&a, "USD").await;
        let tb = api.user(&b, "USD").await;
        api.deposit(&ta, "100.00", "USD").await;
        api.deposit(&tb, "100.00", "USD").await;
        let t = api.transfer(&ta, &key(), &b, "50.00", "USD").await;
        let tid = t.body["transfer_id"].as_str().expect("id").to_owned();
        let sends = (0..20).map(|_| {
            let (api, tb, tid) = (&api, &tb, &tid);
            async move {
                refund(
                    api,
                    tb,
                    &key(),
                    json!({"transfer_id": tid, "amount": "7.00"}),
                )
                .await
            }
        });
        let replies = futures::future::join_all(sends).await;
        let ok = replies
            .iter()
            .filter(|r| r.status == StatusCode::CREATED)
            .count();
        let refused = replies
            .iter()
            .filter(|r| r.code() == "refund_exceeds_original")
            .count();
        assert_eq!((ok, refused), (7, 13), "redis={redis}");
        assert_eq!(api.balance(&ta).await, "99.00");
        assert_eq!(api.balance(&tb).await, "101.00");
    }
}

/// A refund needs the payee's available money; refunds do not count toward
/// the payee's daily limit and skip the fraud rules.
#[tokio::test]
async fn a_refund_needs_funds_but_not_limit_or_rules() {
    let rules = r#"{"daily_limits": {"USD": "5.00"},
        "fraud_rules": [{"name": "large", "rule": "amount", "over": {"USD": "1.00"}, "action": "block"}]}"#;
    let (c, api) = cluster_with(rules, false).await;
    let (a, b) = pair(&c, "rfl", false);
    let ta = api.user(&a, "USD").await;
    let tb = api.user(&b, "USD").await;
    api.deposit(&ta, "100.00", "USD").await;
    // An admin lifts the payer's limit and the rule does not apply under 1.00:
    // pay 1.00 ten times.
    set_limit(&api, &a, json!("1000")).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let t = api.transfer(&ta, &key(), &b, "1.00", "USD").await;
        assert_eq!(t.status, StatusCode::CREATED, "{:?}", t.body);
        ids.push(t.body["transfer_id"].as_str().expect("id").to_owned());
    }
    // Spend 6 of them elsewhere? The limit (5.00) stops that; refunds are not limited.
    for tid in &ids[..6] {
        let r = refund(&api, &tb, &key(), json!({"transfer_id": tid})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    assert_eq!(account(&api, &tb).await["limits"]["used_today"], "0.00");
    assert_eq!(api.balance(&tb).await, "4.00");
    // Move the payee's money away (within their limit), then a refund finds no funds.
    let (_, other) = pair(&c, "rfl2", false);
    api.user(&other, "USD").await;
    for _ in 0..4 {
        let t = api.transfer(&tb, &key(), &other, "1.00", "USD").await;
        assert_eq!(t.status, StatusCode::CREATED, "{:?}", t.body);
    }
    let broke = refund(&api, &tb, &key(), json!({"transfer_id": ids[6]})).await;
    assert_eq!(broke.code(), "insufficient_funds");
}

async fn admin_post(api: &Api, path: &str) -> Reply {
    api.post(path, Some(ADMIN), None, json!({})).await
}

/// A `review` rule accepts a transfer as held: 202, its amount out of the
/// payer's available balance and nowhere else, until an admin releases it
/// (it commits under its own ID) or rejects it (the money is back); two
/// decisions at once apply once. Both protocols, both lock modes.
#[tokio::test]
async fn a_review_rule_holds_a_transfer_until_an_admin_decides() {
    let rules = r#"{"fraud_rules": [
        {"name": "large", "rule": "amount", "over": {"USD": "50.00"}, "action": "review"}
    ]}"#;
    for redis in [false, true] {
        let (c, api) = cluster_with(rules, redis).await;
        for same in [true, false] {
            let prefix = format!("rv{}{}", u8::from(redis), u8::from(same));
            let (a, b) = pair(&c, &prefix, same);
            let ta = api.user(&a, "USD").await;
            let tb = api.user(&b, "USD").await;
            api.deposit(&ta, "500.00", "USD").await;
            let d = api
                .post(
                    "/v1/fraud_detection",
                    Some(ADMIN),
                    None,
                    json!({"from": a, "to": b, "amount": "60.00", "currency": "USD"}),
                )
                .await;
            assert_eq!(
                (d.body["decision"].as_str(), d.body["rule"].as_str()),
                (Some("review"), Some("large"))
            );
            let k = key();
            let held = api.transfer(&ta, &k, &b, "60.00", "USD").await;
            assert_eq!(held.status, StatusCode::ACCEPTED, "{:?}", held.body);
            assert_eq!(
                (held.body["status"].as_str(), held.body["rule"].as_str()),
                (Some("held"), Some("large"))
            );
            let tid = held.body["transfer_id"].as_str().expect("id").to_owned();
            let again = api.transfer(&ta, &k, &b, "60.00", "USD").await;
            assert_eq!(
                (again.status, again.body["transfer_id"].as_str()),
                (StatusCode::ACCEPTED, Some(tid.as_str()))
            );
            let payer = account(&api, &ta).await;
            assert_eq!(
                (payer["balance"].as_str(), payer["available"].as_str()),
                (Some("500.00"), Some("440.00"))
            );
            assert_eq!(payer["transactions"][0]["kind"], "hold");
            assert_eq!(api.balance(&tb).await, "0.00");
            assert_eq!(
                api.get(&format!("/v1/transfer/{tid}"), Some(&ta))
                    .await
                    .body["status"],
                "held"
            );
            // Released: committed under its own ID, money with the payee.
            let released = admin_post(&api, &format!("/v1/admin/transfers/{tid}/release")).await;
            assert_eq!(released.status, StatusCode::OK, "{:?}", released.body);
            assert_eq!(
                (
                    released.body["status"].as_str(),
                    released.body["transfer_id"].as_str()
                ),
                (Some("committed"), Some(tid.as_str()))
            );
            for path in ["release", "reject"] {
                let late = admin_post(&api, &format!("/v1/admin/transfers/{tid}/{path}")).await;
                assert_eq!(late.code(), "transfer_not_held", "{:?}", late.body);
            }
            let payer = account(&api, &ta).await;
            assert_eq!(
                (payer["balance"].as_str(), payer["available"].as_str()),
                (Some("440.00"), Some("440.00"))
            );
            assert_eq!(api.balance(&tb).await, "60.00");
            // Rejected: aborted transfer_rejected, the money available again,
            // and the key's replay says so.
            let k2 = key();
            let second = api.transfer(&ta, &k2, &b, "70.00", "USD").await;
            assert_eq!(second.status, StatusCode::ACCEPTED, "{:?}", second.body);
            let tid2 = second.body["transfer_id"].as_str().expect("id").to_owned();
            let (reject, release) = (
                format!("/v1/admin/transfers/{tid2}/reject"),
                format!("/v1/admin/transfers/{tid2}/release"),
            );
            let (r1, r2) = tokio::join!(admin_post(&api, &reject), admin_post(&api, &release));
            let won: Vec<&Reply> = [&r1, &r2]
                .into_iter()
                .filter(|r| r.status == StatusCode::OK)
                .collect();
            assert_eq!(won.len(), 1, "{:?} {:?}", r1.body, r2.body);
            let lost = if r1.status == StatusCode::OK {
                &r2
            } else {
                &r1
            };
            assert_eq!(lost.code(), "transfer_not_held", "{:?}", lost.body);
            let rejected = r1.status == StatusCode::OK;
            if rejected {
                assert_eq!(r1.body["failure_code"], "transfer_rejected");
                let replay = api.transfer(&ta, &k2, &b, "70.00", "USD").await;
                assert_eq!(replay.code(), "transfer_rejected");
            }
            let payer = account(&api, &ta).await;
            let want = if rejected { "440.00" } else { "370.00" };
            assert_eq!(
                (payer["balance"].as_str(), payer["available"].as_str()),
                (Some(want), Some(want))
            );
            // A transfer under the rule's amount is not held.
            let small = api.transfer(&ta, &key(), &b, "5.00", "USD").await;
            assert_eq!(small.status, StatusCode::CREATED, "{:?}", small.body);
        }
        assert_eq!(
            admin_post(
                &api,
                &format!("/v1/admin/transfers/{}/release", uuid::Uuid::new_v4())
            )
            .await
            .code(),
            "transfer_not_found"
        );
        let snap = checker::Snapshot::take(&c.agents())
            .await
            .expect("snapshot");
        assert_eq!(snap.violations(true), Vec::<String>::new());
    }
}

/// A hold nobody decides expires: aborted hold_expired, the money available
/// again.
#[tokio::test]
async fn a_hold_nobody_decides_expires() {
    let rules = r#"{"hold_expiry_s": 1, "fraud_rules": [
        {"name": "large", "rule": "amount", "over": {"USD": "50.00"}, "action": "review"}
    ]}"#;
    let (c, api) = cluster_with(rules, false).await;
    let (a, b) = pair(&c, "rvexp", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    api.deposit(&ta, "100.00", "USD").await;
    let held = api.transfer(&ta, &key(), &b, "60.00", "USD").await;
    assert_eq!(held.status, StatusCode::ACCEPTED, "{:?}", held.body);
    let tid = held.body["transfer_id"].as_str().expect("id").to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let view = api.get(&format!("/v1/transfer/{tid}"), Some(&ta)).await;
        if view.body["status"] == "aborted" {
            assert_eq!(view.body["failure_code"], "hold_expired");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {:?}",
            view.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let payer = account(&api, &ta).await;
    assert_eq!(
        (payer["balance"].as_str(), payer["available"].as_str()),
        (Some("100.00"), Some("100.00"))
    );
    let snap = checker::Snapshot::take(&c.agents())
        .await
        .expect("snapshot");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}

/// A held transfer counts toward the daily limit when it moves: a release
/// the payer's day has no room for is refused (422 limit_exceeded) and the
/// transfer stays held; a rejection still ends it.
#[tokio::test]
async fn a_release_needs_room_in_the_payers_day() {
    let rules = r#"{"daily_limits": {"USD": "100.00"}, "fraud_rules": [
        {"name": "large", "rule": "amount", "over": {"USD": "50.00"}, "action": "review"}
    ]}"#;
    let (c, api) = cluster_with(rules, false).await;
    let (a, b) = pair(&c, "rvlim", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    api.deposit(&ta, "500.00", "USD").await;
    let held = api.transfer(&ta, &key(), &b, "60.00", "USD").await;
    assert_eq!(held.status, StatusCode::ACCEPTED, "{:?}", held.body);
    let tid = held.body["transfer_id"].as_str().expect("id").to_owned();
    let spent = api.transfer(&ta, &key(), &b, "50.00", "USD").await;
    assert_eq!(spent.status, StatusCode::CREATED, "{:?}", spent.body);
    let refused = admin_post(&api, &format!("/v1/admin/transfers/{tid}/release")).await;
    assert_eq!(refused.code(), "limit_exceeded", "{:?}", refused.body);
    assert_eq!(
        api.get(&format!("/v1/transfer/{tid}"), Some(&ta))
            .await
            .body["status"],
        "held"
    );
    let rejected = admin_post(&api, &format!("/v1/admin/transfers/{tid}/reject")).await;
    assert_eq!(rejected.status, StatusCode::OK, "{:?}", rejected.body);
    let payer = account(&api, &ta).await;
    assert_eq!(
        (payer["balance"].as_str(), payer["available"].as_str()),
        (Some("450.00"), Some("450.00"))
    );
    assert_eq!(payer["limits"]["used_today"], "50.00");
    let snap = checker::Snapshot::take(&c.agents())
        .await
        .expect("snapshot");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}
