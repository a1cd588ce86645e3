//! Step 3: the decision, on the home shard. This UPDATE is the commit point.
//!
//! The coordinator and recovery both decide through the same compare-and-set
//! (`… WHERE state = 'preparing'`), so exactly one of them wins and both act on the
//! winner's decision. Crash rule: if we crash before this commits, the transfer is
//! still `preparing` and recovery aborts it; if we crash after, the decision stands
//! and recovery finishes every prepared leg the way it says.

use tracing::instrument;

use crate::agent::ShardAgent;
use crate::error::{ShardError, ShardResult};
use crate::idempotency::read_transfer;
use crate::records::{FailureCode, TransferId, TransferRecord, TRANSFER_COLUMNS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort(FailureCode),
}

impl ShardAgent {
    /// Records `decision` unless the transfer was already decided, and returns the
    /// record as it stands afterwards (whoever decided it). `None`: no such transfer.
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %tid, decision = ?decision))]
    pub async fn decide(
        &self,
        tid: TransferId,
        decision: Decision,
    ) -> ShardResult<Option<TransferRecord>> {
        self.timed("decide", async {
            let conn = self.conn().await?;
            let (state, code) = match decision {
                Decision::Commit => ("committed", None),
                Decision::Abort(code) => ("aborted", Some(code.as_str())),
            };
            let stmt = conn
                .prepare_cached(&format!(
                    "UPDATE transfers SET state = $2, failure_code = $3, decided_at = now()
                     WHERE transfer_id = $1 AND state = 'preparing'
                     RETURNING {TRANSFER_COLUMNS}"
                ))
                .await
                .map_err(self.pg("prepare decide"))?;
            let won = conn
                .query_opt(&stmt, &[&tid.0, &state, &code])
                .await
                .map_err(self.pg("decide"))?;
            match won {
                Some(row) => TransferRecord::from_row(self.id(), &row).map(Some),
                None => read_transfer(&conn, self.id(), tid).await,
            }
        })
        .await
    }

    /// Reads a transfer record on this (its home) shard.
    pub async fn transfer(&self, tid: TransferId) -> ShardResult<Option<TransferRecord>> {
        self.timed("read transfer", async {
            let conn = self.conn().await?;
            read_transfer(&conn, self.id(), tid).await
        })
        .await
    }

    pub(crate) fn corrupt(&self, detail: String) -> ShardError {
        ShardError::CorruptRow {
            shard: self.id(),
            detail,
        }
    }
}
