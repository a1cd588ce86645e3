//! Step 2: apply one leg on a participant shard and prepare it.
//!
//! Crash rule: a leg that was prepared stays prepared (with its row lock) until
//! someone reads the decision. If we crash before the decision is written, recovery
//! finds the transfer still `preparing` after `in_doubt_after`, aborts it, and rolls
//! this leg back. A leg that failed before PREPARE leaves nothing behind.

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

const DEBIT_SQL: &str = "WITH a AS (
       UPDATE accounts SET balance = balance - $1
       WHERE user_id = $2 AND currency = $3 AND balance >= $1
       RETURNING account_id, balance)
     INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
     SELECT account_id, $4, 'transfer_debit', $6, balance, $5 FROM a
     RETURNING balance_after";

const CREDIT_SQL: &str = "WITH a AS (
       UPDATE accounts SET balance = balance + $1
       WHERE user_id = $2 AND currency = $3
       RETURNING account_id, balance)
     INSERT INTO ledger_entries (account_id, transfer_id, kind, amount, balance_after, counterparty)
     SELECT account_id, $4, 'transfer_credit', $6, balance, $5 FROM a
     RETURNING balance_after";

impl ShardAgent {
    #[instrument(skip_all, fields(shard = %self.id(), gid = %leg.gid, transfer_id = %leg.gid.transfer_id, side = ?leg.side))]
    pub async fn prepare_leg(&self, leg: &Leg) -> ShardResult<Prepared> {
        self.timed("prepare leg", self.prepare_leg_inner(leg)).await
    }

    async fn prepare_leg_inner(&self, leg: &Leg) -> ShardResult<Prepared> {
        let shard = self.id();
        let mut conn = self.conn().await?;
        conn.begin(shard).await?;
        let (sql, signed) = match leg.side {
            Side::Debit => (DEBIT_SQL, -leg.amount),
            Side::Credit => (CREDIT_SQL, leg.amount),
        };
        let applied = async {
            let stmt = conn.prepare_cached(sql).await?;
            conn.query_opt(
                &stmt,
                &[
                    &leg.amount,
                    leg.user.as_uuid(),
                    &leg.currency.code(),
                    &leg.gid.transfer_id.0,
                    &leg.counterparty,
                    &signed,
                ],
            )
            .await
        }
        .await;
        match applied {
            Err(e) => {
                conn.rollback_quietly().await;
                return Err(ShardError::from_pg(shard, "apply leg", e));
            }
            Ok(None) => {
                let why = self.why_refused(&conn, leg).await;
                conn.rollback_quietly().await;
                return why.map(Prepared::Rejected);
            }
            Ok(Some(_)) => {}
        }
        fail::fail_point!("shard-before-prepare-transaction", |_| Err(
            ShardError::Unavailable {
                shard,
                reason: "failpoint shard-before-prepare-transaction".into(),
            }
        ));
        // The GID's text is ours (prefix, hex, digits): safe to splice into SQL,
        // which has no placeholders for PREPARE TRANSACTION.
        if let Err(e) = conn
            .batch_execute(&format!("PREPARE TRANSACTION '{}'", leg.gid))
            .await
        {
            conn.rollback_quietly().await;
            return Err(ShardError::from_pg(shard, "prepare transaction", e));
        }
        conn.ended();
        // Inside a failed transaction PREPARE answers with the tag ROLLBACK and no
        // error, and tokio-postgres does not expose command tags: so check that the
        // prepared transaction really exists.
        let gid = leg.gid.to_string();
        let exists = conn
            .query_opt("SELECT 1 FROM pg_prepared_xacts WHERE gid = $1", &[&gid])
            .await
            .map_err(self.pg("verify prepare"))?;
        match exists {
            Some(_) => Ok(Prepared::Yes),
            None => Err(ShardError::PrepareFailed { shard, gid }),
        }
    }

    /// The leg's update matched no row: say which rule refused it.
    async fn why_refused(&self, conn: &crate::agent::Conn, leg: &Leg) -> ShardResult<FailureCode> {
        let row = conn
            .query_opt(
                "SELECT currency, balance FROM accounts WHERE user_id = $1",
                &[leg.user.as_uuid()],
            )
            .await
            .map_err(self.pg("diagnose leg"))?;
        let Some(row) = row else {
            return Ok(FailureCode::RecipientNotFound);
        };
        let currency: String = row.get("currency");
        if currency.trim() != leg.currency.code() {
            return Ok(FailureCode::CurrencyMismatch);
        }
        Ok(FailureCode::InsufficientFunds)
    }
}
