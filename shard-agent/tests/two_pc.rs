//! Each 2PC step against real PostgreSQL: prepare, decide, finish, recover.

mod common;

use std::time::Duration;

use common::{balance, hold_rows, key, pair, sql, usd, user};
use router::ShardId;
use rust_decimal::Decimal;
use shard_agent::idempotency::{Claim, NewTransfer};
use shard_agent::two_pc::decide::Decision;
use shard_agent::two_pc::finish::Finished;
use shard_agent::two_pc::prepare::{Leg, Prepared, Side};
use shard_agent::two_pc::recover::{resolve_leg, Resolution};
use shard_agent::{
    AgentConfig, FailureCode, Gid, Mode, ShardAgent, TransferKind, TransferRecord, TransferState,
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

fn leg(gid: &str, side: Side, user: router::UserId, amount: &str) -> Leg {
    Leg {
        gid: gid.parse().expect("stored GID parses"),
        side,
        user,
        amount: usd(amount).value(),
        currency: shard_agent::Currency::Usd,
        counterparty: "other".into(),
    }
}

#[tokio::test]
async fn stored_gids_name_the_transfer_and_both_shards() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let record = claim(
        &p.a,
        payer,
        router::UserId::for_username("payee"),
        "1",
        "k",
        p.b.id(),
    )
    .await;
    let gids: Vec<Gid> = record
        .participants
        .iter()
        .map(|g| g.parse().expect("parses"))
        .collect();
    assert_eq!(gids.len(), 2);
    assert!(gids
        .iter()
        .all(|g| g.transfer_id == record.transfer_id && g.home == p.a.id()));
    assert_eq!(
        (gids[0].participant, gids[1].participant),
        (p.a.id(), p.b.id())
    );
    assert_eq!(record.state, TransferState::Preparing);
}

#[tokio::test]
async fn a_prepared_leg_is_invisible_until_committed_and_commit_is_idempotent() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let r = claim(&p.a, payer, payee, "4", "k", p.b.id()).await;
    let debit = leg(&r.participants[0], Side::Debit, payer, "4");
    let credit = leg(&r.participants[1], Side::Credit, payee, "4");
    assert_eq!(
        p.a.prepare_leg(&debit).await.expect("prepare debit"),
        Prepared::Yes
    );
    assert_eq!(
        p.b.prepare_leg(&credit).await.expect("prepare credit"),
        Prepared::Yes
    );
    assert_eq!(
        balance(&p.a, payer).await,
        Decimal::from(10),
        "a prepared debit is not visible"
    );
    assert_eq!(p.a.prepared_stats().await.expect("stats").count, 1);
    let decided =
        p.a.decide(r.transfer_id, Decision::Commit)
            .await
            .expect("decide")
            .expect("record");
    assert_eq!(decided.state, TransferState::Committed);
    assert_eq!(
        p.a.commit_prepared(&debit.gid).await.expect("commit"),
        Finished::Done
    );
    assert_eq!(
        p.b.commit_prepared(&credit.gid).await.expect("commit"),
        Finished::Done
    );
    // Repeating a finished step is success, not an error (SQLSTATE 42704).
    assert_eq!(
        p.a.commit_prepared(&debit.gid).await.expect("commit again"),
        Finished::AlreadyFinished
    );
    assert_eq!(balance(&p.a, payer).await, Decimal::from(6));
    assert_eq!(balance(&p.b, payee).await, Decimal::from(4));
}

#[tokio::test]
async fn rolled_back_legs_leave_balances_untouched() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let r = claim(
        &p.a,
        payer,
        router::UserId::for_username("payee"),
        "3",
        "k",
        p.b.id(),
    )
    .await;
    let debit = leg(&r.participants[0], Side::Debit, payer, "3");
    assert_eq!(
        p.a.prepare_leg(&debit).await.expect("prepare"),
        Prepared::Yes
    );
    assert_eq!(
        p.a.rollback_prepared(&debit.gid).await.expect("rollback"),
        Finished::Done
    );
    assert_eq!(
        p.a.rollback_prepared(&debit.gid)
            .await
            .expect("rollback again"),
        Finished::AlreadyFinished
    );
    assert_eq!(balance(&p.a, payer).await, Decimal::from(10));
}

#[tokio::test]
async fn business_rules_reject_legs_without_preparing_anything() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let r = claim(&p.a, payer, payee, "10.01", "k", p.b.id()).await;
    let over = leg(&r.participants[0], Side::Debit, payer, "10.01");
    assert_eq!(
        p.a.prepare_leg(&over).await.expect("prepare"),
        Prepared::Rejected(FailureCode::InsufficientFunds)
    );
    let ghost = leg(
        &r.participants[1],
        Side::Credit,
        router::UserId::for_username("ghost"),
        "1",
    );
    assert_eq!(
        p.b.prepare_leg(&ghost).await.expect("prepare"),
        Prepared::Rejected(FailureCode::RecipientNotFound)
    );
    let mut eur = leg(&r.participants[1], Side::Credit, payee, "1");
    eur.currency = shard_agent::Currency::Eur;
    assert_eq!(
        p.b.prepare_leg(&eur).await.expect("prepare"),
        Prepared::Rejected(FailureCode::CurrencyMismatch)
    );
    assert_eq!(
        p.a.prepared_stats().await.expect("stats").count
            + p.b.prepared_stats().await.expect("stats").count,
        0
    );
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
async fn recovery_finishes_legs_the_way_the_decision_says() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    // Committed decision, legs left prepared: recovery commits them.
    let r1 = claim(&p.a, payer, payee, "2", "k1", p.b.id()).await;
    let (d1, c1) = (
        leg(&r1.participants[0], Side::Debit, payer, "2"),
        leg(&r1.participants[1], Side::Credit, payee, "2"),
    );
    p.a.prepare_leg(&d1).await.expect("prepare");
    p.b.prepare_leg(&c1).await.expect("prepare");
    p.a.decide(r1.transfer_id, Decision::Commit)
        .await
        .expect("decide");
    // Undecided transfer, legs prepared: recovery aborts it and rolls them back.
    // (Another payer and payee: a prepared leg keeps its row lock.)
    let payer2 = user(&p.a, "payer2", "10").await;
    let payee2 = user(&p.b, "payee2", "0").await;
    let r2 = claim(&p.a, payer2, payee2, "3", "k2", p.b.id()).await;
    let (d2, c2) = (
        leg(&r2.participants[0], Side::Debit, payer2, "3"),
        leg(&r2.participants[1], Side::Credit, payee2, "3"),
    );
    p.a.prepare_leg(&d2).await.expect("prepare");
    p.b.prepare_leg(&c2).await.expect("prepare");

    let young = p.b.in_doubt(Duration::from_secs(3600)).await.expect("list");
    assert!(
        young.is_empty(),
        "legs younger than in_doubt_after are left to their coordinator"
    );
    for (agent, expected) in [(&p.a, 2), (&p.b, 2)] {
        let legs = agent.in_doubt(Duration::ZERO).await.expect("list");
        assert_eq!(legs.len(), expected);
        for l in legs {
            let want = if l.gid.transfer_id == r1.transfer_id {
                Resolution::Committed
            } else {
                Resolution::RolledBack
            };
            assert_eq!(
                resolve_leg(agent, &p.a, &l.gid).await.expect("resolve"),
                want
            );
        }
    }
    assert_eq!(
        p.a.transfer(r2.transfer_id)
            .await
            .expect("read")
            .expect("record")
            .failure_code,
        Some(FailureCode::CoordinatorTimeout)
    );
    assert_eq!(balance(&p.a, payer).await, Decimal::from(8));
    assert_eq!(balance(&p.b, payee).await, Decimal::from(2));
    assert_eq!(balance(&p.a, payer2).await, Decimal::from(10));
    assert_eq!(balance(&p.b, payee2).await, Decimal::ZERO);
    assert_eq!(
        p.a.prepared_stats().await.expect("stats").count
            + p.b.prepared_stats().await.expect("stats").count,
        0
    );
}

#[tokio::test]
async fn recovery_never_guesses_when_the_home_shard_is_unreachable() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let r = claim(&p.a, payer, payee, "1", "k", p.b.id()).await;
    let credit = leg(&r.participants[1], Side::Credit, payee, "1");
    p.b.prepare_leg(&credit).await.expect("prepare");
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
    let err = resolve_leg(&p.b, &unreachable, &credit.gid)
        .await
        .expect_err("home is down");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(
        p.b.prepared_stats().await.expect("stats").count,
        1,
        "the leg stays prepared"
    );
    assert_eq!(
        resolve_leg(&p.b, &p.a, &credit.gid)
            .await
            .expect("home is back"),
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

/// A leg that waits on a row lock past its call budget is cancelled on the
/// server, so it cannot prepare later, after the coordinator gave it up.
#[tokio::test]
async fn a_leg_given_up_on_is_cancelled_and_never_prepares_later() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let r = claim(
        &p.a,
        payer,
        router::UserId::for_username("payee"),
        "3",
        "slow",
        p.b.id(),
    )
    .await;
    let debit = leg(&r.participants[0], Side::Debit, payer, "3");
    // An agent whose lock wait (10 s) outlasts its call budget (1.5 s).
    let impatient = ShardAgent::new(
        p.a.id(),
        &p.dsn_a,
        AgentConfig {
            call_timeout_ms: 1_500,
            lock_timeout_ms: 10_000,
            ..AgentConfig::default()
        },
    )
    .expect("agent");
    let holder = hold_rows(&p.dsn_a, &[payer]).await;

    let started = std::time::Instant::now();
    let err = impatient
        .prepare_leg(&debit)
        .await
        .expect_err("the leg cannot get the lock in time");
    assert!(
        matches!(err, shard_agent::ShardError::Unavailable { .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the budget"
    );

    // The lock is released: a leg still running on the server would now prepare.
    holder.batch_execute("COMMIT").await.expect("release");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let prepared = holder
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1",
            &[&debit.gid.to_string()],
        )
        .await
        .expect("count prepared");
    assert_eq!(prepared.get::<_, i64>(0), 0, "nothing was prepared");
    assert_eq!(balance(&p.a, payer).await, Decimal::from(10));
}
