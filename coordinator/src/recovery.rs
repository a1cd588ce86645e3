//! The recovery loop: on start and on a timer, every shard's in-doubt prepared
//! transactions are resolved from their home shard's decision, and transfers stuck
//! in `preparing` are aborted (presumed abort), and, in Redis-lock mode, pending
//! credits are applied (forward recovery). See `shard_agent::two_pc::recover`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use router::ShardId;
use serde::Serialize;
use shard_agent::two_pc::recover::{abort_stale, resolve_leg, InDoubt, PreparedStats, Resolution};
use tracing::{info, warn};

use shard_agent::external::ExternalOrder;
use shard_agent::idempotency::IdempotencyKey;
use shard_agent::redis_legs::{Credited, PendingStats};
use shard_agent::{Amount, ShardAgent, ShardError, TransferId};

use crate::batch::raise_floor;
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
    /// In-doubt legs left for a later pass because their home shard (or their
    /// own shard) stopped answering during this one.
    pub skipped: u64,
    /// Redis-lock mode: pending credits refused by their fence (the floor is
    /// raised and they are retried).
    pub fence_rejected: u64,
    /// Passes cut at `recovery_pass_max_ms`.
    pub passes_cut: u64,
    /// Our prepared transactions per shard, young and old, at the last pass.
    pub prepared: BTreeMap<ShardId, PreparedStats>,
    /// Pending credits older than `in_doubt_after` per home shard (Redis-lock
    /// mode's in-doubt transfers), at the last pass.
    pub pending_credits: BTreeMap<ShardId, PendingStats>,
    pub unreachable: Vec<ShardId>,
}

impl RecoveryStatus {
    /// Pending credits in doubt, over every shard.
    pub fn pending_credit_count(&self) -> i64 {
        self.pending_credits.values().map(|s| s.count).sum()
    }

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

/// The bounds of one recovery pass. Units are in the names.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryLimits {
    /// Recovery leaves younger prepared transactions and records alone: their
    /// coordinator may still be working on them.
    pub in_doubt_after: Duration,
    /// A pass first asks every shard for its prepared transactions, all at once;
    /// a shard that does not answer within this is skipped for the whole pass,
    /// as a participant and as a home shard.
    pub probe_timeout: Duration,
    /// A pass that runs longer is cut (every step is safe to cut: each is a
    /// compare-and-set or an idempotent finish) and the next pass goes on.
    pub pass_max: Duration,
}

pub struct Recovery {
    cluster: Arc<Cluster>,
    /// Redis-lock mode: pending credits are applied under a fresh lock.
    locks: Option<Arc<LockService>>,
    /// Deposits and withdrawals cut while settling are settled again through
    /// the provider, with the same reference, bounded by the timeout.
    payments: Option<(Arc<dyn PaymentProvider>, Duration)>,
    limits: RecoveryLimits,
    status: Mutex<RecoveryStatus>,
}

/// What one pass shares between the shards it works at once: its counters, and
/// the shards found unreachable so far, which nobody calls again in this pass.
#[derive(Default)]
struct Pass {
    status: Mutex<RecoveryStatus>,
    unreachable: Mutex<BTreeSet<ShardId>>,
}

impl Pass {
    fn count(&self, add: impl FnOnce(&mut RecoveryStatus)) {
        add(&mut self
            .status
            .lock()
            .expect("invariant: pass status lock is never held across a panic"));
    }

    fn is_unreachable(&self, shard: ShardId) -> bool {
        self.unreachable
            .lock()
            .expect("invariant: pass lock is never held across a panic")
            .contains(&shard)
    }

    /// Counts an error; a shard that did not answer is skipped for the rest of
    /// the pass, so one dead shard costs at most one timeout per pass.
    fn failed(&self, e: &ShardError) {
        self.count(|s| s.errors += 1);
        if matches!(e, ShardError::Unavailable { .. }) {
            self.unreachable
                .lock()
                .expect("invariant: pass lock is never held across a panic")
                .insert(e.shard());
        }
    }
}

impl Recovery {
    pub fn new(
        cluster: Arc<Cluster>,
        locks: Option<Arc<LockService>>,
        payments: Option<(Arc<dyn PaymentProvider>, Duration)>,
        limits: RecoveryLimits,
    ) -> Recovery {
        Recovery {
            cluster,
            locks,
            payments,
            limits,
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
    ///
    /// Shards are worked at once, and within a shard the in-doubt legs of each
    /// home shard at once, so a dead or slow shard delays only the work that
    /// needs it: at most one probe timeout, then it is skipped until the next
    /// pass. The whole pass is bounded by `pass_max`.
    pub async fn run_once(&self) -> RecoveryStatus {
        // A deliberately broken variant for the chaos suite: recovery off.
        fail::fail_point!("broken-recovery-off", |_| RecoveryStatus::default());
        let routing = self.cluster.routing();
        let pass = Pass::default();
        let probes = join_all(routing.agents.values().map(|agent| async move {
            let stats = tokio::time::timeout(self.limits.probe_timeout, agent.prepared_stats())
                .await
                .unwrap_or_else(|_| {
                    Err(ShardError::Unavailable {
                        shard: agent.id(),
                        reason: format!(
                            "recovery probe: no answer within {} ms",
                            self.limits.probe_timeout.as_millis()
                        ),
                    })
                });
            (agent, stats)
        }))
        .await;
        let mut reachable = Vec::with_capacity(probes.len());
        for (agent, stats) in probes {
            match stats {
                Ok(stats) => {
                    pass.count(|s| {
                        s.prepared.insert(agent.id(), stats);
                    });
                    reachable.push(agent);
                }
                Err(e) => {
                    warn!(shard = %agent.id(), %e, "recovery: shard unreachable; skipped this pass");
                    pass.failed(&e);
                }
            }
        }
        let work = join_all(
            reachable
                .into_iter()
                .map(|agent| self.recover_shard(agent, &routing, &pass)),
        );
        let cut = tokio::time::timeout(self.limits.pass_max, work)
            .await
            .is_err();
        if cut {
            warn!(
                pass_max_ms = self.limits.pass_max.as_millis() as u64,
                "recovery pass cut at its bound; the next pass goes on"
            );
        }
        let unreachable = pass
            .unreachable
            .into_inner()
            .expect("invariant: pass lock is never held across a panic");
        let mut pass = pass
            .status
            .into_inner()
            .expect("invariant: pass status lock is never held across a panic");
        pass.passes_cut = u64::from(cut);
        pass.unreachable = unreachable.into_iter().collect();
        self.record(&pass);
        pass
    }

    /// Everything one shard needs, each part at once so that a part waiting on
    /// a slow shard holds up none of the others: its in-doubt legs (each home
    /// shard's at once) and, as a home shard, its pending credits, cut payments
    /// and stale records.
    async fn recover_shard(&self, agent: &ShardAgent, routing: &Routing, pass: &Pass) {
        let legs = async {
            match agent.in_doubt(self.limits.in_doubt_after).await {
                Ok(legs) => {
                    let mut by_home: BTreeMap<ShardId, Vec<InDoubt>> = BTreeMap::new();
                    for leg in legs {
                        by_home.entry(leg.gid.home).or_default().push(leg);
                    }
                    join_all(
                        by_home.into_iter().map(|(home, legs)| {
                            self.resolve_legs(agent, home, legs, routing, pass)
                        }),
                    )
                    .await;
                }
                Err(e) => {
                    warn!(shard = %agent.id(), %e, "recovery: could not list prepared transactions");
                    pass.failed(&e);
                }
            }
        };
        let credits = async {
            if let Some(locks) = &self.locks {
                self.forward_pending(agent, routing, locks, pass).await;
            }
            match agent.pending_stats(self.limits.in_doubt_after).await {
                Ok(stats) if stats.count > 0 => pass.count(|s| {
                    s.pending_credits.insert(agent.id(), stats);
                }),
                Ok(_) => {}
                Err(e) => {
                    warn!(shard = %agent.id(), %e, "recovery: could not count pending credits");
                    pass.failed(&e);
                }
            }
        };
        let payments = async {
            if let Some((provider, timeout)) = &self.payments {
                self.settle_external(agent, provider.clone(), *timeout, pass)
                    .await;
            }
        };
        tokio::join!(legs, credits, payments, self.abort_stale(agent, pass));
    }

    /// Resolves `participant`'s in-doubt legs whose decision lives on `home`, one
    /// after the other, until either shard stops answering.
    async fn resolve_legs(
        &self,
        participant: &ShardAgent,
        home: ShardId,
        legs: Vec<InDoubt>,
        routing: &Routing,
        pass: &Pass,
    ) {
        let Some(home_agent) = routing.agent(home) else {
            warn!(%home, legs = legs.len(), "recovery: home shard not in the catalog; left prepared");
            pass.count(|s| s.unknown += legs.len() as u64);
            return;
        };
        for (i, leg) in legs.iter().enumerate() {
            if pass.is_unreachable(home) || pass.is_unreachable(participant.id()) {
                pass.count(|s| s.skipped += (legs.len() - i) as u64);
                return;
            }
            match resolve_leg(participant, home_agent, &leg.gid).await {
                Ok(Resolution::Committed) => pass.count(|s| s.committed += 1),
                Ok(Resolution::RolledBack) => pass.count(|s| s.rolled_back += 1),
                Ok(Resolution::Unknown) => pass.count(|s| s.unknown += 1),
                Ok(Resolution::Deferred) => pass.count(|s| s.deferred += 1),
                Err(e) => {
                    warn!(gid = %leg.gid, %e, "recovery: could not resolve; will retry");
                    pass.failed(&e);
                }
            }
        }
    }

    /// Aborts this home shard's transfers still `preparing` after
    /// `in_doubt_after` (presumed abort).
    async fn abort_stale(&self, agent: &ShardAgent, pass: &Pass) {
        match agent.stale_preparing(self.limits.in_doubt_after).await {
            Ok(stale) => {
                for tid in stale {
                    if pass.is_unreachable(agent.id()) {
                        return;
                    }
                    match abort_stale(agent, tid).await {
                        Ok(_) => pass.count(|s| s.aborted_stale += 1),
                        Err(e) => {
                            warn!(transfer_id = %tid, %e, "recovery: could not abort stale transfer");
                            pass.failed(&e);
                        }
                    }
                }
            }
            Err(e) => {
                warn!(shard = %agent.id(), %e, "recovery: could not list stale transfers");
                pass.failed(&e);
            }
        }
    }

    /// Adds a pass's counts to the totals and logs a pass that did something.
    fn record(&self, pass: &RecoveryStatus) {
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
                skipped = pass.skipped,
                "recovery pass"
            );
        }
        let mut status = self
            .status
            .lock()
            .expect("invariant: recovery status lock is never held across a panic");
        status.passes += 1;
        status.passes_cut += pass.passes_cut;
        status.committed += pass.committed;
        status.rolled_back += pass.rolled_back;
        status.aborted_stale += pass.aborted_stale;
        status.forwarded += pass.forwarded;
        status.settled_external += pass.settled_external;
        status.unknown += pass.unknown;
        status.deferred += pass.deferred;
        status.skipped += pass.skipped;
        status.fence_rejected += pass.fence_rejected;
        status.errors += pass.errors;
        status.prepared = pass.prepared.clone();
        status.pending_credits = pass.pending_credits.clone();
        status.unreachable = pass.unreachable.clone();
    }

    /// Forward recovery: applies each pending credit of `home` older than
    /// `in_doubt_after` under a fresh lock on the payee, then clears it. A credit
    /// already applied (the coordinator got there) is only cleared.
    async fn forward_pending(
        &self,
        home: &ShardAgent,
        routing: &Routing,
        locks: &LockService,
        pass: &Pass,
    ) {
        let pending = match home.pending_credits(self.limits.in_doubt_after).await {
            Ok(p) => p,
            Err(e) => {
                warn!(shard = %home.id(), %e, "recovery: could not list pending credits");
                pass.failed(&e);
                return;
            }
        };
        for p in pending {
            let payee = routing.agent_for(&p.to_user);
            if pass.is_unreachable(home.id()) || pass.is_unreachable(payee.id()) {
                pass.count(|s| s.skipped += 1);
                continue;
            }
            let held = match locks.acquire(&[p.to_user]).await {
                Ok(h) => h,
                Err(e) => {
                    warn!(transfer_id = %p.transfer_id, %e, "recovery: no lock for a pending credit; will retry");
                    pass.count(|s| s.errors += 1);
                    self.note_failed(home, p.transfer_id, &e.to_string(), pass)
                        .await;
                    continue;
                }
            };
            let fence = held.token();
            let applied = payee
                .credit_group(std::slice::from_ref(&p), fence)
                .await
                .and_then(|mut c| {
                    c.pop().ok_or_else(|| ShardError::CorruptRow {
                        shard: payee.id(),
                        detail: "a credit got no answer".into(),
                    })
                });
            locks.release(held).await;
            match applied {
                Ok(Credited::Yes | Credited::AlreadyApplied) => {
                    match home.clear_pending_credits(&[p.transfer_id]).await {
                        Ok(()) => pass.count(|s| s.forwarded += 1),
                        Err(e) => {
                            warn!(transfer_id = %p.transfer_id, %e, "recovery: credit applied, pending not cleared");
                            pass.failed(&e);
                        }
                    }
                }
                Ok(Credited::Missing) => {
                    tracing::error!(transfer_id = %p.transfer_id, payee = %p.to_user, "recovery: the payee's account is gone from its shard; the credit stays pending");
                    pass.count(|s| s.errors += 1);
                    self.note_failed(home, p.transfer_id, "the payee has no account", pass)
                        .await;
                }
                Ok(Credited::FenceRejected { last_fence }) => {
                    warn!(
                        transfer_id = %p.transfer_id,
                        fence,
                        last_fence,
                        "recovery: pending credit refused by its fence; floor raised, will retry"
                    );
                    pass.count(|s| s.fence_rejected += 1);
                    raise_floor(locks, last_fence).await;
                    self.note_failed(home, p.transfer_id, "refused by its fence", pass)
                        .await;
                }
                Err(e) => {
                    warn!(transfer_id = %p.transfer_id, %e, "recovery: could not apply a pending credit; will retry");
                    pass.failed(&e);
                    self.note_failed(home, p.transfer_id, &e.to_string(), pass)
                        .await;
                }
            }
        }
    }

    /// Counts a failed attempt on a pending credit's row (the admin view shows
    /// it; the least recently tried credits go first next time).
    async fn note_failed(&self, home: &ShardAgent, tid: TransferId, reason: &str, pass: &Pass) {
        if let Err(e) = home.pending_credits_failed(&[tid], reason).await {
            warn!(transfer_id = %tid, %e, "recovery: could not record a failed credit attempt");
            pass.failed(&e);
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
        pass: &Pass,
    ) {
        let unsettled = match agent.unsettled_external(self.limits.in_doubt_after).await {
            Ok(u) => u,
            Err(e) => {
                warn!(shard = %agent.id(), %e, "recovery: could not list unsettled payments");
                pass.failed(&e);
                return;
            }
        };
        for u in unsettled {
            if pass.is_unreachable(agent.id()) {
                return;
            }
            let (Some((user, username)), Ok(amount)) =
                (u.user(), Amount::new(u.record.amount, u.record.currency))
            else {
                warn!(transfer_id = %u.record.transfer_id, "recovery: unsettled payment without a user or a valid amount; left alone");
                pass.count(|s| s.unknown += 1);
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
                Ok(_) => pass.count(|s| s.settled_external += 1),
                Err(e) => {
                    warn!(transfer_id = %u.record.transfer_id, %e, "recovery: could not settle a payment; will retry");
                    pass.failed(&e);
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
