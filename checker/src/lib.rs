//! The invariant checker: the invariants of ARCHITECTURE.md, across every shard.
//!
//! [`Snapshot::take`] reads each shard's committed state (shard by shard, so a
//! snapshot taken while transfers run can see one half-committed across shards:
//! report that, fail only on quiescent snapshots). [`Snapshot::violations`] lists
//! every broken invariant; an empty list is the only passing verdict.

pub mod events;

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde::Serialize;
use shard_agent::check::{DecisionRow, EntryRow, ShardAudit};
use shard_agent::{ShardAgent, ShardResult};
use uuid::Uuid;

/// Everything the checker knows, read from all shards.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub audits: Vec<(u16, ShardAudit)>,
    /// Decision records by transfer ID (home shards).
    pub decisions: HashMap<Uuid, DecisionRow>,
    /// User-account ledger entries by transfer ID (all shards).
    pub entries: HashMap<Uuid, Vec<EntryRow>>,
}

/// Money totals per currency, as a report shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub user_balances: BTreeMap<String, Decimal>,
    pub clearing_balances: BTreeMap<String, Decimal>,
}

impl Snapshot {
    pub async fn take(agents: &[ShardAgent]) -> ShardResult<Snapshot> {
        let mut snap = Snapshot::default();
        for agent in agents {
            let mut audit = agent.audit().await?;
            for d in std::mem::take(&mut audit.decisions) {
                snap.decisions.insert(d.transfer_id, d);
            }
            for e in std::mem::take(&mut audit.entries) {
                snap.entries.entry(e.transfer_id).or_default().push(e);
            }
            snap.audits.push((agent.id().0, audit));
        }
        Ok(snap)
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for (_, audit) in &self.audits {
            for (cur, v) in &audit.user_balances {
                *t.user_balances.entry(cur.clone()).or_default() += *v;
            }
            for (cur, v) in &audit.clearing_balances {
                *t.clearing_balances.entry(cur.clone()).or_default() += *v;
            }
        }
        t
    }

    /// Every invariant violation, in words. `quiescent`: nothing is in flight, so
    /// in-flight states themselves are violations (invariant 5).
    pub fn violations(&self, quiescent: bool) -> Vec<String> {
        let mut v = Vec::new();
        self.conservation(&mut v);
        for (shard, a) in &self.audits {
            if a.negative_balances > 0 {
                v.push(format!(
                    "invariant 2: shard {shard} has {} negative balances",
                    a.negative_balances
                ));
            }
            if a.ledger_mismatches > 0 {
                v.push(format!("invariant 4: shard {shard} has {} accounts whose ledger does not sum to the balance", a.ledger_mismatches));
            }
            if a.hold_mismatches > 0 {
                v.push(format!("invariant 4: shard {shard} has {} accounts whose held money is not their open withdrawals", a.hold_mismatches));
            }
            if quiescent && a.prepared > 0 {
                v.push(format!(
                    "invariant 5: shard {shard} still holds {} prepared transactions",
                    a.prepared
                ));
            }
            if quiescent && a.pending_credits > 0 {
                v.push(format!("invariant 5: shard {shard} has {} debited transfers whose credit is still pending", a.pending_credits));
            }
            if a.limit_overruns > 0 {
                v.push(format!("invariant 8: shard {shard} has {} users whose transfers today exceed the daily limit", a.limit_overruns));
            }
            if a.usage_mismatches > 0 {
                v.push(format!("invariant 8: shard {shard} has {} users whose recorded usage today is not their transfer debits today", a.usage_mismatches));
            }
            if a.event_seq_mismatches > 0 {
                v.push(format!("invariant 9: shard {shard} has {} users whose events are not one per ledger entry, numbered without gaps", a.event_seq_mismatches));
            }
            if a.orphan_events > 0 {
                v.push(format!(
                    "invariant 9: shard {shard} has {} events that no ledger entry accounts for",
                    a.orphan_events
                ));
            }
            if a.fence_regressions > 0 {
                v.push(format!("fencing: shard {shard} has {} writes made under a lock older than an earlier write to the same account", a.fence_regressions));
            }
            if quiescent && a.undecided_transfers > 0 {
                v.push(format!(
                    "invariant 5: shard {shard} has {} transfers still preparing",
                    a.undecided_transfers
                ));
            }
        }
        self.exactly_once(quiescent, &mut v);
        self.refunds_within_originals(&mut v);
        v
    }

    /// Invariant 1: user balances equal their opening balances plus committed
    /// deposits minus withdrawals, and every account of every shard sums to zero
    /// with the clearing accounts.
    fn conservation(&self, v: &mut Vec<String>) {
        let mut users = Decimal::ZERO;
        let mut opening = Decimal::ZERO;
        let mut clearing = Decimal::ZERO;
        for (_, a) in &self.audits {
            users += a.user_balances.values().copied().sum::<Decimal>();
            opening += a.user_opening.values().copied().sum::<Decimal>();
            clearing += a.clearing_balances.values().copied().sum::<Decimal>();
        }
        let net: Decimal = self
            .decisions
            .values()
            .filter(|d| d.state == "committed")
            .map(|d| match d.kind.as_str() {
                "deposit" => d.amount,
                "withdrawal" => -d.amount,
                _ => Decimal::ZERO,
            })
            .sum::<Decimal>()
            + opening;
        if users != net {
            v.push(format!("invariant 1: user balances sum to {users}, opening balances plus committed deposits minus withdrawals are {net}"));
        }
        if users + clearing != Decimal::ZERO {
            v.push(format!(
                "invariant 1: user ({users}) and clearing ({clearing}) balances do not cancel out"
            ));
        }
    }

    /// Invariant 3 on the stored side: a committed transfer has exactly one debit
    /// and one credit of its amount; an aborted one has none; no entry lacks a
    /// committed decision.
    fn exactly_once(&self, quiescent: bool, v: &mut Vec<String>) {
        for (tid, d) in &self.decisions {
            let entries = self.entries.get(tid).map(Vec::as_slice).unwrap_or(&[]);
            let count = |kind: &str, amount: Decimal| {
                entries
                    .iter()
                    .filter(|e| e.kind == kind && e.amount == amount)
                    .count()
            };
            match (d.state.as_str(), d.kind.as_str()) {
                ("committed", "transfer") => {
                    let (debits, credits) = (
                        count("transfer_debit", -d.amount),
                        count("transfer_credit", d.amount),
                    );
                    if debits != 1 || credits != 1 || entries.len() != 2 {
                        // Mid-run, a cross-shard commit may be visible on one shard only.
                        if quiescent || entries.len() > 2 {
                            v.push(format!("invariant 3: committed transfer {tid} has {debits} debits, {credits} credits, {} entries", entries.len()));
                        }
                    }
                }
                ("committed", kind @ ("refund" | "dispute_refund")) => {
                    let (debits, credits) = (
                        count(&format!("{kind}_debit"), -d.amount),
                        count(&format!("{kind}_credit"), d.amount),
                    );
                    if (debits != 1 || credits != 1 || entries.len() != 2)
                        && (quiescent || entries.len() > 2)
                    {
                        v.push(format!("invariant 3: committed {kind} {tid} has {debits} debits, {credits} credits, {} entries", entries.len()));
                    }
                }
                ("committed", "deposit")
                    if count("deposit", d.amount) != 1 || entries.len() != 1 =>
                {
                    v.push(format!(
                        "invariant 3: committed deposit {tid} has {} entries",
                        entries.len()
                    ));
                }
                ("committed", "withdrawal")
                    if count("withdrawal", -d.amount) != 1 || entries.len() != 1 =>
                {
                    v.push(format!(
                        "invariant 3: committed withdrawal {tid} has {} entries",
                        entries.len()
                    ));
                }
                // A held transfer's release commits on the payee's (deciding)
                // shard before the payer's record turns committed, so mid-run a
                // credit may be seen next to a held record.
                ("aborted", _) | ("held", _)
                    if !entries.is_empty() && (quiescent || d.state == "aborted") =>
                {
                    v.push(format!(
                        "invariant 3: {} {} {tid} has {} ledger entries",
                        d.state,
                        d.kind,
                        entries.len()
                    ));
                }
                _ => {}
            }
        }
        for (tid, entries) in &self.entries {
            let decided = self
                .decisions
                .get(tid)
                .is_some_and(|d| d.state == "committed");
            if !decided
                && (quiescent
                    || self
                        .decisions
                        .get(tid)
                        .is_some_and(|d| d.state == "aborted"))
            {
                v.push(format!(
                    "invariant 3: {} ledger entries of {tid} have no committed decision",
                    entries.len()
                ));
            }
        }
    }

    /// Invariant 7: the committed refunds of a transfer sum to at most its
    /// amount, and only a committed transfer has any. Refunds are recorded on
    /// the payee's shard and the original on the payer's, so this needs every
    /// shard's snapshot; an original missing from it (a snapshot taken while
    /// its bucket moved) is not judged.
    fn refunds_within_originals(&self, v: &mut Vec<String>) {
        let mut refunded: BTreeMap<Uuid, Decimal> = BTreeMap::new();
        for d in self.decisions.values() {
            if let (Some(of), "committed") = (d.refund_of, d.state.as_str()) {
                *refunded.entry(of).or_default() += d.amount;
            }
        }
        for (of, sum) in refunded {
            match self.decisions.get(&of) {
                Some(o) if o.state == "committed" && o.kind == "transfer" && sum > o.amount => {
                    v.push(format!(
                        "invariant 7: transfer {of} of {} has {sum} refunded",
                        o.amount
                    ));
                }
                Some(o) if o.state == "committed" && o.kind == "transfer" => {}
                Some(o) => v.push(format!(
                    "invariant 7: {} {} {of} has {sum} refunded",
                    o.state, o.kind
                )),
                None => {}
            }
        }
    }

    /// Invariant 3 on the client's side: every acknowledged transfer is committed.
    pub fn unacknowledged(&self, acknowledged: &[Uuid]) -> Vec<String> {
        acknowledged
            .iter()
            .filter(|tid| {
                self.decisions
                    .get(tid)
                    .is_none_or(|d| d.state != "committed")
            })
            .map(|tid| format!("invariant 3: transfer {tid} was acknowledged but is not committed"))
            .collect()
    }

    /// Invariant 3 for definite failures: none of these transfers moved money.
    pub fn failed_but_moved(&self, failed: &[Uuid]) -> Vec<String> {
        failed
            .iter()
            .filter(|tid| self.entries.get(tid).is_some_and(|e| !e.is_empty()))
            .map(|tid| format!("invariant 3: transfer {tid} was answered with a failure but has ledger entries"))
            .collect()
    }
}

/// Polls until no prepared transaction, undecided transfer or pending credit
/// remains on any shard (recovery has finished), or `within` passes; returns the
/// last snapshot.
///
/// Shards are read one after another, so a single snapshot can be torn: the
/// payee's shard read before recovery applies a credit, the payer's after it
/// clears the pending credit. Recovery finishes each action before it clears the
/// marker that caused it, so once every shard has looked settled, nothing is left
/// to do, and a second snapshot taken after that one is consistent: that is the
/// one returned.
pub async fn wait_quiescent(
    agents: &[ShardAgent],
    within: std::time::Duration,
) -> ShardResult<Snapshot> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen_settled = false;
    loop {
        let snap = Snapshot::take(agents).await?;
        let settled = snap
            .audits
            .iter()
            .all(|(_, a)| a.prepared == 0 && a.undecided_transfers == 0 && a.pending_credits == 0);
        if (settled && seen_settled) || tokio::time::Instant::now() >= deadline {
            return Ok(snap);
        }
        seen_settled = settled;
        if !settled {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}
