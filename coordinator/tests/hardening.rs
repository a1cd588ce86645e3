//! The API as an attacker meets it: rate limits, bounded password work, slow and
//! idle connections, errors that are always problem+json, the payment provider
//! chosen by configuration, metrics and graceful shutdown. Real PostgreSQL.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use common::{pair, Api, PASSWORD};
use coordinator::config::{Config, RateLimits};
use coordinator::payments::{HttpProviderConfig, ProviderConfig};
use reqwest::StatusCode;
use serde_json::json;
use testkit::{test_limits, TestCluster};
use tokio::io::AsyncWriteExt;

async fn cluster_with(edit: impl FnOnce(&mut Config)) -> (TestCluster, Api) {
    let mut config = TestCluster::provision(2, test_limits()).await;
    edit(&mut config);
    let cluster = TestCluster::serve(config).await;
    let api = Api::new(&cluster);
    (cluster, api)
}

fn retry_after(r: &common::Reply) -> u64 {
    r.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", r.headers))
}

#[tokio::test]
async fn login_attempts_are_limited_per_username_whether_or_not_it_exists() {
    let (_c, api) = cluster_with(|c| {
        c.rate_limits = RateLimits {
            login_per_username_per_minute: 5,
            login_per_username_burst: 5,
            ..RateLimits::off()
        }
    })
    .await;
    api.user("victim", "USD").await; // one login: one attempt spent
    for name in ["victim", "nobody_at_all"] {
        let wrong = json!({"username": name, "password": "not the password"});
        let allowed = if name == "victim" { 4 } else { 5 };
        for i in 0..allowed {
            let r = api.post("/v1/login", None, None, wrong.clone()).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{name} attempt {i}");
        }
        let r = api.post("/v1/login", None, None, wrong).await;
        assert_eq!(
            r.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{name}: {:?}",
            r.body
        );
        assert!(r.is_problem());
        assert_eq!(r.code(), "rate_limited");
        assert!(retry_after(&r) >= 1);
    }
    // The right password is refused too while the limit holds: guessing stops.
    let right = json!({"username": "victim", "password": PASSWORD});
    let r = api.post("/v1/login", None, None, right).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // Another username is not affected.
    api.user("bystander", "USD").await;
}

#[tokio::test]
async fn sign_up_and_login_are_limited_per_client_address_from_a_trusted_header() {
    let (_c, api) = cluster_with(|c| {
        c.rate_limits = RateLimits {
            auth_per_address_per_minute: 3,
            auth_per_address_burst: 3,
            ..RateLimits::off()
        };
        c.http.trusted_client_ip_header = Some("X-Forwarded-For".into());
    })
    .await;
    let sign_up = |name: &str, from: &str| {
        api.http
            .post(format!("{}/v1/user", api.base))
            .header("x-forwarded-for", format!("198.51.100.7, {from}"))
            .json(&json!({"username": name, "email": format!("{name}@example.com"), "password": PASSWORD, "currency": "USD"}))
            .send()
    };
    for i in 0..3 {
        let r = sign_up(&format!("addr_a{i}"), "203.0.113.1")
            .await
            .expect("reaches");
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = sign_up("addr_a3", "203.0.113.1").await.expect("reaches");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    // The proxy's last entry is the client; a forged first entry changes nothing,
    // and another client is not limited.
    let r = sign_up("addr_b0", "203.0.113.2").await.expect("reaches");
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn money_routes_are_limited_per_user() {
    let (c, api) = cluster_with(|c| {
        c.rate_limits = RateLimits {
            money_per_user_per_second: 1,
            money_per_user_burst: 3,
            ..RateLimits::off()
        }
    })
    .await;
    let (a, b) = pair(&c, "rl", false);
    let ta = api.user(&a, "USD").await;
    let tb = api.user(&b, "USD").await;
    for _ in 0..3 {
        assert_eq!(
            api.get("/v1/account", Some(&ta)).await.status,
            StatusCode::OK
        );
    }
    let r = api.transfer(&ta, "rl-1", &b, "1.00", "USD").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert_eq!(r.code(), "rate_limited");
    // Refused before anything ran: the key is still free.
    assert_eq!(
        api.get("/v1/account", Some(&tb)).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(retry_after(&r) * 1000)).await;
    let r = api.transfer(&ta, "rl-1", &b, "1.00", "USD").await;
    assert_eq!(r.code(), "insufficient_funds", "{:?}", r.body);
}

#[tokio::test]
async fn password_work_beyond_its_bound_gets_503_at_once() {
    let (_c, api) = cluster_with(|c| {
        c.limits.password_workers = 1;
        c.limits.password_queue_max = 2;
        c.limits.argon2_memory_kib = 8 * 1024;
        c.limits.argon2_iterations = 3;
    })
    .await;
    let logins = (0..30).map(|i| {
        api.post(
            "/v1/login",
            None,
            None,
            json!({"username": format!("ghost{i}"), "password": "whatever1"}),
        )
    });
    let replies = futures::future::join_all(logins).await;
    let busy: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert!(
        busy.len() >= 20,
        "30 logins, 1 worker, 2 waiting: {} refused",
        busy.len()
    );
    for r in &busy {
        assert_eq!(r.code(), "overloaded");
        assert!(r.is_problem() && r.headers.contains_key("retry-after"));
    }
    assert!(replies
        .iter()
        .all(|r| [StatusCode::SERVICE_UNAVAILABLE, StatusCode::UNAUTHORIZED].contains(&r.status)));
}

#[tokio::test]
async fn every_error_is_problem_json() {
    let (_c, api) = cluster_with(|_| {}).await;
    let token = api.user("probjson", "USD").await;
    let raw = |method: reqwest::Method, path: &str| {
        api.http
            .request(method, format!("{}{path}", api.base))
            .bearer_auth(&token)
    };
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            raw(reqwest::Method::GET, "/v1/account?limit=abc"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            raw(
                reqwest::Method::GET,
                "/v1/account?limit=99999999999999999999999",
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            raw(reqwest::Method::GET, "/v1/transfer/%FF%FE"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            raw(reqwest::Method::GET, "/no/such/route"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            raw(reqwest::Method::DELETE, "/v1/transfer"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            raw(reqwest::Method::POST, "/v1/transfer")
                .header("idempotency-key", "k1")
                .body(r#"{"to":"x","amount":"1","currency":"USD"}"#),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            raw(reqwest::Method::POST, "/v1/transfer")
                .header("idempotency-key", "k2")
                .header("content-type", "application/json")
                .body(vec![b' '; 64 * 1024]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (req, status, code) in cases {
        let r = req.send().await.expect("reaches the server");
        let got = r.status();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body: serde_json::Value = r.json().await.expect("a JSON body");
        assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
        assert_eq!(ct, "application/problem+json", "{code}");
        assert_eq!(body["status"], status.as_u16());
    }
}

#[tokio::test]
async fn idle_and_slow_connections_do_not_delay_a_transfer() {
    let (c, api) = cluster_with(|_| {}).await;
    let (a, b) = pair(&c, "slowloris", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    api.deposit(&ta, "10.00", "USD").await;
    // 250 connections that send nothing, 250 that send a transfer's headers with
    // a forged token and then trickle nothing of the body they announced.
    let mut held = Vec::new();
    for i in 0..500 {
        let mut s = tokio::net::TcpStream::connect(c.addr)
            .await
            .expect("connect");
        if i % 2 == 1 {
            let head = format!(
                "POST /v1/transfer HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {a}~forged{i}\r\n\
                 idempotency-key: slow-{i}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
            );
            s.write_all(head.as_bytes()).await.expect("write headers");
        }
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let r = api
        .transfer(&ta, "through-the-crowd", &b, "1.00", "USD")
        .await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    println!("transfer beside 500 idle/slow connections: {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    drop(held);
}

#[tokio::test]
async fn metrics_count_requests_transfers_and_groups() {
    let (c, api) = cluster_with(|_| {}).await;
    let (a, b) = pair(&c, "metrics", false);
    let ta = api.user(&a, "USD").await;
    api.user(&b, "USD").await;
    api.deposit(&ta, "10.00", "USD").await;
    let scrape = || async {
        let r = api
            .http
            .get(format!("{}/metrics", api.base))
            .send()
            .await
            .expect("scrape");
        assert_eq!(r.status(), StatusCode::OK);
        r.text().await.expect("text")
    };
    let sum = |text: &str, prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = scrape().await;
    for i in 0..3 {
        let r = api
            .transfer(&ta, &format!("m-{i}"), &b, "1.00", "USD")
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let after = scrape().await;
    let moved = |prefix: &str| sum(&after, prefix) - sum(&before, prefix);
    assert!(
        moved("wallet_http_requests_total{route=\"/v1/transfer\"") >= 3.0,
        "{after}"
    );
    assert!(
        moved("wallet_transfers_total{path=\"2pc\",outcome=\"committed\"}") >= 3.0,
        "{after}"
    );
    assert!(moved("wallet_batch_group_size_count") >= 1.0, "{after}");
    assert!(
        moved("wallet_transfer_duration_seconds_count") >= 3.0,
        "{after}"
    );
    for series in [
        "wallet_in_doubt{",
        "wallet_pool_connections{",
        "wallet_recovery_actions_total{",
        "wallet_http_request_duration_seconds_bucket{",
    ] {
        assert!(after.contains(series), "{series} missing from:\n{after}");
    }
}

/// A Stripe-compatible provider as seen from the wire: records what it is sent
/// and answers by the payment method.
#[derive(Clone, Default)]
struct Psp {
    seen: Arc<Mutex<Vec<Call>>>,
}

/// Path, Authorization, Idempotency-Key, form body.
type Call = (String, String, String, String);

async fn psp_handler(
    State(psp): State<Psp>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: String,
) -> (axum::http::StatusCode, String) {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    psp.seen.lock().expect("not poisoned").push((
        uri.path().to_owned(),
        header("authorization"),
        header("idempotency-key"),
        body.clone(),
    ));
    if body.contains("payment_method=pm_card_ok") || body.contains("destination=ba_ok") {
        let status = if uri.path() == "/v1/payouts" {
            "paid"
        } else {
            "succeeded"
        };
        (
            axum::http::StatusCode::OK,
            format!(r#"{{"status":"{status}"}}"#),
        )
    } else {
        (
            axum::http::StatusCode::PAYMENT_REQUIRED,
            r#"{"error":{"code":"card_declined"}}"#.to_owned(),
        )
    }
}

#[tokio::test]
async fn an_http_payment_provider_is_chosen_by_configuration() {
    let psp = Psp::default();
    let app = axum::Router::new()
        .route("/v1/payment_intents", post(psp_handler))
        .route("/v1/payouts", post(psp_handler))
        .with_state(psp.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let psp_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut config = TestCluster::provision(2, test_limits()).await;
    config.payment_provider = Some(ProviderConfig::Http(HttpProviderConfig {
        base_url: format!("http://{psp_addr}/"),
        api_key: "sk_test_123".into(),
        webhook_secret: None,
    }));
    let provider = config
        .payment_provider
        .as_ref()
        .expect("set above")
        .build()
        .expect("valid provider");
    let cluster = TestCluster::serve_provider(config, provider).await;
    let api = Api::new(&cluster);
    let token = api.user("psp_user", "USD").await;
    let deposit = |amount: &'static str, pm: &'static str, key: &'static str| {
        api.post(
            "/v1/deposit",
            Some(&token),
            Some(key),
            json!({"amount": amount, "currency": "USD", "payment_token": pm}),
        )
    };
    let r = deposit("12.34", "pm_card_ok", "d1").await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let tid = r.body["transfer_id"]
        .as_str()
        .expect("transfer id")
        .to_owned();
    assert_eq!(api.balance(&token).await, "12.34");
    let r = deposit("5.00", "pm_card_declined", "d2").await;
    assert_eq!(r.code(), "payment_declined", "{:?}", r.body);
    // Withdrawals go out as payouts.
    let r = api
        .post(
            "/v1/withdrawal",
            Some(&token),
            Some("w1"),
            json!({"amount": "2.00", "currency": "USD", "payment_token": "ba_ok"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(api.balance(&token).await, "10.34");
    // The sandbox's tokens mean nothing to a real provider.
    let r = deposit("100.00", "sandbox_ok", "d3").await;
    assert_eq!(r.code(), "payment_declined");

    let seen = psp.seen.lock().expect("not poisoned").clone();
    let (path, auth, key, body) = &seen[0];
    assert_eq!(path, "/v1/payment_intents");
    assert_eq!(auth, "Bearer sk_test_123");
    assert_eq!(key, &tid, "the transfer ID is the idempotency key");
    assert!(
        body.contains("amount=1234") && body.contains("currency=usd"),
        "{body}"
    );
    assert_eq!(seen[2].0, "/v1/payouts");
    assert!(seen[2].3.contains("amount=200"), "{}", seen[2].3);
}

#[tokio::test]
async fn serve_refuses_to_start_without_a_payment_provider() {
    let mut config = TestCluster::provision(1, test_limits()).await;
    config.payment_provider = None;
    let err = coordinator::serve::serve(&config, || {}, std::future::ready(()))
        .await
        .expect_err("no provider, no server");
    assert!(err.to_string().contains("payment_provider"), "{err}");
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let config = TestCluster::provision(2, test_limits()).await;
    let coordinator = Arc::new(
        coordinator::service::Coordinator::start(
            &config,
            Arc::new(coordinator::payments::Sandbox::default()),
        )
        .await
        .expect("start"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let config = config.clone();
        async move {
            coordinator::serve::serve_coordinator(listener, coordinator, &config, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let r = http
        .post(format!("{base}/v1/user"))
        .json(&json!({"username": "drain", "email": "d@example.com", "password": PASSWORD, "currency": "USD"}))
        .send()
        .await
        .expect("sign up");
    assert_eq!(r.status(), StatusCode::CREATED);
    let token: serde_json::Value = http
        .post(format!("{base}/v1/login"))
        .json(&json!({"username": "drain", "password": PASSWORD}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = token["token"].as_str().expect("token").to_owned();
    // A deposit whose provider never answers runs for payment_timeout_ms (300 ms
    // in the test limits); shutdown starts while it is in flight.
    let slow = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.post(format!("{base}/v1/deposit"))
                .bearer_auth(token)
                .header("idempotency-key", "drain-1")
                .json(&json!({"amount": "1.00", "currency": "USD", "payment_token": "sandbox_timeout"}))
                .send()
                .await
                .map(|r| r.status())
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = stop.send(());
    let status = slow
        .await
        .expect("task")
        .expect("the in-flight request got its answer");
    assert_eq!(
        status,
        StatusCode::GATEWAY_TIMEOUT,
        "the provider's timeout, not a cut connection"
    );
    server.await.expect("task").expect("served and drained");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
}

/// A provider whose first call for a reference is slow and approves, and whose
/// concurrent second call for it answers at once that it is busy (as a PSP
/// answers 409 to a request whose key is still being processed): the timeout
/// verdict.
#[derive(Default)]
struct SlowThenBusy {
    calls: Mutex<Vec<shard_agent::TransferId>>,
}

impl coordinator::payments::PaymentProvider for SlowThenBusy {
    fn name(&self) -> &'static str {
        "slow-then-busy"
    }

    fn execute(
        &self,
        _direction: shard_agent::external::Direction,
        _token: &str,
        _amount: shard_agent::Amount,
        reference: shard_agent::TransferId,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = shard_agent::external::ProviderVerdict> + Send + '_>,
    > {
        let first = {
            let mut calls = self.calls.lock().expect("not poisoned");
            let first = !calls.contains(&reference);
            calls.push(reference);
            first
        };
        Box::pin(async move {
            if first {
                tokio::time::sleep(Duration::from_millis(4_500)).await;
                shard_agent::external::ProviderVerdict::Approved
            } else {
                shard_agent::external::ProviderVerdict::TimedOut
            }
        })
    }
}

#[tokio::test]
async fn recovery_leaves_a_deposit_alone_while_its_request_waits_on_the_provider() {
    // Recovery looks at deposits older than 3 s (test limits); this one's
    // provider takes 4.5 s. Without the settle lease recovery asked the provider
    // too, got "busy", aborted the deposit, and the approval that followed was
    // lost: the user charged, the wallet not credited.
    let limits = coordinator::config::Limits {
        payment_timeout_ms: 8_000,
        ..test_limits()
    };
    let config = TestCluster::provision(2, limits).await;
    let provider = Arc::new(SlowThenBusy::default());
    let cluster = TestCluster::serve_provider(config, provider.clone()).await;
    let api = Api::new(&cluster);
    let token = api.user("leased", "USD").await;
    let r = api
        .post(
            "/v1/deposit",
            Some(&token),
            Some("lease-1"),
            json!({"amount": "25.00", "currency": "USD", "payment_token": "tok"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(api.balance(&token).await, "25.00");
    assert_eq!(
        provider.calls.lock().expect("not poisoned").len(),
        1,
        "only the request asked the provider"
    );
}
