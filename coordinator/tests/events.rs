//! Events against real shards and a real nats-server: the outbox row every
//! movement writes with its money, the notification feed, and the relay's
//! delivery to JetStream through a broker restart and a broker down for a
//! minute. (A relay killed between publish and mark is a crash point of the
//! chaos harness: `chaos-tests/tests/crash_points.rs`.)

mod common;

use std::time::Duration;

use checker::events::{delivery_violations, outboxes, read_stream, wait_published};
use checker::Snapshot;
use common::{cluster_with, key, pair, Api, Reply, ADMIN};
use coordinator::events::{EventsConfig, EventsMode};
use local_cluster::NatsServer;
use reqwest::StatusCode;
use serde_json::{json, Value};
use testkit::{test_limits, TestCluster};

async fn notifications(api: &Api, token: &str, query: &str) -> Reply {
    api.get(&format!("/v1/notifications{query}"), Some(token))
        .await
}

/// Every notification of a user, paged 2 at a time through `next_cursor`.
async fn all_notifications(api: &Api, token: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let r = notifications(api, token, &format!("?limit=2&after={after}")).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        let page = r.body["notifications"].as_array().expect("a list").clone();
        match r.body["next_cursor"].as_i64() {
            None => {
                assert!(page.is_empty(), "a page with notifications has a cursor");
                return all;
            }
            Some(cursor) => {
                assert_eq!(Some(cursor), page.last().and_then(|n| n["seq"].as_i64()));
                after = cursor;
                all.extend(page);
            }
        }
    }
}

fn summary(list: &[Value]) -> Vec<(i64, String, String)> {
    list.iter()
        .map(|n| {
            (
                n["seq"].as_i64().expect("seq"),
                n["type"].as_str().expect("type").to_owned(),
                n["amount"].as_str().expect("amount").to_owned(),
            )
        })
        .collect()
}

async fn checker_clean(cluster: &TestCluster) {
    let snap = Snapshot::take(&cluster.agents()).await.expect("snapshot");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}

/// Every movement writes its user's event with the money, numbered without
/// gaps; refused work writes none; the feed reads them in order with a
/// sentence each. Same-shard and cross-shard, both lock modes.
#[tokio::test]
async fn every_movement_has_its_event_and_refused_work_has_none() {
    let rules = r#"{"fraud_rules": [
        {"name": "large", "rule": "amount", "over": {"USD": "50.00"}, "action": "review"}
    ]}"#;
    for redis in [false, true] {
        let (c, api) = cluster_with(rules, redis).await;
        let prefix = format!("ev{}", u8::from(redis));
        let (a, b) = pair(&c, &prefix, true);
        let (_, far) = pair(&c, &prefix, false);
        let ta = api.user(&a, "USD").await;
        let tb = api.user(&b, "USD").await;
        let tf = api.user(&far, "USD").await;
        api.deposit(&ta, "100.00", "USD").await;
        let local = api.transfer(&ta, &key(), &b, "10.00", "USD").await;
        assert_eq!(local.status, StatusCode::CREATED, "{:?}", local.body);
        let cross = api.transfer(&ta, &key(), &far, "12.50", "USD").await;
        assert_eq!(cross.status, StatusCode::CREATED, "{:?}", cross.body);
        let cross_id = cross.body["transfer_id"].as_str().expect("id").to_owned();
        // Refused: no event, and no number used up.
        let poor = api.transfer(&tb, &key(), &far, "11.00", "USD").await;
        assert_eq!(poor.code(), "insufficient_funds", "{:?}", poor.body);
        // Held for review, then rejected: a hold and its release.
        let held = api.transfer(&ta, &key(), &b, "60.00", "USD").await;
        assert_eq!(held.status, StatusCode::ACCEPTED, "{:?}", held.body);
        let held_id = held.body["transfer_id"].as_str().expect("id").to_owned();
        let rejected = api
            .post(
                &format!("/v1/admin/transfers/{held_id}/reject"),
                Some(ADMIN),
                None,
                json!({}),
            )
            .await;
        assert_eq!(rejected.status, StatusCode::OK, "{:?}", rejected.body);
        // A refund by the payee of the cross-shard transfer.
        let refund = api
            .post(
                "/v1/refunds",
                Some(&tf),
                Some(&key()),
                json!({"transfer_id": cross_id, "amount": "2.50"}),
            )
            .await;
        assert_eq!(refund.status, StatusCode::CREATED, "{:?}", refund.body);

        let mine = all_notifications(&api, &ta).await;
        assert_eq!(
            summary(&mine),
            vec![
                (1, "deposit".into(), "100.00".into()),
                (2, "transfer_debit".into(), "-10.00".into()),
                (3, "transfer_debit".into(), "-12.50".into()),
                (4, "review_hold".into(), "-60.00".into()),
                (5, "review_release".into(), "60.00".into()),
                (6, "refund_credit".into(), "2.50".into()),
            ]
        );
        assert_eq!(mine[1]["message"], format!("you sent 10.00 to {b}"));
        assert_eq!(mine[3]["transfer_id"].as_str(), Some(held_id.as_str()));
        assert_eq!(mine[2]["balance_after"], "77.50");
        let theirs = all_notifications(&api, &tf).await;
        assert_eq!(
            summary(&theirs),
            vec![
                (1, "transfer_credit".into(), "12.50".into()),
                (2, "refund_debit".into(), "-2.50".into()),
            ]
        );
        assert_eq!(theirs[0]["message"], format!("you received 12.50 from {a}"));
        assert_eq!(theirs[0]["transfer_id"].as_str(), Some(cross_id.as_str()));
        let b_list = all_notifications(&api, &tb).await;
        assert_eq!(
            summary(&b_list),
            vec![(1, "transfer_credit".into(), "10.00".into())]
        );
        // One page after a cursor.
        let page = notifications(&api, &ta, "?after=4&limit=1").await;
        assert_eq!(page.status, StatusCode::OK);
        assert_eq!(
            summary(page.body["notifications"].as_array().expect("list")),
            vec![(5, "review_release".into(), "60.00".into())]
        );
        assert_eq!(page.body["next_cursor"], 5);
        // Invariant 9 (one event per entry, gapless) with the rest.
        checker_clean(&c).await;
        // Pruned past the retention (here: everything is past it): each
        // user keeps their newest event, so the numbers still end at the
        // account's, and the outbox (no broker here) is emptied first.
        for agent in c.agents() {
            agent
                .prune_events(Duration::ZERO, true, 10_000)
                .await
                .expect("prune");
            assert_eq!(agent.outbox_lag().await.expect("lag").unpublished, 0);
        }
        let kept = all_notifications(&api, &ta).await;
        assert_eq!(
            summary(&kept),
            vec![(6, "refund_credit".into(), "2.50".into())]
        );
        checker_clean(&c).await;
    }
}

/// Bad paging parameters are 400 problem+json; no session is 401.
#[tokio::test]
async fn bad_notification_queries_are_refused_with_problems() {
    let (_c, api) = cluster_with("{}", false).await;
    let t = api.user("evbad_a", "USD").await;
    for query in [
        "?limit=0",
        "?limit=201",
        "?after=-1",
        "?limit=abc",
        "?after=1.5",
    ] {
        let r = notifications(&api, &t, query).await;
        assert_eq!(
            (r.status, r.code(), r.is_problem()),
            (StatusCode::BAD_REQUEST, "invalid_request", true),
            "{query}: {:?}",
            r.body
        );
    }
    let r = api.get("/v1/notifications", None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let empty = notifications(&api, &t, "").await;
    assert_eq!(
        empty.body,
        json!({"notifications": [], "next_cursor": null})
    );
}

/// A cluster whose relay publishes to `nats`.
async fn cluster_with_nats(nats: &NatsServer, shards: usize) -> (TestCluster, Api) {
    cluster_with_nats_timeout(nats, shards, 1_000).await
}

/// The same, with the relay's rounds bounded by `publish_timeout_ms`.
async fn cluster_with_nats_timeout(
    nats: &NatsServer,
    shards: usize,
    publish_timeout_ms: u64,
) -> (TestCluster, Api) {
    testkit::init_tracing();
    let mut config = TestCluster::provision(shards, test_limits()).await;
    config.events = EventsConfig {
        mode: EventsMode::Nats,
        url: Some(nats.url()),
        lease_ms: (2 * publish_timeout_ms).max(2_000),
        publish_timeout_ms,
        ..EventsConfig::default()
    };
    let cluster = TestCluster::serve(config).await;
    let api = Api::new(&cluster);
    (cluster, api)
}

/// Transfers from `from` to each of `to`, each of which must commit.
async fn pay_each(api: &Api, from: &str, to: &[String], amount: &str) {
    for name in to {
        let r = api.transfer(from, &key(), name, amount, "USD").await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
}

async fn readyz(api: &Api) -> Value {
    let r = api.get("/readyz", None).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "lag never makes the API unready: {:?}",
        r.body
    );
    r.body["events"].clone()
}

/// `/readyz`'s events object once it shows `unpublished` events, the oldest
/// at least `min_age_s` old (the lag is read once a second), or as it stands
/// after ten seconds.
async fn lag_reaches(api: &Api, unpublished: usize, min_age_s: f64) -> Value {
    lag_reaches_within(api, unpublished, min_age_s, Duration::from_secs(10)).await
}

async fn lag_reaches_within(
    api: &Api,
    unpublished: usize,
    min_age_s: f64,
    within: Duration,
) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let lag = readyz(api).await;
        let reached = lag["unpublished"] == unpublished
            && lag["oldest_unpublished_s"].as_f64().unwrap_or(0.0) >= min_age_s;
        if reached || std::time::Instant::now() > deadline {
            return lag;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every outbox event is in the stream exactly once, and nothing else is.
async fn stream_matches_outboxes(cluster: &TestCluster, nats: &NatsServer) -> usize {
    let agents = cluster.agents();
    wait_published(&agents, Duration::from_secs(30))
        .await
        .expect("the relay catches up");
    let outbox = outboxes(&agents).await.expect("outboxes");
    let stream = read_stream(&nats.url(), "WALLET_EVENTS", Duration::from_secs(30))
        .await
        .expect("read the stream");
    assert_eq!(delivery_violations(&stream, &outbox), Vec::<String>::new());
    assert_eq!(stream.len(), outbox.len());
    for e in &stream {
        assert!(
            e.subject
                .starts_with(&format!("wallet.events.{}.shard", e.kind)),
            "{}",
            e.subject
        );
    }
    stream.len()
}

/// The relay publishes every event once, through a broker restart: while
/// the broker is down transfers keep committing, the events wait in the
/// outbox and `/readyz` shows them; after it, the relay catches up.
#[tokio::test]
async fn the_relay_delivers_every_event_once_across_a_broker_restart() {
    let store = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsServer::start(0, store.path()).expect("start nats-server");
    let (c, api) = cluster_with_nats(&nats, 2).await;
    let payer = api.user("evrs_payer", "USD").await;
    api.deposit(&payer, "1000.00", "USD").await;
    let payees: Vec<String> = (0..6).map(|i| format!("evrs_payee{i}")).collect();
    for p in &payees {
        api.user(p, "USD").await;
    }
    pay_each(&api, &payer, &payees, "1.00").await;
    let first = stream_matches_outboxes(&c, &nats).await;
    assert_eq!(first, 1 + 2 * payees.len());
    assert_eq!(readyz(&api).await["broker_ok"], true);

    nats.kill9();
    pay_each(&api, &payer, &payees, "2.00").await;
    // Refused while the broker is down: it must never reach the stream.
    let poor = api.user("evrs_poor", "USD").await;
    let refused = api.transfer(&poor, &key(), &payees[0], "5.00", "USD").await;
    assert_eq!(refused.code(), "insufficient_funds", "{:?}", refused.body);
    let refused_id: uuid::Uuid = refused.body["transfer_id"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("a refused transfer's answer names it");
    let lag = lag_reaches(&api, 2 * payees.len(), 1.0).await;
    assert_eq!(lag["broker_ok"], false, "{lag}");
    assert_eq!(lag["unpublished"], 2 * payees.len(), "{lag}");
    assert!(
        lag["oldest_unpublished_s"].as_f64().unwrap_or(0.0) >= 1.0,
        "{lag}"
    );

    nats.restart().expect("restart nats-server");
    let total = stream_matches_outboxes(&c, &nats).await;
    assert_eq!(total, first + 2 * payees.len());
    let stream = read_stream(&nats.url(), "WALLET_EVENTS", Duration::from_secs(10))
        .await
        .expect("read the stream");
    assert_eq!(
        checker::events::history_violations(&stream, &[], &[refused_id]),
        Vec::<String>::new()
    );
    assert!(stream.iter().all(|e| e.transfer_id != refused_id));
    assert_eq!(lag_reaches(&api, 0, 0.0).await["unpublished"], 0);
    checker_clean(&c).await;
}

/// A frozen broker (SIGSTOP: publishes hang until their deadline instead of
/// failing) holds each relay round for its whole `publish_timeout_ms`, here
/// 10 s. `/readyz` still shows the events waiting within a few seconds,
/// because the lag is read on its own clock, not between rounds.
#[tokio::test]
async fn the_lag_stays_fresh_while_a_frozen_broker_holds_the_relay() {
    let store = tempfile::tempdir().expect("tempdir");
    let nats = NatsServer::start(0, store.path()).expect("start nats-server");
    let (c, api) = cluster_with_nats_timeout(&nats, 2, 10_000).await;
    let payer = api.user("evfz_payer", "USD").await;
    api.deposit(&payer, "100.00", "USD").await;
    let payees: Vec<String> = (0..4).map(|i| format!("evfz_payee{i}")).collect();
    for p in &payees {
        api.user(p, "USD").await;
    }
    let first = stream_matches_outboxes(&c, &nats).await;
    assert_eq!(lag_reaches(&api, 0, 0.0).await["unpublished"], 0);

    nats.pause().expect("SIGSTOP nats-server");
    // The first transfer's events start rounds that hang on the broker.
    pay_each(&api, &payer, &payees[..1], "1.00").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    pay_each(&api, &payer, &payees[1..], "1.00").await;
    let lag = lag_reaches_within(&api, 2 * payees.len(), 0.0, Duration::from_secs(3)).await;
    assert_eq!(
        lag["unpublished"],
        2 * payees.len(),
        "the lag must not wait for the hung round: {lag}"
    );

    nats.resume().expect("SIGCONT nats-server");
    let total = stream_matches_outboxes(&c, &nats).await;
    assert_eq!(total, first + 2 * payees.len());
    assert_eq!(lag_reaches(&api, 0, 0.0).await["unpublished"], 0);
    checker_clean(&c).await;
}

/// A broker down for a minute: a transfer every few seconds still commits,
/// the lag grows in `/readyz` and `/metrics`, and once the broker is back
/// every event reaches the stream once, numbered without gaps.
#[tokio::test]
async fn a_broker_down_for_a_minute_delays_events_and_nothing_else() {
    let store = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsServer::start(0, store.path()).expect("start nats-server");
    let (c, api) = cluster_with_nats(&nats, 2).await;
    let payer = api.user("evdown_payer", "USD").await;
    api.deposit(&payer, "1000.00", "USD").await;
    let payees: Vec<String> = (0..3).map(|i| format!("evdown_payee{i}")).collect();
    for p in &payees {
        api.user(p, "USD").await;
    }
    let before = stream_matches_outboxes(&c, &nats).await;

    nats.kill9();
    let down = std::time::Instant::now();
    let mut paid = 0;
    while down.elapsed() < Duration::from_secs(60) {
        let started = std::time::Instant::now();
        pay_each(&api, &payer, &payees, "0.50").await;
        paid += payees.len();
        // Each round is as fast as without a broker.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "transfers waited on the broker"
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let lag = lag_reaches(&api, 2 * paid, 55.0).await;
    assert_eq!(lag["unpublished"], 2 * paid, "{lag}");
    assert!(
        lag["oldest_unpublished_s"].as_f64().unwrap_or(0.0) >= 55.0,
        "{lag}"
    );
    let metrics = api
        .http
        .get(c.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    let text = metrics.text().await.expect("metrics text");
    assert!(
        text.lines()
            .any(|l| l.starts_with("wallet_events_unpublished{") && !l.ends_with(" 0")),
        "the lag is a metric"
    );

    nats.restart().expect("restart nats-server");
    let after = stream_matches_outboxes(&c, &nats).await;
    assert_eq!(after, before + 2 * paid);
    checker_clean(&c).await;
}
