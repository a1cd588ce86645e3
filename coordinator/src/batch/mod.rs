//! Groups (`shard_agent::batch`, the `wallet_batch_*` SQL functions): the one
//! protocol every transfer runs by. Concurrent transfers are grouped and run
//! as one transaction per shard, which is how the wallet gets past one fsync
//! and several round trips per transfer. Each transfer is still decided on its
//! own: a refused transfer is recorded as aborted and the rest of its group
//! commits. A replay, a key in progress or reused, a session that is not live:
//! each is answered by the group's check too, writing nothing.
//!
//! Lanes: one per shard for same-shard transfers (one local statement per
//! group, one group at a time), and one for cross-shard transfers (two-phase
//! commit per group, up to `batch_workers` groups at once). Transfers that
//! arrive while a lane is busy wait and form its next group, up to `batch_max`;
//! a lane about to start a group first yields to the scheduler for as long as
//! transfers keep arriving (the clients of the group that just finished).
//!
//! A group never holds one payer twice, nor a payer that is also a payee: each
//! leg's check then depends on its own account alone. Nor does it touch an
//! account that a running group of its lane touches (`lane::Held`), so groups of
//! one lane never wait on each other's locks, and a hot payee's transfers
//! gather in the next group. Such a transfer waits for the next group.
//!
//! Cross-shard protocol for a group (every step has a failpoint):
//! 1. claim keys, lock, check: on every shard at once with lock waits bounded
//!    to [`PARALLEL_LOCK_WAIT_MS`], and after such a wait ran out, again shard
//!    after shard in shard-ID order (one global lock order, (shard, user ID),
//!    so groups never wait on each other in a cycle), where each lock wait is
//!    bounded to [`ORDERED_LOCK_WAIT_MS`] and each shard's answer to
//!    [`GROUP_CHECK_TIMEOUT_MS`];
//! 2. every shard but the last applies and prepares, at once, while the last
//!    one applies and keeps its transaction open;
//! 3. the last shard inserts the group's decision row and commits: the
//!    decision;
//! 4. every prepared transaction is committed, then each client is answered.
//!
//! If step 1 fails on any shard, nothing was written: the open transactions
//! are rolled back and each member runs again alone, as a group of one that
//! may wait for a row up to the shard's `lock_timeout` (it holds up nobody
//! else). What the failure met (the users of a held row, a silent shard) is
//! marked so that their next transfers run alone too (`crate::suspects`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use router::ShardId;
use shard_agent::batch::BatchLeg;
use shard_agent::transfer::{Submitted, TransferOrder};
use shard_agent::{ShardAgent, ShardError, TransferId};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{Instrument, Span};

use crate::cluster::Routing;
use crate::error::CoordinatorError;
use crate::redis_lock::LockService;
use crate::suspects::{settle_fault, Fault, Suspect, Suspects};

mod group;
mod lane;
mod redis;

pub use group::GROUP_CHECK_TIMEOUT_MS;
use group::{run_cross, run_local, Run};
use lane::{run_lane, AnswerMark};
pub(crate) use redis::raise_floor;
use redis::run_redis;
pub use redis::{FAILPOINTS as REDIS_FAILPOINTS, GROUP_GRANT_WAIT_MS};

/// The batched protocol's failpoints, in protocol order.
pub const FAILPOINTS: [&str; 4] = [
    "batch-after-check",
    "batch-after-prepare",
    "batch-after-decision",
    "batch-before-reply",
];

type Reply = oneshot::Sender<Result<Submitted, CoordinatorError>>;

/// Most transfers running alone at once because a user or shard they touch is
/// marked; more get 503 `shard_busy` at once (nothing claimed).
pub const ALONE_MAX: usize = 256;

struct Job {
    order: TransferOrder,
    /// Shared by every job of the batcher: faults met mark what they touched.
    suspects: Arc<Suspects>,
    /// The payer's token hash while their session is unread (`Payer::Claimed`).
    session: Option<Vec<u8>>,
    routing: Arc<Routing>,
    tid: TransferId,
    span: Span,
    reply: Reply,
    /// When the transfer was handed to its lane.
    queued: Instant,
    /// Redis mode: the locks its cross-shard groups run under.
    locks: Option<Arc<LockService>>,
}

impl Job {
    fn home(&self) -> &ShardAgent {
        self.routing.agent_for(&self.order.from)
    }
    fn remote(&self) -> &ShardAgent {
        self.routing.agent_for(&self.order.to)
    }

    fn answer(self, result: Result<Submitted, CoordinatorError>) {
        // The client may have gone; the transfer's outcome is recorded anyway.
        let _ = self.reply.send(result);
    }

    /// Runs this transfer again on its own, as a group of one
    /// ([`Run::Alone`]), bounded by [`ALONE_MAX`] at the door of
    /// [`Batcher::transfer`] for marked transfers, and by the size of the
    /// group that failed for its members.
    fn alone(self) {
        tokio::spawn(async move {
            let local = self.home().id() == self.remote().id();
            let group = vec![self];
            match (local, group[0].locks.clone()) {
                (true, _) => run_local(group, None, Run::Alone).await,
                (false, Some(locks)) => run_redis(group, None, Run::Alone, locks).await,
                (false, None) => run_cross(group, None, Run::Alone).await,
            }
        });
    }

    /// What a lone run's failure says about the users and shards it touched:
    /// a row-lock timeout points at its users' rows; "shard unavailable" at
    /// one of its two shards, to be confirmed by a probe.
    fn fault_of(&self, e: &ShardError) -> Fault {
        match e {
            ShardError::LockTimeout { .. } => Fault::RowHeld([self.order.from, self.order.to]),
            ShardError::Unavailable { shard, .. } => Fault::ShardSilent(
                [self.home(), self.remote()]
                    .into_iter()
                    .filter(|a| a.id() == *shard)
                    .cloned()
                    .collect(),
            ),
            _ => Fault::None,
        }
    }

    /// Answers a lone run that wrote nothing with its error, and marks what
    /// the error points at.
    async fn fail_alone(self, e: ShardError) {
        let fault = self.fault_of(&e);
        let (suspects, span) = (self.suspects.clone(), self.span.clone());
        self.answer(Err(e.into()));
        settle_fault(&suspects, fault).instrument(span).await;
    }

    fn legs(&self) -> [BatchLeg; 2] {
        BatchLeg::both(self.tid, &self.order, self.session.clone())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Lane {
    Local(ShardId),
    Cross,
}

/// The coordinator's batching front: hands each transfer to its lane.
pub struct Batcher {
    lanes: Mutex<HashMap<Lane, mpsc::Sender<Job>>>,
    max: usize,
    workers: usize,
    linger: Duration,
    /// Transfers that may wait for one lane; see [`LANE_QUEUE_MAX`].
    queue_max: usize,
    counts: Arc<GroupCounts>,
    suspects: Arc<Suspects>,
    /// Bounds the transfers running alone because of a mark ([`ALONE_MAX`]).
    alone_slots: Arc<Semaphore>,
    /// Redis mode: cross-shard groups run under these locks instead of
    /// two-phase commit.
    locks: Option<Arc<LockService>>,
}

/// Groups started and the transfers in them since the batcher started, for
/// same-shard and cross-shard lanes: the bench reports transfers per group,
/// the figure batching lives by.
#[derive(Debug, Default)]
struct GroupCounts {
    local_groups: AtomicU64,
    local_transfers: AtomicU64,
    cross_groups: AtomicU64,
    cross_transfers: AtomicU64,
}

/// A snapshot of [`GroupCounts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupStats {
    pub local_groups: u64,
    pub local_transfers: u64,
    pub cross_groups: u64,
    pub cross_transfers: u64,
}

impl GroupStats {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: GroupStats) -> GroupStats {
        GroupStats {
            local_groups: self.local_groups - earlier.local_groups,
            local_transfers: self.local_transfers - earlier.local_transfers,
            cross_groups: self.cross_groups - earlier.cross_groups,
            cross_transfers: self.cross_transfers - earlier.cross_transfers,
        }
    }

    /// Both periods' groups together (`self` and `other` do not overlap).
    pub fn plus(self, other: GroupStats) -> GroupStats {
        GroupStats {
            local_groups: self.local_groups + other.local_groups,
            local_transfers: self.local_transfers + other.local_transfers,
            cross_groups: self.cross_groups + other.cross_groups,
            cross_transfers: self.cross_transfers + other.cross_transfers,
        }
    }

    /// Mean transfers per group over both kinds of lane (`None` without groups).
    pub fn transfers_per_group(self) -> Option<f64> {
        let groups = self.local_groups + self.cross_groups;
        (groups > 0).then(|| (self.local_transfers + self.cross_transfers) as f64 / groups as f64)
    }
}

impl GroupCounts {
    fn record(&self, lane: Lane, transfers: usize) {
        let (groups, total) = match lane {
            Lane::Local(_) => (&self.local_groups, &self.local_transfers),
            Lane::Cross => (&self.cross_groups, &self.cross_transfers),
        };
        groups.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(transfers as u64, Ordering::Relaxed);
        let lane = match lane {
            Lane::Local(_) => "same_shard",
            Lane::Cross => "cross_shard",
        };
        metrics::histogram!("wallet_batch_group_size", "lane" => lane).record(transfers as f64);
    }

    fn snapshot(&self) -> GroupStats {
        GroupStats {
            local_groups: self.local_groups.load(Ordering::Relaxed),
            local_transfers: self.local_transfers.load(Ordering::Relaxed),
            cross_groups: self.cross_groups.load(Ordering::Relaxed),
            cross_transfers: self.cross_transfers.load(Ordering::Relaxed),
        }
    }
}

impl Batcher {
    /// `locks`: Redis mode's lock service, or `None` for two-phase commit.
    pub fn new(
        max: usize,
        workers: usize,
        linger: Duration,
        queue_max: usize,
        locks: Option<Arc<LockService>>,
    ) -> Batcher {
        Batcher {
            lanes: Mutex::new(HashMap::new()),
            max: max.max(1),
            workers: workers.max(1),
            linger,
            queue_max: queue_max.max(1),
            counts: Arc::default(),
            suspects: Arc::default(),
            alone_slots: Arc::new(Semaphore::new(ALONE_MAX)),
            locks,
        }
    }

    /// Groups and their transfers since the batcher started.
    pub fn stats(&self) -> GroupStats {
        self.counts.snapshot()
    }

    /// Users and shards marked now (`crate::suspects`), for logs and tests.
    pub fn marked(&self) -> usize {
        self.suspects.live()
    }

    /// Moves money in a group: same-shard or cross-shard, new key or not.
    /// `session`: the payer's token hash when their session is unread; the
    /// group's check reads it on the payer's shard.
    pub async fn transfer(
        &self,
        routing: Arc<Routing>,
        order: TransferOrder,
        session: Option<Vec<u8>>,
    ) -> Result<Submitted, CoordinatorError> {
        let (home, remote) = (
            routing.agent_for(&order.from).id(),
            routing.agent_for(&order.to).id(),
        );
        let lane = if home == remote {
            Lane::Local(home)
        } else {
            Lane::Cross
        };
        // A release completes its held transfer under the transfer's own ID.
        let tid = order.release_of.unwrap_or_else(TransferId::generate);
        let span = Span::current();
        span.record("transfer_id", tracing::field::display(tid));
        let (reply, answer) = oneshot::channel();
        let suspect = self.suspects.any([
            Suspect::User(order.from),
            Suspect::User(order.to),
            Suspect::Shard(home),
            Suspect::Shard(remote),
        ]);
        let job = Job {
            order,
            suspects: self.suspects.clone(),
            session,
            routing,
            tid,
            span,
            reply,
            queued: Instant::now(),
            locks: self.locks.clone(),
        };
        if suspect {
            // A fault met recently on this user or shard: only this transfer
            // waits for it, outside the lanes.
            let Ok(_slot) = self.alone_slots.clone().try_acquire_owned() else {
                return Err(CoordinatorError::Overloaded {
                    queue: "transfers running alone",
                    queued_max: ALONE_MAX,
                });
            };
            job.alone();
            return answer.await.map_err(|_| {
                CoordinatorError::Corrupt("transfer ended without an answer".into())
            })?;
        }
        self.lane(lane).try_send(job).map_err(|e| match e {
            // Nothing of the transfer was claimed or written: a retry with the
            // same key runs it afresh.
            mpsc::error::TrySendError::Full(_) => CoordinatorError::Overloaded {
                queue: "batch lane",
                queued_max: self.queue_max,
            },
            mpsc::error::TrySendError::Closed(_) => {
                CoordinatorError::Corrupt("batch lane stopped".into())
            }
        })?;
        answer
            .await
            .map_err(|_| CoordinatorError::Corrupt("batch ended without an answer".into()))?
    }

    fn lane(&self, lane: Lane) -> mpsc::Sender<Job> {
        let mut lanes = self
            .lanes
            .lock()
            .expect("invariant: no code panics while holding the lane map");
        lanes
            .entry(lane)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(self.queue_max);
                // A shard's same-shard groups run one at a time: there is a lane
                // per shard, and a measured 0.85x against 0.76x with two.
                let workers = match lane {
                    Lane::Local(_) => 1,
                    Lane::Cross => self.workers,
                };
                // Only the cross-shard lane waits for returning clients: it is the
                // one lane every cross-shard transfer comes back to, while a
                // client's next same-shard transfer may go to any shard's lane.
                let linger = match lane {
                    Lane::Local(_) => Duration::ZERO,
                    Lane::Cross => self.linger,
                };
                tokio::spawn(run_lane(
                    lane,
                    rx,
                    self.max,
                    workers,
                    linger,
                    self.counts.clone(),
                    self.locks.clone(),
                ));
                tx
            })
            .clone()
    }
}

/// The default of `batch_queue_max`: transfers that may wait for one lane (one
/// shard's same-shard lane, or the cross-shard lane) beyond the group it is
/// running, 32 groups of the default `batch_max`. Past it a transfer is refused
/// at once with 503 `shard_busy` rather than queued without bound behind a lane
/// that cannot keep up.
pub const LANE_QUEUE_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_stats_give_the_mean_group_size_between_two_snapshots() {
        let counts = GroupCounts::default();
        let before = GroupStats::default();
        assert_eq!(before.transfers_per_group(), None, "no group yet");
        counts.record(Lane::Local(ShardId(0)), 3);
        counts.record(Lane::Cross, 16);
        let mid = counts.snapshot();
        assert_eq!(mid.transfers_per_group(), Some(9.5));
        counts.record(Lane::Local(ShardId(1)), 1);
        let since = counts.snapshot().since(mid);
        assert_eq!((since.local_groups, since.local_transfers), (1, 1));
        assert_eq!(since.transfers_per_group(), Some(1.0));
        let both = mid.plus(since);
        assert_eq!((both.local_groups, both.cross_groups), (2, 1));
        assert_eq!(both.transfers_per_group(), Some(20.0 / 3.0));
    }
}
