//! Batching (`shard_agent::batch`, the `wallet_batch_*` SQL functions): concurrent transfers with new
//! Idempotency-Keys are grouped and run as one transaction per shard, which is
//! how the wallet gets past one fsync and several round trips per transfer
//! (issue 5). Each transfer is still decided on its own: a refused transfer is
//! recorded as aborted and the rest of its group commits.
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
//!    to 50 ms, and after such a wait ran out, again shard after shard in
//!    shard-ID order (one global lock order, (shard, user ID), so groups never
//!    wait on each other in a cycle; an unbatched transfer, which locks in
//!    user-ID order, can, until `lock_timeout`), where each lock wait is
//!    bounded to `ORDERED_LOCK_WAIT_MS` and each shard's answer to
//!    `GROUP_CHECK_TIMEOUT_MS`;
//! 2. every shard but the last applies and prepares, at once, while the last
//!    one applies and keeps its transaction open;
//! 3. the last shard inserts the group's decision row and commits: the
//!    decision;
//! 4. every prepared transaction is committed, then each client is answered.
//!
//! If step 1 fails on any shard, nothing was written: the open transactions are
//! rolled back and each transfer runs alone through the unbatched protocol
//! (`two_pc::transfer`), which reports its own outcome; what the failure met
//! (the users of a held row, a silent shard) is marked so that their next
//! transfers run alone too (`crate::suspects`). A transfer whose key
//! exists takes the unbatched slow path, which replays it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use router::{ShardId, UserId};
use shard_agent::batch::{BatchLeg, OpenBatch, Verdict};
use shard_agent::transfer_local::{Submitted, TransferOrder};
use shard_agent::{
    FailureCode, Gid, ShardAgent, ShardError, TransferId, TransferRecord, TransferState,
};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{info, warn, Instrument, Span};
use uuid::Uuid;

use crate::cluster::Routing;
use crate::error::{crash_point, CoordinatorError};
use crate::service::verify_payer;
use crate::suspects::{mark_silent, settle_fault, Fault, Suspect, Suspects};
use crate::two_pc;

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

    /// Runs this transfer alone, through the unbatched protocol.
    fn alone(self) {
        self.unbatched(false);
    }

    /// The slow path after a batch found the key exists: replay it.
    fn replay(self) {
        self.unbatched(true);
    }

    /// Same-shard: `transfer_local`, whose fast path refuses a key that exists
    /// and falls back to its replay. Cross-shard: the whole unbatched protocol,
    /// or, when the key is known to exist, its slow path directly. An unread
    /// session is read first, as for any unbatched transfer.
    fn unbatched(self, key_exists: bool) {
        tokio::spawn(async move {
            let result = {
                let (home, remote) = (self.home(), self.remote());
                async {
                    if let Some(token_hash) = &self.session {
                        verify_payer(home, &self.order, token_hash).await?;
                    }
                    if home.id() == remote.id() {
                        home.transfer_local(&self.order)
                            .await
                            .map_err(CoordinatorError::from)
                    } else if key_exists {
                        two_pc::with_claim(home, remote, &self.order).await
                    } else {
                        two_pc::transfer(home, remote, &self.order).await
                    }
                }
                .instrument(self.span.clone())
                .await
            };
            let fault = self.fault_of(&result);
            let (suspects, span) = (self.suspects.clone(), self.span.clone());
            self.answer(result);
            settle_fault(&suspects, fault).instrument(span).await;
        });
    }

    /// What this transfer's lone run says about the users and shards it
    /// touched: a row-lock timeout points at its users' rows; "shard
    /// unavailable" at one of its two shards, to be confirmed by a probe.
    fn fault_of(&self, result: &Result<Submitted, CoordinatorError>) -> Fault {
        let shards = || vec![self.home().clone(), self.remote().clone()];
        match result {
            Err(CoordinatorError::Shard(ShardError::LockTimeout { .. })) => {
                Fault::RowHeld([self.order.from, self.order.to])
            }
            Err(CoordinatorError::Shard(e @ ShardError::Unavailable { .. })) => Fault::ShardSilent(
                shards()
                    .into_iter()
                    .filter(|a| a.id() == e.shard())
                    .collect(),
            ),
            Ok(Submitted::New(r)) => match r.failure_code {
                Some(FailureCode::ShardBusy) => Fault::RowHeld([self.order.from, self.order.to]),
                Some(FailureCode::ShardUnavailable) => Fault::ShardSilent(shards()),
                _ => Fault::None,
            },
            _ => Fault::None,
        }
    }

    fn legs(&self) -> [BatchLeg; 2] {
        let o = &self.order;
        [
            BatchLeg {
                tid: self.tid,
                debit: true,
                user: o.from,
                user_name: o.from_username.clone(),
                party: o.to,
                party_name: o.to_username.clone(),
                amount: o.amount,
                key: Some(o.key.clone()),
                session: self.session.clone(),
            },
            BatchLeg {
                tid: self.tid,
                debit: false,
                user: o.to,
                user_name: o.to_username.clone(),
                party: o.from,
                party_name: o.from_username.clone(),
                amount: o.amount,
                key: None,
                session: None,
            },
        ]
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

    /// Moves money as `two_pc::transfer` or `transfer_local` would, in a group.
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
                Lane::Local(_) => run_local(group, &answered).await,
                Lane::Cross => run_cross(group, &answered).await,
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

async fn run_local(group: Vec<Job>, answered: &AnswerMark) {
    let agent = group[0].home();
    let legs: Vec<BatchLeg> = group.iter().flat_map(|j| j.legs()).collect();
    let result = agent.transfer_local_batch(&legs).await;
    answered.mark();
    match result {
        Ok(records) => answer_all(group, records, &[]),
        // Nothing was written: each transfer runs alone and reports its own outcome.
        Err(e) => {
            warn!(shard = %agent.id(), %e, transfers = group.len(), "local batch failed; running its transfers one by one");
            mark_unanswered(&group, &e);
            group.into_iter().for_each(Job::alone);
        }
    }
}

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

/// Answers each transfer from its record. One without a record had a key that
/// exists or an unverified payer (`unverified[i]`, where the caller knows), and
/// runs alone: which replays the key, or reads the session and answers 401 or
/// 422.
fn answer_all(group: Vec<Job>, records: Vec<TransferRecord>, unverified: &[bool]) {
    let mut by_tid: HashMap<TransferId, TransferRecord> =
        records.into_iter().map(|r| (r.transfer_id, r)).collect();
    for (i, job) in group.into_iter().enumerate() {
        if unverified.get(i) == Some(&true) {
            job.alone();
            continue;
        }
        match by_tid.remove(&job.tid) {
            Some(record) => {
                job.span.in_scope(|| {
                    info!(state = ?record.state, code = ?record.failure_code, "transfer decided");
                });
                job.answer(Ok(Submitted::New(record)));
            }
            None => job.replay(),
        }
    }
}

/// One shard's part of a cross-shard group: its legs, and for each leg the
/// index of its transfer in the group.
struct Part<'a> {
    agent: &'a ShardAgent,
    legs: Vec<BatchLeg>,
    owner: Vec<usize>,
}

async fn run_cross(group: Vec<Job>, answered: &AnswerMark) {
    let batch = Uuid::new_v4();
    let span = tracing::info_span!("2pc batch", %batch, transfers = group.len(),
        transfer_ids = %group.iter().map(|j| j.tid.to_string()).collect::<Vec<_>>().join(","));
    let mut unverified = vec![false; group.len()];
    let result = cross(batch, &group, &mut unverified)
        .instrument(span.clone())
        .await;
    answered.mark();
    let _entered = span.enter();
    match result {
        Ok(Ran::Decided(records)) => answer_all(group, records, &unverified),
        Ok(Ran::NothingWritten(e)) => {
            warn!(%e, "batch check failed; running its transfers one by one");
            mark_unanswered(&group, &e);
            group.into_iter().for_each(Job::alone);
        }
        Err(e) => {
            warn!(%e, "batch failed before its decision was known");
            for (job, unverified) in group.into_iter().zip(unverified) {
                // Nothing of an unverified payer's transfer was written
                // anywhere: it runs alone, which answers 401 or 422.
                if unverified {
                    job.alone();
                } else {
                    let e = each(&e);
                    job.answer(Err(e));
                }
            }
        }
    }
}

enum Ran {
    Decided(Vec<TransferRecord>),
    /// Step 1 failed: every transaction was rolled back.
    NothingWritten(ShardError),
}

/// `unverified[i]` is set once the check found transfer `i`'s payer unverified.
async fn cross(
    batch: Uuid,
    group: &[Job],
    unverified: &mut [bool],
) -> Result<Ran, CoordinatorError> {
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
    // Step 1: every shard at once, each lock wait bounded tightly; when one
    // waits too long (perhaps on another group checking in another order), all
    // is rolled back and the check runs again shard after shard.
    let (mut open, verdict) = match check_at_once(&parts, group.len()).await {
        Checked::Open(checked) => checked,
        Checked::Busy => match check_in_order(&parts, group.len()).await {
            Ok(checked) => checked,
            Err(e) => return Ok(Ran::NothingWritten(e)),
        },
        Checked::Failed(e) => return Ok(Ran::NothingWritten(e)),
    };
    for (flag, v) in unverified.iter_mut().zip(&verdict) {
        *flag = *v == Verdict::Unverified;
    }
    // Nothing to write (every key exists or every payer is unverified): no
    // prepared transaction, no decision row.
    if verdict
        .iter()
        .all(|v| matches!(v, Verdict::KeyExists | Verdict::Unverified))
    {
        join_all(open.into_iter().map(|(txn, _)| txn.rollback())).await;
        return Ok(Ran::Decided(Vec::new()));
    }
    crash_point!("batch-after-check");
    let t1 = t0.elapsed();
    // The highest shard decides: its transaction opened last.
    let (mut decider, part_d) = open
        .pop()
        .expect("invariant: a cross-shard group spans at least two shards");
    let gids: Vec<Gid> = open
        .iter()
        .map(|(_, p)| Gid::new(TransferId(batch), part_d.agent.id(), p.agent.id()))
        .collect();
    let participants: Vec<String> = gids.iter().map(|g| g.to_string()).collect();
    let outcomes =
        |part: &Part<'_>| -> Vec<Verdict> { part.owner.iter().map(|&i| verdict[i]).collect() };
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
    let mut failed = applied_d.as_ref().err().map(|e| e.to_string());
    for (_, _, r) in &prepared {
        if let (Err(e), None) = (r, &failed) {
            failed = Some(e.to_string());
        }
    }
    if let Some(reason) = failed {
        // No decision: roll everything back. A prepare that returned an error may
        // have prepared before its connection broke; recovery finishes what we
        // cannot reach.
        decider.rollback().await;
        roll_back(&prepared).await;
        return Err(ShardError::Unavailable {
            shard: part_d.agent.id(),
            reason: format!("batch {batch} not prepared everywhere: {reason}"),
        }
        .into());
    }
    let decided =
        applied_d.expect("invariant: the deciding shard's apply succeeded (checked above)");
    crash_point!("batch-after-prepare");
    let t2 = t0.elapsed();
    // Step 3: the decision.
    if let Err(e) = decider.decide(batch).await {
        if two_pc::nothing_committed(&e) {
            roll_back(&prepared).await;
        }
        return Err(e.into());
    }
    crash_point!("batch-after-decision");
    let t3 = t0.elapsed();
    // Step 4: committed whatever happens here; recovery commits what we cannot.
    join_all(prepared.iter().map(|(agent, gid, _)| async move {
        if let Err(e) = agent.commit_prepared(gid).await {
            warn!(%e, %gid, "commit prepared (batch) failed; recovery will finish it");
        }
    }))
    .await;
    crash_point!("batch-before-reply");
    tracing::debug!(n = group.len(), ?t1, ?t2, ?t3, t4 = ?t0.elapsed(), "batch timing");
    let mut records = Vec::new();
    for (_, _, r) in prepared {
        records.extend(r.expect("invariant: every prepare succeeded (checked above)"));
    }
    records.extend(decided);
    debug_assert!(records.iter().all(|r| r.state != TransferState::Preparing));
    Ok(Ran::Decided(records))
}

/// A shard's answer to step 2, with the GID it prepared under.
type PrepareAnswer<'a> = (&'a ShardAgent, Gid, Result<Vec<TransferRecord>, ShardError>);

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

/// How long one shard may take to answer a group's check. A shard silent this
/// long is taken as unreachable: the group's members run alone and the shard
/// is marked (`crate::suspects`), so it stalls one group, not the lane.
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
    let answers = join_all(parts.values().map(|part| async move {
        let prior = vec![Verdict::Pass; part.legs.len()];
        let r = open_bounded(part, &prior, PARALLEL_LOCK_WAIT_MS).await;
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
            Err(e) => failure = Some(e),
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

/// Step 1 on one shard, bounded: each lock wait by `lock_wait_ms`, the whole
/// call by [`GROUP_CHECK_TIMEOUT_MS`] (a shard that does not answer by then
/// is `Unavailable`; its connection is dropped, which rolls its part back).
async fn open_bounded<'a>(
    part: &'a Part<'a>,
    prior: &[Verdict],
    lock_wait_ms: u64,
) -> Result<(OpenBatch<'a>, Vec<Verdict>), ShardError> {
    let bound = Duration::from_millis(GROUP_CHECK_TIMEOUT_MS);
    match tokio::time::timeout(
        bound,
        part.agent.open_batch(&part.legs, prior, Some(lock_wait_ms)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(ShardError::Unavailable {
            shard: part.agent.id(),
            reason: format!("batch check: no answer within {GROUP_CHECK_TIMEOUT_MS} ms"),
        }),
    }
}

/// Every shard's transactions open, in shard order, with each transfer's verdict.
type OpenChecked<'a> = (Vec<(OpenBatch<'a>, &'a Part<'a>)>, Vec<Verdict>);

async fn check_in_order<'a>(
    parts: &'a BTreeMap<ShardId, Part<'a>>,
    n: usize,
) -> Result<OpenChecked<'a>, ShardError> {
    let mut verdict = vec![Verdict::Pass; n];
    let mut open = Vec::with_capacity(parts.len());
    for part in parts.values() {
        let prior: Vec<Verdict> = part.owner.iter().map(|&i| verdict[i]).collect();
        match open_bounded(part, &prior, ORDERED_LOCK_WAIT_MS).await {
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
        let may_be_prepared = !matches!(r, Err(e) if two_pc::nothing_committed(e));
        if may_be_prepared {
            if let Err(e) = agent.rollback_prepared(gid).await {
                warn!(%e, %gid, "rollback prepared (batch) failed; recovery will finish it");
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
