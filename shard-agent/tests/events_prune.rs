//! Pruning old events against real PostgreSQL: an event still in the outbox
//! is never pruned, even when its outbox row is a little younger than the
//! event (the two are inserted by consecutive statements), and each user
//! keeps their newest event.

mod common;

use std::time::Duration;

use common::{order, pair, raw, transfer_alone, user};
use router::UserId;

const TEN_DAYS: Duration = Duration::from_secs(10 * 24 * 3600);

/// The user's event numbers still stored, in order.
async fn seqs(db: &tokio_postgres::Client, user: UserId) -> Vec<i64> {
    db.query(
        "SELECT seq FROM events WHERE user_id = $1 ORDER BY seq",
        &[&user.0],
    )
    .await
    .expect("read events")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn an_event_still_in_the_outbox_is_kept_while_its_row_is_up_to_an_hour_younger() {
    let p = pair().await;
    let payer = user(&p.a, "prune_payer", "30").await;
    let payee = user(&p.a, "prune_payee", "5").await;
    transfer_alone(&p.a, &order(payer, payee, "1.00", "prune-1")).await;
    let db = raw(&p.dsn_a).await;
    assert_eq!(seqs(&db, payer).await, vec![1, 2]);
    assert_eq!(seqs(&db, payee).await, vec![1, 2]);

    // Every event is older than ten days. The payer's first event is still
    // in the outbox, with a row half an hour younger than the cut-off; the
    // payee's first event was published (its row is gone).
    db.batch_execute(&format!(
        "UPDATE events SET created_at = now() - interval '10 days 1 minute';
         UPDATE event_outbox SET created_at = now() - interval '10 days 1 minute';
         UPDATE event_outbox o SET created_at = now() - interval '10 days' + interval '30 minutes'
           FROM events e WHERE e.event_id = o.event_id AND e.user_id = '{payer}' AND e.seq = 1;
         DELETE FROM event_outbox o USING events e
          WHERE e.event_id = o.event_id AND e.user_id = '{payee}' AND e.seq = 1;",
        payer = payer.0,
        payee = payee.0,
    ))
    .await
    .expect("date the events");

    let pruned = p.a.prune_events(TEN_DAYS, false, 100).await.expect("prune");
    assert_eq!(pruned, 1, "only the payee's published first event goes");
    assert_eq!(
        seqs(&db, payer).await,
        vec![1, 2],
        "an event still in the outbox stays"
    );
    assert_eq!(seqs(&db, payee).await, vec![2], "the newest event stays");

    // With no broker, outbox rows past the retention go first; this one is
    // not past it yet.
    let pruned = p.a.prune_events(TEN_DAYS, true, 100).await.expect("prune");
    assert_eq!(pruned, 0);
    assert_eq!(seqs(&db, payer).await, vec![1, 2]);

    db.batch_execute("UPDATE event_outbox SET created_at = now() - interval '11 days'")
        .await
        .expect("age the outbox");
    let pruned = p.a.prune_events(TEN_DAYS, true, 100).await.expect("prune");
    assert_eq!(pruned, 1, "the payer's first event, once out of the outbox");
    assert_eq!(seqs(&db, payer).await, vec![2]);
    let orphans: i64 = db
        .query_one(
            "SELECT count(*) FROM event_outbox o
              WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = o.event_id)",
            &[],
        )
        .await
        .expect("count orphans")
        .get(0);
    assert_eq!(orphans, 0, "no outbox row is left without its event");
}
