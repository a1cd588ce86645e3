//! What a shard holds, read for the rebalancing commands: a bucket's rows
//! and money (the verifier's comparison), users and money per bucket (the
//! plan), rows of buckets it does not serve (verify, remove), and what a
//! removal would strand. Read-only; the moves themselves are in
//! `crate::ownership`.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::agent::ShardAgent;
use crate::error::ShardResult;
use crate::ownership::TABLES;

/// What a bucket holds on one shard, as the verifier compares it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketStats {
    /// Rows per table.
    pub rows: BTreeMap<String, i64>,
    pub balance_sum: Decimal,
    pub held_sum: Decimal,
    pub opening_sum: Decimal,
    /// Accounts whose opening balance plus ledger does not equal the balance.
    pub ledger_mismatches: i64,
}

impl ShardAgent {
    /// The rows and money of `bucket` on this shard, in one statement, so
    /// every count and sum comes from one snapshot.
    pub async fn bucket_stats(&self, bucket: u16) -> ShardResult<BucketStats> {
        self.timed("bucket stats", async {
            let conn = self.conn().await?;
            let counts: Vec<String> = TABLES
                .iter()
                .map(|(table, filter)| format!("(SELECT count(*) FROM {table} WHERE {filter})"))
                .collect();
            let row = conn
                .query_one(
                    &format!(
                        "SELECT coalesce(sum(balance), 0), coalesce(sum(held), 0),
                                coalesce(sum(opening_balance), 0),
                                count(*) FILTER (WHERE a.opening_balance + coalesce(
                                    (SELECT sum(amount) FROM ledger_entries e WHERE e.account_id = a.account_id), 0)
                                    <> a.balance),
                                ARRAY[{}]::bigint[]
                           FROM accounts a WHERE kind = 'user' AND bucket = $1",
                        counts.join(", ")
                    ),
                    &[&i32::from(bucket)],
                )
                .await
                .map_err(self.pg("count and sum bucket"))?;
            let counted: Vec<i64> = row.get(4);
            Ok(BucketStats {
                rows: TABLES
                    .iter()
                    .zip(counted)
                    .map(|((table, _), n)| ((*table).to_owned(), n))
                    .collect(),
                balance_sum: row.get(0),
                held_sum: row.get(1),
                opening_sum: row.get(2),
                ledger_mismatches: row.get(3),
            })
        })
        .await
    }

    /// Users and money per bucket held here (the plan's figures): bucket ->
    /// (users, balance sum).
    pub async fn bucket_sizes(&self) -> ShardResult<BTreeMap<u16, (i64, Decimal)>> {
        self.timed("bucket sizes", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT bucket, count(*), coalesce(sum(balance), 0) FROM accounts
                      WHERE kind = 'user' GROUP BY bucket",
                    &[],
                )
                .await
                .map_err(self.pg("bucket sizes"))?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i32>(0) as u16, (r.get(1), r.get(2))))
                .collect())
        })
        .await
    }

    /// Rows held here of buckets this shard does not serve (owned or
    /// fenced): what a finished move must never leave behind. Bucket -> users.
    pub async fn stray_rows(&self) -> ShardResult<BTreeMap<u16, i64>> {
        self.timed("stray rows", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT u.bucket, count(*) FROM users u
                      WHERE EXISTS (SELECT 1 FROM bucket_ownership_init)
                        AND NOT EXISTS (SELECT 1 FROM owned_buckets o
                                         WHERE o.bucket = u.bucket AND o.state IN ('owned', 'fenced'))
                      GROUP BY u.bucket",
                    &[],
                )
                .await
                .map_err(self.pg("stray rows"))?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i32>(0) as u16, r.get(1)))
                .collect())
        })
        .await
    }

    /// `max_prepared_transactions` of this server (0: it cannot take part
    /// in two-phase commit).
    pub async fn max_prepared_transactions(&self) -> ShardResult<i64> {
        self.timed("read settings", async {
            let conn = self.conn().await?;
            let v: String = conn
                .query_one("SELECT current_setting('max_prepared_transactions')", &[])
                .await
                .map_err(self.pg("read max_prepared_transactions"))?
                .get(0);
            v.parse()
                .map_err(|_| self.corrupt(format!("max_prepared_transactions is {v:?}")))
        })
        .await
    }

    /// What this shard holds that removing shard `home` would strand: its
    /// prepared legs whose decision lives on `home` (the GID names it), and,
    /// when this shard is `home` itself, any prepared leg, undecided record or
    /// pending credit.
    pub async fn in_doubt_for(&self, home: router::ShardId) -> ShardResult<i64> {
        self.timed("in doubt", async {
            let conn = self.conn().await?;
            let gids = conn
                .query(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE $1",
                    &[&crate::gid::Gid::like_pattern()],
                )
                .await
                .map_err(self.pg("read prepared legs"))?;
            let mut n = gids
                .iter()
                .filter(|r| {
                    self.id() == home
                        || r.get::<_, String>(0)
                            .parse::<crate::gid::Gid>()
                            .is_ok_and(|g| g.home == home)
                })
                .count() as i64;
            if self.id() == home {
                n += conn
                    .query_one(
                        "SELECT (SELECT count(*) FROM pending_credits)
                              + (SELECT count(*) FROM transfers WHERE state = 'preparing')",
                        &[],
                    )
                    .await
                    .map_err(self.pg("count undecided work"))?
                    .get::<_, i64>(0);
            }
            Ok(n)
        })
        .await
    }
}
