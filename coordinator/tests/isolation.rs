//! One shard's or one account's trouble stays with the transfers that touch it:
//! a shard that never answers and an account row held outside any group each
//! stall their own transfers, while transfers among other shards and users go
//! on through the batch lanes.

mod common;

use std::time::{Duration, Instant};

use common::Api;
use reqwest::StatusCode;
use router::{ShardId, UserId};
use rust_decimal::Decimal;
use shard_agent::{Amount, Currency};
use testkit::{test_limits, TestCluster};

/// How long a call to a dead shard or a wait on a held row may last before it
/// gives up: far longer than the healthy transfers may take, so a lane that
/// waited for it would show.
const FAULT_WAIT_MS: u64 = 20_000;

/// Healthy transfers must all be answered within this, while the fault lasts.
const HEALTHY_WITHIN: Duration = Duration::from_secs(5);

/// Usernames with `prefix` whose users live on `shard`.
fn names_on(cluster: &TestCluster, prefix: &str, shard: u16, n: usize) -> Vec<String> {
    let routing = cluster.coordinator.cluster().routing();
    (0..100_000)
        .map(|i| format!("{prefix}{i}"))
        .filter(|name| routing.map.shard_of(&UserId::for_username(name)) == ShardId(shard))
        .take(n)
        .collect()
}

async fn funded(api: &Api, name: &str) -> String {
    let token = api.user(name, "USD").await;
    api.deposit(&token, "50.00", "USD").await;
    token
}

/// Healthy cross-shard transfers between shards 0 and 1 (and same-shard ones
/// on shard 0), one after another; returns how long they all took.
async fn healthy_round(api: &Api, payers: &[(String, String)], payee: &str, tag: &str) -> Duration {
    let started = Instant::now();
    for (i, (token, _)) in payers.iter().enumerate() {
        let r = api
            .transfer(token, &format!("{tag}-{i}"), payee, "1.00", "USD")
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "healthy transfer {i}: {:?}",
            r.body
        );
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_never_answers_stalls_only_the_transfers_that_touch_it() {
    let mut config = TestCluster::provision(4, test_limits()).await;
    // Shard 3 is a black hole: its port accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the black hole");
    config.shards[3].dsn = format!(
        "postgres://postgres@127.0.0.1:{}/gone",
        hole.local_addr().expect("addr").port()
    );
    config.agent.call_timeout_ms = FAULT_WAIT_MS;
    config.agent.connect_timeout_ms = FAULT_WAIT_MS;
    let cluster = TestCluster::serve(config).await;
    let api = Api::new(&cluster);
    let mut payers = Vec::new();
    for name in names_on(&cluster, "payer", 0, 6) {
        payers.push((funded(&api, &name).await, name));
    }
    let payee = names_on(&cluster, "payee", 1, 1).remove(0);
    api.user(&payee, "USD").await;
    let ghost = names_on(&cluster, "ghost", 3, 1).remove(0);

    // Victims pay someone on the dead shard; their requests hang.
    let mut victims = Vec::new();
    for (i, (token, _)) in payers.iter().enumerate().take(2) {
        let api = Api::new(&cluster);
        let (token, ghost) = (token.clone(), ghost.clone());
        victims.push(tokio::spawn(async move {
            api.transfer(&token, &format!("victim-{i}"), &ghost, "1.00", "USD")
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = healthy_round(&api, &payers[2..], &payee, "healthy").await;
    println!("healthy transfers beside a dead shard: {took:?}");
    assert!(
        took < HEALTHY_WITHIN,
        "healthy transfers waited for the dead shard: {took:?}"
    );
    assert!(
        victims.iter().all(|v| !v.is_finished()),
        "the victims still wait for the dead shard"
    );
    for v in victims {
        v.abort();
    }
    // The dead shard is marked once a ping confirms it is silent: its next
    // transfer runs alone, outside the lanes (no group counts it), and healthy
    // traffic keeps flowing.
    let deadline = Instant::now() + HEALTHY_WITHIN;
    while cluster.coordinator.marked() == 0 {
        assert!(Instant::now() < deadline, "the dead shard was never marked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let groups_before = cluster.coordinator.batch_stats();
    let late = {
        let api = Api::new(&cluster);
        let (token, ghost) = (payers[0].0.clone(), ghost.clone());
        tokio::spawn(async move {
            api.transfer(&token, "victim-late", &ghost, "1.00", "USD")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let groups_after = cluster.coordinator.batch_stats();
    assert_eq!(
        groups_after.since(groups_before).cross_transfers,
        0,
        "a transfer to the marked shard joined a group"
    );
    let took = healthy_round(&api, &payers[2..], &payee, "again").await;
    assert!(took < HEALTHY_WITHIN, "{took:?}");
    late.abort();
    drop(hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_held_outside_any_group_stalls_only_its_own_transfers() {
    let mut limits = test_limits();
    limits.in_doubt_after_ms = 60_000;
    let mut config = TestCluster::provision(4, limits).await;
    config.agent.lock_timeout_ms = FAULT_WAIT_MS;
    config.agent.call_timeout_ms = 2 * FAULT_WAIT_MS;
    config.agent.statement_timeout_ms = 2 * FAULT_WAIT_MS;
    let cluster = TestCluster::serve(config).await;
    let api = Api::new(&cluster);
    let mut payers = Vec::new();
    for name in names_on(&cluster, "payer", 0, 7) {
        payers.push((funded(&api, &name).await, name));
    }
    let cross_payee = names_on(&cluster, "payee", 1, 1).remove(0);
    api.user(&cross_payee, "USD").await;
    let local_payee = names_on(&cluster, "local", 0, 1).remove(0);
    api.user(&local_payee, "USD").await;
    // The victim pays others: its waiting transfer holds its payee's row (rows
    // are locked in user-ID order), so a shared payee would wait too.
    let victim_cross = names_on(&cluster, "vcross", 1, 1).remove(0);
    let victim_local = names_on(&cluster, "vlocal", 0, 1).remove(0);
    api.user(&victim_cross, "USD").await;
    api.user(&victim_local, "USD").await;

    // The victim's row is held by an in-doubt prepared leg, as a coordinator
    // that died mid-transfer leaves it until recovery.
    let (victim_token, victim) = payers.remove(0);
    let routing = cluster.coordinator.cluster().routing();
    let victim_shard = routing.agent_for(&UserId::for_username(&victim)).clone();
    let gid = local_cluster::testing::in_doubt_credit(
        &victim_shard,
        victim_shard.id(),
        UserId::for_username(&victim),
        Amount::new(Decimal::ONE, Currency::Usd).expect("a valid amount"),
    )
    .await
    .expect("hold the victim's row");

    // The victim sends, cross-shard and same-shard; both wait on its row.
    let mut stuck = Vec::new();
    for (key, to) in [
        ("v-cross", victim_cross.clone()),
        ("v-local", victim_local.clone()),
    ] {
        let api = Api::new(&cluster);
        let token = victim_token.clone();
        stuck.push(tokio::spawn(async move {
            api.transfer(&token, key, &to, "1.00", "USD").await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cross = healthy_round(&api, &payers[..3], &cross_payee, "cross").await;
    let local = healthy_round(&api, &payers[3..], &local_payee, "local").await;
    println!("healthy transfers beside a held row: cross {cross:?}, same-shard {local:?}");
    assert!(
        cross < HEALTHY_WITHIN,
        "cross-shard waited for the held row: {cross:?}"
    );
    assert!(
        local < HEALTHY_WITHIN,
        "same-shard waited for the held row: {local:?}"
    );
    assert!(
        stuck.iter().all(|s| !s.is_finished()),
        "the victim's transfers still wait for its row"
    );

    // Released: the victim's transfers go through, each exactly once.
    victim_shard
        .rollback_prepared(&gid)
        .await
        .expect("release the row");
    for s in stuck {
        let r = s.await.expect("victim task");
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    assert_eq!(api.balance(&victim_token).await, "48.00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_bucket_stalls_only_its_own_transfers_and_keeps_them_out_of_groups() {
    let mut limits = test_limits();
    limits.move_wait_ms = FAULT_WAIT_MS;
    let cluster = TestCluster::start(2, limits).await;
    let api = Api::new(&cluster);
    let mut payers = Vec::new();
    for name in names_on(&cluster, "fpayer", 0, 7) {
        payers.push((funded(&api, &name).await, name));
    }
    let cross_payee = names_on(&cluster, "fpayee", 1, 1).remove(0);
    api.user(&cross_payee, "USD").await;
    let local_payee = names_on(&cluster, "flocal", 0, 1).remove(0);
    api.user(&local_payee, "USD").await;
    let (victim_token, victim) = payers.remove(0);
    let victim_id = UserId::for_username(&victim);
    let bucket = router::bucket_of(&victim_id).0;
    let others_in_bucket = payers
        .iter()
        .map(|(_, n)| n)
        .chain([&cross_payee, &local_payee])
        .any(|n| router::bucket_of(&UserId::for_username(n)).0 == bucket);
    assert!(!others_in_bucket, "the victim must be alone in its bucket");

    // A move fences the victim's bucket on its shard, as the mover does
    // before it copies the bucket.
    let routing = cluster.coordinator.cluster().routing();
    let shard = routing.agent_for(&victim_id).clone();
    let mine: Vec<u16> = routing
        .map
        .buckets_of(shard.id())
        .iter()
        .map(|b| b.0)
        .collect();
    shard
        .init_ownership(&mine, routing.map.epoch().0)
        .await
        .expect("record ownership");
    let move_id = 4242;
    assert_eq!(
        shard
            .fence_bucket(bucket, move_id, 1_000)
            .await
            .expect("fence"),
        shard_agent::ownership::Fenced::Yes
    );

    let waiting = {
        let api = Api::new(&cluster);
        let (token, to) = (victim_token.clone(), cross_payee.clone());
        tokio::spawn(async move { api.transfer(&token, "fenced", &to, "1.00", "USD").await })
    };
    // The victim's transfer met the fence in a group, which marked it: its
    // retries run alone and fail no other group.
    let deadline = Instant::now() + HEALTHY_WITHIN;
    while cluster.coordinator.marked() == 0 {
        assert!(Instant::now() < deadline, "the victim was never marked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cross = healthy_round(&api, &payers[..3], &cross_payee, "cross").await;
    let local = healthy_round(&api, &payers[3..], &local_payee, "local").await;
    println!("healthy transfers beside a fenced bucket: cross {cross:?}, same-shard {local:?}");
    assert!(
        cross < HEALTHY_WITHIN,
        "cross-shard waited for the fence: {cross:?}"
    );
    assert!(
        local < HEALTHY_WITHIN,
        "same-shard waited for the fence: {local:?}"
    );
    assert!(
        !waiting.is_finished(),
        "the victim's transfer waits for its bucket"
    );

    // The move rolls back: the victim's transfer goes through, once.
    assert!(shard
        .set_bucket_state(bucket, move_id, &["fenced"], "owned", routing.map.epoch().0)
        .await
        .expect("unfence"));
    let r = waiting.await.expect("victim task");
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(api.balance(&victim_token).await, "49.00");
}
