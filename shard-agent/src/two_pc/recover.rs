//! Step 5: recovery. Finishes what a crashed or cut-off coordinator left behind.
//!
//! It acts only on prepared transactions older than `in_doubt_after` (a live
//! coordinator may still be preparing younger ones: Citus #1030), and only through
//! the decision's compare-and-set, so it can never contradict a coordinator that
//! decided first. If the home shard cannot be reached it does nothing and tries
//! again later: it never guesses an outcome.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, instrument, warn};

use crate::agent::ShardAgent;
use crate::error::ShardResult;
use crate::gid::Gid;
use crate::records::{FailureCode, TransferId, TransferState};
use crate::two_pc::decide::Decision;
use crate::two_pc::finish::Finished;

/// Bounds what one recovery pass reads of one list (per home shard, for in-doubt
/// legs), so a backlog is worked off over several ticks.
pub const RECOVERY_BATCH_MAX: i64 = 500;

/// A prepared transaction of ours, as `pg_prepared_xacts` shows it.
#[derive(Clone, Debug)]
pub struct InDoubt {
    pub gid: Gid,
    pub prepared_at: DateTime<Utc>,
    pub age_ms: i64,
}

/// What one participant's prepared transactions look like right now.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PreparedStats {
    pub count: i64,
    pub oldest_age_ms: i64,
}

/// How a prepared leg was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    Committed,
    RolledBack,
    /// The home shard is not in the catalog: left alone and reported.
    Unknown,
    /// The home transaction is still running: tried again on the next pass.
    Deferred,
}

impl ShardAgent {
    /// Our prepared transactions on this shard older than `older_than`, oldest
    /// first, at most [`RECOVERY_BATCH_MAX`] per home shard: legs whose home
    /// cannot answer never crowd out the legs of another home.
    pub async fn in_doubt(&self, older_than: Duration) -> ShardResult<Vec<InDoubt>> {
        self.timed("list in-doubt", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT gid, prepared, age_ms FROM (
                         SELECT gid, prepared,
                                (extract(epoch FROM now() - prepared) * 1000)::bigint AS age_ms,
                                row_number() OVER (
                                    PARTITION BY substring(gid FROM '_h([0-9]+)_p') ORDER BY prepared
                                ) AS nth
                         FROM pg_prepared_xacts
                         WHERE database = current_database() AND gid LIKE $1
                           AND prepared < now() - make_interval(secs => $2)) t
                     WHERE nth <= $3
                     ORDER BY prepared",
                    &[
                        &Gid::like_pattern(),
                        &older_than.as_secs_f64(),
                        &RECOVERY_BATCH_MAX,
                    ],
                )
                .await
                .map_err(self.pg("list prepared transactions"))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let text: String = row.get("gid");
                match text.parse::<Gid>() {
                    Ok(gid) => out.push(InDoubt {
                        gid,
                        prepared_at: row.get("prepared"),
                        age_ms: row.get("age_ms"),
                    }),
                    Err(e) => warn!(shard = %self.id(), %e, "prepared transaction with our prefix but not our format; left alone"),
                }
            }
            Ok(out)
        })
        .await
    }

    /// Count and oldest age of our prepared transactions: the in-doubt metric.
    pub async fn prepared_stats(&self) -> ShardResult<PreparedStats> {
        self.timed("prepared stats", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one(
                    "SELECT count(*) AS n,
                            coalesce(max((extract(epoch FROM now() - prepared) * 1000)::bigint), 0) AS oldest
                     FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE $1",
                    &[&Gid::like_pattern()],
                )
                .await
                .map_err(self.pg("prepared stats"))?;
            Ok(PreparedStats {
                count: row.get("n"),
                oldest_age_ms: row.get("oldest"),
            })
        })
        .await
    }

    /// 2PC and Redis-mode transfers of this home shard still `preparing` after
    /// `older_than` (in Redis mode: not yet debited, so nothing moved).
    pub async fn stale_preparing(&self, older_than: Duration) -> ShardResult<Vec<TransferId>> {
        self.timed("list stale transfers", async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT transfer_id FROM transfers
                     WHERE state = 'preparing' AND mode IN ('2pc', 'redis')
                       AND created_at < now() - make_interval(secs => $1)
                     ORDER BY created_at LIMIT $2",
                    &[&older_than.as_secs_f64(), &RECOVERY_BATCH_MAX],
                )
                .await
                .map_err(self.pg("list stale transfers"))?;
            Ok(rows.iter().map(|r| TransferId(r.get(0))).collect())
        })
        .await
    }
}

/// What recovery's compare-and-set on the home shard found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tombstone {
    /// No record: the attempt is now aborted for good (a tombstone is written).
    Written,
    /// A record exists, in this state ('preparing', 'committed' or 'aborted').
    Record(TransferState),
    /// The home transaction is running right now: ask again later.
    Busy,
}

impl ShardAgent {
    /// Recovery's compare-and-set for a prepared leg whose transfer has no record
    /// on this (its home) shard: see [`Tombstone`].
    #[instrument(skip_all, fields(shard = %self.id(), transfer_id = %tid))]
    pub async fn tombstone(&self, tid: TransferId) -> ShardResult<Tombstone> {
        self.timed("tombstone", async {
            let conn = self.conn().await?;
            let row = conn
                .query_one("SELECT wallet_tombstone($1) AS outcome", &[&tid.0])
                .await
                .map_err(self.pg("tombstone"))?;
            let outcome: &str = row.get("outcome");
            match outcome {
                "tombstoned" => Ok(Tombstone::Written),
                "busy" => Ok(Tombstone::Busy),
                "preparing" => Ok(Tombstone::Record(TransferState::Preparing)),
                "committed" => Ok(Tombstone::Record(TransferState::Committed)),
                "aborted" => Ok(Tombstone::Record(TransferState::Aborted)),
                other => Err(self.corrupt(format!("transfer {tid} has state {other:?}"))),
            }
        })
        .await
    }
}

/// Resolves one in-doubt leg on `participant` from the decision on `home`.
#[instrument(skip_all, fields(gid = %gid, transfer_id = %gid.transfer_id))]
pub async fn resolve_leg(
    participant: &ShardAgent,
    home: &ShardAgent,
    gid: &Gid,
) -> ShardResult<Resolution> {
    // Presumed abort: a transfer still `preparing` this late is aborted, through the
    // same compare-and-set the coordinator's commit uses.
    let decided = home
        .decide(
            gid.transfer_id,
            Decision::Abort(FailureCode::CoordinatorTimeout),
        )
        .await?;
    let state = match decided {
        Some(record) => record.state,
        // No record: a group whose deciding shard has not committed its decision
        // (`wallet_batch_decide`). The tombstone's compare-and-set decides it.
        None => match home.tombstone(gid.transfer_id).await? {
            Tombstone::Written => TransferState::Aborted,
            Tombstone::Record(state) => state,
            Tombstone::Busy => {
                info!(shard = %participant.id(), "in-doubt leg whose home transaction is still running; retry later");
                return Ok(Resolution::Deferred);
            }
        },
    };
    let (resolution, finished) = match state {
        TransferState::Committed => (
            Resolution::Committed,
            participant.commit_prepared(gid).await?,
        ),
        TransferState::Aborted => (
            Resolution::RolledBack,
            participant.rollback_prepared(gid).await?,
        ),
        // Claimed between our two reads: the next pass aborts it through decide.
        TransferState::Preparing => return Ok(Resolution::Deferred),
        // A held transfer's record is never a GID's decision (a release runs in
        // a group, whose GID names the group): never guess, report it.
        TransferState::Held => return Ok(Resolution::Deferred),
    };
    info!(shard = %participant.id(), ?resolution, already = (finished == Finished::AlreadyFinished), "resolved in-doubt leg");
    Ok(resolution)
}

/// Aborts one stale `preparing` transfer on its home shard (if nobody decided it
/// meanwhile). Its prepared legs, if any, are rolled back by each participant's own
/// in-doubt pass, which reads this decision.
#[instrument(skip_all, fields(transfer_id = %tid))]
pub async fn abort_stale(home: &ShardAgent, tid: TransferId) -> ShardResult<TransferState> {
    let record = home
        .decide(tid, Decision::Abort(FailureCode::CoordinatorTimeout))
        .await?
        .ok_or_else(|| home.corrupt(format!("stale transfer {tid} vanished")))?;
    if record.state == TransferState::Aborted {
        info!(shard = %home.id(), "aborted stale transfer");
    }
    Ok(record.state)
}
