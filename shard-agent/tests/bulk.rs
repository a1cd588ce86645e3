//! Bulk loading (for `wallet bench`) keeps every invariant, and the checker still
//! catches money that appears from nowhere after one.

mod common;

use checker::Snapshot;
use common::{balance, hold_rows, key, pair, sql, transfer_alone, usd};
use router::{bucket_of, UserId};
use rust_decimal::Decimal;
use shard_agent::bulk::{BulkDefaults, BulkUser};
use shard_agent::transfer::{Submitted, TransferOrder};
use shard_agent::{Currency, TransferState};

fn bulk_users(n: usize) -> Vec<BulkUser> {
    (0..n)
        .map(|i| {
            let username = format!("bulk{i:04}");
            let user_id = UserId::for_username(&username);
            BulkUser {
                user_id,
                bucket: bucket_of(&user_id),
                username,
                session_token_hash: Some(vec![i as u8; 32]),
            }
        })
        .collect()
}

/// A transfer from the first of `users` to the second.
fn first_pays_second(users: &[BulkUser], amount: &str, k: &str) -> TransferOrder {
    TransferOrder {
        from: users[0].user_id,
        from_username: users[0].username.clone(),
        to: users[1].user_id,
        to_username: users[1].username.clone(),
        amount: usd(amount),
        key: key(users[0].user_id, k),
        refund_of: None,
        reason: None,
        dispute: None,
        release_of: None,
    }
}

fn defaults() -> BulkDefaults {
    BulkDefaults {
        currency: Currency::Usd,
        opening_balance: Decimal::new(25_00, 2),
        password_hash: "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".into(),
        session_ttl_s: 3600,
    }
}

#[tokio::test]
async fn a_bulk_load_conserves_money_and_its_users_can_transfer() {
    let p = pair().await;
    let users = bulk_users(200);
    p.a.bulk_load_users(&users, &defaults())
        .await
        .expect("bulk load");

    let snap = Snapshot::take(&[p.a.clone(), p.b.clone()])
        .await
        .expect("snapshot");
    assert_eq!(snap.violations(true), Vec::<String>::new());
    let totals = snap.totals();
    assert_eq!(totals.user_balances["USD"], Decimal::new(5000, 0));
    assert_eq!(totals.clearing_balances["USD"], Decimal::new(-5000, 0));

    // A same-shard transfer works on loaded users, and its key replays.
    let (from, to) = (users[0].user_id, users[1].user_id);
    let order = first_pays_second(&users, "7.25", "bulk-1");
    let Submitted::New(first) = transfer_alone(&p.a, &order).await else {
        panic!("a new key makes a new transfer");
    };
    assert_eq!(first.state, TransferState::Committed);
    let Submitted::Replayed(again) = transfer_alone(&p.a, &order).await else {
        panic!("the same key replays");
    };
    assert_eq!(again.transfer_id, first.transfer_id);
    // A replay does not wait on the accounts' row locks (a prepared leg, a hot
    // payee): it answers from the key while another transaction holds them.
    let holder = hold_rows(&p.dsn_a, &[from, to]).await;
    let Submitted::Replayed(locked) = transfer_alone(&p.a, &order).await else {
        panic!("the same key replays");
    };
    assert_eq!(locked.transfer_id, first.transfer_id);
    holder.batch_execute("ROLLBACK").await.expect("release");
    assert_eq!(balance(&p.a, from).await, Decimal::new(1775, 2));
    assert_eq!(balance(&p.a, to).await, Decimal::new(3225, 2));

    let snap = Snapshot::take(&[p.a.clone(), p.b.clone()])
        .await
        .expect("snapshot");
    assert_eq!(snap.violations(true), Vec::<String>::new());

    // Money from nowhere, with no ledger entry: the checker must say so.
    sql(
        &p.dsn_a,
        &format!(
            "UPDATE accounts SET balance = balance + 1 WHERE user_id = '{}'",
            to.as_uuid()
        ),
    )
    .await;
    let snap = Snapshot::take(&[p.a.clone(), p.b.clone()])
        .await
        .expect("snapshot");
    let violations = snap.violations(true);
    assert!(
        violations.iter().any(|v| v.starts_with("invariant 1")),
        "{violations:?}"
    );
    assert!(
        violations.iter().any(|v| v.starts_with("invariant 4")),
        "{violations:?}"
    );
}

#[tokio::test]
async fn a_local_transfer_is_refused_whole_when_funds_are_short() {
    let p = pair().await;
    let users = bulk_users(2);
    p.a.bulk_load_users(&users, &defaults())
        .await
        .expect("bulk load");
    let from = users[0].user_id;
    let order = first_pays_second(&users, "25.01", "too-much");
    let Submitted::New(r) = transfer_alone(&p.a, &order).await else {
        panic!("a new key makes a new transfer");
    };
    assert_eq!(r.state, TransferState::Aborted);
    assert_eq!(
        r.failure_code,
        Some(shard_agent::FailureCode::InsufficientFunds)
    );
    assert_eq!(balance(&p.a, from).await, Decimal::new(25, 0));
    let snap = Snapshot::take(&[p.a.clone(), p.b.clone()])
        .await
        .expect("snapshot");
    assert_eq!(snap.violations(true), Vec::<String>::new());
}
