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

use common::{balance, hold_rows, order, pair_repeatable_read, user};
use rust_decimal::Decimal;
use shard_agent::transfer_local::Submitted;
use shard_agent::two_pc::home::{HomeLeg, HomeOutcome};
use shard_agent::two_pc::prepare::{Leg, Side};
use shard_agent::{Gid, TransferId, TransferState};

async fn raw(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

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
async fn a_tombstone_committed_while_the_home_leg_waits_wins_under_a_repeatable_read_default() {
    let p = pair_repeatable_read().await;
    let payer = user(&p.a, "payer", "10").await;
    let payee = user(&p.b, "payee", "0").await;
    let o = order(payer, payee, "4", "k");
    let tid = TransferId::generate();
    let gid = Gid::new(tid, p.a.id(), p.b.id());
    let credit = Leg {
        gid,
        side: Side::Credit,
        user: payee,
        amount: o.amount.value(),
        currency: o.amount.currency(),
        counterparty: o.from_username.clone(),
    };
    p.b.prepare_leg(&credit)
        .await
        .expect("prepare the payee's leg");

    // Recovery's tombstone, still open: it holds the transfer's advisory lock.
    let recovery = raw(&p.dsn_a).await;
    recovery.batch_execute("BEGIN").await.expect("begin");
    let verdict: String = recovery
        .query_one("SELECT wallet_tombstone($1)", &[&tid.0])
        .await
        .expect("tombstone")
        .get(0);
    assert_eq!(verdict, "tombstoned");

    // The late home leg starts now, takes its snapshot and waits on the lock.
    let home = HomeLeg {
        tid,
        order: &o,
        participants: vec![gid.to_string()],
    };
    let late = async { p.a.home_leg(&home, None).await };
    let commit_tombstone = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        recovery.batch_execute("COMMIT").await.expect("commit");
    };
    let (outcome, ()) = tokio::join!(late, commit_tombstone);
    assert!(
        matches!(outcome.expect("home leg"), HomeOutcome::Tombstoned),
        "the tombstone committed first, so the home leg must see it"
    );
    p.b.rollback_prepared(&gid).await.expect("roll back");
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
    let transfer = async { p.a.transfer_local(&o).await };
    let release = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer.batch_execute("COMMIT").await.expect("commit");
    };
    let (outcome, ()) = tokio::join!(transfer, release);
    match outcome.expect("transfer") {
        Submitted::New(r) => assert_eq!(r.state, TransferState::Committed),
        other => panic!("expected a new committed transfer, got {other:?}"),
    }
    assert_eq!(balance(&p.a, payer).await, Decimal::from(7));
    assert_eq!(balance(&p.a, payee).await, Decimal::from(3));
}
