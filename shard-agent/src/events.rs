//! The shard's outbox (migration V20): the events `wallet_post` writes with
//! every ledger entry on a user's account, and the outbox rows that list the
//! ones not yet published; read here by the relay (which publishes them and
//! takes their outbox rows out under the shard's relay lease) and by the
//! notification feed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use router::UserId;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::agent::{buckets_of, Durability, ShardAgent};
use crate::error::ShardResult;

/// The most events one notification page or one relay read returns.
pub const EVENT_PAGE_MAX: i64 = 1000;

/// One event of the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Uuid,
    pub user_id: Uuid,
    /// The user's sequence number: 1, 2, 3… with no gaps.
    pub seq: i64,
    /// The entry's kind (`transfer_debit`, `deposit`, …) or, for holds and
    /// releases, what they are for (`review_hold`, `dispute_release`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// The transfer the event is about.
    pub transfer_id: Uuid,
    /// Signed: negative takes money out of (or holds it on) the account.
    pub amount: Decimal,
    pub currency: String,
    pub balance_after: Decimal,
    pub counterparty: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The outbox rows the relay publishes, counts as lag and prunes here
/// (alias `o`): those of buckets this shard owns outright. Not a fenced
/// bucket (its rows are being copied; the target publishes whatever is left
/// in the outbox after the switch), nor an incoming or moved one. The owned
/// buckets are read once per statement (a hashed subplan of at most 4,096
/// rows), not once per row.
const OUTBOX_OWNED: &str = "(NOT EXISTS (SELECT 1 FROM bucket_ownership_init)
     OR o.bucket IN (SELECT ob.bucket FROM owned_buckets ob WHERE ob.state = 'owned'))";

/// The same for events (alias `e`), through their users: for pruning only,
/// which runs once a minute.
const EVENTS_OWNED: &str = "(NOT EXISTS (SELECT 1 FROM bucket_ownership_init)
     OR EXISTS (SELECT 1 FROM owned_buckets ob JOIN users ou ON ob.bucket = ou.bucket
                 WHERE ou.user_id = e.user_id AND ob.state = 'owned'))";

/// The most an event's outbox row may be younger than the event (their
/// `created_at`): the two are inserted by consecutive statements of one
/// `wallet_post` call, so this is far past any real gap. Pruning relies on it
/// to read only the old end of the outbox.
const OUTBOX_AFTER_EVENT_MAX: &str = "1 hour";

const EVENT_COLUMNS: &str = "e.event_id, e.user_id, e.seq, e.type, e.transfer_id, e.amount, \
                             e.currency::text, e.balance_after, e.counterparty, e.created_at";

/// An event still in the outbox: its outbox row's number (what the relay
/// deletes once the broker acknowledged it) and the event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub outbox_no: i64,
    /// The user's bucket, which the relay's delete must still own.
    pub bucket: i32,
    pub event: Event,
}

impl Event {
    fn from_row(row: &tokio_postgres::Row) -> Event {
        Event {
            event_id: row.get(0),
            user_id: row.get(1),
            seq: row.get(2),
            kind: row.get(3),
            transfer_id: row.get(4),
            amount: row.get(5),
            currency: row.get(6),
            balance_after: row.get(7),
            counterparty: row.get(8),
            created_at: row.get(9),
        }
    }
}

/// How far the relay is behind on one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OutboxLag {
    /// Events not yet published.
    pub unpublished: i64,
    /// Age of the oldest of them, in seconds (0 when there is none).
    pub oldest_age_s: f64,
}

impl ShardAgent {
    /// Takes or renews this shard's relay lease for `holder` until `ttl` from
    /// now, if nobody else holds an unexpired one. True when `holder` holds it.
    pub async fn take_relay_lease(&self, holder: &str, ttl: Duration) -> ShardResult<bool> {
        self.timed("take relay lease", async {
            let conn = self.conn().await?;
            let rows = conn
                .execute(
                    "UPDATE event_relay_lease
                        SET holder = $1, expires_at = clock_timestamp() + make_interval(secs => $2)
                      WHERE holder = $1 OR expires_at < clock_timestamp()",
                    &[&holder, &ttl.as_secs_f64()],
                )
                .await
                .map_err(self.pg("take relay lease"))?;
            Ok(rows == 1)
        })
        .await
    }

    /// Up to `limit` events of the outbox (not yet published) of the buckets
    /// this shard owns, in the order they were written (each user's in seq
    /// order).
    ///
    /// Each outbox row finds its event by one index probe: the lateral
    /// subquery with a limit of its own cannot be turned into a join. A plain
    /// join was hashed, reading the whole events table on every round, for
    /// as long as that table was small next to the batch.
    pub async fn unpublished_events(&self, limit: i64) -> ShardResult<Vec<Pending>> {
        let limit = limit.clamp(1, EVENT_PAGE_MAX);
        self.timed("read outbox", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS}, o.outbox_no, o.bucket
                           FROM (SELECT outbox_no, event_id, bucket FROM event_outbox o
                                  WHERE {OUTBOX_OWNED} ORDER BY outbox_no LIMIT {limit}) o
                           LEFT JOIN LATERAL (SELECT * FROM events e
                                               WHERE e.event_id = o.event_id LIMIT 1) e ON true
                          ORDER BY o.outbox_no"
                    ),
                    &[],
                )
                .await
                .map_err(self.pg("read outbox"))?;
            // An outbox row whose event is gone (invariant 9 forbids it) is
            // taken out, so it can never hold up the rows behind it.
            let orphans: Vec<i64> = rows
                .iter()
                .filter(|r| r.get::<_, Option<uuid::Uuid>>(0).is_none())
                .map(|r| r.get(10))
                .collect();
            if !orphans.is_empty() {
                tracing::error!(shard = %self.id(), rows = ?orphans, "outbox rows without their event; taking them out");
                conn.execute(
                    "DELETE FROM event_outbox o WHERE outbox_no = ANY ($1)
                        AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = o.event_id)",
                    &[&orphans],
                )
                .await
                .map_err(self.pg("take out orphan outbox rows"))?;
            }
            Ok(rows
                .iter()
                .filter(|r| r.get::<_, Option<uuid::Uuid>>(0).is_some())
                .map(|r| Pending {
                    outbox_no: r.get(10),
                    bucket: r.get(11),
                    event: Event::from_row(r),
                })
                .collect())
        })
        .await
    }

    /// Takes the outbox rows of `published` out (their events are
    /// published), only while `holder` holds the relay lease (a relay that
    /// lost it takes nothing out; the next holder publishes those events
    /// again, and the broker drops the copies by ID). Returns how many rows
    /// it took out. One round trip: BEGIN, the ownership check of the rows'
    /// buckets (known from the read), the delete and COMMIT are pipelined.
    ///
    /// The delete commits without waiting for its WAL flush
    /// (`synchronous_commit` off, for this transaction only): a shard that
    /// crashes before the flush forgets the delete, and the events are
    /// published again, which at-least-once publishing allows and the
    /// broker drops by ID. Money never commits this way.
    pub async fn mark_published(&self, holder: &str, published: &[&Pending]) -> ShardResult<u64> {
        let outbox_nos: Vec<i64> = published.iter().map(|p| p.outbox_no).collect();
        let mut buckets: Vec<i32> = published.iter().map(|p| p.bucket).collect();
        buckets.sort_unstable();
        buckets.dedup();
        self.timed("mark events published", async {
            let mut conn = self.conn().await?;
            let delete = conn
                .prepare_cached(
                    "DELETE FROM event_outbox
                      WHERE outbox_no = ANY ($2) AND bucket = ANY ($3)
                        AND EXISTS (SELECT 1 FROM event_relay_lease
                                     WHERE holder = $1 AND expires_at > clock_timestamp())
                     RETURNING 1",
                )
                .await
                .map_err(self.pg("prepare mark events published"))?;
            // The rows' buckets must still be this shard's, under their
            // shared locks, as for any write of a bucket's rows: a move's
            // fence waits for this delete or refuses it, so a move never
            // copies an outbox that is still changing. The delete also
            // keeps to the buckets checked, whatever the caller passed.
            let rows = conn
                .owned_autocommit(
                    self.id(),
                    Durability::NoFlushWait,
                    &buckets,
                    &delete,
                    &[&holder, &outbox_nos, &buckets],
                    self.pg("mark events published"),
                )
                .await?;
            Ok(rows.len() as u64)
        })
        .await
    }

    /// The relay's lag here: outbox rows of owned buckets, and the age of
    /// the oldest.
    pub async fn outbox_lag(&self) -> ShardResult<OutboxLag> {
        self.timed("read outbox lag", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one(
                    &format!(
                        "SELECT count(*),
                                coalesce(extract(epoch FROM clock_timestamp() - min(created_at))::float8, 0)
                           FROM event_outbox o WHERE {OUTBOX_OWNED}"
                    ),
                    &[],
                )
                .await
                .map_err(self.pg("read outbox lag"))?;
            Ok(OutboxLag {
                unpublished: row.get(0),
                oldest_age_s: row.get::<_, f64>(1).max(0.0),
            })
        })
        .await
    }

    /// Prunes what is older than `retention`, at most `limit` rows of each
    /// table, in owned buckets only (a move's copy counts rows): with
    /// `unpublished_too` (no broker: nobody publishes), outbox rows first;
    /// then events no longer in the outbox, oldest first and never a user's
    /// newest, so the numbers kept always run without a hole up to the
    /// account's `event_seq` (unless an event older than the retention is
    /// still unpublished). Returns how many events it deleted.
    pub async fn prune_events(
        &self,
        retention: Duration,
        unpublished_too: bool,
        limit: i64,
    ) -> ShardResult<u64> {
        self.timed("prune events", async {
            let conn = self.conn().await?;
            let secs = retention.as_secs_f64();
            if unpublished_too {
                conn.execute(
                    &format!(
                        "DELETE FROM event_outbox WHERE outbox_no = ANY (ARRAY(
                             SELECT o.outbox_no
                               FROM (SELECT outbox_no, bucket, created_at FROM event_outbox
                                      ORDER BY outbox_no LIMIT $2) o
                              WHERE o.created_at < clock_timestamp() - make_interval(secs => $1)
                                AND {OUTBOX_OWNED}))"
                    ),
                    &[&secs, &limit],
                )
                .await
                .map_err(self.pg("prune outbox"))?;
            }
            // An event still in the outbox is never pruned. The cut-off is
            // `now()`, not `clock_timestamp()`: a volatile bound cannot use
            // the indexes by age, and both reads were whole-table scans once
            // a minute. Only outbox rows up to OUTBOX_AFTER_EVENT_MAX younger
            // than the cut-off are read (once per statement, a hashed subplan):
            // an outbox row is inserted by the statement after its event's
            // (`wallet_post`), and a move copies both with their times, so it
            // is never younger than its event by more than one statement.
            conn.execute(
                &format!(
                    "DELETE FROM events WHERE event_id = ANY (ARRAY(
                         SELECT e.event_id FROM events e
                          WHERE e.created_at < now() - make_interval(secs => $1)
                            AND e.event_id NOT IN (
                                SELECT o.event_id FROM event_outbox o
                                 WHERE o.created_at < now() - make_interval(secs => $1)
                                                      + interval '{OUTBOX_AFTER_EVENT_MAX}')
                            AND e.seq < (SELECT a.event_seq FROM accounts a WHERE a.user_id = e.user_id)
                            AND {EVENTS_OWNED}
                          ORDER BY e.created_at, e.user_id, e.seq LIMIT $2))"
                ),
                &[&secs, &limit],
            )
            .await
            .map_err(self.pg("prune events"))
        })
        .await
    }

    /// The user's events with seq above `after`, in seq order, at most
    /// `limit` (published or not: the feed does not wait for the broker).
    pub async fn notifications(
        &self,
        user: UserId,
        after: i64,
        limit: i64,
    ) -> ShardResult<Vec<Event>> {
        let limit = limit.clamp(1, EVENT_PAGE_MAX);
        self.timed(
            "read notifications",
            self.owned_read(&buckets_of([&user]), async |conn| {
                let rows = conn
                    .query(
                        &format!(
                            "SELECT {EVENT_COLUMNS} FROM events e
                              WHERE e.user_id = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3"
                        ),
                        &[user.as_uuid(), &after, &limit],
                    )
                    .await
                    .map_err(self.pg("read notifications"))?;
                Ok(rows.iter().map(Event::from_row).collect())
            }),
        )
        .await
    }
}

impl ShardAgent {
    /// Every event of the buckets this shard serves, by user and seq: the
    /// delivery checker's view of what was written.
    pub async fn served_events(&self) -> ShardResult<Vec<Event>> {
        self.timed("read all events", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events e
                          WHERE wallet_serves((SELECT u.bucket FROM users u WHERE u.user_id = e.user_id))
                          ORDER BY e.user_id, e.seq"
                    ),
                    &[],
                )
                .await
                .map_err(self.pg("read all events"))?;
            Ok(rows.iter().map(Event::from_row).collect())
        })
        .await
    }
}
