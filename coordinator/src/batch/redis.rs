//! Redis mode's run of a cross-shard group: the same groups and the same
//! shard functions as two-phase commit, with Redis locks instead of prepared
//! transactions.
//!
//! 1. Grant: one Redis call locks, for each transfer, both of its accounts or
//!    neither, under one fencing token for the group
//!    ([`LockService::grant`]). Transfers whose locks another group holds try
//!    again for up to [`GROUP_GRANT_WAIT_MS`] while the granted ones go on,
//!    then run alone, where they wait up to the lock service's `lock_wait_ms`;
//!    a transfer that still has no lock is recorded as aborted with
//!    `lock_unavailable` (nothing moved).
//! 2. Payees: each payee shard is read once, unlocked, for the refusals found
//!    on the payee's side (`recipient_not_found`, `currency_mismatch`).
//! 3. Debits: one statement per payer shard (`wallet_redis_debit`), the
//!    commit point: keys, sessions and refusals by the group's check, the
//!    fence, the money, the records, and a pending credit per transfer.
//! 4. Credits: one statement per payee shard (`wallet_redis_credit`); then the
//!    pending credits are cleared on each payer shard (an asynchronous
//!    commit), the clients answered and the locks released.
//!
//! Crash rule: before a payer shard's debit statement commits, nothing of
//! its transfers exists; after it, they are committed and recovery applies
//! any credit left pending, under a fresh lock (forward recovery). A credit
//! that cannot apply is counted on its pending row, which the in-doubt view
//! shows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rand::Rng;
use router::{ShardId, UserId};
use shard_agent::batch::{BatchLeg, Verdict};
use shard_agent::redis_legs::{Credited, PendingCredit};
use shard_agent::transfer::Submitted;
use shard_agent::{FailureCode, ShardAgent, ShardError, TransferId, TransferState};
use tracing::{warn, Instrument};

use super::group::{
    answer_one, client_answer, each, each_shard_error, mark_unanswered, nothing_committed, Run,
    LOCAL_GROUP_LOCK_WAIT_MS,
};
use super::{AnswerMark, Job};
use crate::error::{crash_point, stall_point, CoordinatorError};
use crate::redis_lock::{Held, LockService};

/// Redis mode's failpoints, in protocol order.
pub const FAILPOINTS: [&str; 3] = [
    "redis-after-lock",
    "redis-between-legs",
    "redis-before-reply",
];

/// How long a group from a lane keeps asking for the locks of its transfers
/// that another group holds (that group holds them for a few milliseconds)
/// before those transfers run alone.
pub const GROUP_GRANT_WAIT_MS: u64 = 100;

/// What becomes of one transfer of a group.
enum Fate {
    /// Boxed: a record is large.
    Answer(Box<Result<Submitted, CoordinatorError>>),
    /// Nothing was written and the group ran from a lane: run it alone.
    Alone,
}

impl Fate {
    fn answer(result: Result<Submitted, CoordinatorError>) -> Fate {
        Fate::Answer(Box::new(result))
    }
}

/// Grants the group's locks, runs each granted part, and answers every
/// transfer (or sends it to run alone).
pub(super) async fn run_redis(
    group: Vec<Job>,
    answered: Option<Arc<AnswerMark>>,
    run: Run,
    locks: Arc<LockService>,
) {
    let wait_ms = match run {
        Run::Grouped => GROUP_GRANT_WAIT_MS,
        Run::Alone => locks.config().lock_wait_ms,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut pending = group;
    // The payees as read in the first round, kept for the transfers that ask
    // again (accounts are never deleted and never change currency).
    let mut carried: Option<Vec<PayeeRead>> = None;
    let mut parts = Vec::new();
    loop {
        let wants: Vec<Vec<UserId>> = pending
            .iter()
            .map(|j| vec![j.order.from, j.order.to])
            .collect();
        // The payees are read unlocked, so at the same time as the grant.
        let (grant, payees) = match carried.take() {
            Some(payees) => (locks.grant(&wants).await, payees),
            None => tokio::join!(locks.grant(&wants), read_payees(&pending)),
        };
        let (held, granted) = match grant {
            Ok(grant) => grant,
            Err(e) => {
                warn!(%e, transfers = pending.len(), "locks not granted; the transfers are aborted, nothing moved");
                parts.push(tokio::spawn(locked(
                    pending,
                    None,
                    run,
                    locks.clone(),
                    answered.clone(),
                )));
                break;
            }
        };
        let (mut ready, mut rest, mut rest_payees) = (Vec::new(), Vec::new(), Vec::new());
        for ((job, payee), granted) in pending.into_iter().zip(payees).zip(granted) {
            if granted {
                ready.push((job, payee));
            } else {
                rest.push(job);
                rest_payees.push(payee);
            }
        }
        if let (false, Some(held)) = (ready.is_empty(), held) {
            let (ready, payees): (Vec<Job>, Vec<PayeeRead>) = ready.into_iter().unzip();
            parts.push(tokio::spawn(locked(
                ready,
                Some((held, payees)),
                run,
                locks.clone(),
                answered.clone(),
            )));
        }
        if rest.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            match run {
                Run::Grouped => rest.into_iter().for_each(Job::alone),
                Run::Alone => {
                    warn!(
                        waited_ms = wait_ms,
                        "locks held elsewhere for too long; the transfer is aborted, nothing moved"
                    );
                    parts.push(tokio::spawn(locked(
                        rest,
                        None,
                        run,
                        locks.clone(),
                        answered.clone(),
                    )));
                }
            }
            break;
        }
        pending = rest;
        carried = Some(rest_payees);
        let pause = rand::thread_rng().gen_range(1..5);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    for part in parts {
        // A part that panicked has dropped its replies: its clients see the
        // transfer end without an answer.
        let _ = part.await;
    }
}

/// What a payee's shard said of a transfer's payee: a refusal or none, or
/// the shard's error.
type PayeeRead = Result<Option<FailureCode>, ShardError>;

/// Each transfer's payee, read on each payee shard at once (unlocked:
/// accounts are never deleted and never change currency).
async fn read_payees(group: &[Job]) -> Vec<PayeeRead> {
    let payees = by_shard(group, 0..group.len(), |j| j.remote());
    let read = join_all(payees.into_values().map(|(agent, members)| async move {
        let wanted: Vec<(UserId, _)> = members
            .iter()
            .map(|&i| (group[i].order.to, group[i].order.amount.currency()))
            .collect();
        (agent.payee_refusals(&wanted).await, members)
    }))
    .await;
    let mut out: Vec<(usize, PayeeRead)> = Vec::with_capacity(group.len());
    for (r, members) in read {
        match r {
            Ok(codes) => out.extend(members.into_iter().zip(codes.into_iter().map(Ok))),
            Err(e) => out.extend(members.into_iter().map(|i| (i, Err(each_shard_error(&e))))),
        }
    }
    // Every member was in exactly one shard's part: back to the group's order.
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// One granted part of a group, with its locks and its payees as read (or,
/// with `granted` of `None`, transfers that got no lock: they are recorded as
/// aborted with `lock_unavailable`).
async fn locked(
    group: Vec<Job>,
    granted: Option<(Held, Vec<PayeeRead>)>,
    run: Run,
    locks: Arc<LockService>,
    answered: Option<Arc<AnswerMark>>,
) {
    let (held, payees) = match granted {
        Some((held, payees)) => (Some(held), Some(payees)),
        None => (None, None),
    };
    let fence = held.as_ref().map(Held::token);
    let span = tracing::info_span!("redis group", transfers = group.len(), fence, alone = (run == Run::Alone),
        transfer_ids = %group.iter().map(|j| j.tid.to_string()).collect::<Vec<_>>().join(","));
    let result = steps(&group, fence.zip(payees), run, &locks)
        .instrument(span.clone())
        .await;
    // The lane's mark goes before the answers: a client back before it would
    // be counted twice in the lane's estimate of its next group. The answers
    // go before the locks are released: the lane keeps these accounts out of
    // its next groups until this part ends.
    if let Some(answered) = &answered {
        answered.mark();
    }
    let entered = span.enter();
    match result {
        Ok(fates) => {
            for (job, fate) in group.into_iter().zip(fates) {
                match fate {
                    Fate::Answer(result) => answer_one(job, *result),
                    Fate::Alone => job.alone(),
                }
            }
        }
        Err(e) => {
            warn!(%e, "group cut short; committed transfers are completed by recovery");
            for job in group {
                job.answer(Err(each(&e)));
            }
        }
    }
    drop(entered);
    if let Some(held) = held {
        locks.release(held).instrument(span).await;
    }
}

/// The members of `group` listed in `members`, by the shard `side` picks, in
/// shard-ID order.
fn by_shard<'a>(
    group: &'a [Job],
    members: impl IntoIterator<Item = usize>,
    side: impl Fn(&'a Job) -> &'a ShardAgent,
) -> BTreeMap<ShardId, (&'a ShardAgent, Vec<usize>)> {
    let mut parts: BTreeMap<ShardId, (&ShardAgent, Vec<usize>)> = BTreeMap::new();
    for i in members {
        let agent = side(&group[i]);
        parts
            .entry(agent.id())
            .or_insert((agent, Vec::new()))
            .1
            .push(i);
    }
    parts
}

/// Steps 2 to 4 for transfers holding their locks under a fence, with
/// their payees as read (`None`: no lock, so each is only recorded as
/// aborted). Returns each transfer's fate.
async fn steps(
    group: &[Job],
    locked: Option<(i64, Vec<PayeeRead>)>,
    run: Run,
    locks: &LockService,
) -> Result<Vec<Fate>, CoordinatorError> {
    let n = group.len();
    let mut fate: Vec<Option<Fate>> = (0..n).map(|_| None).collect();
    // A shard that answered an error wrote nothing; from a lane, its
    // transfers run again alone.
    let unwritten = |fate: &mut Vec<Option<Fate>>, members: &[usize], e: &ShardError| {
        mark_unanswered(members.iter().map(|&i| &group[i]), e);
        for &i in members {
            fate[i] = Some(match run {
                Run::Grouped => Fate::Alone,
                Run::Alone => Fate::answer(Err(each_shard_error(e).into())),
            });
        }
    };
    let mut prior = vec![Verdict::Refused(FailureCode::LockUnavailable); n];
    let fence = match locked {
        None => None,
        Some((fence, payees)) => {
            crash_point!("redis-after-lock");
            stall_point!("redis-stall-after-lock");
            let mut failed: BTreeMap<ShardId, (ShardError, Vec<usize>)> = BTreeMap::new();
            for (i, payee) in payees.into_iter().enumerate() {
                match payee {
                    Ok(None) => prior[i] = Verdict::Pass,
                    Ok(Some(code)) => prior[i] = Verdict::Refused(code),
                    Err(e) => failed.entry(e.shard()).or_insert((e, Vec::new())).1.push(i),
                }
            }
            for (e, members) in failed.into_values() {
                unwritten(&mut fate, &members, &e);
            }
            Some(fence)
        }
    };

    // Step 3: the debits, the commit point.
    let payers = by_shard(group, (0..n).filter(|&i| fate[i].is_none()), |j| j.home());
    let debited = join_all(payers.into_values().map(|(agent, members)| {
        let prior = &prior;
        async move {
            let legs: Vec<BatchLeg> = members
                .iter()
                .map(|&i| {
                    let [debit, _] = group[i].legs();
                    debit
                })
                .collect();
            let verdicts: Vec<Verdict> = members.iter().map(|&i| prior[i]).collect();
            let lock_wait_ms = match run {
                Run::Grouped => LOCAL_GROUP_LOCK_WAIT_MS,
                Run::Alone => agent.config().lock_timeout_ms,
            };
            let r = agent
                .redis_debit_group(&legs, &verdicts, fence.unwrap_or(0), lock_wait_ms)
                .await;
            (agent, members, r)
        }
    }))
    .await;
    let mut committed: Vec<usize> = Vec::new();
    for (agent, members, r) in debited {
        let answers = match r {
            Ok(answers) => answers,
            Err(e) if nothing_committed(&e) => {
                unwritten(&mut fate, &members, &e);
                continue;
            }
            Err(e) => {
                warn!(shard = %agent.id(), %e, "debits' outcome unknown; recovery completes any that committed");
                mark_unanswered(members.iter().map(|&i| &group[i]), &e);
                for &i in &members {
                    fate[i] = Some(Fate::answer(Err(each_shard_error(&e).into())));
                }
                continue;
            }
        };
        let mut by_tid: HashMap<TransferId, _> = answers.into_iter().map(|a| (a.tid, a)).collect();
        let mut fenced_off = false;
        for &i in &members {
            let Some(answer) = by_tid.remove(&group[i].tid) else {
                fate[i] = Some(Fate::answer(Err(CoordinatorError::Corrupt(format!(
                    "the group gave transfer {} no answer",
                    group[i].tid
                )))));
                continue;
            };
            let fresh = matches!(answer.verdict, Verdict::Pass)
                && answer
                    .record
                    .as_ref()
                    .is_some_and(|r| r.state == TransferState::Committed);
            if fresh {
                committed.push(i);
            }
            fenced_off |=
                fence.is_some() && answer.verdict == Verdict::Refused(FailureCode::LockUnavailable);
            fate[i] = Some(Fate::answer(client_answer(answer, agent.id())));
        }
        if fenced_off {
            raise_floor_above(locks, agent).await;
        }
    }
    if committed.is_empty() {
        return Ok(finish(fate));
    }
    crash_point!("redis-between-legs");

    // Step 4: the credits, then the pending credits cleared.
    let fence = fence.expect("invariant: transfers commit only under a lock's fence");
    let payees = by_shard(group, committed, |j| j.remote());
    let credited = join_all(payees.into_values().map(|(agent, members)| async move {
        let credits: Vec<PendingCredit> = members.iter().map(|&i| pending(&group[i])).collect();
        (agent.credit_group(&credits, fence).await, members)
    }))
    .await;
    let mut cleared: Vec<usize> = Vec::new();
    let mut failed: Vec<(usize, String)> = Vec::new();
    for (r, members) in credited {
        match r {
            Ok(results) => {
                for (&i, credited) in members.iter().zip(results) {
                    match credited {
                        Credited::Yes | Credited::AlreadyApplied => cleared.push(i),
                        Credited::Missing => {
                            tracing::error!(transfer_id = %group[i].tid, payee = %group[i].order.to, "the payee's account is gone from its shard; the credit stays pending");
                            failed.push((i, "the payee has no account".into()));
                        }
                        Credited::FenceRejected { last_fence } => {
                            warn!(transfer_id = %group[i].tid, fence, last_fence, "credit refused by its fence; in doubt until recovery applies it");
                            raise_floor(locks, last_fence).await;
                            failed.push((i, "refused by its fence".into()));
                        }
                    }
                }
            }
            Err(e) => {
                warn!(%e, "credits failed; in doubt until recovery applies them");
                failed.extend(members.into_iter().map(|i| (i, e.to_string())));
            }
        }
    }
    for (i, reason) in failed {
        note_failed_credit(group[i].home(), group[i].tid, &reason).await;
    }
    let homes = by_shard(group, cleared, |j| j.home());
    join_all(homes.into_values().map(|(agent, members)| async move {
        let tids: Vec<TransferId> = members.iter().map(|&i| group[i].tid).collect();
        if let Err(e) = agent.clear_pending_credits(&tids).await {
            warn!(%e, "pending credits not cleared; recovery will");
        }
    }))
    .await;
    crash_point!("redis-before-reply");
    Ok(finish(fate))
}

fn finish(fate: Vec<Option<Fate>>) -> Vec<Fate> {
    fate.into_iter()
        .map(|f| {
            f.unwrap_or_else(|| {
                Fate::answer(Err(CoordinatorError::Corrupt(
                    "a transfer of the group was never answered".into(),
                )))
            })
        })
        .collect()
}

/// A committed transfer's credit, as its pending row records it.
fn pending(job: &Job) -> PendingCredit {
    PendingCredit {
        transfer_id: job.tid,
        to_user: job.order.to,
        to_username: job.order.to_username.clone(),
        from_username: job.order.from_username.clone(),
        amount: job.order.amount.value(),
        currency: job.order.amount.currency(),
        refund_of: job.order.refund_of,
        dispute: job.order.dispute,
    }
}

/// After a debit refused by its fence: raises the token source above every
/// fence stored on that shard, so the retry's token passes.
async fn raise_floor_above(locks: &LockService, agent: &ShardAgent) {
    match agent.max_fence().await {
        Ok(fence) => raise_floor(locks, fence).await,
        Err(e) => warn!(%e, "could not read the shard's fences; the next refusal will try again"),
    }
}

/// Raises the token source above a fence that refused a write, so the retry
/// (the client's, or recovery's) gets a token that passes it.
pub(crate) async fn raise_floor(locks: &LockService, last_fence: i64) {
    if let Err(e) = locks.raise_floor(last_fence).await {
        warn!(%e, last_fence, "could not raise the fencing floor; the next refusal will try again");
    }
}

/// Counts a failed credit on its pending row, so the admin view shows it.
async fn note_failed_credit(home: &ShardAgent, tid: TransferId, reason: &str) {
    if let Err(e) = home.pending_credits_failed(&[tid], reason).await {
        warn!(%e, transfer_id = %tid, "could not record the failed credit attempt");
    }
}
