//! The shard's own ownership check (`wallet_own`) on every write path against
//! real PostgreSQL: a bucket that is fenced or moved away is refused with
//! `NotOwner` naming the bucket and its state, and the refusal writes nothing;
//! once the bucket is owned again the same call goes through.

mod common;

use common::{balance, order, pair, user};
use router::{bucket_of, UserId, BUCKET_COUNT};
use rust_decimal::Decimal;
use shard_agent::batch::{BatchLeg, Verdict};
use shard_agent::ownership::Fenced;
use shard_agent::redis_legs::PendingCredit;
use shard_agent::{Currency, ShardAgent, ShardError, TransferId};

/// The move that fences the payer's bucket in these tests.
const MOVE: i64 = 1;

fn d(text: &str) -> Decimal {
    text.parse().expect("a decimal")
}

/// Records that `agent` owns every bucket, as a coordinator does on first open.
async fn own_everything(agent: &ShardAgent) {
    let all: Vec<u16> = (0..BUCKET_COUNT).collect();
    assert!(agent
        .init_ownership(&all, 1)
        .await
        .expect("record ownership"));
}

/// Asserts that `result` is a refusal of `user`'s bucket in `state`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, ShardError>, user: UserId, state: &str) {
    match result {
        Err(ShardError::NotOwner {
            bucket, state: s, ..
        }) => {
            assert_eq!(bucket, bucket_of(&user).0, "the refusal names the bucket");
            assert_eq!(s, state, "the refusal names the bucket's state");
        }
        other => panic!("expected NotOwner({state}), got {other:?}"),
    }
}

async fn pending_credits(agent: &ShardAgent) -> i64 {
    agent.audit().await.expect("audit").pending_credits
}

#[tokio::test]
async fn every_write_path_refuses_a_fenced_bucket_and_writes_nothing() {
    let p = pair().await;
    let payer = user(&p.a, "own_payer", "100").await;
    let near = user(&p.a, "own_near", "0").await;
    let far = user(&p.b, "own_far", "0").await;
    own_everything(&p.a).await;
    let bucket = bucket_of(&payer).0;
    assert_ne!(
        bucket,
        bucket_of(&near).0,
        "the test needs the two local users in different buckets"
    );
    assert_eq!(
        p.a.fence_bucket(bucket, MOVE, 200).await.expect("fence"),
        Fenced::Yes
    );

    // A same-shard group (wallet_batch_local).
    let legs = BatchLeg::both(
        TransferId::generate(),
        &order(payer, near, "10", "local"),
        None,
    );
    assert_refused(
        p.a.transfer_local_batch(&legs, 2_000).await,
        payer,
        "fenced",
    );

    // A 2PC open: the check runs in the group's transaction before any lock.
    let [debit, _] = BatchLeg::both(
        TransferId::generate(),
        &order(payer, far, "10", "2pc"),
        None,
    );
    let opened = p.a.open_batch(&[debit], &[Verdict::Pass], None).await;
    assert_refused(opened.map(|(_, v)| v), payer, "fenced");

    // Redis mode: the debits (the commit point) and a pending credit's apply.
    let [debit, _] = BatchLeg::both(
        TransferId::generate(),
        &order(payer, far, "10", "redis"),
        None,
    );
    assert_refused(
        p.a.redis_debit_group(&[debit], &[Verdict::Pass], 10, 2_000)
            .await,
        payer,
        "fenced",
    );
    let credit = PendingCredit {
        transfer_id: TransferId::generate(),
        to_user: payer,
        to_username: "own_payer".into(),
        from_username: "own_far".into(),
        amount: d("5"),
        currency: Currency::Usd,
        refund_of: None,
        dispute: None,
    };
    assert_refused(
        p.a.credit_group(std::slice::from_ref(&credit), 11).await,
        payer,
        "fenced",
    );

    // Nothing of the four was written; the rows are still readable, frozen.
    assert_eq!(balance(&p.a, payer).await, d("100.00"));
    assert_eq!(balance(&p.a, near).await, d("0.00"));
    assert_eq!(pending_credits(&p.a).await, 0);

    // The move rolled back: the same calls go through.
    assert!(p
        .a
        .set_bucket_state(bucket, MOVE, &["fenced"], "owned", 2)
        .await
        .expect("unfence"));
    let legs = BatchLeg::both(
        TransferId::generate(),
        &order(payer, near, "10", "local"),
        None,
    );
    p.a.transfer_local_batch(&legs, 2_000)
        .await
        .expect("owned again");
    p.a.credit_group(&[credit], 11).await.expect("credit");
    assert_eq!(balance(&p.a, payer).await, d("95.00"));
    assert_eq!(balance(&p.a, near).await, d("10.00"));
}

#[tokio::test]
async fn a_moved_bucket_refuses_reads_too_while_other_buckets_carry_on() {
    let p = pair().await;
    let gone = user(&p.a, "mv_gone", "20").await;
    let stays = user(&p.a, "mv_stays", "20").await;
    let other = user(&p.a, "mv_other", "0").await;
    own_everything(&p.a).await;
    let bucket = bucket_of(&gone).0;
    assert!(
        bucket != bucket_of(&stays).0 && bucket != bucket_of(&other).0,
        "the test needs the moved user alone in its bucket"
    );
    assert_eq!(
        p.a.fence_bucket(bucket, MOVE, 200).await.expect("fence"),
        Fenced::Yes
    );
    assert!(p
        .a
        .set_bucket_state(bucket, MOVE, &["fenced"], "moved", 2)
        .await
        .expect("switch away"));

    // A fenced bucket is still readable; a moved one is not, though its rows
    // are still here until the source is cleaned.
    assert_refused(p.a.account_view(gone, 1, None).await, gone, "moved");

    // Writes of the other buckets are not held up.
    let legs = BatchLeg::both(
        TransferId::generate(),
        &order(stays, other, "7", "carry-on"),
        None,
    );
    p.a.transfer_local_batch(&legs, 2_000)
        .await
        .expect("another bucket");
    assert_eq!(balance(&p.a, other).await, d("7.00"));
}

/// The relay's delete of published outbox rows is a write of their buckets
/// like any other: refused while a bucket is fenced (the rows stay for the
/// move to copy), a no-op for a relay that does not hold the lease, and done
/// once the bucket is owned again.
#[tokio::test]
async fn the_relays_delete_is_refused_for_a_fenced_bucket_and_keeps_the_rows() {
    let p = pair().await;
    let payer = user(&p.a, "relay_payer", "30").await;
    own_everything(&p.a).await;
    let ttl = std::time::Duration::from_secs(30);
    assert!(p.a.take_relay_lease("relay-a", ttl).await.expect("lease"));
    let published = p.a.unpublished_events(100).await.expect("read outbox");
    let mine: Vec<_> = published
        .iter()
        .filter(|e| e.event.user_id == payer.0)
        .collect();
    assert_eq!(mine.len(), 1, "the deposit's event waits in the outbox");
    assert_eq!(mine[0].bucket, i32::from(bucket_of(&payer).0));

    let bucket = bucket_of(&payer).0;
    assert_eq!(
        p.a.fence_bucket(bucket, MOVE, 200).await.expect("fence"),
        Fenced::Yes
    );
    assert_refused(p.a.mark_published("relay-a", &mine).await, payer, "fenced");
    assert!(p
        .a
        .set_bucket_state(bucket, MOVE, &["fenced"], "owned", 2)
        .await
        .expect("unfence"));
    let still = p.a.unpublished_events(100).await.expect("read outbox");
    assert!(
        still.iter().any(|e| e.outbox_no == mine[0].outbox_no),
        "a refused delete takes nothing out"
    );

    assert_eq!(
        p.a.mark_published("relay-b", &mine).await.expect("delete"),
        0,
        "a relay without the lease takes nothing out"
    );
    assert_eq!(
        p.a.mark_published("relay-a", &mine).await.expect("delete"),
        1
    );
    let after = p.a.unpublished_events(100).await.expect("read outbox");
    assert!(after.iter().all(|e| e.outbox_no != mine[0].outbox_no));
}
