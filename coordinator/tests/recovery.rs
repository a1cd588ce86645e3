//! Recovery that a dead shard cannot stall: shards are worked at once, a home
//! shard that does not answer is skipped for the rest of the pass, and legs
//! homed elsewhere are resolved in the same pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::cluster::Cluster;
use coordinator::recovery::{Recovery, RecoveryLimits};
use router::{bucket_of, ShardId, UserId};
use rust_decimal::Decimal;
use shard_agent::users::NewUser;
use shard_agent::{AgentConfig, Amount, Currency, Gid, ShardAgent};
use testkit::{init_tracing, test_limits, TestCluster};

/// How long a call to the black-holed shard waits before it gives up: far
/// longer than a pass may take, so a pass that waited for it would show.
const DEAD_SHARD_CALL_MS: u64 = 20_000;

/// A user named after `prefix` whose bucket `map` gives `agent`'s shard.
async fn user_on(agent: &ShardAgent, map: &router::ShardMap, prefix: &str) -> UserId {
    let name = (0..)
        .map(|k| format!("{prefix}_{k}"))
        .find(|n| map.shard_of(&UserId::for_username(n)) == agent.id())
        .expect("some name lands on every shard");
    let name = name.as_str();
    let user_id = UserId::for_username(name);
    agent
        .create_user(&NewUser {
            user_id,
            bucket: bucket_of(&user_id),
            username: name.into(),
            email: format!("{name}@example.com"),
            password_hash: "not-a-real-hash".into(),
            currency: Currency::Usd,
        })
        .await
        .expect("create user");
    user_id
}

/// Prepares a credit leg on `participant` whose decision lives on `home`.
async fn in_doubt_leg(participant: &ShardAgent, home: ShardId, payee: UserId) -> Gid {
    local_cluster::testing::in_doubt_credit(
        participant,
        home,
        payee,
        Amount::new(Decimal::ONE, Currency::Usd).expect("a valid amount"),
    )
    .await
    .expect("prepare an in-doubt leg")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_home_shard_does_not_delay_legs_homed_elsewhere() {
    init_tracing();
    let mut config = TestCluster::provision(3, test_limits()).await;
    // Shard 2 is a black hole: the port accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the black hole");
    let hole_port = hole.local_addr().expect("addr").port();
    config.shards[2].dsn = format!("postgres://postgres@127.0.0.1:{hole_port}/gone");
    let agent_config = AgentConfig {
        call_timeout_ms: DEAD_SHARD_CALL_MS,
        connect_timeout_ms: DEAD_SHARD_CALL_MS,
        ..AgentConfig::default()
    };
    let cluster = Arc::new(
        Cluster::open(&config.catalog_dsn, &config.shards, agent_config)
            .await
            .expect("open the cluster"),
    );
    let routing = cluster.routing();
    let (s0, s1) = (
        routing.agent(ShardId(0)).expect("shard 0").clone(),
        routing.agent(ShardId(1)).expect("shard 1").clone(),
    );
    // A prepared leg keeps its payee's row locked: one payee per leg.
    let mut payees = Vec::new();
    for i in 0..4 {
        payees.push((
            user_on(&s0, &routing.map, &format!("payee{i}_on_0")).await,
            user_on(&s1, &routing.map, &format!("payee{i}_on_1")).await,
        ));
    }

    // Legs homed on the dead shard come first on each participant (oldest first),
    // then one leg on each participant homed on a healthy shard, with no record
    // there: recovery tombstones it and rolls it back.
    let mut stuck = Vec::new();
    for &(payee0, payee1) in &payees[..3] {
        stuck.push(in_doubt_leg(&s0, ShardId(2), payee0).await);
        stuck.push(in_doubt_leg(&s1, ShardId(2), payee1).await);
    }
    let (payee0, payee1) = payees[3];
    let healthy = [
        in_doubt_leg(&s0, ShardId(1), payee0).await,
        in_doubt_leg(&s1, ShardId(0), payee1).await,
    ];

    let recovery = Recovery::new(
        cluster.clone(),
        None,
        None,
        RecoveryLimits {
            in_doubt_after: Duration::ZERO,
            probe_timeout: Duration::from_millis(500),
            // Far above the dead shard's call timeout: a pass that waited for
            // it would show in its length, not be hidden by the cut.
            pass_max: Duration::from_secs(60),
        },
    );
    let started = Instant::now();
    let pass = recovery.run_once().await;
    let took = started.elapsed();
    println!("recovery pass with a black-holed home shard: {took:?}, {pass:?}");

    assert_eq!(pass.rolled_back, 2, "both legs homed on healthy shards");
    assert_eq!(pass.unreachable, vec![ShardId(2)]);
    assert_eq!((pass.passes_cut, pass.skipped), (0, 6));
    assert!(
        took < Duration::from_millis(DEAD_SHARD_CALL_MS / 2),
        "the pass did not wait for the dead shard's {DEAD_SHARD_CALL_MS} ms call timeout: {took:?}"
    );
    let left: Vec<Gid> = [&s0, &s1]
        .iter()
        .map(|a| async move { a.in_doubt(Duration::ZERO).await.expect("list") })
        .collect::<futures::future::JoinAll<_>>()
        .await
        .into_iter()
        .flatten()
        .map(|leg| leg.gid)
        .collect();
    assert_eq!(
        left.len(),
        stuck.len(),
        "only the dead shard's legs are left"
    );
    assert!(left.iter().all(|g| stuck.contains(g)));
    assert!(healthy.iter().all(|g| !left.contains(g)));
    drop(hole);

    // Cleanup: the stuck legs are this test's own; roll them back.
    for gid in &stuck {
        let participant = if gid.participant == ShardId(0) {
            &s0
        } else {
            &s1
        };
        participant
            .rollback_prepared(gid)
            .await
            .expect("clean up a stuck leg");
    }
}
