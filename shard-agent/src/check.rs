//! Read-only queries the invariant checker runs on each shard (the invariants of ARCHITECTURE.md
//! 1-5), one consistent snapshot per shard. Callers run them when the system is
//! quiet for the verdict, and while faults run for a report.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::agent::ShardAgent;
use crate::error::ShardResult;
use crate::gid::Gid;

/// One shard's totals and local invariant violations.
#[derive(Clone, Debug, Default)]
pub struct ShardAudit {
    /// Sum of user balances per currency.
    pub user_balances: BTreeMap<String, Decimal>,
    /// Sum of user accounts' opening balances per currency: money a bulk load
    /// (`wallet bench`) placed on them, offset on the clearing account. Zero for
    /// users who signed up through the API.
    pub user_opening: BTreeMap<String, Decimal>,
    /// Sum of clearing balances per currency (negative of net deposits).
    pub clearing_balances: BTreeMap<String, Decimal>,
    /// Invariant 2: user accounts whose balance less held money is below
    /// zero, dispute holds aside (a dispute may hold more than is available).
    pub negative_balances: i64,
    /// Invariant 4: accounts whose opening balance plus entries differs from the balance.
    pub ledger_mismatches: i64,
    /// Accounts whose held money is not the sum of their withdrawals waiting
    /// on a payment provider, their open disputes and their transfers held
    /// for review, or whose hold and release entries do not net to the last
    /// two (invariant 4).
    pub hold_mismatches: i64,
    /// Invariant 5: our prepared transactions, and transfers not yet decided.
    pub prepared: i64,
    pub undecided_transfers: i64,
    /// Redis-lock mode: debits whose credit is not applied yet (invariant 5).
    pub pending_credits: i64,
    /// Redis-lock mode: fenced writes that landed after a write with a newer
    /// fencing token on the same account (a stale lock holder wrote).
    pub fence_regressions: i64,
    /// Invariant 8: user accounts without an admin's override whose usage
    /// today is above the configured default limit of their currency.
    pub limit_overruns: i64,
    /// Invariant 8: user accounts whose recorded usage today is not the sum
    /// of today's transfer debits on their ledger.
    pub usage_mismatches: i64,
    /// Invariant 9: user accounts whose events are not numbered 1..event_seq
    /// without gaps (from the oldest kept, after pruning), or, with nothing
    /// pruned, not one per ledger entry.
    pub event_seq_mismatches: i64,
    /// Invariant 9: events that are not the event of a ledger entry on their
    /// user's account (same ID, amount and balance after), and outbox rows
    /// whose event does not exist.
    pub orphan_events: i64,
    /// Invariant 3: every decision record of this home shard…
    pub decisions: Vec<DecisionRow>,
    /// …and every ledger entry on this shard's user accounts.
    pub entries: Vec<EntryRow>,
    /// Each user's balance, by username, for checking against a client's model.
    pub balances_by_user: Vec<(String, Decimal)>,
}

/// A decision record, for matching against the ledger (invariant 3).
#[derive(Clone, Debug)]
pub struct DecisionRow {
    pub transfer_id: Uuid,
    pub kind: String,
    pub state: String,
    pub amount: Decimal,
    /// A refund's original transfer.
    pub refund_of: Option<Uuid>,
}

/// A ledger entry reduced to what exactly-once checking needs.
#[derive(Clone, Debug)]
pub struct EntryRow {
    pub transfer_id: Uuid,
    pub kind: String,
    pub amount: Decimal,
}

/// The rows an audit counts: those of the buckets this shard serves
/// (`wallet_serves`), and the clearing accounts. A bucket copied in by a move
/// that has not switched, or switched away and not cleaned yet, is another
/// shard's.
const SERVED: &str = "(kind = 'clearing' OR wallet_serves(bucket))";
const SERVED_A: &str = "(a.kind = 'clearing' OR wallet_serves(a.bucket))";
/// An account's usage of its daily limit today (UTC), as the check reads it.
const USED_TODAY: &str = "(CASE WHEN a.used_day >= (now() AT TIME ZONE 'UTC')::date
                                THEN a.used_today ELSE 0 END)";
/// A transfer record belongs to its home user's bucket.
const SERVED_T: &str = "coalesce((SELECT wallet_serves(u.bucket) FROM users u
                                   WHERE u.user_id = coalesce(t.from_user, t.to_user)), true)";

impl ShardAgent {
    /// Users this shard serves, and the sum of their balances per currency.
    pub async fn served_totals(&self) -> ShardResult<(i64, BTreeMap<String, Decimal>)> {
        self.timed("served totals", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    &format!(
                        "SELECT trim(currency), count(*), coalesce(sum(balance), 0) FROM accounts
                          WHERE kind = 'user' AND {SERVED} GROUP BY currency"
                    ),
                    &[],
                )
                .await
                .map_err(self.pg("served totals"))?;
            let users = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
            let balances = rows.iter().map(|r| (r.get(0), r.get(2))).collect();
            Ok((users, balances))
        })
        .await
    }

    /// WAL flushes this shard's server has made since its statistics were reset
    /// (`pg_stat_wal.wal_sync`, by backends and the WAL writer together): with the
    /// number of transfers, the fsyncs each one cost.
    pub async fn wal_syncs(&self) -> ShardResult<i64> {
        self.timed("read WAL statistics", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one("SELECT wal_sync FROM pg_stat_wal", &[])
                .await
                .map_err(self.pg("read WAL statistics"))?;
            Ok(row.get("wal_sync"))
        })
        .await
    }

    /// One shard's audit. The prepared count is read first, and everything else in
    /// one REPEATABLE READ snapshot taken after it: so "nothing prepared" means every
    /// leg committed before the snapshot and the balances include it.
    pub async fn audit(&self) -> ShardResult<ShardAudit> {
        self.timed("audit", async {
            let mut conn = self.conn().await?;
            let pg = self.pg("audit");
            let prepared: i64 = conn
                .query_one(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE $1",
                    &[&Gid::like_pattern()],
                )
                .await
                .map_err(&pg)?
                .get(0);
            conn.in_txn_begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", self.id()).await?;
            let mut audit = ShardAudit { prepared, ..ShardAudit::default() };
            for row in conn
                .query(&format!("SELECT kind, currency, sum(balance), sum(opening_balance) FROM accounts WHERE {SERVED} GROUP BY kind, currency"), &[])
                .await
                .map_err(&pg)?
            {
                let kind: &str = row.get(0);
                let currency: String = row.get(1);
                let sum: Decimal = row.get(2);
                let opening: Decimal = row.get(3);
                let currency = currency.trim().to_owned();
                if kind == "user" {
                    audit.user_opening.insert(currency.clone(), opening);
                    audit.user_balances.insert(currency, sum);
                } else {
                    audit.clearing_balances.insert(currency, sum);
                }
            }
            // The configured default daily limits, as {"USD": "150.00", …}.
            let defaults = serde_json::to_value(&self.config().rules.daily_limits)
                .map_err(|e| self.corrupt(format!("daily limits as JSON: {e}")))?;
            let row = conn
                .query_one(
                    &format!("SELECT
                       (SELECT count(*) FROM accounts a
                          WHERE a.kind = 'user' AND {SERVED_A}
                            AND a.balance - a.held + coalesce((SELECT sum(d.amount) FROM disputes d
                                                                WHERE d.payee_user = a.user_id
                                                                  AND d.state = 'open'), 0) < 0),
                       (SELECT count(*) FROM accounts a
                          WHERE {SERVED_A} AND a.opening_balance + coalesce((SELECT sum(amount) FROM ledger_entries e
                                                     WHERE e.account_id = a.account_id
                                                       AND e.kind NOT IN ('hold', 'release')), 0) <> a.balance),
                       (SELECT count(*) FROM transfers t WHERE state = 'preparing' AND {SERVED_T}),
                       (SELECT count(*) FROM accounts a
                          LEFT JOIN (SELECT user_id, sum(amount) AS open FROM
                                       (SELECT payee_user AS user_id, amount FROM disputes
                                         WHERE state = 'open'
                                        UNION ALL
                                        SELECT from_user, amount FROM transfers
                                         WHERE state = 'held') o
                                      GROUP BY user_id) d
                                 ON d.user_id = a.user_id
                          LEFT JOIN (SELECT account_id, -sum(amount) AS held FROM ledger_entries
                                      WHERE kind IN ('hold', 'release') GROUP BY account_id) h
                                 USING (account_id)
                          WHERE {SERVED_A} AND (a.held <> coalesce((SELECT sum(t.amount) FROM transfers t
                                                     WHERE t.from_user = a.user_id AND t.funds_held
                                                       AND t.kind = 'withdrawal'
                                                       AND t.state = 'preparing'), 0)
                                                   + coalesce(d.open, 0)
                                  OR coalesce(h.held, 0) <> coalesce(d.open, 0))),
                       (SELECT count(*) FROM pending_credits p JOIN transfers t USING (transfer_id) WHERE {SERVED_T}),
                       (SELECT count(*) FROM (
                          SELECT fence, lag(fence) OVER (PARTITION BY account_id ORDER BY entry_id) AS prev
                          FROM ledger_entries WHERE fence IS NOT NULL) f
                        WHERE fence < prev),
                       (SELECT count(*) FROM accounts a
                          WHERE a.kind = 'user' AND {SERVED_A} AND a.daily_limit IS NULL
                            AND {USED_TODAY} > ($1::jsonb ->> trim(a.currency))::numeric),
                       (SELECT count(*) FROM accounts a
                          LEFT JOIN (SELECT account_id, -sum(amount) AS spent FROM ledger_entries
                                      WHERE kind = 'transfer_debit'
                                        AND created_at >= ((now() AT TIME ZONE 'UTC')::date)::timestamp AT TIME ZONE 'UTC'
                                      GROUP BY account_id) u USING (account_id)
                          WHERE a.kind = 'user' AND {SERVED_A}
                            AND {USED_TODAY} <> coalesce(u.spent, 0)),
                       (SELECT count(*) FROM accounts a
                          LEFT JOIN (SELECT user_id, count(*) AS n, min(seq) AS lo, max(seq) AS hi
                                       FROM events GROUP BY user_id) ev USING (user_id)
                          LEFT JOIN (SELECT account_id, count(*) AS n FROM ledger_entries
                                      GROUP BY account_id) le USING (account_id)
                          WHERE a.kind = 'user' AND {SERVED_A}
                            AND (a.event_seq <> coalesce(ev.hi, 0)
                                 OR coalesce(ev.n, 0) <> coalesce(ev.hi - ev.lo + 1, 0)
                                 OR (coalesce(ev.lo, 1) = 1 AND coalesce(ev.n, 0) <> coalesce(le.n, 0)))),
                       (SELECT count(*) FROM events e JOIN accounts a USING (user_id)
                          LEFT JOIN (SELECT md5(transfer_id::text || account_id::text)::uuid AS id,
                                            account_id, amount, balance_after
                                       FROM ledger_entries) le
                                 ON le.id = e.event_id AND le.account_id = a.account_id
                                AND le.amount = e.amount AND le.balance_after = e.balance_after
                          WHERE {SERVED_A} AND le.id IS NULL)
                       + (SELECT count(*) FROM event_outbox o
                           WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = o.event_id))"),
                    &[&defaults],
                )
                .await
                .map_err(&pg)?;
            audit.negative_balances = row.get(0);
            audit.ledger_mismatches = row.get(1);
            audit.undecided_transfers = row.get(2);
            audit.hold_mismatches = row.get(3);
            audit.pending_credits = row.get(4);
            audit.fence_regressions = row.get(5);
            audit.limit_overruns = row.get(6);
            audit.usage_mismatches = row.get(7);
            audit.event_seq_mismatches = row.get(8);
            audit.orphan_events = row.get(9);
            audit.decisions = conn
                .query(&format!("SELECT transfer_id, kind, state, amount, refund_of FROM transfers t WHERE {SERVED_T}"), &[])
                .await
                .map_err(&pg)?
                .iter()
                .map(|r| DecisionRow { transfer_id: r.get(0), kind: r.get(1), state: r.get(2), amount: r.get(3), refund_of: r.get(4) })
                .collect();
            audit.entries = conn
                .query(
                    &format!("SELECT e.transfer_id, e.kind, e.amount FROM ledger_entries e
                     JOIN accounts a USING (account_id)
                     WHERE a.kind = 'user' AND {SERVED_A} AND e.kind NOT IN ('hold', 'release')"),
                    &[],
                )
                .await
                .map_err(&pg)?
                .iter()
                .map(|r| EntryRow { transfer_id: r.get(0), kind: r.get(1), amount: r.get(2) })
                .collect();
            audit.balances_by_user = conn
                .query(&format!("SELECT u.username, a.balance FROM users u JOIN accounts a USING (user_id) WHERE {SERVED_A}"), &[])
                .await
                .map_err(&pg)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            conn.batch_execute("COMMIT").await.map_err(&pg)?;
            conn.ended();
            Ok(audit)
        })
        .await
    }
}
