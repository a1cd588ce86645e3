//! Users, their account, their sessions, and what they may read.

use chrono::{DateTime, Utc};
use router::{Bucket, UserId};
use rust_decimal::Decimal;
use tokio_postgres::error::SqlState;

use crate::agent::buckets_of;
use crate::agent::ShardAgent;
use crate::error::{ShardError, ShardResult};
use crate::money::Currency;
use crate::records::{
    LedgerEntry, Mode, TransferId, TransferKind, TransferRecord, TransferState, UserRow,
    TRANSFER_COLUMNS,
};

/// Bounds one page of ledger entries.
pub const LEDGER_PAGE_MAX: i64 = 200;

#[derive(Clone, Debug)]
pub struct NewUser {
    pub user_id: UserId,
    pub bucket: Bucket,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub currency: Currency,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    Yes,
    UsernameTaken,
}

/// A user's account with one page of its ledger, newest first.
#[derive(Clone, Debug)]
pub struct AccountView {
    pub user: UserRow,
    pub balance: Decimal,
    /// Money on the account no debit may spend: withdrawals waiting on their
    /// provider, transfers held for review, dispute holds.
    pub held: Decimal,
    /// The daily limit as an admin set it for this user (`None`: the
    /// configured default for the currency, if any).
    pub daily_limit: Option<Decimal>,
    /// What transfers took out today (UTC).
    pub used_today: Decimal,
    pub entries: Vec<LedgerEntry>,
    /// Pass as `before` to read the next (older) page.
    pub next_before: Option<i64>,
}

impl ShardAgent {
    /// Creates the user and their (empty) account in one transaction.
    pub async fn create_user(&self, new: &NewUser) -> ShardResult<Created> {
        self.timed("create user", async {
            let mut conn = self.conn().await?;
            conn.in_txn_begin("BEGIN ISOLATION LEVEL READ COMMITTED", self.id())
                .await?;
            if let Err(e) = conn
                .own(self.id(), &[i32::from(new.bucket.0)], true)
                .await
            {
                conn.rollback_quietly().await;
                return Err(e);
            }
            let inserted = conn
                .execute(
                    "INSERT INTO users (user_id, username, email, password_hash, currency, bucket)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        new.user_id.as_uuid(),
                        &new.username,
                        &new.email,
                        &new.password_hash,
                        &new.currency.code(),
                        &i32::from(new.bucket.0),
                    ],
                )
                .await;
            match inserted {
                Ok(_) => {}
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    conn.rollback_quietly().await;
                    return Ok(Created::UsernameTaken);
                }
                Err(e) => {
                    conn.rollback_quietly().await;
                    return Err(ShardError::from_pg(self.id(), "insert user", e));
                }
            }
            let account = conn
                .execute(
                    "INSERT INTO accounts (user_id, kind, currency, bucket) VALUES ($1, 'user', $2, $3)",
                    &[new.user_id.as_uuid(), &new.currency.code(), &i32::from(new.bucket.0)],
                )
                .await;
            if let Err(e) = account {
                conn.rollback_quietly().await;
                return Err(ShardError::from_pg(self.id(), "insert account", e));
            }
            conn.batch_execute("COMMIT").await.map_err(self.pg("commit user"))?;
            conn.ended();
            Ok(Created::Yes)
        })
        .await
    }

    /// The user and their password hash, for login.
    pub async fn credentials(&self, user: UserId) -> ShardResult<Option<(UserRow, String)>> {
        self.timed(
            "read credentials",
            self.owned_read(&buckets_of([&user]), async |conn| {
                let row = conn
                    .query_opt(
                        &format!(
                            "SELECT {}, u.password_hash FROM users u WHERE u.user_id = $1",
                            UserRow::COLUMNS
                        ),
                        &[user.as_uuid()],
                    )
                    .await
                    .map_err(self.pg("read credentials"))?;
                row.map(|r| Ok((UserRow::from_row(self.id(), &r)?, r.get("password_hash"))))
                    .transpose()
            }),
        )
        .await
    }

    pub async fn create_session(
        &self,
        user: UserId,
        token_hash: &[u8],
        expires_at: DateTime<Utc>,
    ) -> ShardResult<()> {
        self.timed("create session", async {
            let mut conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(
                    "INSERT INTO sessions (token_hash, user_id, expires_at) VALUES ($1, $2, $3)",
                )
                .await
                .map_err(self.pg("prepare create session"))?;
            self.owned_autocommit(
                &mut conn,
                &buckets_of([&user]),
                &stmt,
                &[&token_hash, user.as_uuid(), &expires_at],
                self.pg("create session"),
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// The user a live (unexpired, not revoked) session token belongs to.
    pub async fn session_user(&self, token_hash: &[u8]) -> ShardResult<Option<UserRow>> {
        self.timed("read session", async {
            let conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(&format!(
                    "SELECT {} FROM sessions s JOIN users u USING (user_id)
                     WHERE s.token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > now()",
                    UserRow::COLUMNS
                ))
                .await
                .map_err(self.pg("prepare read session"))?;
            let row = conn
                .query_opt(&stmt, &[&token_hash])
                .await
                .map_err(self.pg("read session"))?;
            row.map(|r| UserRow::from_row(self.id(), &r)).transpose()
        })
        .await
    }

    /// Revokes a session; true when it was live.
    pub async fn revoke_session(&self, user: UserId, token_hash: &[u8]) -> ShardResult<bool> {
        self.timed("revoke session", async {
            let mut conn = self.conn().await?;
            let stmt = conn
                .prepare_cached(
                    "UPDATE sessions SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL
                     RETURNING 1",
                )
                .await
                .map_err(self.pg("prepare revoke session"))?;
            let rows = self
                .owned_autocommit(
                    &mut conn,
                    &buckets_of([&user]),
                    &stmt,
                    &[&token_hash],
                    self.pg("revoke session"),
                )
                .await?;
            Ok(rows.len() == 1)
        })
        .await
    }

    /// The user's balance and a page of ledger entries older than `before`.
    pub async fn account_view(
        &self,
        user: UserId,
        limit: i64,
        before: Option<i64>,
    ) -> ShardResult<Option<AccountView>> {
        let limit = limit.clamp(1, LEDGER_PAGE_MAX);
        self.timed("read account", self.owned_read(&buckets_of([&user]), async |conn| {
            let Some(row) = conn
                .query_opt(
                    &format!(
                        "SELECT {}, a.account_id, a.balance, a.held, a.daily_limit,
                                CASE WHEN a.used_day >= (now() AT TIME ZONE 'UTC')::date
                                     THEN a.used_today ELSE 0 END AS used_today
                           FROM users u JOIN accounts a USING (user_id)
                         WHERE u.user_id = $1",
                        UserRow::COLUMNS
                    ),
                    &[user.as_uuid()],
                )
                .await
                .map_err(self.pg("read account"))?
            else {
                return Ok(None);
            };
            let account_id: uuid::Uuid = row.get("account_id");
            // One extra row tells whether another page exists.
            let rows = conn
                .query(
                    "SELECT entry_id, transfer_id, kind, amount, balance_after, counterparty, created_at
                     FROM ledger_entries WHERE account_id = $1 AND entry_id < $2
                     ORDER BY entry_id DESC LIMIT $3",
                    &[&account_id, &before.unwrap_or(i64::MAX), &(limit + 1)],
                )
                .await
                .map_err(self.pg("read ledger"))?;
            let mut entries: Vec<LedgerEntry> = rows.iter().map(LedgerEntry::from_row).collect();
            let next_before = if entries.len() as i64 > limit {
                entries.truncate(limit as usize);
                entries.last().map(|e| e.entry_id)
            } else {
                None
            };
            Ok(Some(AccountView {
                user: UserRow::from_row(self.id(), &row)?,
                balance: row.get("balance"),
                held: row.get("held"),
                daily_limit: row.get("daily_limit"),
                used_today: row.get("used_today"),
                entries,
                next_before,
            }))
        }))
        .await
    }

    /// A transfer as `party` may see it: from the home shard's record when `party`
    /// paid (or the transfer was local), else from the credit entry on `party`'s
    /// account, which exists only once the transfer committed.
    pub async fn transfer_for_party(
        &self,
        party: &UserRow,
        tid: TransferId,
    ) -> ShardResult<Option<TransferRecord>> {
        self.timed(
            "read transfer for party",
            self.owned_read(&buckets_of([&party.user_id]), async |conn| {
                let own = conn
                    .query_opt(
                        &format!(
                            "SELECT {TRANSFER_COLUMNS} FROM transfers
                         WHERE transfer_id = $1 AND (from_user = $2 OR to_user = $2)"
                        ),
                        &[&tid.0, party.user_id.as_uuid()],
                    )
                    .await
                    .map_err(self.pg("read own transfer"))?;
                if let Some(row) = own {
                    return TransferRecord::from_row(self.id(), &row).map(Some);
                }
                let credit = conn
                    .query_opt(
                        "SELECT e.amount, e.counterparty, e.created_at, e.kind FROM ledger_entries e
                     JOIN accounts a USING (account_id)
                     WHERE e.transfer_id = $1 AND a.user_id = $2
                       AND e.kind IN ('transfer_credit', 'refund_credit')",
                        &[&tid.0, party.user_id.as_uuid()],
                    )
                    .await
                    .map_err(self.pg("read incoming transfer"))?;
                Ok(credit.map(|row| {
                    let from_username: Option<String> = row.get("counterparty");
                    TransferRecord {
                        transfer_id: tid,
                        kind: if row.get::<_, &str>("kind") == "refund_credit" {
                            TransferKind::Refund
                        } else {
                            TransferKind::Transfer
                        },
                        mode: Mode::TwoPc,
                        from_user: from_username.as_deref().map(UserId::for_username),
                        from_username,
                        to_user: Some(party.user_id),
                        to_username: Some(party.username.clone()),
                        amount: row.get("amount"),
                        currency: party.currency,
                        state: TransferState::Committed,
                        failure_code: None,
                        participants: Vec::new(),
                        created_at: row.get("created_at"),
                        decided_at: Some(row.get("created_at")),
                        refund_of: None,
                        reason: None,
                        failure_detail: None,
                    }
                }))
            }),
        )
        .await
    }
}
