//! The fast path of a cross-shard transfer against real PostgreSQL: the payer's
//! leg commits on the home shard with the key and the record (`wallet_home_leg`), the
//! payee's leg is prepared, and recovery resolves a payee leg whose home
//! transaction never committed through a tombstone.

mod common;

use std::time::Duration;

use common::{balance, order, pair, user, Pair};
use rust_decimal::Decimal;
use shard_agent::transfer_local::TransferOrder;
use shard_agent::two_pc::home::{HomeLeg, HomeOutcome, Opened, Tombstone};
use shard_agent::two_pc::prepare::{Leg, Prepared, Side};
use shard_agent::two_pc::recover::{resolve_leg, Resolution};
use shard_agent::{FailureCode, Gid, TransferId, TransferState};

/// A fresh attempt of `order`: its home leg on `p.a` and its payee leg on `p.b`.
fn attempt<'a>(p: &Pair, order: &'a TransferOrder) -> (HomeLeg<'a>, Leg) {
    let tid = TransferId::generate();
    let gid = Gid::new(tid, p.a.id(), p.b.id());
    let credit = Leg {
        gid,
        side: Side::Credit,
        user: order.to,
        amount: order.amount.value(),
        currency: order.amount.currency(),
        counterparty: order.from_username.clone(),
    };
    let home = HomeLeg {
        tid,
        order,
        participants: vec![gid.to_string()],
    };
    (home, credit)
}

fn recorded(outcome: HomeOutcome) -> shard_agent::TransferRecord {
    match outcome {
        HomeOutcome::Recorded(r) => r,
        other => panic!("expected a recorded outcome, got {other:?}"),
    }
}

async fn prepared_count(p: &Pair) -> i64 {
    p.a.prepared_stats().await.expect("stats").count
        + p.b.prepared_stats().await.expect("stats").count
}

#[tokio::test]
async fn payee_first_the_home_leg_debits_and_records_the_decision_in_one_statement() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let o = order(payer, payee, "4", "k");
    let (home, credit) = attempt(&p, &o);
    assert_eq!(
        p.b.prepare_leg(&credit).await.expect("prepare"),
        Prepared::Yes
    );

    let r = recorded(p.a.home_leg(&home, None).await.expect("home leg"));
    assert_eq!((r.state, r.failure_code), (TransferState::Committed, None));
    assert_eq!(r.transfer_id, home.tid);
    assert_eq!(
        r.participants,
        vec![credit.gid.to_string()],
        "the stored GID"
    );
    assert_eq!(balance(&p.a, payer).await, Decimal::from(6));
    assert_eq!(
        balance(&p.b, payee).await,
        Decimal::ZERO,
        "credit still prepared"
    );
    // Recovery commits the payee's leg from the record.
    assert_eq!(
        resolve_leg(&p.b, &p.a, &credit.gid).await.expect("resolve"),
        Resolution::Committed
    );
    assert_eq!(balance(&p.b, payee).await, Decimal::from(4));

    // The same key again, as a new attempt: refused before anything is written.
    let (again, _) = attempt(&p, &o);
    assert!(matches!(
        p.a.home_leg(&again, None).await.expect("home leg"),
        HomeOutcome::KeyExists
    ));
    assert!(matches!(
        p.a.open_home_leg(&again).await.expect("open"),
        Opened::Done(HomeOutcome::KeyExists)
    ));
    assert_eq!(balance(&p.a, payer).await, Decimal::from(6));
    assert!(p.a.transfer(again.tid).await.expect("read").is_none());
}

#[tokio::test]
async fn a_refused_debit_is_recorded_as_aborted_on_both_shapes() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "1").await;
    let payee = user(&p.b, "payee", "0").await;
    let o1 = order(payer, payee, "5", "k1");
    let (home, _) = attempt(&p, &o1);
    let r = recorded(p.a.home_leg(&home, None).await.expect("home leg"));
    assert_eq!(
        (r.state, r.failure_code),
        (TransferState::Aborted, Some(FailureCode::InsufficientFunds))
    );

    let o2 = order(payer, payee, "5", "k2");
    let (home, _) = attempt(&p, &o2);
    let r = match p.a.open_home_leg(&home).await.expect("open") {
        Opened::Done(outcome) => recorded(outcome),
        Opened::Open(_) => panic!("a refused debit must not leave a transaction open"),
    };
    assert_eq!(
        (r.state, r.failure_code),
        (TransferState::Aborted, Some(FailureCode::InsufficientFunds))
    );
    // Both aborts are stored with their keys, and nothing moved.
    assert!(matches!(
        p.a.home_leg(&attempt(&p, &o2).0, None)
            .await
            .expect("home leg"),
        HomeOutcome::KeyExists
    ));
    assert_eq!(balance(&p.a, payer).await, Decimal::ONE);

    // An abort known before the home leg (the payee's leg failed) is recorded
    // without touching the balance, and recovery rolls the payee's leg back.
    let o3 = order(payer, payee, "1", "k3");
    let (home, credit) = attempt(&p, &o3);
    p.b.prepare_leg(&credit).await.expect("prepare");
    let r = recorded(
        p.a.home_leg(&home, Some(FailureCode::ShardUnavailable))
            .await
            .expect("home leg"),
    );
    assert_eq!(r.failure_code, Some(FailureCode::ShardUnavailable));
    assert_eq!(
        resolve_leg(&p.b, &p.a, &credit.gid).await.expect("resolve"),
        Resolution::RolledBack
    );
    assert_eq!(balance(&p.a, payer).await, Decimal::ONE);
    assert_eq!(balance(&p.b, payee).await, Decimal::ZERO);
}

#[tokio::test]
async fn payer_first_the_open_home_transaction_commits_only_with_its_record() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let o = order(payer, payee, "3", "k");

    // Rolled back: nothing of the attempt remains, and the key is free again.
    let (home, _) = attempt(&p, &o);
    match p.a.open_home_leg(&home).await.expect("open") {
        Opened::Open(open) => open.rollback().await,
        Opened::Done(outcome) => panic!("expected an open transaction, got {outcome:?}"),
    }
    assert!(p.a.transfer(home.tid).await.expect("read").is_none());
    assert_eq!(balance(&p.a, payer).await, Decimal::from(10));

    // Committed after the payee's leg is prepared.
    let (home, credit) = attempt(&p, &o);
    let Opened::Open(open) = p.a.open_home_leg(&home).await.expect("open") else {
        panic!("expected an open transaction");
    };
    assert_eq!(
        balance(&p.a, payer).await,
        Decimal::from(10),
        "the debit is invisible until the decision commits"
    );
    p.b.prepare_leg(&credit).await.expect("prepare");
    // Recovery meanwhile must wait: the home transaction holds the attempt's lock.
    assert_eq!(
        resolve_leg(&p.b, &p.a, &credit.gid).await.expect("resolve"),
        Resolution::Deferred
    );
    let r = open.commit().await.expect("commit");
    assert_eq!(
        (r.state, r.transfer_id),
        (TransferState::Committed, home.tid)
    );
    assert_eq!(balance(&p.a, payer).await, Decimal::from(7));
    let history =
        p.a.account_view(payer, 10, None)
            .await
            .expect("view")
            .expect("account");
    assert!(
        history
            .entries
            .iter()
            .any(|e| e.transfer_id == home.tid && e.amount == Decimal::from(-3)),
        "the debit's ledger entry committed with it"
    );
    assert_eq!(
        resolve_leg(&p.b, &p.a, &credit.gid).await.expect("resolve"),
        Resolution::Committed
    );
    assert_eq!(balance(&p.b, payee).await, Decimal::from(3));
    assert_eq!(prepared_count(&p).await, 0);
}

#[tokio::test]
async fn recovery_tombstones_a_leg_without_a_record_and_the_late_home_leg_is_refused() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let o = order(payer, payee, "2", "k");
    let (home, credit) = attempt(&p, &o);
    p.b.prepare_leg(&credit).await.expect("prepare");
    // The coordinator stalls; recovery finds the leg and no record.
    let legs = p.b.in_doubt(Duration::ZERO).await.expect("list");
    assert_eq!(legs.len(), 1);
    assert_eq!(
        resolve_leg(&p.b, &p.a, &legs[0].gid)
            .await
            .expect("resolve"),
        Resolution::RolledBack
    );
    assert_eq!(
        p.a.tombstone(home.tid).await.expect("tombstone"),
        Tombstone::Written,
        "asking again finds the tombstone, not a record"
    );
    // The coordinator wakes up: its decision can no longer commit, in either shape.
    assert!(matches!(
        p.a.home_leg(&home, None).await.expect("home leg"),
        HomeOutcome::Tombstoned
    ));
    assert!(matches!(
        p.a.open_home_leg(&home).await.expect("open"),
        Opened::Done(HomeOutcome::Tombstoned)
    ));
    assert_eq!(balance(&p.a, payer).await, Decimal::from(10));
    assert_eq!(balance(&p.b, payee).await, Decimal::ZERO);
    assert_eq!(prepared_count(&p).await, 0);
    // The key was never claimed: a retry runs a fresh attempt.
    let (retry, _) = attempt(&p, &o);
    let r = recorded(p.a.home_leg(&retry, None).await.expect("retry"));
    assert_eq!(r.state, TransferState::Committed);
    assert_eq!(balance(&p.a, payer).await, Decimal::from(8));
}

#[tokio::test]
async fn two_attempts_with_one_key_never_both_commit() {
    let p = pair().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let o = order(payer, payee, "1", "k");
    let (first, _) = attempt(&p, &o);
    let Opened::Open(open) = p.a.open_home_leg(&first).await.expect("open") else {
        panic!("expected an open transaction");
    };
    // A duplicate request arrives while the first attempt's transaction is open:
    // it waits for it, then finds the key.
    let (second, _) = attempt(&p, &o);
    let duplicate = async { p.a.home_leg(&second, None).await };
    let commit_later = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        open.commit().await
    };
    let (dup, committed) = tokio::join!(duplicate, commit_later);
    assert_eq!(committed.expect("commit").state, TransferState::Committed);
    assert!(
        matches!(dup.expect("duplicate"), HomeOutcome::KeyExists),
        "the key's first attempt wins"
    );
    assert!(p.a.transfer(second.tid).await.expect("read").is_none());
    assert_eq!(balance(&p.a, payer).await, Decimal::from(9), "debited once");
}
