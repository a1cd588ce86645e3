//! Bulk loading for `wallet bench`: many users with an opening balance in one
//! transaction per shard, through `COPY`, instead of one API sign-up each (argon2
//! alone would take minutes for 100,000 users).
//!
//! The opening balances are offset on the shard's clearing account (both its
//! balance and its opening balance), so every account of every shard still sums
//! to zero and each account's ledger still explains its balance: the invariant
//! checker holds from the first moment.

use std::fmt::Write as _;
use std::io::Cursor;

use futures::SinkExt;
use router::{Bucket, UserId};
use rust_decimal::Decimal;
use tracing::instrument;

use crate::agent::ShardAgent;
use crate::error::{ShardError, ShardResult};
use crate::money::Currency;

/// One user to load. `session_token_hash`, when set, becomes a live session.
#[derive(Clone, Debug)]
pub struct BulkUser {
    pub user_id: UserId,
    pub bucket: Bucket,
    pub username: String,
    pub session_token_hash: Option<Vec<u8>>,
}

/// What every loaded user shares.
#[derive(Clone, Debug)]
pub struct BulkDefaults {
    pub currency: Currency,
    pub opening_balance: Decimal,
    /// A PHC password hash, computed once for all of them.
    pub password_hash: String,
    pub session_ttl_s: u64,
}

impl ShardAgent {
    /// Loads `users` (all of which must route to this shard) in one transaction.
    #[instrument(skip_all, fields(shard = %self.id(), users = users.len()))]
    pub async fn bulk_load_users(
        &self,
        users: &[BulkUser],
        defaults: &BulkDefaults,
    ) -> ShardResult<()> {
        let shard = self.id();
        let pg = |ctx: &'static str| move |e| ShardError::from_pg(shard, ctx, e);
        let currency = defaults.currency.code();
        let mut users_csv = String::with_capacity(users.len() * 200);
        let mut accounts_csv = String::with_capacity(users.len() * 100);
        let mut sessions_csv = String::new();
        for u in users {
            // Usernames are validated to [a-z0-9_.-]: nothing to escape in text COPY.
            debug_assert!(!u.username.contains(['\t', '\n', '\\']));
            let id = u.user_id.as_uuid();
            let _ = writeln!(
                users_csv,
                "{id}\t{name}\t{name}@bench.invalid\t{hash}\t{currency}\t{bucket}",
                name = u.username,
                hash = defaults.password_hash,
                bucket = u.bucket.0,
            );
            let _ = writeln!(
                accounts_csv,
                "{id}\tuser\t{currency}\t{bucket}\t{b}\t{b}",
                bucket = u.bucket.0,
                b = defaults.opening_balance,
            );
            if let Some(hash) = &u.session_token_hash {
                let _ = write!(sessions_csv, "\\\\x");
                for byte in hash {
                    let _ = write!(sessions_csv, "{byte:02x}");
                }
                let _ = writeln!(
                    sessions_csv,
                    "\t{id}\t{}",
                    chrono::Utc::now() + chrono::Duration::seconds(defaults.session_ttl_s as i64)
                );
            }
        }
        let total = defaults.opening_balance * Decimal::from(users.len());
        let mut conn = self.conn().await?;
        conn.begin(shard).await?;
        let result = async {
            for (sql, data) in [
                (
                    "COPY users (user_id, username, email, password_hash, currency, bucket) FROM STDIN",
                    users_csv,
                ),
                (
                    "COPY accounts (user_id, kind, currency, bucket, opening_balance, balance) FROM STDIN",
                    accounts_csv,
                ),
                (
                    "COPY sessions (token_hash, user_id, expires_at) FROM STDIN",
                    sessions_csv,
                ),
            ] {
                if data.is_empty() {
                    continue;
                }
                let sink = conn.copy_in::<_, Cursor<Vec<u8>>>(sql).await.map_err(pg("start copy"))?;
                futures::pin_mut!(sink);
                sink.send(Cursor::new(data.into_bytes())).await.map_err(pg("copy rows"))?;
                sink.finish().await.map_err(pg("finish copy"))?;
            }
            let offset = conn
                .execute(
                    "UPDATE accounts SET balance = balance - $1, opening_balance = opening_balance - $1
                     WHERE kind = 'clearing' AND currency = $2",
                    &[&total, &currency],
                )
                .await
                .map_err(pg("offset clearing account"))?;
            if offset != 1 {
                return Err(self.corrupt(format!("no clearing account for {currency}")));
            }
            conn.batch_execute("COMMIT").await.map_err(pg("commit bulk load"))
        }
        .await;
        match result {
            Ok(()) => {
                conn.ended();
                // As after any bulk load: set hint bits and statistics now, rather
                // than on the first transfers that touch each page.
                conn.batch_execute("VACUUM (ANALYZE) users, accounts, sessions")
                    .await
                    .map_err(pg("vacuum after bulk load"))
            }
            Err(e) => {
                conn.rollback_quietly().await;
                Err(e)
            }
        }
    }
}
