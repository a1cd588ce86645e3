//! The API against a real 4-shard cluster: every documented error code, the
//! happy paths, and that errors are problem+json.

mod common;

use common::{pair, Api};
use reqwest::StatusCode;
use serde_json::json;
use testkit::{test_limits, TestCluster};

async fn cluster() -> (TestCluster, Api) {
    let cluster = TestCluster::start(4, test_limits()).await;
    let api = Api::new(&cluster);
    (cluster, api)
}

#[tokio::test]
async fn sign_up_login_and_account_view_work_end_to_end() {
    let (_c, api) = cluster().await;
    let r = api.sign_up("Alice", "USD").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["username"], "alice");
    assert_eq!(r.body["currency"], "USD");
    let token = api.login("alice").await;
    let acct = api.get("/v1/account", Some(&token)).await;
    assert_eq!(acct.status, StatusCode::OK);
    assert_eq!(acct.body["balance"], "0.00");
    assert_eq!(acct.body["transactions"], json!([]));
}

#[tokio::test]
async fn sign_up_returns_409_when_the_username_is_taken() {
    let (_c, api) = cluster().await;
    assert_eq!(api.sign_up("bob", "USD").await.status, StatusCode::CREATED);
    let again = api.sign_up("BOB", "EUR").await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.code(), "username_taken");
    assert!(again.is_problem());
}

#[tokio::test]
async fn sign_up_rejects_bad_fields_with_problem_json() {
    let (_c, api) = cluster().await;
    let cases = [
        (
            json!({"username": "x", "email": "x@example.com", "password": "long enough", "currency": "USD"}),
            "invalid_request",
        ),
        (
            json!({"username": "carol", "email": "nope", "password": "long enough", "currency": "USD"}),
            "invalid_request",
        ),
        (
            json!({"username": "carol", "email": "c@example.com", "password": "short", "currency": "USD"}),
            "invalid_request",
        ),
        (
            json!({"username": "carol", "email": "c@example.com", "password": "long enough", "currency": "XXX"}),
            "unsupported_currency",
        ),
        (json!({"username": "carol"}), "invalid_request"),
    ];
    for (body, code) in cases {
        let r = api.post("/v1/user", None, None, body.clone()).await;
        assert_eq!(r.code(), code, "{body}");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.is_problem());
    }
    let raw = api
        .http
        .post(api.base.clone() + "/v1/user")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    assert_eq!(raw.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn login_returns_401_for_wrong_password_or_unknown_user() {
    let (_c, api) = cluster().await;
    api.user("dave", "USD").await;
    for (user, pw) in [("dave", "wrong password"), ("nobody", "whatever123")] {
        let r = api
            .post(
                "/v1/login",
                None,
                None,
                json!({"username": user, "password": pw}),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.code(), "invalid_credentials");
    }
}

#[tokio::test]
async fn login_sets_a_session_cookie_that_authenticates() {
    let (_c, api) = cluster().await;
    api.sign_up("erin", "USD").await;
    let r = api
        .post(
            "/v1/login",
            None,
            None,
            json!({"username": "erin", "password": common::PASSWORD}),
        )
        .await;
    let cookie = r.headers["set-cookie"]
        .to_str()
        .expect("ascii cookie")
        .to_owned();
    assert!(
        cookie.starts_with("wallet_session=") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("name=value");
    let acct = api
        .http
        .get(api.base.clone() + "/v1/account")
        .header("cookie", pair)
        .send()
        .await
        .expect("send");
    assert_eq!(acct.status(), StatusCode::OK);
}

#[tokio::test]
async fn logout_revokes_the_token() {
    let (_c, api) = cluster().await;
    let token = api.user("frank", "USD").await;
    let r = api
        .send("POST", "/v1/logout", Some(&token), None, None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let after = api.get("/v1/account", Some(&token)).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
    assert_eq!(after.code(), "unauthorized");
}

#[tokio::test]
async fn protected_routes_return_401_without_a_valid_token() {
    let (_c, api) = cluster().await;
    for token in [
        None,
        Some("garbage"),
        Some("0123456789abcdef0123456789abcdef.forged"),
        Some("nobody~forged"),
        Some("Nobody~forged"),
    ] {
        let r = api.get("/v1/account", token).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(r.code(), "unauthorized");
        assert!(r.is_problem());
        let t = api
            .transfer(token.unwrap_or(""), "k1", "someone", "1.00", "USD")
            .await;
        assert_eq!(t.status, StatusCode::UNAUTHORIZED);
    }
}

/// A transfer's token is read where the transfer runs: in the group's check
/// (groups of many or of one), just before it in Redis mode's cross-shard
/// transfers. Every way answers alike, moves nothing, and replays nothing.
#[tokio::test]
async fn a_transfer_moves_nothing_without_a_live_session_batched_or_not() {
    for (mode, batch_max) in [("2pc", 32), ("2pc", 1), ("redis", 32)] {
        let limits = coordinator::config::Limits {
            batch_max,
            ..test_limits()
        };
        let c = if mode == "redis" {
            TestCluster::start_redis(4, limits).await
        } else {
            TestCluster::start(4, limits).await
        };
        let api = Api::new(&c);
        api.user("euro_payee", "EUR").await;
        for same in [true, false] {
            let tag = format!("{mode}{batch_max}{}", if same { "s" } else { "x" });
            let (a, b) = pair(&c, &tag, same);
            let ta = api.user(&a, "USD").await;
            let tb = api.user(&b, "USD").await;
            api.deposit(&ta, "10.00", "USD").await;
            let old = api.login(&a).await;
            let r = api.send("POST", "/v1/logout", Some(&old), None, None).await;
            assert_eq!(r.status, StatusCode::NO_CONTENT);
            // a's name with b's secret: a token no session was issued for.
            let secret = tb.split_once('~').expect("a current-format token").1;
            let forged = format!("{a}~{secret}");
            let shouted = format!("{}~{secret}", a.to_uppercase());
            let dead = [
                ("logged out", &old),
                ("forged", &forged),
                ("not canonical", &shouted),
            ];
            let refused = |why: &str, r: &common::Reply| {
                assert_eq!(
                    (r.status, r.code()),
                    (StatusCode::UNAUTHORIZED, "unauthorized"),
                    "{tag} {why}: {:?}",
                    r.body
                );
                assert!(
                    r.headers.get("idempotent-replayed").is_none(),
                    "{tag} {why}"
                );
                assert!(r.body.get("transfer_id").is_none(), "{tag} {why}");
            };
            for (why, token) in dead {
                refused(why, &api.transfer(token, "k1", &b, "1.00", "USD").await);
            }
            // The payer's own currency is checked with the session, and such a
            // refusal is not stored: the key then works for a valid request.
            let r = api.transfer(&ta, "k1", "euro_payee", "1.00", "EUR").await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::UNPROCESSABLE_ENTITY, "currency_mismatch"),
                "{tag}: {:?}",
                r.body
            );
            assert_eq!(r.body["detail"], "your account holds USD", "{tag}");
            assert_eq!(api.balance(&ta).await, "10.00", "{tag}: nothing moved");
            let r = api.transfer(&ta, "k1", &b, "1.00", "USD").await;
            assert_eq!(r.status, StatusCode::CREATED, "{tag}: {:?}", r.body);
            // Once the key holds an outcome, a dead token does not replay it.
            for (why, token) in dead {
                refused(why, &api.transfer(token, "k1", &b, "1.00", "USD").await);
            }
            assert_eq!(api.balance(&ta).await, "9.00", "{tag}");
            assert_eq!(api.balance(&tb).await, "1.00", "{tag}");
        }
    }
}

/// Sessions issued before tokens named their user (`<user id>.<secret>`) keep
/// working: such a token is read before the transfer runs.
#[tokio::test]
async fn a_token_of_the_earlier_format_still_pays() {
    let (c, api) = cluster().await;
    for same in [true, false] {
        let (a, b) = pair(&c, if same { "olds" } else { "oldx" }, same);
        let ta = api.user(&a, "USD").await;
        let tb = api.user(&b, "USD").await;
        api.deposit(&ta, "5.00", "USD").await;
        let user = router::UserId::for_username(&a);
        let old = format!(
            "{}.{}",
            user.as_uuid().simple(),
            coordinator::auth::random_secret()
        );
        let agent = c.coordinator.cluster().routing().agent_for(&user).clone();
        agent
            .create_session(
                user,
                &coordinator::auth::token_hash(&old),
                chrono::Utc::now() + chrono::Duration::hours(1),
            )
            .await
            .expect("an old-format session");
        let r = api.transfer(&old, "k1", &b, "2.00", "USD").await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let r = api.transfer(&old, "k2", &b, "2.00", "EUR").await;
        assert_eq!(r.code(), "currency_mismatch");
        assert_eq!(api.balance(&ta).await, "3.00");
        assert_eq!(api.balance(&tb).await, "2.00");
    }
}

#[tokio::test]
async fn transfers_move_money_within_and_across_shards() {
    let (c, api) = cluster().await;
    for same in [true, false] {
        let (a, b) = pair(&c, if same { "same" } else { "cross" }, same);
        let ta = api.user(&a, "USD").await;
        let tb = api.user(&b, "USD").await;
        api.deposit(&ta, "100.00", "USD").await;
        let r = api.transfer(&ta, "t1", &b, "12.5", "USD").await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "same_shard={same}: {:?}",
            r.body
        );
        assert_eq!(r.body["status"], "committed");
        assert_eq!(r.body["amount"], "12.50");
        assert_eq!(r.body["from"], a.as_str());
        assert_eq!(r.body["to"], b.as_str());
        assert_eq!(api.balance(&ta).await, "87.50");
        assert_eq!(api.balance(&tb).await, "12.50");
        let id = r.body["transfer_id"].as_str().expect("id").to_owned();
        for token in [&ta, &tb] {
            let seen = api.get(&format!("/v1/transfer/{id}"), Some(token)).await;
            assert_eq!(seen.status, StatusCode::OK, "{:?}", seen.body);
            assert_eq!(seen.body["status"], "committed");
            assert_eq!(seen.body["amount"], "12.50");
        }
        let stranger = api.user(&format!("{a}_x"), "USD").await;
        let hidden = api
            .get(&format!("/v1/transfer/{id}"), Some(&stranger))
            .await;
        assert_eq!(hidden.code(), "transfer_not_found");
    }
}

#[tokio::test]
async fn transfer_errors_have_their_documented_codes() {
    let (c, api) = cluster().await;
    let (a, b) = pair(&c, "err", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    api.user("euro_user", "EUR").await;
    api.deposit(&ta, "10.00", "USD").await;
    let cases: Vec<(Option<&str>, serde_json::Value, StatusCode, &str)> = vec![
        (
            Some("k1"),
            json!({"to": b, "amount": "0", "currency": "USD"}),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            Some("k2"),
            json!({"to": b, "amount": "-5", "currency": "USD"}),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            Some("k3"),
            json!({"to": b, "amount": "1.001", "currency": "USD"}),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            Some("k4"),
            json!({"to": b, "amount": "1e3", "currency": "USD"}),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            Some("k5"),
            json!({"to": b, "amount": "99999999999999999999999999999", "currency": "USD"}),
            StatusCode::BAD_REQUEST,
            "invalid_amount",
        ),
        (
            Some("k6"),
            json!({"to": b, "amount": "1.00", "currency": "ABC"}),
            StatusCode::BAD_REQUEST,
            "unsupported_currency",
        ),
        (
            None,
            json!({"to": b, "amount": "1.00", "currency": "USD"}),
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
        ),
        (
            Some("k7"),
            json!({"to": "no_such_user", "amount": "1.00", "currency": "USD"}),
            StatusCode::NOT_FOUND,
            "recipient_not_found",
        ),
        (
            Some("k8"),
            json!({"to": a, "amount": "1.00", "currency": "USD"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "same_account",
        ),
        (
            Some("k9"),
            json!({"to": b, "amount": "1.00", "currency": "EUR"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency_mismatch",
        ),
        (
            Some("k10"),
            json!({"to": "euro_user", "amount": "1.00", "currency": "USD"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "currency_mismatch",
        ),
        (
            Some("k11"),
            json!({"to": b, "amount": "10.01", "currency": "USD"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "insufficient_funds",
        ),
        (
            Some("k12"),
            json!({"to": b, "amount": 5, "currency": "USD"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Some("k13"),
            json!({"to": b, "amount": "1.00", "currency": "USD", "extra": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (key, body, status, code) in cases {
        let r = api
            .send("POST", "/v1/transfer", Some(&ta), key, Some(body.clone()))
            .await;
        assert_eq!((r.status, r.code()), (status, code), "{body}: {:?}", r.body);
        assert!(r.is_problem(), "{body}");
    }
    let bad_key = api
        .send(
            "POST",
            "/v1/transfer",
            Some(&ta),
            Some(&"k".repeat(256)),
            Some(json!({"to": b, "amount": "1", "currency": "USD"})),
        )
        .await;
    assert_eq!(bad_key.code(), "invalid_idempotency_key");
    assert_eq!(
        api.balance(&ta).await,
        "10.00",
        "no rejected request moved money"
    );
}

#[tokio::test]
async fn deposits_and_withdrawals_follow_the_sandbox_tokens() {
    let (_c, api) = cluster().await;
    let t = api.user("gina", "USD").await;
    let dep = |token: &'static str, key: &'static str| {
        let api = &api;
        let t = t.clone();
        async move {
            api.post(
                "/v1/deposit",
                Some(&t),
                Some(key),
                json!({"amount": "50.00", "currency": "USD", "payment_token": token}),
            )
            .await
        }
    };
    assert_eq!(dep("sandbox_ok", "d1").await.status, StatusCode::CREATED);
    let declined = dep("sandbox_declined", "d2").await;
    assert_eq!(
        (declined.status, declined.code()),
        (StatusCode::PAYMENT_REQUIRED, "payment_declined")
    );
    let timeout = dep("sandbox_timeout", "d3").await;
    assert_eq!(
        (timeout.status, timeout.code()),
        (StatusCode::GATEWAY_TIMEOUT, "payment_timeout")
    );
    assert_eq!(api.balance(&t).await, "50.00");
    let w = api
        .post(
            "/v1/withdrawal",
            Some(&t),
            Some("w1"),
            json!({"amount": "20.00", "currency": "USD", "payment_token": "sandbox_ok"}),
        )
        .await;
    assert_eq!(w.status, StatusCode::CREATED, "{:?}", w.body);
    assert_eq!(w.body["kind"], "withdrawal");
    let over = api
        .post(
            "/v1/withdrawal",
            Some(&t),
            Some("w2"),
            json!({"amount": "30.01", "currency": "USD", "payment_token": "sandbox_ok"}),
        )
        .await;
    assert_eq!(
        (over.status, over.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds")
    );
    let declined_w = api
        .post(
            "/v1/withdrawal",
            Some(&t),
            Some("w3"),
            json!({"amount": "1.00", "currency": "USD", "payment_token": "sandbox_declined"}),
        )
        .await;
    assert_eq!(declined_w.code(), "payment_declined");
    assert_eq!(api.balance(&t).await, "30.00");
}

#[tokio::test]
async fn account_history_is_newest_first_and_paginates() {
    let (c, api) = cluster().await;
    let (a, b) = pair(&c, "page", false);
    let ta = api.user(&a, "JPY").await;
    api.user(&b, "JPY").await;
    api.deposit(&ta, "1000", "JPY").await;
    for i in 1..=4 {
        let r = api
            .transfer(&ta, &format!("p{i}"), &b, &i.to_string(), "JPY")
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    let first = api.get("/v1/account?limit=2", Some(&ta)).await;
    assert_eq!(first.body["balance"], "990");
    let txs = first.body["transactions"].as_array().expect("array");
    assert_eq!(txs.len(), 2);
    assert_eq!(txs[0]["amount"], "-4");
    assert_eq!(txs[1]["amount"], "-3");
    let cursor = first.body["next_cursor"].as_str().expect("more pages");
    let second = api
        .get(&format!("/v1/account?limit=2&cursor={cursor}"), Some(&ta))
        .await;
    let txs = second.body["transactions"].as_array().expect("array");
    assert_eq!(
        txs.iter()
            .map(|t| t["amount"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["-2", "-1"]
    );
    let third = api
        .get(
            &format!(
                "/v1/account?limit=2&cursor={}",
                second.body["next_cursor"].as_str().expect("one more page")
            ),
            Some(&ta),
        )
        .await;
    assert_eq!(third.body["transactions"][0]["kind"], "deposit");
    assert!(third.body["next_cursor"].is_null());
    for bad in [
        "/v1/account?limit=0",
        "/v1/account?limit=500",
        "/v1/account?cursor=abc",
    ] {
        assert_eq!(
            api.get(bad, Some(&ta)).await.code(),
            "invalid_request",
            "{bad}"
        );
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_with_problem_json() {
    let (_c, api) = cluster().await;
    let r = api.get("/v2/nothing", None).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let m = api.send("DELETE", "/v1/transfer", None, None, None).await;
    assert_eq!(
        (m.status, m.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let big = api
        .post(
            "/v1/user",
            None,
            None,
            json!({"username": "x".repeat(100_000)}),
        )
        .await;
    assert_eq!(
        (big.status, big.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
}

#[tokio::test]
async fn health_readiness_openapi_and_admin_routes_answer() {
    let (c, api) = cluster().await;
    assert_eq!(api.get("/healthz", None).await.body["status"], "ok");
    let ready = api.get("/readyz", None).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.body["lock_mode"], "2pc");
    assert_eq!(ready.body["shards"].as_array().map(Vec::len), Some(4));
    let doc = api.get("/openapi.json", None).await.body;
    for route in [
        "/v1/user",
        "/v1/login",
        "/v1/logout",
        "/v1/account",
        "/v1/transfer",
        "/v1/transfer/{id}",
        "/v1/deposit",
        "/v1/withdrawal",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            doc["paths"][route].is_object(),
            "openapi.json lacks {route}"
        );
    }
    let codes = doc["components"]["schemas"]["ErrorCode"].to_string();
    for code in [
        "invalid_amount",
        "missing_idempotency_key",
        "recipient_not_found",
        "same_account",
        "currency_mismatch",
        "insufficient_funds",
        "idempotency_key_reused",
        "request_in_progress",
        "shard_unavailable",
        "unauthorized",
    ] {
        assert!(codes.contains(code), "ErrorCode schema lacks {code}");
    }
    assert_eq!(
        api.get("/v1/admin/in-doubt", None).await.code(),
        "unauthorized"
    );
    let admin = api
        .get(
            "/v1/admin/in-doubt",
            Some(c.config.admin_token.as_deref().expect("test admin token")),
        )
        .await;
    assert_eq!(admin.status, StatusCode::OK, "{:?}", admin.body);
    assert_eq!(admin.body["in_doubt"], 0);
}

#[tokio::test]
async fn an_unreachable_shard_gives_503_shard_unavailable_with_retry_after() {
    let mut config = TestCluster::provision(4, test_limits()).await;
    let dead_port = local_cluster::free_port().expect("port");
    config.shards[3].dsn = format!("host=127.0.0.1 port={dead_port} user=postgres dbname=gone");
    config.agent.connect_timeout_ms = 300;
    config.agent.call_timeout_ms = 1_000;
    config.agent.lock_timeout_ms = 500;
    let c = TestCluster::serve(config).await;
    let api = Api::new(&c);
    let routing = c.coordinator.cluster().routing();
    let on = |shard: u16| {
        (0..10_000)
            .map(|i| format!("down{i}"))
            .find(|n| routing.map.shard_of(&router::UserId::for_username(n)).0 == shard)
            .expect("a name on that shard")
    };
    let (alive, dead) = (on(0), on(3));
    let signup = api.sign_up(&dead, "USD").await;
    assert_eq!(
        (signup.status, signup.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "shard_unavailable")
    );
    assert_eq!(signup.headers["retry-after"], "1");
    assert!(signup.is_problem());
    let token = api.user(&alive, "USD").await;
    api.deposit(&token, "10", "USD").await;
    let t = api.transfer(&token, "to-dead", &dead, "1.00", "USD").await;
    assert_eq!(
        (t.status, t.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "shard_unavailable"),
        "{:?}",
        t.body
    );
    assert_eq!(t.headers["retry-after"], "1");
    assert_eq!(api.balance(&token).await, "10.00", "nothing moved");
    let ready = api.get("/readyz", None).await;
    assert_eq!(
        (ready.status, ready.body["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("degraded"))
    );
}

/// One order of refusals: a transfer that is unfunded and names nobody, or
/// names an account of another currency, gets the same answer same-shard or
/// cross-shard, in groups of many or of one (`batch_max` 1).
#[tokio::test]
async fn refusals_follow_one_precedence_on_every_path() {
    for (redis, batch_max) in [(false, 32), (false, 1), (true, 32), (true, 1)] {
        let limits = coordinator::config::Limits {
            batch_max,
            ..test_limits()
        };
        let cluster = if redis {
            TestCluster::start_redis(4, limits).await
        } else {
            TestCluster::start(4, limits).await
        };
        let api = Api::new(&cluster);
        for same_shard in [true, false] {
            let tag = format!(
                "prec{}{batch_max}{}",
                if redis { "r" } else { "" },
                if same_shard { "s" } else { "x" }
            );
            let path = format!("redis {redis}, batch_max {batch_max}, same shard {same_shard}");
            let (payer, ghost) = pair(&cluster, &tag, same_shard);
            let token = api.user(&payer, "USD").await;
            // Unfunded, to nobody: the recipient comes first.
            let r = api
                .transfer(&token, &format!("{tag}-1"), &ghost, "5.00", "USD")
                .await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::NOT_FOUND, "recipient_not_found"),
                "{path}: {:?}",
                r.body
            );
            // Unfunded, to an account in another currency: the currency next.
            api.user(&ghost, "EUR").await;
            let r = api
                .transfer(&token, &format!("{tag}-2"), &ghost, "5.00", "USD")
                .await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::UNPROCESSABLE_ENTITY, "currency_mismatch"),
                "{path}: {:?}",
                r.body
            );
            // The first key again, now with another body: the key outranks
            // every refusal, and nothing is stored for it.
            let r = api
                .transfer(&token, &format!("{tag}-1"), &ghost, "6.00", "USD")
                .await;
            assert_eq!(
                (r.status, r.code()),
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
                "{path}: {:?}",
                r.body
            );
            // A session that is not live outranks the key.
            let r = api
                .transfer(
                    &format!("{payer}~not-its-secret"),
                    &format!("{tag}-1"),
                    &ghost,
                    "5.00",
                    "USD",
                )
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}: {:?}", r.body);
        }
    }
}

/// A deposit waiting on its payment provider holds no lock on the account:
/// the owner's transfers go through while it waits.
#[tokio::test]
async fn a_deposit_waiting_on_its_provider_does_not_hold_the_account() {
    let limits = coordinator::config::Limits {
        payment_timeout_ms: 4_000,
        ..test_limits()
    };
    let cluster = TestCluster::start(4, limits).await;
    let api = Api::new(&cluster);
    for same_shard in [true, false] {
        let tag = if same_shard { "depo_s" } else { "depo_x" };
        let (payer, payee) = pair(&cluster, tag, same_shard);
        let token = api.user(&payer, "USD").await;
        api.user(&payee, "USD").await;
        api.deposit(&token, "10.00", "USD").await;
        let slow = tokio::spawn({
            let (http, url, token) = (
                api.http.clone(),
                format!("{}/v1/deposit", api.base),
                token.clone(),
            );
            async move {
                http.post(url)
                    .bearer_auth(token)
                    .header("idempotency-key", "never-answered")
                    .json(&json!({"amount": "5.00", "currency": "USD", "payment_token": "sandbox_timeout"}))
                    .send()
                    .await
                    .map(|r| r.status())
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        for i in 0..3 {
            let r = api
                .transfer(&token, &format!("{tag}-{i}"), &payee, "1.00", "USD")
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        }
        assert!(
            !slow.is_finished(),
            "the transfers went through while the deposit still waited on its provider"
        );
        let status = slow.await.expect("task").expect("answered");
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(api.balance(&token).await, "7.00");
    }
}

/// A withdrawal waiting on its payment provider holds its amount, not the
/// account's row: the owner's transfers go through meanwhile, but only with
/// the money the withdrawal does not hold; when the provider gives up, the hold
/// is released.
#[tokio::test]
async fn a_withdrawal_waiting_on_its_provider_holds_its_funds_not_the_account() {
    let limits = coordinator::config::Limits {
        payment_timeout_ms: 4_000,
        ..test_limits()
    };
    let cluster = TestCluster::start(4, limits).await;
    let api = Api::new(&cluster);
    for same_shard in [true, false] {
        let tag = if same_shard { "wdr_s" } else { "wdr_x" };
        let (payer, payee) = pair(&cluster, tag, same_shard);
        let token = api.user(&payer, "USD").await;
        api.user(&payee, "USD").await;
        api.deposit(&token, "10.00", "USD").await;
        let slow = tokio::spawn({
            let (http, url, token) = (
                api.http.clone(),
                format!("{}/v1/withdrawal", api.base),
                token.clone(),
            );
            async move {
                http.post(url)
                    .bearer_auth(token)
                    .header("idempotency-key", "never-paid-out")
                    .json(&json!({"amount": "6.00", "currency": "USD", "payment_token": "sandbox_timeout"}))
                    .send()
                    .await
                    .map(|r| r.status())
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        for i in 0..3 {
            let r = api
                .transfer(&token, &format!("{tag}-{i}"), &payee, "1.00", "USD")
                .await;
            assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        }
        // 10.00 - 6.00 held - 3.00 sent: 1.00 is all that may still move.
        let r = api
            .transfer(&token, &format!("{tag}-over"), &payee, "2.00", "USD")
            .await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds"),
            "the held amount is not spendable: {:?}",
            r.body
        );
        assert!(
            !slow.is_finished(),
            "the transfers ran while the withdrawal still waited on its provider"
        );
        let status = slow.await.expect("task").expect("answered");
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(api.balance(&token).await, "7.00", "nothing was paid out");
        // The hold is released: all 7.00 may move again.
        let r = api
            .transfer(&token, &format!("{tag}-after"), &payee, "7.00", "USD")
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
}
