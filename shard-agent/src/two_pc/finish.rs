//! Step 4: make a prepared leg final.
//!
//! Safe to repeat: "prepared transaction does not exist" (SQLSTATE 42704) means
//! someone (recovery, or an earlier attempt of ours) already finished it. The
//! decision record says which way it went, so that is success, not an error.
//! Crash rule: a leg we did not finish is finished by recovery from the decision.

use tokio_postgres::error::SqlState;
use tracing::instrument;

use crate::agent::ShardAgent;
use crate::error::{ShardError, ShardResult};
use crate::gid::Gid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// This call committed or rolled back the prepared transaction.
    Done,
    /// There was no such prepared transaction: it had already been finished.
    AlreadyFinished,
}

impl ShardAgent {
    #[instrument(skip_all, fields(shard = %self.id(), gid = %gid, transfer_id = %gid.transfer_id))]
    pub async fn commit_prepared(&self, gid: &Gid) -> ShardResult<Finished> {
        self.finish(gid, "COMMIT PREPARED").await
    }

    #[instrument(skip_all, fields(shard = %self.id(), gid = %gid, transfer_id = %gid.transfer_id))]
    pub async fn rollback_prepared(&self, gid: &Gid) -> ShardResult<Finished> {
        self.finish(gid, "ROLLBACK PREPARED").await
    }

    async fn finish(&self, gid: &Gid, verb: &'static str) -> ShardResult<Finished> {
        self.timed("finish prepared", async {
            let conn = self.conn().await?;
            match conn.batch_execute(&format!("{verb} '{gid}'")).await {
                Ok(()) => Ok(Finished::Done),
                Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                    Ok(Finished::AlreadyFinished)
                }
                Err(e) => Err(ShardError::from_pg(self.id(), "finish prepared", e)),
            }
        })
        .await
    }
}
