//! A lane: the queue of transfers of one kind (one shard's same-shard
//! transfers, or every cross-shard one) and the loop that forms its groups and
//! runs them: how long it lingers for returning clients, which transfers fit
//! in the next group, and which accounts its running groups hold.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use router::UserId;
use tokio::sync::{mpsc, Semaphore};

use super::group::{run_cross, run_local, Run};
use super::redis::run_redis;
use super::{GroupCounts, Job, Lane, GROUP_CHECK_TIMEOUT_MS};
use crate::redis_lock::LockService;

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
pub(super) struct AnswerMark {
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
    pub(super) fn mark(&self) {
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
pub(super) async fn run_lane(
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
