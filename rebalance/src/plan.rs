//! The plan: which buckets move where, so that the map becomes the one the
//! ring gives the active shards' weights.
//!
//! The ring is consistent: with the map as the ring left it, adding a shard
//! moves buckets only onto the new shard (about 1/N of them for the Nth), and
//! draining one moves only its own buckets; no bucket moves between two
//! shards that both stay.

use std::collections::BTreeMap;

use router::{ShardId, ShardMap, ShardWeight};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::{Admin, RebalanceError, Result};

/// One bucket to move, with what it carries now.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedMove {
    pub bucket: u16,
    pub from: String,
    pub to: String,
    #[serde(skip)]
    pub from_id: ShardId,
    #[serde(skip)]
    pub to_id: ShardId,
    pub users: i64,
    /// The sum of the bucket's user balances (all currencies added up).
    pub money: Decimal,
}

/// What `wallet shards plan` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub epoch: u64,
    pub moves: Vec<PlannedMove>,
    pub buckets: usize,
    pub users: i64,
    pub money: Decimal,
    /// Buckets per (from, to) pair.
    pub flows: BTreeMap<String, usize>,
}

impl Admin {
    /// The moves from the catalog's map to the ring of the active shards.
    pub async fn plan(&self) -> Result<Plan> {
        let map = self.map().await?;
        let rows = self.shard_rows().await?;
        let weights: Vec<ShardWeight> = rows
            .iter()
            .filter(|s| s.state == "active")
            .map(|s| ShardWeight {
                shard: s.id,
                weight: s.weight,
            })
            .collect();
        if weights.is_empty() {
            return Err(RebalanceError::Refused(
                "no active shard: nowhere to place the buckets".into(),
            ));
        }
        let target = ShardMap::from_weights(map.epoch(), &weights)?;
        let name = |id: ShardId| {
            rows.iter()
                .find(|s| s.id == id)
                .map_or_else(|| format!("shard{}", id.0), |s| s.name.clone())
        };
        let wanted = map.moves_to(&target);
        let mut sizes: BTreeMap<ShardId, BTreeMap<u16, (i64, Decimal)>> = BTreeMap::new();
        for from in wanted
            .iter()
            .map(|m| m.from)
            .collect::<std::collections::BTreeSet<_>>()
        {
            sizes.insert(from, self.agent(from)?.bucket_sizes().await?);
        }
        let mut plan = Plan {
            epoch: map.epoch().0,
            moves: Vec::with_capacity(wanted.len()),
            buckets: wanted.len(),
            users: 0,
            money: Decimal::ZERO,
            flows: BTreeMap::new(),
        };
        for m in wanted {
            let (users, money) = sizes
                .get(&m.from)
                .and_then(|s| s.get(&m.bucket.0))
                .copied()
                .unwrap_or((0, Decimal::ZERO));
            plan.users += users;
            plan.money += money;
            *plan
                .flows
                .entry(format!("{} -> {}", name(m.from), name(m.to)))
                .or_default() += 1;
            plan.moves.push(PlannedMove {
                bucket: m.bucket.0,
                from: name(m.from),
                to: name(m.to),
                from_id: m.from,
                to_id: m.to,
                users,
                money,
            });
        }
        // The buckets that carry users first (most first), so that a partial
        // run (`--max-moves`) moves the most users; then by bucket number.
        plan.moves
            .sort_by(|a, b| b.users.cmp(&a.users).then(a.bucket.cmp(&b.bucket)));
        Ok(plan)
    }
}
