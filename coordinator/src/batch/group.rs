//! A group's run: the same-shard statement, the cross-shard steps (check,
//! prepare, decide, commit prepared), and how each member is answered or sent
//! to run again alone. The lanes that form groups are in the parent module.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::future::join_all;
use router::ShardId;
use shard_agent::batch::{Answer, BatchLeg, GroupAnswer, OpenBatch, Verdict};
use shard_agent::transfer::Submitted;
use shard_agent::{Gid, ShardAgent, ShardError, TransferId};
use tracing::{info, warn, Instrument};
use uuid::Uuid;

use super::{AnswerMark, Job};
use crate::error::{crash_point, CoordinatorError};
use crate::suspects::{mark_silent, Suspect};

/// Copies an error for each transfer of a group (errors are not `Clone`).
pub(super) fn each(e: &CoordinatorError) -> CoordinatorError {
    match e {
        CoordinatorError::Shard(ShardError::LockTimeout { shard }) => {
            ShardError::LockTimeout { shard: *shard }.into()
        }
        CoordinatorError::Shard(e @ ShardError::NotOwner { .. }) => each_shard_error(e).into(),
        CoordinatorError::Shard(s) => ShardError::Unavailable {
            shard: s.shard(),
            reason: s.to_string(),
        }
        .into(),
        CoordinatorError::Crashed { at } => CoordinatorError::Crashed { at },
        CoordinatorError::Corrupt(text) => CoordinatorError::Corrupt(text.clone()),
        CoordinatorError::Unauthorized => CoordinatorError::Unauthorized,
        CoordinatorError::Refused(code) => CoordinatorError::Refused(*code),
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
/// `Clone`): a lock timeout, a refused bucket and a corrupt row stay what they are, anything
/// else reads as the shard unavailable.
pub(super) fn each_shard_error(e: &ShardError) -> ShardError {
    match e {
        ShardError::LockTimeout { shard } => ShardError::LockTimeout { shard: *shard },
        ShardError::NotOwner {
            shard,
            bucket,
            state,
        } => ShardError::NotOwner {
            shard: *shard,
            bucket: *bucket,
            state: state.clone(),
        },
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
pub(super) enum Run {
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
pub(super) async fn run_local(group: Vec<Job>, answered: Option<&AnswerMark>, run: Run) {
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
            if matches!(e, ShardError::NotOwner { .. }) {
                // A bucket moving: expected, and only its transfers will wait.
                info!(%e, transfers = group.len(), "group met a moving bucket; its transfers run again alone");
            } else {
                warn!(%e, transfers = group.len(), "group check failed; its transfers run again alone");
            }
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
pub(super) const LOCAL_GROUP_LOCK_WAIT_MS: u64 = 200;

/// What a group that failed at its check marks (`crate::suspects`), so the
/// next transfers touching it run alone instead of stalling another group
/// (the group's own members run alone now):
/// - a lock wait that ran out on a shard: every user with a leg on that shard
///   (which row was held is not known; one of them is the culprit, and the
///   others' next transfers merely run alone for a while);
/// - a shard that did not answer: the shard, once a ping confirms it;
/// - a bucket the shard refused (moving, or moved away): the members' users
///   in that bucket. Their transfers wait for the move (`retry_moved`), and
///   each retry would otherwise join a new group and fail it again, sending
///   all its members alone.
pub(super) fn mark_unanswered<'a>(group: impl IntoIterator<Item = &'a Job>, e: &ShardError) {
    let group: Vec<&Job> = group.into_iter().collect();
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
        ShardError::NotOwner { bucket, .. } => {
            // u16::MAX: the shard did not say which bucket; mark them all.
            let users: Vec<Suspect> = group
                .iter()
                .flat_map(|j| [j.order.from, j.order.to])
                .filter(|u| *bucket == u16::MAX || router::bucket_of(u).0 == *bucket)
                .map(Suspect::User)
                .collect();
            suspects.mark(users);
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
        answer_one(job, result);
    }
}

/// Answers one transfer, logged on its own span.
pub(super) fn answer_one(job: Job, result: Result<Submitted, CoordinatorError>) {
    job.span.in_scope(|| match &result {
        Ok(Submitted::New(r)) => {
            info!(state = ?r.state, code = ?r.failure_code, "transfer decided")
        }
        Ok(other) => info!(answer = ?std::mem::discriminant(other), "answered without writing"),
        Err(e) => info!(%e, "refused"),
    });
    job.answer(result);
}

/// The client's answer from the group's answer on the payer's shard.
pub(super) fn client_answer(
    answer: GroupAnswer,
    shard: ShardId,
) -> Result<Submitted, CoordinatorError> {
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

pub(super) async fn run_cross(group: Vec<Job>, answered: Option<&AnswerMark>, run: Run) {
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
pub(super) fn nothing_committed(e: &ShardError) -> bool {
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
