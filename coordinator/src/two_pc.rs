//! The coordinator's side of two-phase commit (the recommended 2PC
//! protocol", with its "last-agent" optimization). Every step has a named
//! failpoint; recovery (`crate::recovery`) finishes whatever a crash at any of them
//! leaves.
//!
//! **Fast path**, for an Idempotency-Key never seen: only the payee's leg is
//! prepared. The payer's leg commits on the home shard in one local transaction
//! with the key and the transfer record, and that commit is the decision. Three
//! transactions instead of six. Rows are locked in user-ID order, as everywhere:
//! when the payer's ID is the lower, the home transaction opens first and stays
//! open while the payee's leg is prepared; otherwise the payee's leg is prepared
//! first and the home transaction is one statement.
//!
//! **Slow path**, when the key exists (a replay, or a retry after a retryable
//! abort): claim the key on the home shard, prepare both legs in user-ID order,
//! decide on the home shard, finish both legs.
//!
//! **The coordinator never guesses an in-doubt outcome**: when the decision's own
//! answer is lost it reports the transfer as unavailable and leaves the legs to
//! recovery, which reads the decision (or, on the fast path, writes a tombstone
//! when there is none).

use futures::join;
use router::UserId;
use shard_agent::idempotency::Claim;
use shard_agent::transfer_local::{Submitted, TransferOrder};
use shard_agent::two_pc::decide::Decision;
use shard_agent::two_pc::home::{HomeLeg, HomeOutcome, Opened};
use shard_agent::two_pc::prepare::{Leg, Prepared, Side};
use shard_agent::{FailureCode, Gid, Mode, ShardAgent, ShardError, TransferId, TransferState};
use tracing::{info, warn, Instrument};

use crate::error::{crash_point, CoordinatorError};

/// Every failpoint of the protocol, fast path then slow path, each in protocol
/// order. The chaos suite runs one scenario per entry.
pub const FAILPOINTS: [&str; 9] = [
    // Fast path (the middle three on the slow path too).
    "2pc-after-home-leg",
    "2pc-after-prepare-credit",
    "2pc-before-decision",
    "2pc-after-decision",
    "2pc-before-reply",
    // Slow path only.
    "2pc-after-claim",
    "2pc-after-prepare-debit",
    "2pc-after-prepare-all",
    "2pc-between-commit-prepared",
];

pub async fn transfer(
    home: &ShardAgent,
    remote: &ShardAgent,
    order: &TransferOrder,
) -> Result<Submitted, CoordinatorError> {
    match fast(home, remote, order).await? {
        Some(done) => Ok(done),
        None => with_claim(home, remote, order).await,
    }
}

/// The fast path; `None` when the Idempotency-Key exists (nothing of this attempt
/// is left behind: a payee leg it prepared is rolled back, or by recovery).
async fn fast(
    home: &ShardAgent,
    remote: &ShardAgent,
    order: &TransferOrder,
) -> Result<Option<Submitted>, CoordinatorError> {
    let tid = TransferId::generate();
    let credit_gid = Gid::new(tid, home.id(), remote.id());
    let home_leg = HomeLeg {
        tid,
        order,
        participants: vec![credit_gid.to_string()],
    };
    let credit = leg(
        credit_gid,
        Side::Credit,
        order.to,
        order,
        &order.from_username,
    );
    let span = tracing::info_span!("2pc", transfer_id = %tid, home = %home.id(), remote = %remote.id(), path = "fast");
    async {
        if order.from.as_uuid() <= order.to.as_uuid() {
            payer_first(home, remote, &home_leg, &credit).await
        } else {
            payee_first(home, remote, &home_leg, &credit).await
        }
    }
    .instrument(span)
    .await
}

/// The payer's ID is the lower: its row is locked first, by the home transaction,
/// which stays open while the payee's leg is prepared.
async fn payer_first(
    home: &ShardAgent,
    remote: &ShardAgent,
    home_leg: &HomeLeg<'_>,
    credit: &Leg,
) -> Result<Option<Submitted>, CoordinatorError> {
    let open = match home.open_home_leg(home_leg).await? {
        Opened::Open(open) => open,
        Opened::Done(outcome) => return answered(home, outcome),
    };
    crash_point!("2pc-after-home-leg");
    let prepared = remote.prepare_leg(credit).await;
    crash_point!("2pc-after-prepare-credit");
    let decision = broken_commit_unprepared(decision_of(Some(&Ok(Prepared::Yes)), Some(&prepared)));
    crash_point!("2pc-before-decision");
    match decision {
        Decision::Commit => {
            // The commit point. If its answer is lost the outcome is unknown: report
            // the shard unavailable; recovery reads the record or tombstones it.
            let record = match open.commit().await {
                Ok(record) => record,
                Err(e) => return Err(give_up(remote, credit, &prepared, e).await),
            };
            crash_point!("2pc-after-decision");
            if let Err(e) = remote.commit_prepared(&credit.gid).await {
                warn!(%e, "commit prepared (credit) failed; recovery will finish it");
            }
            crash_point!("2pc-before-reply");
            info!(state = ?record.state, "transfer decided");
            Ok(Some(Submitted::New(record)))
        }
        Decision::Abort(code) => {
            // The payee's leg failed: undo the debit, then record the abort.
            open.rollback().await;
            home_decides(home, remote, home_leg, credit, &prepared, Some(code)).await
        }
    }
}

/// The payee's ID is the lower: its leg is prepared first, then one statement on
/// the home shard claims the key, debits and commits the decision.
async fn payee_first(
    home: &ShardAgent,
    remote: &ShardAgent,
    home_leg: &HomeLeg<'_>,
    credit: &Leg,
) -> Result<Option<Submitted>, CoordinatorError> {
    let prepared = remote.prepare_leg(credit).await;
    crash_point!("2pc-after-prepare-credit");
    let failure =
        match broken_commit_unprepared(decision_of(Some(&Ok(Prepared::Yes)), Some(&prepared))) {
            Decision::Commit => None,
            Decision::Abort(code) => Some(code),
        };
    crash_point!("2pc-before-decision");
    home_decides(home, remote, home_leg, credit, &prepared, failure).await
}

/// The payee's leg is settled: one statement on the home shard records the
/// outcome (debiting unless `failure` already aborts the transfer), and its commit
/// is the decision; then the payee's leg is finished the way it says. An error
/// leaves the outcome to recovery, as above.
async fn home_decides(
    home: &ShardAgent,
    remote: &ShardAgent,
    home_leg: &HomeLeg<'_>,
    credit: &Leg,
    prepared: &Result<Prepared, ShardError>,
    failure: Option<FailureCode>,
) -> Result<Option<Submitted>, CoordinatorError> {
    let outcome = match home.home_leg(home_leg, failure).await {
        Ok(outcome) => outcome,
        Err(e) => return Err(give_up(remote, credit, prepared, e).await),
    };
    crash_point!("2pc-after-decision");
    finish_credit(remote, credit, prepared, &outcome).await;
    crash_point!("2pc-before-reply");
    answered(home, outcome)
}

/// The home shard's decision failed. If it definitely committed nothing, the
/// payee's leg is rolled back now rather than holding its row lock until recovery
/// tombstones it; otherwise it is left to recovery. The client hears the error.
async fn give_up(
    remote: &ShardAgent,
    credit: &Leg,
    prepared: &Result<Prepared, ShardError>,
    e: ShardError,
) -> CoordinatorError {
    if nothing_committed(&e) && may_be_prepared(Some(prepared)) {
        if let Err(e) = remote.rollback_prepared(&credit.gid).await {
            warn!(%e, "rollback prepared (credit) failed; recovery will finish it");
        }
    }
    e.into()
}

/// Commits the payee's leg if the home shard recorded a commit; otherwise rolls
/// it back if it may be prepared. Errors are logged: recovery finishes the leg
/// from the record, or from a tombstone when there is none.
async fn finish_credit(
    remote: &ShardAgent,
    credit: &Leg,
    prepared: &Result<Prepared, ShardError>,
    outcome: &HomeOutcome,
) {
    let committed = broken_commit_anyway()
        || matches!(outcome, HomeOutcome::Recorded(r) if r.state == TransferState::Committed);
    let result = if committed {
        remote.commit_prepared(&credit.gid).await
    } else if may_be_prepared(Some(prepared)) {
        remote.rollback_prepared(&credit.gid).await
    } else {
        return;
    };
    if let Err(e) = result {
        warn!(%e, committed, "finishing the credit leg failed; recovery will finish it");
    }
}

/// The client's answer from the home shard's: `None` sends a key that exists to
/// the slow path, which replays it.
fn answered(
    home: &ShardAgent,
    outcome: HomeOutcome,
) -> Result<Option<Submitted>, CoordinatorError> {
    match outcome {
        HomeOutcome::Recorded(record) => {
            info!(state = ?record.state, code = ?record.failure_code, "transfer decided");
            Ok(Some(Submitted::New(record)))
        }
        HomeOutcome::KeyExists => Ok(None),
        // Recovery gave this attempt up before its home transaction ran: nothing
        // moved and the key is free, so the client may retry with it.
        HomeOutcome::Tombstoned => Err(ShardError::Unavailable {
            shard: home.id(),
            reason: "the attempt was aborted by recovery before its decision".into(),
        }
        .into()),
    }
}

/// A leg may be prepared unless it was refused or never attempted; one whose
/// prepare returned an error may have prepared before the connection broke.
fn may_be_prepared(r: Option<&Result<Prepared, ShardError>>) -> bool {
    !matches!(r, None | Some(Ok(Prepared::Rejected(_))))
}

/// The slow path: the Idempotency-Key exists.
pub(crate) async fn with_claim(
    home: &ShardAgent,
    remote: &ShardAgent,
    order: &TransferOrder,
) -> Result<Submitted, CoordinatorError> {
    let mut new = order.new_transfer(Mode::TwoPc);
    new.legs = Some((home.id(), vec![home.id(), remote.id()]));
    let record = match home.claim(&order.key, &new).await? {
        Claim::Started(r) => r,
        Claim::Replay(r) => return Ok(Submitted::Replayed(r)),
        Claim::InProgress(r) => return Ok(Submitted::InProgress(r)),
        Claim::KeyReused => return Ok(Submitted::KeyReused),
    };
    let tid = record.transfer_id;
    let span = tracing::info_span!("2pc", transfer_id = %tid, home = %home.id(), remote = %remote.id(), path = "slow");
    async {
        // The exact GIDs stored with the claim, never rebuilt.
        let gids = record
            .participants
            .iter()
            .map(|g| g.parse::<Gid>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CoordinatorError::Corrupt(e.to_string()))?;
        let [debit_gid, credit_gid] = gids[..] else {
            return Err(CoordinatorError::Corrupt(format!(
                "transfer {tid} has {} GIDs",
                gids.len()
            )));
        };
        crash_point!("2pc-after-claim");
        let debit = leg(
            debit_gid,
            Side::Debit,
            order.from,
            order,
            &order.to_username,
        );
        let credit = leg(
            credit_gid,
            Side::Credit,
            order.to,
            order,
            &order.from_username,
        );
        // Legs are prepared one after the other, the lower user ID first: each leg
        // locks one account until the decision is carried out, so taking them in
        // one global order (the order same-shard transfers and Redis locks use too)
        // means two transfers never wait on each other in a cycle. A hot merchant
        // with legs prepared in parallel deadlocked this way until lock_timeout.
        // A leg is not attempted once the other has failed.
        let debit_first = order.from.as_uuid() <= order.to.as_uuid();
        let prepare_debit = || async {
            let r = home.prepare_leg(&debit).await;
            crash_point!("2pc-after-prepare-debit");
            Ok::<_, CoordinatorError>(r)
        };
        let prepare_credit = || async {
            let r = remote.prepare_leg(&credit).await;
            crash_point!("2pc-after-prepare-credit");
            Ok::<_, CoordinatorError>(r)
        };
        let (d, c) = if debit_first {
            let d = prepare_debit().await?;
            let c = match d {
                Ok(Prepared::Yes) => Some(prepare_credit().await?),
                _ => None,
            };
            (Some(d), c)
        } else {
            let c = prepare_credit().await?;
            let d = match c {
                Ok(Prepared::Yes) => Some(prepare_debit().await?),
                _ => None,
            };
            (d, Some(c))
        };
        crash_point!("2pc-after-prepare-all");
        let decision = decision_of(d.as_ref(), c.as_ref());
        let decision = broken_commit_unprepared(decision);
        crash_point!("2pc-before-decision");
        // The commit point. If its answer is lost we do not know the outcome: report
        // the shard unavailable and let recovery, which reads the decision, finish.
        let decided = home.decide(tid, decision).await?.ok_or_else(|| {
            CoordinatorError::Corrupt(format!("transfer {tid} vanished before its decision"))
        })?;
        crash_point!("2pc-after-decision");
        if decided.state == TransferState::Committed {
            commit_both(remote, &credit_gid, home, &debit_gid).await?;
        } else {
            // Roll back every leg that may be prepared, including one whose prepare
            // returned an error (it may have prepared before the connection broke).
            // A rejected leg or one never attempted left nothing to roll back.
            let (a, b) = join!(
                async {
                    match may_be_prepared(d.as_ref()) {
                        true => home.rollback_prepared(&debit_gid).await.map(Some),
                        false => Ok(None),
                    }
                },
                async {
                    match may_be_prepared(c.as_ref()) {
                        true => remote.rollback_prepared(&credit_gid).await.map(Some),
                        false => Ok(None),
                    }
                }
            );
            for r in [a, b] {
                if let Err(e) = r {
                    warn!(%e, "rollback prepared failed; recovery will finish it");
                }
            }
        }
        crash_point!("2pc-before-reply");
        info!(state = ?decided.state, code = ?decided.failure_code, "transfer decided");
        Ok(Submitted::New(decided))
    }
    .instrument(span)
    .await
}

fn leg(gid: Gid, side: Side, user: UserId, order: &TransferOrder, counterparty: &str) -> Leg {
    Leg {
        gid,
        side,
        user,
        amount: order.amount.value(),
        currency: order.amount.currency(),
        counterparty: counterparty.to_owned(),
    }
}

/// Commit only when both legs prepared (`None`: not attempted). A business
/// rejection wins over a fault, and the payer's rejection over the payee's, so the
/// client hears the most useful reason. (Legs go in user-ID order and the second
/// is skipped once the first failed, so when the payee's leg goes first its
/// rejection is the one reported.)
fn decision_of(
    debit: Option<&Result<Prepared, ShardError>>,
    credit: Option<&Result<Prepared, ShardError>>,
) -> Decision {
    match (debit, credit) {
        (Some(Ok(Prepared::Yes)), Some(Ok(Prepared::Yes))) => Decision::Commit,
        (Some(Ok(Prepared::Rejected(code))), _) | (_, Some(Ok(Prepared::Rejected(code)))) => {
            Decision::Abort(*code)
        }
        (Some(Err(e)), _) | (_, Some(Err(e))) => Decision::Abort(fault_code(e)),
        // A leg is skipped only after the other failed, which the arms above take.
        _ => Decision::Abort(FailureCode::ShardUnavailable),
    }
}

/// A deliberately broken variant for the chaos suite (failpoint
/// `broken-commit-unprepared`): commit whether or not every prepare succeeded.
/// The checker must catch it; compiled in only with the `failpoints` feature.
/// On the fast path it also commits the payee's leg when the home shard refused
/// the debit.
fn broken_commit_unprepared(decision: Decision) -> Decision {
    match broken_commit_anyway() {
        true => Decision::Commit,
        false => decision,
    }
}

fn broken_commit_anyway() -> bool {
    #[cfg(feature = "failpoints")]
    if fail::eval("broken-commit-unprepared", |_| ()).is_some() {
        return true;
    }
    false
}

/// The home shard answered with an error, so its statement (and, payer first, its
/// transaction) rolled back: this attempt can never commit, since its transfer ID
/// is never sent again. Any other error (no answer, a lost connection, a row we
/// could not read back) leaves the outcome unknown.
pub(crate) fn nothing_committed(e: &ShardError) -> bool {
    matches!(
        e,
        ShardError::LockTimeout { .. } | ShardError::Database { .. }
    )
}

fn fault_code(e: &ShardError) -> FailureCode {
    match e {
        ShardError::LockTimeout { .. } => FailureCode::ShardBusy,
        _ => FailureCode::ShardUnavailable,
    }
}

/// After a commit decision the transfer is committed whatever happens here: a leg
/// we cannot reach is committed by recovery, so errors are logged, not returned.
/// One after the other, so that the failpoint between them leaves exactly the
/// debit prepared for recovery to commit.
async fn commit_both(
    remote: &ShardAgent,
    credit: &Gid,
    home: &ShardAgent,
    debit: &Gid,
) -> Result<(), CoordinatorError> {
    if let Err(e) = remote.commit_prepared(credit).await {
        warn!(%e, "commit prepared (credit) failed; recovery will finish it");
    }
    crash_point!("2pc-between-commit-prepared");
    if let Err(e) = home.commit_prepared(debit).await {
        warn!(%e, "commit prepared (debit) failed; recovery will finish it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use router::ShardId;

    fn unavailable() -> ShardError {
        ShardError::Unavailable {
            shard: ShardId(1),
            reason: "test".into(),
        }
    }

    #[test]
    fn both_prepared_is_the_only_way_to_commit() {
        assert_eq!(
            decision_of(Some(&Ok(Prepared::Yes)), Some(&Ok(Prepared::Yes))),
            Decision::Commit
        );
        assert_eq!(
            decision_of(Some(&Ok(Prepared::Yes)), Some(&Err(unavailable()))),
            Decision::Abort(FailureCode::ShardUnavailable)
        );
        assert_eq!(
            decision_of(
                Some(&Err(ShardError::LockTimeout { shard: ShardId(0) })),
                Some(&Ok(Prepared::Yes))
            ),
            Decision::Abort(FailureCode::ShardBusy)
        );
    }

    #[test]
    fn a_business_rejection_is_reported_over_a_fault() {
        assert_eq!(
            decision_of(
                Some(&Err(unavailable())),
                Some(&Ok(Prepared::Rejected(FailureCode::RecipientNotFound)))
            ),
            Decision::Abort(FailureCode::RecipientNotFound)
        );
        assert_eq!(
            decision_of(
                Some(&Ok(Prepared::Rejected(FailureCode::InsufficientFunds))),
                Some(&Ok(Prepared::Rejected(FailureCode::RecipientNotFound)))
            ),
            Decision::Abort(FailureCode::InsufficientFunds)
        );
    }

    #[test]
    fn a_leg_not_attempted_never_commits() {
        let busy = ShardError::LockTimeout { shard: ShardId(0) };
        assert_eq!(
            decision_of(Some(&Err(busy)), None),
            Decision::Abort(FailureCode::ShardBusy)
        );
        assert_eq!(
            decision_of(
                None,
                Some(&Ok(Prepared::Rejected(FailureCode::RecipientNotFound)))
            ),
            Decision::Abort(FailureCode::RecipientNotFound)
        );
        assert_eq!(
            decision_of(Some(&Ok(Prepared::Yes)), None),
            Decision::Abort(FailureCode::ShardUnavailable)
        );
    }
}
