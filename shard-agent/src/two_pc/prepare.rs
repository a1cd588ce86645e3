//! Step 2: apply one leg on a participant shard and prepare it.
//!
//! Crash rule: a leg that was prepared stays prepared (with its row lock) until
//! someone reads the decision. If we crash before the decision is written, recovery
//! finds the transfer still `preparing` after `in_doubt_after`, aborts it, and rolls
//! this leg back. A leg that failed before PREPARE leaves nothing behind.

use std::time::{Duration, Instant};

use router::UserId;
use rust_decimal::Decimal;
use tracing::instrument;

use crate::agent::ShardAgent;
use crate::error::{ShardError, ShardResult};
use crate::gid::Gid;
use crate::money::Currency;
use crate::records::FailureCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Takes money out: refused unless the balance covers it.
    Debit,
    Credit,
}

/// One side of a transfer, on the shard that holds `user`.
#[derive(Clone, Debug)]
pub struct Leg {
    pub gid: Gid,
    pub side: Side,
    pub user: UserId,
    pub amount: Decimal,
    pub currency: Currency,
    /// The other party's username, kept on the ledger entry.
    pub counterparty: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// The leg is applied and prepared under its GID.
    Yes,
    /// A business rule refused the leg; nothing is left on the shard.
    Rejected(FailureCode),
}

/// How long a cancelled leg may take to answer, and the part of the call budget
/// kept for it.
const CANCEL_GRACE: Duration = Duration::from_millis(1_000);

/// SQLSTATEs `wallet_apply_leg` (sql/shard/functions) raises for a business rejection.
fn rejection(code: &str) -> Option<FailureCode> {
    match code {
        "WL001" => Some(FailureCode::InsufficientFunds),
        "WL002" => Some(FailureCode::RecipientNotFound),
        "WL003" => Some(FailureCode::CurrencyMismatch),
        _ => None,
    }
}

/// A SQL string literal. Standard-conforming strings are on (the default since
/// PostgreSQL 9.1), so doubling single quotes is the whole escaping.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl ShardAgent {
    #[instrument(skip_all, fields(shard = %self.id(), gid = %leg.gid, transfer_id = %leg.gid.transfer_id, side = ?leg.side))]
    pub async fn prepare_leg(&self, leg: &Leg) -> ShardResult<Prepared> {
        // Not `timed`: dropping the message's future on a timeout would leave the
        // server running it, and its PREPARE TRANSACTION would run once a lock
        // wait ends, after we had given the leg up. The deadline is enforced
        // inside, by cancelling the statement.
        self.prepare_leg_inner(leg).await
    }

    /// The whole leg is one simple-query message: `BEGIN; SELECT
    /// wallet_apply_leg(…); PREPARE TRANSACTION '<gid>'`. PostgreSQL runs the
    /// statements of one message in order and skips the rest after an error, so
    /// PREPARE TRANSACTION runs only if the leg applied: when the message succeeds,
    /// the leg is prepared (no need to look it up in `pg_prepared_xacts`, which a
    /// PREPARE sent after a failed statement would need, as it would answer
    /// ROLLBACK without an error). One round trip instead of four.
    async fn prepare_leg_inner(&self, leg: &Leg) -> ShardResult<Prepared> {
        let shard = self.id();
        // Fires before anything is sent: with the leg in one message, "applied but
        // not prepared" can no longer happen, and leaves nothing either way.
        fail::fail_point!("shard-before-prepare-transaction", |_| Err(
            ShardError::Unavailable {
                shard,
                reason: "failpoint shard-before-prepare-transaction".into(),
            }
        ));
        // Every spliced value is typed and validated (a Decimal, UUIDs, a currency
        // code, a username of [a-z0-9_.-]) and quoted anyway; the GID's text is
        // ours (prefix, hex, digits). The simple-query protocol has no placeholders,
        // and PREPARE TRANSACTION has none in any protocol.
        let sql = format!(
            "BEGIN; SELECT wallet_apply_leg({debit}, {user}::uuid, {currency}, {amount}::numeric, {tid}::uuid, {counterparty}); PREPARE TRANSACTION '{gid}'",
            debit = leg.side == Side::Debit,
            user = literal(&leg.user.as_uuid().to_string()),
            currency = literal(leg.currency.code()),
            amount = literal(&leg.amount.to_string()),
            tid = literal(&leg.gid.transfer_id.0.to_string()),
            counterparty = literal(&leg.counterparty),
            gid = leg.gid,
        );
        let budget = Duration::from_millis(self.config().call_timeout_ms);
        let started = Instant::now();
        let mut conn = match tokio::time::timeout(budget, self.conn()).await {
            Ok(conn) => conn?,
            Err(_) => return Err(self.no_answer("prepare leg: get connection", budget)),
        };
        conn.mark_in_txn();
        // Leave a margin of the budget for the cancel to take effect.
        let cancel_at = budget.saturating_sub(CANCEL_GRACE).max(CANCEL_GRACE);
        let sent = {
            let run = conn.batch_execute(&sql);
            tokio::pin!(run);
            match tokio::time::timeout(cancel_at.saturating_sub(started.elapsed()), &mut run).await
            {
                Ok(r) => r,
                Err(_) => {
                    // Cancel the running statement, then wait for its answer: an
                    // error means nothing was prepared; success means it was.
                    self.cancel(&conn.cancel_token()).await;
                    match tokio::time::timeout(CANCEL_GRACE, &mut run).await {
                        Ok(r) => r,
                        // No answer even to the cancel: the connection is discarded and
                        // the outcome is unknown; the caller's rollback and recovery
                        // cover a leg prepared after this.
                        Err(_) => return Err(self.no_answer("prepare leg", budget)),
                    }
                }
            }
        };
        match sent {
            Ok(()) => {
                conn.ended();
                Ok(Prepared::Yes)
            }
            Err(e) => {
                // The transaction failed before PREPARE, or PREPARE failed (which
                // ends it); either way nothing is prepared, unless the connection
                // broke after PREPARE ran, which the caller's rollback covers.
                conn.rollback_quietly().await;
                match e.code().and_then(|c| rejection(c.code())) {
                    Some(code) => Ok(Prepared::Rejected(code)),
                    None => Err(ShardError::from_pg(shard, "prepare leg", e)),
                }
            }
        }
    }
}
