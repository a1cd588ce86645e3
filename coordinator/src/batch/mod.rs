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
//! account that a running group of its lane touches ([`Held`]), so groups of
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use router::{ShardId, UserId};
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
mod redis;

pub use group::GROUP_CHECK_TIMEOUT_MS;
use group::{run_cross, run_local, Run};
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
    locks: Option<Arc<LockService>>,
) {
    // How long the lane keeps a running group's accounts from its next groups
    // ([`Held`]): the Redis locks' TTL, or in 2PC mode GROUP_CHECK_TIMEOUT_MS
    // (past it the next group meets the row locks, whose waits are bounded).
    let hold_max = Duration::from_millis(match &locks {
        Some(locks) => locks.config().lock_ttl_ms,
        None => GROUP_CHECK_TIMEOUT_MS,
    });
    let slots = Arc::new(Semaphore::new(workers));
    let answered = Arc::new(AnswerMark::new());
    let held = Arc::new(Held::default());
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut last_group = 0;
    let mut group_no: u64 = 0;
    let mut closed = false;
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
        let group = take_group(&mut waiting, max, &held.now());
        if group.is_empty() {
            // Everything waiting touches an account a running group holds:
            // wait for a group to end (or its hold to run out), or for a
            // transfer that may not.
            drop(slot);
            let expiry = held.next_expiry();
            tokio::select! {
                _ = held.freed.notified() => {}
                _ = tokio::time::sleep_until(expiry) => {}
                job = rx.recv(), if !closed && waiting.len() < max => {
                    match job {
                        Some(job) => waiting.push_back(job),
                        // The batcher is gone: only the held accounts'
                        // return can move what is left.
                        None => closed = true,
                    }
                }
            }
            continue;
        }
        group_no += 1;
        held.take(group_no, accounts_of(&group), hold_max);
        last_group = group.len();
        counts.record(lane, group.len());
        let answered = answered.clone();
        let locks = locks.clone();
        let held = held.clone();
        // In Redis mode a group holds its lane for no longer than its locks
        // last: one stalled past their TTL (a paused holder) lets the next
        // groups take the expired locks and go on, and its own writes are
        // refused by their fencing token. Its own bounds (each shard call's
        // timeout) end it.
        let lease = match (lane, &locks) {
            (Lane::Cross, Some(_)) => Some(hold_max),
            _ => None,
        };
        let run = tokio::spawn(async move {
            let users = accounts(&group);
            match (lane, locks) {
                (Lane::Local(_), _) => run_local(group, Some(&answered), Run::Grouped).await,
                (Lane::Cross, Some(locks)) => {
                    run_redis(group, Some(answered), Run::Grouped, locks).await
                }
                (Lane::Cross, None) => run_cross(group, Some(&answered), Run::Grouped).await,
            }
            held.give_back(group_no, users);
        });
        tokio::spawn(async move {
            match lease {
                Some(lease) => {
                    let _ = tokio::time::timeout(lease, run).await;
                }
                None => {
                    let _ = run.await;
                }
            }
            drop(slot);
        });
    }
}

/// The accounts a lane's running groups touch, so that it never runs two
/// groups that touch one account at once: a transfer to a hot payee waits
/// for the group holding that payee and joins the next one, instead of
/// waiting on a row lock or a Redis lock inside a group of its own. Each
/// hold runs out after the lane's `hold_max` (a stalled group's accounts are
/// free again for the next group, as its Redis locks are once their TTL ran
/// out; the fencing token or the row locks still keep the stalled one out).
#[derive(Default)]
struct Held {
    /// Account -> (the group holding it, when the hold runs out).
    accounts: Mutex<HashMap<UserId, (u64, tokio::time::Instant)>>,
    /// Woken when a group gives its accounts back.
    freed: tokio::sync::Notify,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, (u64, tokio::time::Instant)>> {
        self.accounts
            .lock()
            .expect("invariant: no code panics while holding the lane's accounts")
    }

    /// The accounts held now (holds that ran out are dropped).
    fn now(&self) -> HashSet<UserId> {
        let now = tokio::time::Instant::now();
        let mut accounts = self.lock();
        accounts.retain(|_, (_, until)| *until > now);
        accounts.keys().copied().collect()
    }

    /// When the first hold runs out (far ahead when none is held).
    fn next_expiry(&self) -> tokio::time::Instant {
        self.lock()
            .values()
            .map(|(_, until)| *until)
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600))
    }

    fn take(&self, group: u64, users: impl IntoIterator<Item = UserId>, hold_max: Duration) {
        let until = tokio::time::Instant::now() + hold_max;
        let mut accounts = self.lock();
        for user in users {
            accounts.insert(user, (group, until));
        }
    }

    /// Gives back what `group` still holds (a hold that ran out may belong
    /// to a later group by now).
    fn give_back(&self, group: u64, users: Vec<UserId>) {
        {
            let mut accounts = self.lock();
            for user in users {
                if accounts.get(&user).is_some_and(|(g, _)| *g == group) {
                    accounts.remove(&user);
                }
            }
        }
        self.freed.notify_one();
    }
}

fn accounts_of(jobs: &[Job]) -> impl Iterator<Item = UserId> + '_ {
    jobs.iter().flat_map(|j| [j.order.from, j.order.to])
}

fn accounts(jobs: &[Job]) -> Vec<UserId> {
    accounts_of(jobs).collect()
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
/// group, or whose payee is a payer of it, or whose payer is a payee of it,
/// or that touches an account in `held` (a running group's), waits.
fn take_group(waiting: &mut VecDeque<Job>, max: usize, held: &HashSet<UserId>) -> Vec<Job> {
    let pairs: Vec<(UserId, UserId)> = waiting.iter().map(|j| (j.order.from, j.order.to)).collect();
    let picked = pick(&pairs, max, held);
    let mut group = Vec::new();
    let mut later = VecDeque::new();
    for (job, picked) in waiting.drain(..).zip(picked) {
        if picked {
            group.push(job);
        } else {
            later.push_back(job);
        }
    }
    *waiting = later;
    group
}

/// Which of the waiting transfers, as (payer, payee) in arrival order, go
/// into the next group (see [`take_group`]).
fn pick(waiting: &[(UserId, UserId)], max: usize, held: &HashSet<UserId>) -> Vec<bool> {
    let mut payers: HashSet<UserId> = HashSet::new();
    let mut payees: HashSet<UserId> = HashSet::new();
    let mut taken = 0;
    waiting
        .iter()
        .map(|&(from, to)| {
            let fits = taken < max
                && !held.contains(&from)
                && !held.contains(&to)
                && !payers.contains(&from)
                && !payees.contains(&from)
                && !payers.contains(&to);
            if fits {
                payers.insert(from);
                payees.insert(to);
                taken += 1;
            }
            fits
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn a_running_group_holds_its_accounts_until_it_gives_them_back_or_its_hold_runs_out() {
        let held = Held::default();
        let (a, b, c) = (
            UserId::for_username("held_a"),
            UserId::for_username("held_b"),
            UserId::for_username("held_c"),
        );
        held.take(1, [a, b], Duration::from_secs(60));
        held.take(2, [c], Duration::from_millis(30));
        assert_eq!(held.now(), HashSet::from([a, b, c]));
        held.give_back(2, vec![a]);
        assert!(held.now().contains(&a), "a is group 1's, not group 2's");
        held.give_back(1, vec![a, b]);
        assert_eq!(held.now(), HashSet::from([c]));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(held.now().is_empty(), "c's hold ran out");
        // A hold that ran out and was taken again belongs to the new group.
        held.take(3, [c], Duration::from_secs(60));
        held.give_back(2, vec![c]);
        assert_eq!(held.now(), HashSet::from([c]));
    }

    proptest! {
        /// A group never holds a payer twice, a payer that is also a payee,
        /// nor an account a running group holds, never exceeds its size, and
        /// leaves out only a transfer that breaks one of those rules against
        /// what came before it (arrival order).
        #[test]
        fn a_group_takes_every_waiting_transfer_that_fits_and_no_other(
            waiting in proptest::collection::vec((0u8..12, 0u8..12), 0..40),
            held in proptest::collection::hash_set(0u8..12, 0..4),
            max in 1usize..10,
        ) {
            let user = |n: u8| UserId::for_username(&format!("u{n}"));
            let pairs: Vec<(UserId, UserId)> = waiting
                .iter()
                .filter(|(a, b)| a != b)
                .map(|&(a, b)| (user(a), user(b)))
                .collect();
            let held: HashSet<UserId> = held.into_iter().map(user).collect();
            let picked = pick(&pairs, max, &held);
            let group: Vec<(UserId, UserId)> = pairs
                .iter()
                .zip(&picked)
                .filter(|(_, &p)| p)
                .map(|(&t, _)| t)
                .collect();
            prop_assert!(group.len() <= max);
            for (i, &(from, to)) in group.iter().enumerate() {
                prop_assert!(!held.contains(&from) && !held.contains(&to));
                for &(f2, t2) in &group[..i] {
                    prop_assert!(f2 != from, "a payer twice");
                    prop_assert!(t2 != from && f2 != to, "a payer that is a payee");
                }
            }
            for (i, &(from, to)) in pairs.iter().enumerate() {
                if picked[i] {
                    continue;
                }
                let before: Vec<(UserId, UserId)> = pairs[..i]
                    .iter()
                    .zip(&picked[..i])
                    .filter(|(_, &p)| p)
                    .map(|(&t, _)| t)
                    .collect();
                let conflicts = before.len() >= max
                    || held.contains(&from)
                    || held.contains(&to)
                    || before.iter().any(|&(f, t)| f == from || t == from || f == to);
                prop_assert!(conflicts, "transfer {i} was left out without a reason");
            }
        }
    }

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
