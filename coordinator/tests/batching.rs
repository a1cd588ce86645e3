//! Batching through the API (coordinator/src/batch/): a burst of concurrent
//! transfers, same-shard and cross-shard, with refusals, a payer who is also a
//! payee, and a duplicate, is grouped however the lanes form their groups, and
//! every transfer still gets its own answer: refused ones do not sink the others,
//! the duplicate replays, and the money adds up.

mod common;

use common::Api;
use futures::future::join_all;
use reqwest::StatusCode;
use testkit::{test_limits, TestCluster};

#[tokio::test]
async fn a_burst_of_transfers_is_decided_transfer_by_transfer() {
    let cluster = TestCluster::start(4, test_limits()).await;
    let api = Api::new(&cluster);
    let merchant = api.user("merchant", "USD").await;
    let mut rich = Vec::new();
    for i in 0..6 {
        let t = api.user(&format!("rich{i}"), "USD").await;
        api.deposit(&t, "50.00", "USD").await;
        rich.push(t);
    }
    let mut poor = Vec::new();
    for i in 0..2 {
        let t = api.user(&format!("poor{i}"), "USD").await;
        api.deposit(&t, "1.00", "USD").await;
        poor.push(t);
    }

    for round in 0..3 {
        // (expected, payer, key, payee, amount)
        let mut plan: Vec<(&str, &String, String, &str, &str)> = Vec::new();
        // rich0..rich3 pay the merchant; rich0 is also paid by rich5.
        for (i, t) in rich.iter().enumerate().take(4) {
            plan.push(("paid", t, format!("m{i}"), "merchant", "10.00"));
        }
        plan.push(("paid", &rich[5], "r5".into(), "rich0", "5.00"));
        for (i, t) in poor.iter().enumerate() {
            plan.push(("refused", t, format!("p{i}"), "merchant", "10.00"));
        }
        plan.push(("nobody", &rich[4], "ghost".into(), "ghost", "1.00"));
        // The same request twice at once: one transfer.
        plan.push(("dup", &rich[4], "dup".into(), "merchant", "2.00"));
        plan.push(("dup", &rich[4], "dup".into(), "merchant", "2.00"));
        let keys: Vec<String> = plan.iter().map(|p| format!("r{round}-{}", p.2)).collect();
        let replies = join_all(
            plan.iter()
                .zip(&keys)
                .map(|(p, key)| api.transfer(p.1, key, p.3, p.4, "USD")),
        )
        .await;
        let kinds: Vec<&str> = plan.iter().map(|p| p.0).collect();

        let mut dup_ids = Vec::new();
        let mut dup_replayed = 0;
        for (kind, r) in kinds.iter().zip(&replies) {
            match *kind {
                "paid" => {
                    assert_eq!(r.status, StatusCode::CREATED, "round {round}: {:?}", r.body);
                    assert_eq!(r.body["status"], "committed");
                }
                "refused" => {
                    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", r.body);
                    assert_eq!(r.code(), "insufficient_funds");
                }
                "nobody" => {
                    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
                    assert_eq!(r.code(), "recipient_not_found");
                }
                _ => {
                    assert_eq!(r.status, StatusCode::CREATED, "duplicate: {:?}", r.body);
                    dup_ids.push(r.body["transfer_id"].clone());
                    dup_replayed += usize::from(r.headers.contains_key("idempotent-replayed"));
                }
            }
        }
        assert_eq!(
            dup_ids[0], dup_ids[1],
            "round {round}: one transfer for one key"
        );
        assert_eq!(
            dup_replayed, 1,
            "round {round}: the second answer is a replay"
        );
    }

    let rounds = 3;
    assert_eq!(
        api.balance(&merchant).await,
        format!("{}.00", rounds * (4 * 10 + 2))
    );
    assert_eq!(
        api.balance(&rich[0]).await,
        format!("{}.00", 50 - rounds * 10 + rounds * 5)
    );
    assert_eq!(
        api.balance(&rich[1]).await,
        format!("{}.00", 50 - rounds * 10)
    );
    assert_eq!(
        api.balance(&rich[4]).await,
        format!("{}.00", 50 - rounds * 2)
    );
    assert_eq!(
        api.balance(&rich[5]).await,
        format!("{}.00", 50 - rounds * 5)
    );
    for t in &poor {
        assert_eq!(
            api.balance(t).await,
            "1.00",
            "refused transfers moved nothing"
        );
    }
}

/// A lane's queue is bounded (`batch_queue_max`): while its group waits on a
/// shard that does not answer, one more transfer waits in the queue and the
/// rest are refused at once with 503 `shard_busy`, having claimed and written
/// nothing, so their retries with the same keys run afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lane_answers_503_shard_busy_and_the_retry_with_the_same_key_runs() {
    let limits = coordinator::config::Limits {
        batch_queue_max: 1,
        ..test_limits()
    };
    let mut config = TestCluster::provision(4, limits).await;
    // Shard 3 never answers: a group with a transfer to it waits for its
    // check's bound (1 s), and the cross-shard lane with it.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the black hole");
    config.shards[3].dsn = format!(
        "postgres://postgres@127.0.0.1:{}/gone",
        hole.local_addr().expect("addr").port()
    );
    config.agent.call_timeout_ms = 20_000;
    config.agent.connect_timeout_ms = 20_000;
    let cluster = TestCluster::serve(config).await;
    let api = Api::new(&cluster);
    let routing = cluster.coordinator.cluster().routing();
    let shard = |n: &str| routing.map.shard_of(&router::UserId::for_username(n)).0;
    let payee = (0..1000)
        .map(|i| format!("payee{i}"))
        .find(|n| shard(n) == 1)
        .expect("a payee on shard 1");
    api.user(&payee, "USD").await;
    let ghost = (0..1000)
        .map(|i| format!("ghost{i}"))
        .find(|n| shard(n) == 3)
        .expect("a name on the dead shard");
    // Payers on shard 0 or 2: every transfer below is in the cross-shard lane.
    let names: Vec<String> = (0..400)
        .map(|i| format!("payer{i}"))
        .filter(|n| shard(n) == 0 || shard(n) == 2)
        .take(20)
        .collect();
    let mut payers = Vec::new();
    for n in &names {
        let t = api.user(n, "USD").await;
        api.deposit(&t, "5.00", "USD").await;
        payers.push(t);
    }

    let stuck = {
        let api = Api::new(&cluster);
        let (token, ghost) = (payers[0].clone(), ghost.clone());
        tokio::spawn(async move {
            api.transfer(&token, "to-ghost", &ghost, "1.00", "USD")
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let keys: Vec<String> = (1..payers.len()).map(|i| format!("k{i}")).collect();
    let replies = join_all(
        payers[1..]
            .iter()
            .zip(&keys)
            .map(|(t, k)| api.transfer(t, k, &payee, "1.00", "USD")),
    )
    .await;
    let mut busy = Vec::new();
    for (i, r) in replies.iter().enumerate() {
        match (r.status, r.code()) {
            (StatusCode::CREATED, _) => {}
            (StatusCode::SERVICE_UNAVAILABLE, "shard_busy") => {
                assert!(r.headers.get("retry-after").is_some());
                busy.push(i + 1);
            }
            _ => panic!("k{}: {:?} {:?}", i + 1, r.status, r.body),
        }
    }
    assert!(
        busy.len() >= replies.len() - 2,
        "behind a group stuck for a second, a queue of one refuses nearly all of 19 \
         transfers sent at once: {busy:?}"
    );
    for &i in &busy {
        let r = api
            .transfer(&payers[i], &format!("k{i}"), &payee, "1.00", "USD")
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "retry of k{i}: {:?}", r.body);
    }
    let payee_token = api.login(&payee).await;
    assert_eq!(
        api.balance(&payee_token).await,
        "19.00",
        "every transfer once"
    );
    stuck.abort();
    drop(hole);
}
