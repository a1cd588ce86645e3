//! `wallet dev --events nats` end to end: it starts its own nats-server with
//! JetStream, writes its URL into cluster.json, and the relay publishes every
//! movement's event there; the notification feed reads the same events.

mod common;

use std::time::Duration;

use common::{free_port, start_dev};
use serde_json::{json, Value};

async fn post(
    http: &reqwest::Client,
    url: String,
    token: Option<&str>,
    key: Option<&str>,
    body: Value,
) -> Value {
    let mut req = http.post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let resp = req.send().await.expect("wallet dev answers");
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_dev_with_nats_publishes_every_event() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let port = free_port();
    let _dev = tokio::task::block_in_place(|| start_dev(&dir, port, &["--events", "nats"]));
    let description: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("cluster.json")).expect("cluster.json"),
    )
    .expect("cluster.json is JSON");
    assert_eq!(description["events"]["mode"], "nats");
    let nats_url = description["events"]["url"]
        .as_str()
        .expect("wallet dev writes the broker's URL")
        .to_owned();

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut tokens = Vec::new();
    for name in ["alice", "bob"] {
        post(&http, format!("{base}/v1/user"), None, None, json!({"username": name, "email": format!("{name}@example.com"), "password": "correct horse battery", "currency": "USD"})).await;
        let login = post(
            &http,
            format!("{base}/v1/login"),
            None,
            None,
            json!({"username": name, "password": "correct horse battery"}),
        )
        .await;
        tokens.push(login["token"].as_str().expect("token").to_owned());
    }
    post(
        &http,
        format!("{base}/v1/deposit"),
        Some(&tokens[0]),
        Some("d1"),
        json!({"amount": "100.00", "currency": "USD", "payment_token": "sandbox_ok"}),
    )
    .await;
    post(
        &http,
        format!("{base}/v1/transfer"),
        Some(&tokens[0]),
        Some("t1"),
        json!({"to": "bob", "amount": "12.50", "currency": "USD"}),
    )
    .await;

    let feed: Value = http
        .get(format!("{base}/v1/notifications"))
        .bearer_auth(&tokens[1])
        .send()
        .await
        .expect("feed")
        .json()
        .await
        .expect("json");
    assert_eq!(
        feed["notifications"][0]["message"],
        "you received 12.50 from alice"
    );
    assert_eq!(feed["next_cursor"], 1);

    // Three events (alice's deposit and debit, bob's credit) reach the stream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stream =
            checker::events::read_stream(&nats_url, "WALLET_EVENTS", Duration::from_secs(5))
                .await
                .unwrap_or_default();
        if stream.len() == 3 {
            let mut kinds: Vec<&str> = stream.iter().map(|e| e.kind.as_str()).collect();
            kinds.sort();
            assert_eq!(kinds, ["deposit", "transfer_credit", "transfer_debit"]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} events in the stream",
            stream.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready: Value = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["events"]["mode"], "nats");
    assert_eq!(ready["events"]["broker_ok"], true);
}
