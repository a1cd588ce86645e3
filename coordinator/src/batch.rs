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
//! leg's check then depends on its own account alone. Such a transfer waits for
//! the next group.
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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use router::{ShardId, UserId};
use shard_agent::batch::{Answer, BatchLeg, GroupAnswer, OpenBatch, Verdict};
use shard_agent::transfer::{Submitted, TransferOrder};
use shard_agent::{Gid, ShardAgent, ShardError, TransferId};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{info, warn, Instrument, Span};
use uuid::Uuid;

use crate::cluster::Routing;
use crate::error::{crash_point, CoordinatorError};
use crate::suspects::{mark_silent, settle_fault, Fault, Suspect, Suspects};

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
            if local {
                run_local(group, None, Run::Alone).await;
            } else {
                run_cross(group, None, Run::Alone).await;
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
    pub fn new(max: usize, workers: usize, linger: Duration, queue_max: usize) -> Batcher {
        Batcher {
            lanes: Mutex::new(HashMap::new()),
            max: max.max(1),
            workers: workers.max(1),
            linger,
            queue_max: queue_max.max(1),
            counts: Arc::default(),
            suspects: Arc::default(),
            alone_slots: Arc::new(Semaphore::new(ALONE_MAX)),
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
        let tid = TransferId::generate();
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

/// Most scheduler turns a lane lingers for more transfers before it starts a group.
const LINGER_YIELDS_MAX: usize = 16;

/// A lane that already holds this share (numerator, denominator) of the group
/// it expects starts at once instead of lingering for the rest.
///
/// The timed linger exists for clients behind a network, which come back in a
/// burst a few hundred microseconds after their group ends. Once most of them
/// are back, the ones still missing are usually threads the OS preempted, not
/// packets in flight, and tokio's timers are 1 ms granular: waiting for them
/// costs a whole timer tick for a group that is barely larger. Measured with
/// `wallet bench` (8 s runs, same host): 2PC in-process 0.50-0.53x -> 0.61-0.63x
/// of single-node; cross-shard groups over HTTP still 15.8 transfers.
const LINGER_SKIP_WHEN_PRESENT: (usize, usize) = (3, 4);

/// When a lane's latest group began to answer its clients.
///
/// A transfer queued before then waited through that group; one queued after
/// may be one of its clients already back. The lane counts the latter once,
/// in the group they came from, when it estimates the next group's size.
struct AnswerMark {
    epoch: Instant,
    /// Nanoseconds from `epoch`; 0 before any group answered.
    at_ns: AtomicU64,
}

impl AnswerMark {
    fn new() -> AnswerMark {
        AnswerMark {
            epoch: Instant::now(),
            at_ns: AtomicU64::new(0),
        }
    }

    /// Called by a group just before it answers.
    fn mark(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.at_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Whether a transfer queued at `queued` did so before the latest answers.
    fn waited_through(&self, queued: Instant) -> bool {
        let ns = u64::try_from(queued.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX);
        ns < self.at_ns.load(Ordering::Relaxed)
    }
}

/// The size the next group may soon reach: the transfers that waited through
/// the last group (`carried`), plus that group's clients, who are likely on
/// their way back or already here. A returning client's transfer already
/// waiting is counted once, in `last_group`: counted twice, the lane would
/// wait for a transfer nobody is sending and always linger to its deadline.
fn expected_group(carried: usize, last_group: usize, max: usize) -> usize {
    (carried + last_group).min(max)
}

/// Whether a lane holding `waiting` transfers, expecting `expected`, should
/// wait up to `linger` for more before it starts a group.
fn should_linger(waiting: usize, expected: usize, linger: Duration) -> bool {
    let (num, den) = LINGER_SKIP_WHEN_PRESENT;
    let mostly_here = waiting * den >= expected * num;
    !linger.is_zero() && waiting < expected && !mostly_here
}

/// Forms groups from what is waiting and runs up to `workers` at once. Ends when
/// the batcher is dropped and the queue is empty.
async fn run_lane(
    lane: Lane,
    mut rx: mpsc::Receiver<Job>,
    max: usize,
    workers: usize,
    linger: Duration,
    counts: Arc<GroupCounts>,
) {
    let slots = Arc::new(Semaphore::new(workers));
    let answered = Arc::new(AnswerMark::new());
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut last_group = 0;
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("invariant: the lane's semaphore is never closed");
        pull(&mut rx, &mut waiting, max);
        let carried = waiting
            .iter()
            .filter(|j| answered.waited_through(j.queued))
            .count();
        let expected = expected_group(carried, last_group, max);
        if waiting.is_empty() {
            match rx.recv().await {
                Some(job) => waiting.push_back(job),
                None => return,
            }
        }
        pull(&mut rx, &mut waiting, max);
        // Linger while transfers keep arriving: the clients of the group that
        // just finished come back one after another, and the first of them
        // should not leave in a group of one while the others are a scheduler
        // turn away. Yields, never sleeps: a lone transfer waits microseconds.
        for _ in 0..LINGER_YIELDS_MAX {
            if waiting.len() >= max {
                break;
            }
            tokio::task::yield_now().await;
            let before = waiting.len();
            pull(&mut rx, &mut waiting, max);
            if waiting.len() == before {
                break;
            }
        }
        // Clients behind a network (HTTP) take longer than a scheduler turn to
        // come back; wait up to `linger` for them, never for more than the last
        // group brought. A lone client is never kept waiting: its next transfer
        // is the whole expected group.
        if should_linger(waiting.len(), expected, linger) {
            let deadline = tokio::time::Instant::now() + linger;
            while waiting.len() < expected {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(job)) => {
                        waiting.push_back(job);
                        pull(&mut rx, &mut waiting, max);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let group = take_group(&mut waiting, max);
        last_group = group.len();
        counts.record(lane, group.len());
        let answered = answered.clone();
        tokio::spawn(async move {
            match lane {
                Lane::Local(_) => run_local(group, Some(&answered), Run::Grouped).await,
                Lane::Cross => run_cross(group, Some(&answered), Run::Grouped).await,
            }
            drop(slot);
        });
    }
}

/// Moves what is queued into `waiting` until it holds a full group: the rest
/// stays in the bounded channel, so `batch_queue_max` bounds a lane's backlog
/// (the channel) plus at most one group's worth here.
fn pull(rx: &mut mpsc::Receiver<Job>, waiting: &mut VecDeque<Job>, max: usize) {
    while waiting.len() < max {
        match rx.try_recv() {
            Ok(job) => waiting.push_back(job),
            Err(_) => return,
        }
    }
}

/// The next group, in arrival order: a transfer whose payer is already in the
/// group, or whose payee is a payer of it, or whose payer is a payee of it, waits.
fn take_group(waiting: &mut VecDeque<Job>, max: usize) -> Vec<Job> {
    let mut payers: HashSet<UserId> = HashSet::new();
    let mut payees: HashSet<UserId> = HashSet::new();
    let mut group = Vec::new();
    let mut later = VecDeque::new();
    while let Some(job) = waiting.pop_front() {
        let (from, to) = (job.order.from, job.order.to);
        let fits = group.len() < max
            && !payers.contains(&from)
            && !payees.contains(&from)
            && !payers.contains(&to);
        if fits {
            payers.insert(from);
            payees.insert(to);
            group.push(job);
        } else {
            later.push_back(job);
        }
    }
    *waiting = later;
    group
}

/// Copies an error for each transfer of a group (errors are not `Clone`).
fn each(e: &CoordinatorError) -> CoordinatorError {
    match e {
        CoordinatorError::Shard(ShardError::LockTimeout { shard }) => {
            ShardError::LockTimeout { shard: *shard }.into()
        }
        CoordinatorError::Shard(s) => ShardError::Unavailable {
            shard: s.shard(),
            reason: s.to_string(),
        }
        .into(),
        CoordinatorError::Crashed { at } => CoordinatorError::Crashed { at },
        CoordinatorError::Corrupt(text) => CoordinatorError::Corrupt(text.clone()),
        CoordinatorError::Unauthorized => CoordinatorError::Unauthorized,
        CoordinatorError::PayerCurrency { holds } => {
            CoordinatorError::PayerCurrency { holds: *holds }
        }
        CoordinatorError::Overloaded { queue, queued_max } => CoordinatorError::Overloaded {
            queue,
            queued_max: *queued_max,
        },
    }
}

/// Copies a shard's error for each transfer of a group (errors are not
/// `Clone`): a lock timeout and a corrupt row stay what they are, anything
/// else reads as the shard unavailable.
fn each_shard_error(e: &ShardError) -> ShardError {
    match e {
        ShardError::LockTimeout { shard } => ShardError::LockTimeout { shard: *shard },
        ShardError::CorruptRow { shard, detail } => ShardError::CorruptRow {
            shard: *shard,
            detail: detail.clone(),
        },
        other => ShardError::Unavailable {
            shard: other.shard(),
            reason: other.to_string(),
        },
    }
}

/// How a group runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// From its lane: every row-lock wait and every shard's check is bounded
    /// short, so that a row held outside the group or a silent shard fails the
    /// group fast instead of stalling its lane; its members then run alone.
    Grouped,
    /// A group of one: a transfer whose group failed at its check, or that
    /// touches a marked user or shard. It may wait for a row up to the shard's
    /// `lock_timeout`, since it holds up nobody else; if its check fails too it
    /// is answered with the error (nothing was written).
    Alone,
}

/// `answered`: the lane's mark, for a group run from a lane.
async fn run_local(group: Vec<Job>, answered: Option<&AnswerMark>, run: Run) {
    let agent = group[0].home().clone();
    let legs: Vec<BatchLeg> = group.iter().flat_map(|j| j.legs()).collect();
    let lock_wait_ms = match run {
        Run::Grouped => LOCAL_GROUP_LOCK_WAIT_MS,
        Run::Alone => agent.config().lock_timeout_ms,
    };
    let result = agent.transfer_local_batch(&legs, lock_wait_ms).await;
    if let Some(answered) = answered {
        answered.mark();
    }
    match result {
        Ok(answers) => answer_all(group, answers),
        // Nothing was written.
        Err(e) => fail_unwritten(group, e, run).await,
    }
}

/// A group whose check failed wrote nothing. From a lane, its members run
/// again alone; alone, the transfer is answered with the error. Either way
/// what the failure met is marked.
async fn fail_unwritten(group: Vec<Job>, e: ShardError, run: Run) {
    match run {
        Run::Grouped => {
            warn!(%e, transfers = group.len(), "group check failed; its transfers run again alone");
            mark_unanswered(&group, &e);
            group.into_iter().for_each(Job::alone);
        }
        Run::Alone => {
            for job in group {
                job.fail_alone(each_shard_error(&e)).await;
            }
        }
    }
}

/// How long a same-shard group from a lane waits for a row lock. Other groups
/// hold a row for a few milliseconds; a wait this long is a row held outside
/// any group (an in-doubt leg, a deposit settling), and only the blocked
/// transfer should wait for it, alone.
const LOCAL_GROUP_LOCK_WAIT_MS: u64 = 200;

/// What a group that failed at its check marks (`crate::suspects`), so the
/// next transfers touching it run alone instead of stalling another group
/// (the group's own members run alone now):
/// - a lock wait that ran out on a shard: every user with a leg on that shard
///   (which row was held is not known; one of them is the culprit, and the
///   others' next transfers merely run alone for a while);
/// - a shard that did not answer: the shard, once a ping confirms it.
fn mark_unanswered(group: &[Job], e: &ShardError) {
    let Some(suspects) = group.first().map(|j| j.suspects.clone()) else {
        return;
    };
    match e {
        ShardError::LockTimeout { shard } => {
            let users: Vec<Suspect> = group
                .iter()
                .flat_map(|j| {
                    [(j.home(), j.order.from), (j.remote(), j.order.to)]
                        .into_iter()
                        .filter(|(a, _)| a.id() == *shard)
                        .map(|(_, u)| Suspect::User(u))
                })
                .collect();
            warn!(%shard, users = users.len(), "a group waited on a row held outside it; its users' transfers run alone for a while");
            suspects.mark(users);
        }
        ShardError::Unavailable { shard, .. } => {
            let agent = group
                .iter()
                .flat_map(|j| [j.home(), j.remote()])
                .find(|a| a.id() == *shard)
                .cloned();
            if let Some(agent) = agent {
                tokio::spawn(async move { mark_silent(&suspects, vec![agent]).await });
            }
        }
        _ => {}
    }
}

/// Answers each transfer of a group from the group's answers.
fn answer_all(group: Vec<Job>, answers: Vec<GroupAnswer>) {
    let mut by_tid: HashMap<TransferId, GroupAnswer> =
        answers.into_iter().map(|a| (a.tid, a)).collect();
    for job in group {
        let result = match by_tid.remove(&job.tid) {
            Some(answer) => client_answer(answer, job.home().id()),
            None => Err(CoordinatorError::Corrupt(format!(
                "the group gave transfer {} no answer",
                job.tid
            ))),
        };
        job.span.in_scope(|| match &result {
            Ok(Submitted::New(r)) => {
                info!(state = ?r.state, code = ?r.failure_code, "transfer decided")
            }
            Ok(other) => info!(answer = ?std::mem::discriminant(other), "answered without writing"),
            Err(e) => info!(%e, "refused"),
        });
        job.answer(result);
    }
}

/// The client's answer from the group's answer on the payer's shard.
fn client_answer(answer: GroupAnswer, shard: ShardId) -> Result<Submitted, CoordinatorError> {
    match answer.submitted(shard)? {
        Ok(submitted) => Ok(submitted),
        Err(Answer::Unauthorized) => Err(CoordinatorError::Unauthorized),
        Err(Answer::PayerCurrency(holds)) => Err(CoordinatorError::PayerCurrency { holds }),
        // Nothing was written; the key's claimant rolled back under us.
        Err(Answer::KeyBusy) => Err(ShardError::LockTimeout { shard }.into()),
        Err(other) => Err(CoordinatorError::Corrupt(format!(
            "answer {other:?} carried no record"
        ))),
    }
}

/// One shard's part of a cross-shard group: its legs, and for each leg the
/// index of its transfer in the group.
struct Part<'a> {
    agent: &'a ShardAgent,
    legs: Vec<BatchLeg>,
    owner: Vec<usize>,
}

async fn run_cross(group: Vec<Job>, answered: Option<&AnswerMark>, run: Run) {
    let batch = Uuid::new_v4();
    let span = tracing::info_span!("2pc group", %batch, transfers = group.len(), alone = (run == Run::Alone),
        transfer_ids = %group.iter().map(|j| j.tid.to_string()).collect::<Vec<_>>().join(","));
    let result = cross(batch, &group, run).instrument(span.clone()).await;
    if let Some(answered) = answered {
        answered.mark();
    }
    match result {
        Ok(Ran::Decided(answers)) => {
            let _entered = span.enter();
            answer_all(group, answers)
        }
        Ok(Ran::NothingWritten(e)) => fail_unwritten(group, e, run).instrument(span).await,
        Err(e) => {
            let _entered = span.enter();
            warn!(%e, "group failed before its decision was known");
            for job in group {
                job.answer(Err(each(&e)));
            }
        }
    }
}

enum Ran {
    /// Every transfer's answer, from its payer's shard.
    Decided(Vec<GroupAnswer>),
    /// Step 1 failed: every transaction was rolled back.
    NothingWritten(ShardError),
}

async fn cross(batch: Uuid, group: &[Job], run: Run) -> Result<Ran, CoordinatorError> {
    // Each shard's legs, in shard-ID order (BTreeMap).
    let mut parts: BTreeMap<ShardId, Part<'_>> = BTreeMap::new();
    for (i, job) in group.iter().enumerate() {
        let [debit, credit] = job.legs();
        for (agent, leg) in [(job.home(), debit), (job.remote(), credit)] {
            let part = parts.entry(agent.id()).or_insert_with(|| Part {
                agent,
                legs: Vec::new(),
                owner: Vec::new(),
            });
            part.legs.push(leg);
            part.owner.push(i);
        }
    }
    let t0 = std::time::Instant::now();
    // Step 1. From a lane: every shard at once, each lock wait bounded
    // tightly; when one waits too long (perhaps on another group checking in
    // another order), all is rolled back and the check runs again shard after
    // shard. Alone: shard after shard at once, waiting as long as a shard lets
    // a lock wait.
    let checked = match run {
        Run::Grouped => match check_at_once(&parts, group.len()).await {
            Checked::Open(checked) => Ok(checked),
            Checked::Busy => {
                check_in_order(&parts, group.len(), Some(ORDERED_LOCK_WAIT_MS), |_| {
                    Duration::from_millis(GROUP_CHECK_TIMEOUT_MS)
                })
                .await
            }
            Checked::Failed(e) => Err(e),
        },
        Run::Alone => {
            // A lone check may wait twice on a shard, for the key and for
            // the account, each up to the shard's lock_timeout.
            check_in_order(&parts, group.len(), None, |agent| {
                Duration::from_millis(2 * agent.config().lock_timeout_ms + GROUP_CHECK_TIMEOUT_MS)
            })
            .await
        }
    };
    let (open, verdict) = match checked {
        Ok(checked) => checked,
        Err(e) => return Ok(Ran::NothingWritten(e)),
    };
    let outcomes =
        |part: &Part<'_>| -> Vec<Verdict> { part.owner.iter().map(|&i| verdict[i]).collect() };
    // Nothing to write (every transfer is answered without a record of its
    // own): each payer's shard reads the answers, then everything rolls back.
    if verdict.iter().all(|v| matches!(v, Verdict::Answered(_))) {
        let read = join_all(open.into_iter().map(|(mut txn, part)| {
            let outcomes = outcomes(part);
            async move {
                let r = txn.apply_undecided(batch, &[], &part.legs, &outcomes).await;
                txn.rollback().await;
                r
            }
        }))
        .await;
        let mut answers = Vec::new();
        for r in read {
            answers.extend(r?);
        }
        return Ok(Ran::Decided(answers));
    }
    crash_point!("batch-after-check");
    let t1 = t0.elapsed();
    let mut open = open;
    // The highest shard decides: its transaction opened last.
    let (mut decider, part_d) = open
        .pop()
        .expect("invariant: a cross-shard group spans at least two shards");
    let gids: Vec<Gid> = open
        .iter()
        .map(|(_, p)| Gid::new(TransferId(batch), part_d.agent.id(), p.agent.id()))
        .collect();
    let participants: Vec<String> = gids.iter().map(|g| g.to_string()).collect();
    // Step 2: every shard but the last prepares; the last applies meanwhile,
    // so that step 3 is only the decision.
    let prepares = join_all(open.into_iter().zip(&gids).map(|((txn, part), gid)| {
        let outcomes = outcomes(part);
        let participants = &participants;
        async move {
            let r = txn
                .prepare(batch, *gid, participants, &part.legs, &outcomes)
                .await;
            (part.agent, *gid, r)
        }
    }));
    let outcomes_d = outcomes(part_d);
    let applied_d = decider.apply_undecided(batch, &participants, &part_d.legs, &outcomes_d);
    let (prepared, applied_d) = tokio::join!(prepares, applied_d);
    let decided = match applied_d {
        Ok(decided) => decided,
        Err(e) => {
            decider.rollback().await;
            roll_back(&prepared).await;
            return Err(ShardError::Unavailable {
                shard: part_d.agent.id(),
                reason: format!("group {batch} not applied on its deciding shard: {e}"),
            }
            .into());
        }
    };
    let failed = prepared.iter().find_map(|(_, _, r)| r.as_ref().err());
    if let (Some(e), false) = (failed, broken_commit_unprepared()) {
        // No decision: roll everything back. A prepare that returned an error may
        // have prepared before its connection broke; recovery finishes what we
        // cannot reach.
        let reason = e.to_string();
        decider.rollback().await;
        roll_back(&prepared).await;
        return Err(ShardError::Unavailable {
            shard: part_d.agent.id(),
            reason: format!("group {batch} not prepared everywhere: {reason}"),
        }
        .into());
    }
    crash_point!("batch-after-prepare");
    let t2 = t0.elapsed();
    // Step 3: the decision.
    if let Err(e) = decider.decide(batch).await {
        if nothing_committed(&e) {
            roll_back(&prepared).await;
        }
        return Err(e.into());
    }
    crash_point!("batch-after-decision");
    let t3 = t0.elapsed();
    // Step 4: committed whatever happens here; recovery commits what we cannot.
    join_all(prepared.iter().map(|(agent, gid, _)| async move {
        if let Err(e) = agent.commit_prepared(gid).await {
            warn!(%e, %gid, "commit prepared (group) failed; recovery will finish it");
        }
    }))
    .await;
    crash_point!("batch-before-reply");
    tracing::debug!(n = group.len(), ?t1, ?t2, ?t3, t4 = ?t0.elapsed(), "group timing");
    let mut answers = decided;
    // Only a deliberately broken run gets here with a failed prepare: its
    // transfers get no answer, which answer_all reports.
    for (_, _, r) in prepared {
        answers.extend(r.into_iter().flatten());
    }
    Ok(Ran::Decided(answers))
}

/// A deliberately broken variant for the chaos suite (failpoint
/// `broken-commit-unprepared`): a group is decided even when a shard failed
/// to prepare its part. The checker must catch it; compiled in only with the
/// `failpoints` feature.
fn broken_commit_unprepared() -> bool {
    #[cfg(feature = "failpoints")]
    if fail::eval("broken-commit-unprepared", |_| ()).is_some() {
        return true;
    }
    false
}

/// The shard answered with an error, so its statement (and its transaction)
/// rolled back: this group can never commit, since its ID is never sent
/// again. Any other error (no answer, a lost connection) leaves the outcome
/// unknown.
fn nothing_committed(e: &ShardError) -> bool {
    matches!(
        e,
        ShardError::LockTimeout { .. } | ShardError::Database { .. }
    )
}

/// A shard's answer to step 2, with the GID it prepared under.
type PrepareAnswer<'a> = (&'a ShardAgent, Gid, Result<Vec<GroupAnswer>, ShardError>);

/// How long a lock wait may last in a check that runs on every shard at once.
/// Groups that lock in parallel can wait on each other in a cycle; this ends
/// the cycle quickly, and the ordered check that follows cannot form one.
const PARALLEL_LOCK_WAIT_MS: u64 = 50;

/// How long a lock wait may last in the ordered check that follows. The
/// ordered check cannot wait on another group in a cycle, so a wait this long
/// is a row held outside any group (an in-doubt leg, a slow transaction): the
/// group gives up and its members run alone, where only the blocked one waits
/// (up to `lock_timeout`), instead of the whole group and every group behind.
const ORDERED_LOCK_WAIT_MS: u64 = 200;

/// How long one shard may take to answer a group's check (a lone transfer's
/// check: this beyond twice the shard's `lock_timeout`, one wait for the key
/// and one for the account). A shard silent this long is
/// taken as unreachable: the group's members run alone and the shard is marked
/// (`crate::suspects`), so it stalls one group, not the lane.
pub const GROUP_CHECK_TIMEOUT_MS: u64 = 1_000;

enum Checked<'a> {
    /// Every shard's transaction is open, in shard order, with each transfer's
    /// verdict over all its legs.
    Open(OpenChecked<'a>),
    /// A lock wait ran out during a parallel check: everything was rolled back.
    Busy,
    Failed(ShardError),
}

async fn check_at_once<'a>(parts: &'a BTreeMap<ShardId, Part<'a>>, n: usize) -> Checked<'a> {
    let bound = Duration::from_millis(GROUP_CHECK_TIMEOUT_MS);
    let answers = join_all(parts.values().map(|part| async move {
        let prior = vec![Verdict::Pass; part.legs.len()];
        let r = open_bounded(part, &prior, Some(PARALLEL_LOCK_WAIT_MS), bound).await;
        (part, r)
    }))
    .await;
    let mut verdict = vec![Verdict::Pass; n];
    let mut open = Vec::with_capacity(answers.len());
    let mut failure = None;
    for (part, r) in answers {
        match r {
            Ok((txn, found)) => {
                for (&i, v) in part.owner.iter().zip(found) {
                    verdict[i] = verdict[i].merge(v);
                }
                open.push((txn, part));
            }
            // A shard that failed otherwise outranks a lock wait elsewhere:
            // the group is then not merely busy, and the ordered check must
            // not run into that shard's still-running statement.
            Err(e) => {
                let keep = matches!(&failure, Some(f) if !matches!(f, ShardError::LockTimeout { .. }))
                    && matches!(e, ShardError::LockTimeout { .. });
                if !keep {
                    failure = Some(e);
                }
            }
        }
    }
    match failure {
        None => Checked::Open((open, verdict)),
        Some(e) => {
            join_all(open.into_iter().map(|(txn, _)| txn.rollback())).await;
            match e {
                ShardError::LockTimeout { .. } => Checked::Busy,
                e => Checked::Failed(e),
            }
        }
    }
}

/// Step 1 on one shard, bounded: each lock wait by `lock_wait_ms` (`None`:
/// the shard's `lock_timeout`), the whole call by `bound` (a shard that does
/// not answer by then is `Unavailable`; its connection is dropped, which rolls
/// its part back).
async fn open_bounded<'a>(
    part: &'a Part<'a>,
    prior: &[Verdict],
    lock_wait_ms: Option<u64>,
    bound: Duration,
) -> Result<(OpenBatch<'a>, Vec<Verdict>), ShardError> {
    match tokio::time::timeout(
        bound,
        part.agent.open_batch(&part.legs, prior, lock_wait_ms),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(ShardError::Unavailable {
            shard: part.agent.id(),
            reason: format!("group check: no answer within {} ms", bound.as_millis()),
        }),
    }
}

/// Every shard's transactions open, in shard order, with each transfer's verdict.
type OpenChecked<'a> = (Vec<(OpenBatch<'a>, &'a Part<'a>)>, Vec<Verdict>);

async fn check_in_order<'a>(
    parts: &'a BTreeMap<ShardId, Part<'a>>,
    n: usize,
    lock_wait_ms: Option<u64>,
    bound: impl Fn(&ShardAgent) -> Duration,
) -> Result<OpenChecked<'a>, ShardError> {
    let mut verdict = vec![Verdict::Pass; n];
    let mut open = Vec::with_capacity(parts.len());
    for part in parts.values() {
        let prior: Vec<Verdict> = part.owner.iter().map(|&i| verdict[i]).collect();
        match open_bounded(part, &prior, lock_wait_ms, bound(part.agent)).await {
            Ok((txn, found)) => {
                for (&i, v) in part.owner.iter().zip(found) {
                    verdict[i] = verdict[i].merge(v);
                }
                open.push((txn, part));
            }
            Err(e) => {
                join_all(open.into_iter().map(|(txn, _)| txn.rollback())).await;
                return Err(e);
            }
        }
    }
    Ok((open, verdict))
}

async fn roll_back(prepared: &[PrepareAnswer<'_>]) {
    join_all(prepared.iter().map(|(agent, gid, r)| async move {
        let may_be_prepared = !matches!(r, Err(e) if nothing_committed(e));
        if may_be_prepared {
            if let Err(e) = agent.rollback_prepared(gid).await {
                warn!(%e, %gid, "rollback prepared (group) failed; recovery will finish it");
            }
        }
    }))
    .await;
}

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

    #[test]
    fn a_returning_client_already_waiting_is_expected_once() {
        let mark = AnswerMark::new();
        let carried = Instant::now();
        assert!(!mark.waited_through(carried), "no group has answered yet");
        std::thread::sleep(Duration::from_millis(1));
        mark.mark();
        std::thread::sleep(Duration::from_millis(1));
        let returned = Instant::now();
        assert!(mark.waited_through(carried));
        assert!(!mark.waited_through(returned));
        // 16 clients, all in the last group; one is back already: still 16.
        let waiting = [returned];
        let n = waiting.iter().filter(|&&q| mark.waited_through(q)).count();
        assert_eq!(expected_group(n, 16, 32), 16);
        // 4 waited through a group of 12: all 16 are expected.
        assert_eq!(expected_group(4, 12, 32), 16);
        assert_eq!(expected_group(30, 16, 32), 32, "never more than a group");
    }

    #[test]
    fn a_lane_lingers_only_while_most_of_its_expected_group_is_missing() {
        let linger = Duration::from_millis(2);
        assert!(!should_linger(1, 8, Duration::ZERO), "no linger configured");
        assert!(
            !should_linger(1, 1, linger),
            "a lone client is its whole group"
        );
        assert!(!should_linger(9, 8, linger), "more than expected is here");
        assert!(should_linger(1, 8, linger), "one of eight is here");
        assert!(should_linger(5, 8, linger), "5/8 is under three quarters");
        assert!(!should_linger(6, 8, linger), "6/8 is three quarters");
        assert!(should_linger(2, 3, linger), "2/3 is under three quarters");
    }
}
