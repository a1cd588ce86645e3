//! `wallet shards verify`: the cluster's placement and money, checked.

use std::collections::BTreeMap;

use router::{ShardId, BUCKET_COUNT};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::{Admin, Result};

/// How long [`Admin::verify`] waits for money in flight to land.
pub const SETTLE_MS: u64 = 10_000;

/// The verifier's findings; `ok` only when `problems` is empty.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    pub ok: bool,
    pub epoch: u64,
    pub shards: usize,
    pub buckets: usize,
    pub users: i64,
    /// Per currency: user balances, clearing balances (their sum must be 0).
    pub user_balances: BTreeMap<String, Decimal>,
    pub clearing_balances: BTreeMap<String, Decimal>,
    pub moves_open: usize,
    pub problems: Vec<String>,
}

impl Admin {
    /// Checks that every bucket is served by exactly one shard, the one the
    /// catalog names; that no shard holds rows of a bucket it does not serve;
    /// that every move the journal calls switched or cleaned left its bucket
    /// with its target; that every ledger matches its balance; and that money
    /// is conserved across the cluster.
    ///
    /// Money in flight (a prepared leg, a pending credit, an undecided
    /// deposit) makes conservation look broken for a moment: such a verdict
    /// is taken again, for up to [`SETTLE_MS`], before it is reported.
    pub async fn verify(&self) -> Result<Verdict> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(SETTLE_MS);
        loop {
            let (verdict, in_flight) = self.verify_once().await?;
            if verdict.ok || in_flight == 0 || tokio::time::Instant::now() >= deadline {
                return Ok(verdict);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    async fn verify_once(&self) -> Result<(Verdict, i64)> {
        let mut in_flight = 0;
        let map = self.map().await?;
        let mut v = Verdict {
            epoch: map.epoch().0,
            shards: self.agents().len(),
            buckets: usize::from(BUCKET_COUNT),
            ..Verdict::default()
        };
        let mut served: Vec<Vec<ShardId>> = vec![Vec::new(); usize::from(BUCKET_COUNT)];
        for (id, agent) in &self.agents() {
            match agent.ownership().await? {
                // Never opened by a coordinator: it serves whatever the map says.
                None => {
                    for (b, owner) in map.table().iter().enumerate() {
                        if owner == id {
                            served[b].push(*id);
                        }
                    }
                }
                Some(rows) => {
                    for o in rows {
                        if matches!(o.state.as_str(), "owned" | "fenced") {
                            served[usize::from(o.bucket)].push(*id);
                        }
                    }
                }
            }
            for (bucket, users) in agent.stray_rows().await? {
                v.problems.push(format!(
                    "shard {id} holds {users} users of bucket {bucket}, which it does not serve"
                ));
            }
            let audit = agent.audit().await?;
            in_flight += audit.prepared + audit.pending_credits + audit.undecided_transfers;
            v.users += audit.balances_by_user.len() as i64;
            if audit.ledger_mismatches > 0 {
                v.problems.push(format!(
                    "shard {id}: {} accounts' ledgers do not sum to their balance",
                    audit.ledger_mismatches
                ));
            }
            if audit.hold_mismatches > 0 {
                v.problems.push(format!(
                    "shard {id}: {} accounts hold money no withdrawal explains",
                    audit.hold_mismatches
                ));
            }
            if audit.negative_balances > 0 {
                v.problems.push(format!(
                    "shard {id}: {} accounts are overdrawn",
                    audit.negative_balances
                ));
            }
            if audit.usage_mismatches > 0 {
                v.problems.push(format!(
                    "shard {id}: {} accounts' daily usage is not their transfer debits today",
                    audit.usage_mismatches
                ));
            }
            for (c, x) in audit.user_balances {
                *v.user_balances.entry(c).or_default() += x;
            }
            for (c, x) in audit.clearing_balances {
                *v.clearing_balances.entry(c).or_default() += x;
            }
        }
        for (b, shards) in served.iter().enumerate() {
            let owner = map.table()[b];
            match shards.as_slice() {
                [one] if *one == owner => {}
                [] => v.problems.push(format!("bucket {b} is served by no shard")),
                [one] => v.problems.push(format!(
                    "bucket {b} is served by shard {one}, the catalog says shard {owner}"
                )),
                many => v.problems.push(format!(
                    "bucket {b} is served by {} shards: {many:?}",
                    many.len()
                )),
            }
        }
        let currencies: std::collections::BTreeSet<&String> = v
            .user_balances
            .keys()
            .chain(v.clearing_balances.keys())
            .collect();
        for c in currencies {
            let users = v.user_balances.get(c).copied().unwrap_or_default();
            let clearing = v.clearing_balances.get(c).copied().unwrap_or_default();
            if users + clearing != Decimal::ZERO {
                v.problems.push(format!(
                    "{c}: user balances ({users}) and clearing balances ({clearing}) do not cancel out"
                ));
            }
        }
        let moves = self.catalog.recent_moves(i64::MAX).await?;
        for m in &moves {
            if matches!(m.step.as_str(), "switched" | "cleaned")
                && map.table()[usize::from(m.bucket)] != m.to_id
                && !moves
                    .iter()
                    .any(|later| later.bucket == m.bucket && later.move_id > m.move_id)
            {
                v.problems.push(format!(
                    "move {} of bucket {} switched to {}, but the catalog names shard {}",
                    m.move_id,
                    m.bucket,
                    m.to,
                    map.table()[usize::from(m.bucket)]
                ));
            }
            if !matches!(m.step.as_str(), "cleaned" | "rolled_back") {
                v.moves_open += 1;
            }
        }
        v.ok = v.problems.is_empty();
        Ok((v, in_flight))
    }
}
