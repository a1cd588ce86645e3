//! The protocol against shards whose default isolation is `repeatable read`.
//!
//! Every compare-and-set of the protocol (the decision, recovery's tombstone,
//! the debit's `balance >= amount`) reads rows that another transaction may have
//! committed while this one waited on a lock. Under READ COMMITTED each
//! statement sees them; under REPEATABLE READ it reads its old snapshot, so the
//! loser of a race would commit too. The shard agent pins the isolation level on
//! every connection; these tests fail without that.

mod common;

use std::time::Duration;

use common::{balance, hold_rows, order, pair_repeatable_read, raw, transfer_alone, user};
use rust_decimal::Decimal;
use shard_agent::batch::{BatchLeg, Verdict};
use shard_agent::transfer::Submitted;
use shard_agent::{Gid, TransferId, TransferState};

#[tokio::test]
async fn every_shard_connection_runs_read_committed_whatever_the_server_default() {
    let p = pair_repeatable_read().await;
    let direct = raw(&p.dsn_a).await;
    let default: String = direct
        .query_one("SHOW default_transaction_isolation", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(
        default, "repeatable read",
        "the test database's own default"
    );
    assert_eq!(
        p.a.session_isolation().await.expect("read the setting"),
        "read committed"
    );
}

#[tokio::test]
async fn a_tombstone_committed_while_the_decision_waits_wins_under_a_repeatable_read_default() {
    let p = pair_repeatable_read().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let o = order(payer, payee, "4", "k");
    let group = TransferId::generate();
    let debit = BatchLeg {
        tid: TransferId::generate(),
        debit: true,
        user: payer,
        user_name: o.from_username.clone(),
        party: payee,
        party_name: o.to_username.clone(),
        amount: o.amount,
        key: Some(o.key.clone()),
        session: None,
        refund_of: None,
        reason: None,
        dispute: None,
        release: false,
    };
    // The deciding shard's part of a group, applied, not yet decided.
    let (mut txn, found) =
        p.a.open_batch(std::slice::from_ref(&debit), &[Verdict::Pass], None)
            .await
            .expect("check");
    assert_eq!(found, vec![Verdict::Pass]);
    let gid = Gid::new(group, p.a.id(), p.b.id());
    txn.apply_undecided(group.0, &[gid.to_string()], &[debit], &[Verdict::Pass])
        .await
        .expect("apply");

    // Recovery's tombstone, still open: it holds the group's advisory lock.
    let recovery = raw(&p.dsn_a).await;
    recovery.batch_execute("BEGIN").await.expect("begin");
    let verdict: String = recovery
        .query_one("SELECT wallet_tombstone($1)", &[&group.0])
        .await
        .expect("tombstone")
        .get(0);
    assert_eq!(verdict, "tombstoned");

    // The late decision waits on the lock; the tombstone commits meanwhile.
    let late = txn.decide(group.0);
    let commit_tombstone = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        recovery.batch_execute("COMMIT").await.expect("commit");
    };
    let (decided, ()) = tokio::join!(late, commit_tombstone);
    assert!(
        matches!(decided, Err(shard_agent::ShardError::Database { .. })),
        "the tombstone committed first, so the decision must see it: {decided:?}"
    );
    assert_eq!(balance(&p.a, payer).await, Decimal::from(10), "no debit");
    assert_eq!(balance(&p.b, payee).await, Decimal::ZERO);
}

#[tokio::test]
async fn a_debit_that_waited_behind_another_writer_applies_under_a_repeatable_read_default() {
    let p = pair_repeatable_read().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.a, "payee", "0").await;
    // Another writer updates the payer's row and commits while the transfer waits
    // on it; under REPEATABLE READ the transfer would fail to serialize.
    let writer = hold_rows(&p.dsn_a, &[payer]).await;
    writer
        .batch_execute(&format!(
            "UPDATE accounts SET balance = balance WHERE user_id = '{}'",
            payer.as_uuid()
        ))
        .await
        .expect("touch the row");
    let o = order(payer, payee, "3", "k");
    let transfer = transfer_alone(&p.a, &o);
    let release = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer.batch_execute("COMMIT").await.expect("commit");
    };
    let (outcome, ()) = tokio::join!(transfer, release);
    match outcome {
        Submitted::New(r) => assert_eq!(r.state, TransferState::Committed),
        other => panic!("expected a new committed transfer, got {other:?}"),
    }
    assert_eq!(balance(&p.a, payer).await, Decimal::from(7));
    assert_eq!(balance(&p.a, payee).await, Decimal::from(3));
}
