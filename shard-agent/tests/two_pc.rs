//! The 2PC steps outside a group's own statements against real PostgreSQL:
//! the decision's compare-and-set, and recovery. (Groups: tests/batch.rs.)

mod common;

use std::time::Duration;

use common::{key, pair, prepare_credit, sql, usd, user};
use router::ShardId;
use shard_agent::idempotency::{Claim, NewTransfer};
use shard_agent::two_pc::decide::Decision;
use shard_agent::two_pc::recover::{resolve_leg, Resolution};
use shard_agent::{
    AgentConfig, FailureCode, Mode, ShardAgent, TransferKind, TransferRecord, TransferState,
};

async fn claim(
    home: &ShardAgent,
    from: router::UserId,
    to: router::UserId,
    amount: &str,
    k: &str,
    remote: ShardId,
) -> TransferRecord {
    let new = NewTransfer {
        kind: TransferKind::Transfer,
        mode: Mode::TwoPc,
        from_user: Some(from),
        from_username: Some("payer".into()),
        to_user: Some(to),
        to_username: Some("payee".into()),
        amount: usd(amount).value(),
        currency: shard_agent::Currency::Usd,
        legs: Some((home.id(), vec![home.id(), remote])),
        payment_token: None,
    };
    match home.claim(&key(from, k), &new).await.expect("claim") {
        Claim::Started(r) => r,
        other => panic!("expected a new claim, got {other:?}"),
    }
}

#[tokio::test]
async fn exactly_one_of_two_racing_decisions_wins() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    for (first, second) in [
        (
            Decision::Commit,
            Decision::Abort(FailureCode::CoordinatorTimeout),
        ),
        (
            Decision::Abort(FailureCode::CoordinatorTimeout),
            Decision::Commit,
        ),
    ] {
        let r = claim(
            &p.a,
            payer,
            router::UserId::for_username("x"),
            "1",
            &format!("{first:?}"),
            p.b.id(),
        )
        .await;
        let (x, y) = tokio::join!(
            p.a.decide(r.transfer_id, first),
            p.a.decide(r.transfer_id, second)
        );
        let (x, y) = (
            x.expect("decide").expect("record"),
            y.expect("decide").expect("record"),
        );
        assert_eq!(
            x.state, y.state,
            "both callers see the same, single decision"
        );
        assert_ne!(x.state, TransferState::Preparing);
    }
}

#[tokio::test]
async fn recovery_never_guesses_when_the_home_shard_is_unreachable() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let _ = payer;
    let gid = prepare_credit(&p.b, p.a.id(), payee, "1").await;
    let port = local_cluster::free_port().expect("port");
    let config = AgentConfig {
        connect_timeout_ms: 300,
        call_timeout_ms: 1_000,
        ..AgentConfig::default()
    };
    let unreachable = ShardAgent::new(
        p.a.id(),
        &format!("host=127.0.0.1 port={port} user=postgres dbname=x"),
        config,
    )
    .expect("agent");
    let err = resolve_leg(&p.b, &unreachable, &gid)
        .await
        .expect_err("home is down");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(
        p.b.prepared_stats().await.expect("stats").count,
        1,
        "the leg stays prepared"
    );
    assert_eq!(
        resolve_leg(&p.b, &p.a, &gid).await.expect("home is back"),
        Resolution::RolledBack
    );
}

#[tokio::test]
async fn foreign_prepared_transactions_are_left_alone() {
    let p = pair().await;
    sql(
        &p.dsn_a,
        "BEGIN; CREATE TABLE other_app (x int); PREPARE TRANSACTION 'other_app_1'",
    )
    .await;
    let ours = p.a.in_doubt(Duration::ZERO).await.expect("list");
    assert!(ours.is_empty());
    assert_eq!(p.a.prepared_stats().await.expect("stats").count, 0);
    sql(&p.dsn_a, "ROLLBACK PREPARED 'other_app_1'").await;
}

#[tokio::test]
async fn stale_preparing_transfers_are_listed_for_abort() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let r = claim(
        &p.a,
        payer,
        router::UserId::for_username("y"),
        "1",
        "k",
        p.b.id(),
    )
    .await;
    assert!(p
        .a
        .stale_preparing(Duration::from_secs(3600))
        .await
        .expect("list")
        .is_empty());
    assert_eq!(
        p.a.stale_preparing(Duration::ZERO).await.expect("list"),
        vec![r.transfer_id]
    );
    let state = shard_agent::two_pc::recover::abort_stale(&p.a, r.transfer_id)
        .await
        .expect("abort");
    assert_eq!(state, TransferState::Aborted);
    assert!(p
        .a
        .stale_preparing(Duration::ZERO)
        .await
        .expect("list")
        .is_empty());
}
