//! Cross-shard transfers in Redis-lock mode: claim on the home shard, lock both
//! accounts, check the payee, debit (the commit point, recording a pending
//! credit), credit, clear the pending credit, unlock. Forward recovery
//! (`crate::recovery`) applies pending credits a crash left behind.
//!
//! Money never moves without a lock: no lock, no debit (503 `lock_unavailable`),
//! and a write under an expired lock is refused by its fencing token.

use shard_agent::idempotency::Claim;
use shard_agent::redis_legs::{Credited, Debited, FencedLeg, PendingCredit};
use shard_agent::transfer::{Submitted, TransferOrder};
use shard_agent::two_pc::decide::Decision;
use shard_agent::{FailureCode, Mode, ShardAgent, TransferRecord};
use tracing::{info, warn, Instrument};

use crate::error::{crash_point, stall_point, CoordinatorError};
use crate::redis_lock::{Held, LockService};

/// Every failpoint of this mode, in protocol order.
pub const FAILPOINTS: [&str; 3] = [
    "redis-after-lock",
    "redis-between-legs",
    "redis-before-reply",
];

pub async fn transfer(
    locks: &LockService,
    home: &ShardAgent,
    remote: &ShardAgent,
    order: &TransferOrder,
) -> Result<Submitted, CoordinatorError> {
    let record = match home
        .claim(&order.key, &order.new_transfer(Mode::Redis))
        .await?
    {
        Claim::Started(r) => r,
        Claim::Replay(r) => return Ok(Submitted::Replayed(r)),
        Claim::InProgress(r) => return Ok(Submitted::InProgress(r)),
        Claim::KeyReused => return Ok(Submitted::KeyReused),
    };
    let span = tracing::info_span!("redis", transfer_id = %record.transfer_id, home = %home.id(), remote = %remote.id());
    async {
        let held = match locks.acquire(&[order.from, order.to]).await {
            Ok(h) => h,
            Err(e) => {
                warn!(%e, "locks not granted; transfer aborted, nothing moved");
                return abort(home, &record, FailureCode::LockUnavailable).await;
            }
        };
        let outcome = locked(locks, home, remote, order, &record, &held).await;
        locks.release(held).await;
        outcome
    }
    .instrument(span)
    .await
}

async fn locked(
    locks: &LockService,
    home: &ShardAgent,
    remote: &ShardAgent,
    order: &TransferOrder,
    record: &TransferRecord,
    held: &Held,
) -> Result<Submitted, CoordinatorError> {
    crash_point!("redis-after-lock");
    stall_point!("redis-stall-after-lock");
    let currency = order.amount.currency();
    if let Some(code) = remote.recipient_refusal(order.to, currency).await? {
        return abort(home, record, code).await;
    }
    let fence = |u| {
        held.fence(u)
            .ok_or_else(|| CoordinatorError::Corrupt(format!("no lock held on {u}")))
    };
    let debit = FencedLeg {
        transfer_id: record.transfer_id,
        user: order.from,
        amount: order.amount.value(),
        currency,
        fence: fence(order.from)?,
        counterparty: order.to_username.clone(),
    };
    let pending = PendingCredit {
        transfer_id: record.transfer_id,
        to_user: order.to,
        to_username: order.to_username.clone(),
        from_username: order.from_username.clone(),
        amount: order.amount.value(),
        currency,
    };
    let committed = match home.debit_fenced(&debit, &pending).await? {
        Debited::Yes(r) => r,
        Debited::Rejected(r) | Debited::AlreadyDecided(r) => return Ok(Submitted::New(r)),
        Debited::FenceRejected { last_fence } => {
            warn!(
                fence = debit.fence,
                last_fence,
                "debit refused by its fence (our lock expired, or the token source is behind); aborted, nothing moved"
            );
            raise_floor(locks, last_fence).await;
            return abort(home, record, FailureCode::LockUnavailable).await;
        }
    };
    crash_point!("redis-between-legs");
    let credit = FencedLeg {
        user: order.to,
        fence: fence(order.to)?,
        counterparty: order.from_username.clone(),
        ..debit
    };
    // The transfer is committed from here on; a credit we cannot apply now is
    // applied by recovery from the pending credit.
    match remote.credit_fenced(&credit).await {
        Ok(Credited::Yes | Credited::AlreadyApplied) => {
            if let Err(e) = home.clear_pending_credit(record.transfer_id).await {
                warn!(%e, "pending credit not cleared; recovery will");
            }
        }
        Ok(Credited::FenceRejected { last_fence }) => {
            warn!(
                fence = credit.fence,
                last_fence, "credit refused by its fence; in doubt until recovery applies it"
            );
            raise_floor(locks, last_fence).await;
            note_failed_credit(home, record, "refused by its fence").await;
        }
        Err(e) => {
            warn!(%e, "credit failed; in doubt until recovery applies it");
            note_failed_credit(home, record, &e.to_string()).await;
        }
    }
    crash_point!("redis-before-reply");
    info!("transfer committed");
    Ok(Submitted::New(committed))
}

/// Raises the token source above a fence that refused a write, so the retry
/// (the client's, or recovery's) gets a token that passes it.
pub(crate) async fn raise_floor(locks: &LockService, last_fence: i64) {
    if let Err(e) = locks.raise_floor(last_fence).await {
        warn!(%e, last_fence, "could not raise the fencing floor; the next refusal will try again");
    }
}

/// Counts a failed credit on its pending row, so the admin view shows it.
async fn note_failed_credit(home: &ShardAgent, record: &TransferRecord, reason: &str) {
    if let Err(e) = home.pending_credit_failed(record.transfer_id, reason).await {
        warn!(%e, "could not record the failed credit attempt");
    }
}

/// Aborts a transfer that moved nothing, through the decision's compare-and-set
/// (recovery may have decided it first; its decision stands).
async fn abort(
    home: &ShardAgent,
    record: &TransferRecord,
    code: FailureCode,
) -> Result<Submitted, CoordinatorError> {
    let decided = home
        .decide(record.transfer_id, Decision::Abort(code))
        .await?
        .ok_or_else(|| {
            CoordinatorError::Corrupt(format!("transfer {} vanished", record.transfer_id))
        })?;
    Ok(Submitted::New(decided))
}
