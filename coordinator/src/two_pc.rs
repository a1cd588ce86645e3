//! The coordinator's side of two-phase commit (DESIGN.md "Recommended 2PC
//! protocol"): claim on the home shard, prepare the legs one after the other in
//! user-ID order, decide on the home shard, finish both legs. Every step after the claim has a named failpoint;
//! recovery (`crate::recovery`) finishes whatever a crash at any of them leaves.
//!
//! **The coordinator never guesses an in-doubt outcome**: when the decision's own
//! answer is lost it reports the transfer as unavailable and leaves the legs to
//! recovery, which reads the decision.

use futures::join;
use router::UserId;
use shard_agent::idempotency::Claim;
use shard_agent::transfer_local::{Submitted, TransferOrder};
use shard_agent::two_pc::decide::Decision;
use shard_agent::two_pc::prepare::{Leg, Prepared, Side};
use shard_agent::{FailureCode, Gid, Mode, ShardAgent, ShardError, TransferState};
use tracing::{info, warn, Instrument};

use crate::error::{crash_point, CoordinatorError};

/// Every failpoint of the protocol, in protocol order. The chaos suite runs one
/// scenario per entry.
pub const FAILPOINTS: [&str; 8] = [
    "2pc-after-claim",
    "2pc-after-prepare-debit",
    "2pc-after-prepare-credit",
    "2pc-after-prepare-all",
    "2pc-before-decision",
    "2pc-after-decision",
    "2pc-between-commit-prepared",
    "2pc-before-reply",
];

pub async fn transfer(
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
    let span =
        tracing::info_span!("2pc", transfer_id = %tid, home = %home.id(), remote = %remote.id());
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
            let may_be_prepared = |r: &Option<Result<Prepared, ShardError>>| {
                !matches!(r, None | Some(Ok(Prepared::Rejected(_))))
            };
            let (a, b) = join!(
                async {
                    match may_be_prepared(&d) {
                        true => home.rollback_prepared(&debit_gid).await.map(Some),
                        false => Ok(None),
                    }
                },
                async {
                    match may_be_prepared(&c) {
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
fn broken_commit_unprepared(decision: Decision) -> Decision {
    #[cfg(feature = "failpoints")]
    if fail::eval("broken-commit-unprepared", |_| ()).is_some() {
        return Decision::Commit;
    }
    decision
}

fn fault_code(e: &ShardError) -> FailureCode {
    match e {
        ShardError::LockTimeout { .. } => FailureCode::ShardBusy,
        _ => FailureCode::ShardUnavailable,
    }
}

/// After a commit decision the transfer is committed whatever happens here: a leg
/// we cannot reach is committed by recovery, so errors are logged, not returned.
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
