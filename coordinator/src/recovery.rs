//! The recovery loop: on start and on a timer, every shard's in-doubt prepared
//! transactions are resolved from their home shard's decision, and transfers stuck
//! in `preparing` are aborted (presumed abort), and, in Redis-lock mode, pending
//! credits are applied (forward recovery). See `shard_agent::two_pc::recover`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use router::ShardId;
use serde::Serialize;
use shard_agent::two_pc::recover::{abort_stale, resolve_leg, PreparedStats, Resolution};
use tracing::{info, warn};

use shard_agent::external::ExternalOrder;
use shard_agent::idempotency::IdempotencyKey;
use shard_agent::redis_legs::{Credited, FencedLeg};
use shard_agent::{Amount, ShardAgent};

use crate::cluster::{Cluster, Routing};
use crate::payments::{call_for, PaymentProvider};
use crate::redis_lock::LockService;

/// For `/v1/admin/in-doubt` and the logs: counters since this coordinator started,
/// and the prepared transactions the last pass saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RecoveryStatus {
    pub passes: u64,
    pub committed: u64,
    pub rolled_back: u64,
    pub aborted_stale: u64,
    /// Redis-lock mode: credits applied from pending credits (forward recovery).
    pub forwarded: u64,
    /// Deposits and withdrawals settled after their settling was cut.
    pub settled_external: u64,
    pub unknown: u64,
    /// In-doubt legs whose home transaction was still running: retried next pass.
    pub deferred: u64,
    pub errors: u64,
    /// Our prepared transactions per shard, young and old, at the last pass.
    pub prepared: BTreeMap<ShardId, PreparedStats>,
    pub unreachable: Vec<ShardId>,
}

impl RecoveryStatus {
    pub fn in_doubt_count(&self) -> i64 {
        self.prepared.values().map(|s| s.count).sum()
    }
    pub fn oldest_age_ms(&self) -> i64 {
        self.prepared
            .values()
            .map(|s| s.oldest_age_ms)
            .max()
            .unwrap_or(0)
    }
}

pub struct Recovery {
    cluster: Arc<Cluster>,
    /// Redis-lock mode: pending credits are applied under a fresh lock.
    locks: Option<Arc<LockService>>,
    /// Deposits and withdrawals cut while settling are settled again through
    /// the provider, with the same reference, bounded by the timeout.
    payments: Option<(Arc<dyn PaymentProvider>, Duration)>,
    in_doubt_after: Duration,
    status: Mutex<RecoveryStatus>,
}

impl Recovery {
    pub fn new(
        cluster: Arc<Cluster>,
        locks: Option<Arc<LockService>>,
        payments: Option<(Arc<dyn PaymentProvider>, Duration)>,
        in_doubt_after: Duration,
    ) -> Recovery {
        Recovery {
            cluster,
            locks,
            payments,
            in_doubt_after,
            status: Mutex::new(RecoveryStatus::default()),
        }
    }

    pub fn status(&self) -> RecoveryStatus {
        self.status
            .lock()
            .expect("invariant: recovery status lock is never held across a panic")
            .clone()
    }

    /// One pass over every shard; returns what this pass did. Errors are counted
    /// and logged; the next pass retries, since every step is safe to repeat.
    pub async fn run_once(&self) -> RecoveryStatus {
        // A deliberately broken variant for the chaos suite: recovery off.
        fail::fail_point!("broken-recovery-off", |_| RecoveryStatus::default());
        let routing = self.cluster.routing();
        let mut pass = RecoveryStatus::default();
        for agent in routing.agents.values() {
            match agent.prepared_stats().await {
                Ok(stats) => {
                    pass.prepared.insert(agent.id(), stats);
                }
                Err(e) => {
                    warn!(shard = %agent.id(), %e, "recovery: shard unreachable; will retry");
                    pass.unreachable.push(agent.id());
                    continue;
                }
            }
            match agent.in_doubt(self.in_doubt_after).await {
                Ok(legs) => {
                    for leg in legs {
                        let Some(home) = routing.agent(leg.gid.home) else {
                            warn!(gid = %leg.gid, "recovery: home shard not in the catalog; left prepared");
                            pass.unknown += 1;
                            continue;
                        };
                        match resolve_leg(agent, home, &leg.gid).await {
                            Ok(Resolution::Committed) => pass.committed += 1,
                            Ok(Resolution::RolledBack) => pass.rolled_back += 1,
                            Ok(Resolution::Unknown) => pass.unknown += 1,
                            Ok(Resolution::Deferred) => pass.deferred += 1,
                            Err(e) => {
                                warn!(gid = %leg.gid, %e, "recovery: could not resolve; will retry");
                                pass.errors += 1;
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(shard = %agent.id(), %e, "recovery: could not list prepared transactions");
                    pass.errors += 1;
                }
            }
            if let Some(locks) = &self.locks {
                self.forward_pending(agent, &routing, locks, &mut pass)
                    .await;
            }
            if let Some((provider, timeout)) = &self.payments {
                self.settle_external(agent, provider.clone(), *timeout, &mut pass)
                    .await;
            }
            match agent.stale_preparing(self.in_doubt_after).await {
                Ok(stale) => {
                    for tid in stale {
                        match abort_stale(agent, tid).await {
                            Ok(_) => pass.aborted_stale += 1,
                            Err(e) => {
                                warn!(transfer_id = %tid, %e, "recovery: could not abort stale transfer");
                                pass.errors += 1;
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(shard = %agent.id(), %e, "recovery: could not list stale transfers");
                    pass.errors += 1;
                }
            }
        }
        let mut status = self
            .status
            .lock()
            .expect("invariant: recovery status lock is never held across a panic");
        let acted = pass.committed
            + pass.rolled_back
            + pass.aborted_stale
            + pass.forwarded
            + pass.settled_external;
        if acted > 0 || pass.in_doubt_count() > 0 {
            info!(
                in_doubt = pass.in_doubt_count(),
                oldest_in_doubt_ms = pass.oldest_age_ms(),
                committed = pass.committed,
                rolled_back = pass.rolled_back,
                aborted_stale = pass.aborted_stale,
                forwarded = pass.forwarded,
                "recovery pass"
            );
        }
        status.passes += 1;
        status.committed += pass.committed;
        status.rolled_back += pass.rolled_back;
        status.aborted_stale += pass.aborted_stale;
        status.forwarded += pass.forwarded;
        status.settled_external += pass.settled_external;
        status.unknown += pass.unknown;
        status.deferred += pass.deferred;
        status.errors += pass.errors;
        status.prepared = pass.prepared.clone();
        status.unreachable = pass.unreachable.clone();
        pass
    }

    /// Forward recovery: applies each pending credit of `home` older than
    /// `in_doubt_after` under a fresh lock on the payee, then clears it. A credit
    /// already applied (the coordinator got there) is only cleared.
    async fn forward_pending(
        &self,
        home: &ShardAgent,
        routing: &Routing,
        locks: &LockService,
        pass: &mut RecoveryStatus,
    ) {
        let pending = match home.pending_credits(self.in_doubt_after).await {
            Ok(p) => p,
            Err(e) => {
                warn!(shard = %home.id(), %e, "recovery: could not list pending credits");
                pass.errors += 1;
                return;
            }
        };
        for p in pending {
            let held = match locks.acquire(&[p.to_user]).await {
                Ok(h) => h,
                Err(e) => {
                    warn!(transfer_id = %p.transfer_id, %e, "recovery: no lock for a pending credit; will retry");
                    pass.errors += 1;
                    continue;
                }
            };
            let leg = FencedLeg {
                transfer_id: p.transfer_id,
                user: p.to_user,
                amount: p.amount,
                currency: p.currency,
                fence: held.fence(p.to_user).unwrap_or_default(),
                counterparty: p.from_username.clone(),
            };
            let applied = routing.agent_for(&p.to_user).credit_fenced(&leg).await;
            locks.release(held).await;
            match applied {
                Ok(Credited::Yes | Credited::AlreadyApplied) => {
                    match home.clear_pending_credit(p.transfer_id).await {
                        Ok(()) => pass.forwarded += 1,
                        Err(e) => {
                            warn!(transfer_id = %p.transfer_id, %e, "recovery: credit applied, pending not cleared");
                            pass.errors += 1;
                        }
                    }
                }
                Ok(Credited::FenceRejected) => pass.errors += 1,
                Err(e) => {
                    warn!(transfer_id = %p.transfer_id, %e, "recovery: could not apply a pending credit; will retry");
                    pass.errors += 1;
                }
            }
        }
    }

    /// Settles deposits and withdrawals whose settling was cut (the provider may
    /// have acted): through the provider again, with the same reference and token,
    /// so a provider that de-duplicates answers as it did the first time.
    async fn settle_external(
        &self,
        agent: &ShardAgent,
        provider: Arc<dyn PaymentProvider>,
        timeout: Duration,
        pass: &mut RecoveryStatus,
    ) {
        let unsettled = match agent.unsettled_external(self.in_doubt_after).await {
            Ok(u) => u,
            Err(e) => {
                warn!(shard = %agent.id(), %e, "recovery: could not list unsettled payments");
                pass.errors += 1;
                return;
            }
        };
        for u in unsettled {
            let (Some((user, username)), Ok(amount)) =
                (u.user(), Amount::new(u.record.amount, u.record.currency))
            else {
                warn!(transfer_id = %u.record.transfer_id, "recovery: unsettled payment without a user or a valid amount; left alone");
                pass.unknown += 1;
                continue;
            };
            let direction = u.direction();
            let order = ExternalOrder {
                user,
                username,
                direction,
                amount,
                // Not used to settle: the record is already claimed.
                key: IdempotencyKey {
                    user,
                    key: String::new(),
                    fingerprint: Vec::new(),
                },
                provider: provider.name().to_owned(),
                payment_token: u.payment_token.clone(),
            };
            let settled = agent
                .settle_external(&order, u.record.transfer_id, |reference| {
                    let (provider, order) = (provider.as_ref(), &order);
                    async move { call_for(provider, timeout, order, reference).await }
                })
                .await;
            match settled {
                Ok(_) => pass.settled_external += 1,
                Err(e) => {
                    warn!(transfer_id = %u.record.transfer_id, %e, "recovery: could not settle a payment; will retry");
                    pass.errors += 1;
                }
            }
        }
    }

    /// Runs a pass at once, then every `every`; meant to be spawned.
    pub async fn run_forever(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.run_once().await;
        }
    }
}
