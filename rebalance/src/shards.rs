//! The shard list: what `wallet shards list/add/drain/remove` read and write.

use std::collections::BTreeMap;

use router::{ShardId, ShardMap};
use rust_decimal::Decimal;
use serde::Serialize;
use shard_agent::{ShardAgent, ShardError};

use shard_agent::moves::ShardRow;

use crate::{Admin, RebalanceError, Result};

/// One line of `wallet shards list`.
#[derive(Clone, Debug, Serialize)]
pub struct ShardInfo {
    pub name: String,
    pub id: u16,
    /// The DSN with any password hidden.
    pub dsn: String,
    pub weight: u32,
    pub state: String,
    /// Buckets the catalog's map gives it.
    pub buckets: usize,
    /// Users and the sum of their balances (all currencies added up; see
    /// `balances` for each currency), counted on the shard; `null` when the
    /// shard did not answer.
    pub users: Option<i64>,
    pub balance_total: Option<Decimal>,
    pub balances: BTreeMap<String, Decimal>,
    /// Why the figures are missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `wallet shards list` prints.
#[derive(Clone, Debug, Serialize)]
pub struct ShardList {
    pub epoch: u64,
    pub shards: Vec<ShardInfo>,
}

impl Admin {
    pub(crate) async fn shard_rows(&self) -> Result<Vec<ShardRow>> {
        Ok(self.catalog.shard_rows().await?)
    }

    pub(crate) async fn shard_named(&self, name: &str) -> Result<ShardRow> {
        self.shard_rows()
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| RebalanceError::UnknownShard(name.to_owned()))
    }

    /// The catalog's epoch.
    pub async fn epoch(&self) -> Result<u64> {
        Ok(self.catalog.epoch().await?)
    }

    /// The catalog's map as of now.
    pub async fn map(&self) -> Result<ShardMap> {
        Ok(self.catalog.map().await?)
    }

    /// Every shard not removed, with its buckets and what it holds.
    pub async fn list(&self) -> Result<ShardList> {
        let map = self.map().await?;
        let counts = map.bucket_counts();
        let mut shards = Vec::new();
        for row in self.shard_rows().await? {
            if row.state == "removed" {
                continue;
            }
            let figures = match self.agents().get(&row.id) {
                Some(agent) => holdings(agent).await,
                None => Err(ShardError::Unavailable {
                    shard: row.id,
                    reason: "not open".into(),
                }),
            };
            let (users, balance_total, balances, error) = match figures {
                Ok((users, balances)) => (
                    Some(users),
                    Some(balances.values().copied().sum()),
                    balances,
                    None,
                ),
                Err(e) => (None, None, BTreeMap::new(), Some(e.to_string())),
            };
            shards.push(ShardInfo {
                name: row.name,
                id: row.id.0,
                dsn: shard_agent::dsn::redact(&row.dsn),
                weight: row.weight,
                state: row.state,
                buckets: counts.get(&row.id).copied().unwrap_or(0),
                users,
                balance_total,
                balances,
                error,
            });
        }
        Ok(ShardList {
            epoch: map.epoch().0,
            shards,
        })
    }

    /// Registers a new shard with no buckets, after checking that its server
    /// answers, can take part in two-phase commit, and is migrated (it is
    /// migrated here if it is not). Its ownership is recorded as empty, so it
    /// refuses every user until a move gives it a bucket.
    pub async fn add(&self, name: &str, dsn: &str, weight: u32) -> Result<ShardId> {
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(RebalanceError::Refused(format!(
                "shard name {name:?}: use 1-63 letters, digits, '-' or '_'"
            )));
        }
        if weight == 0 || weight > router::MAX_WEIGHT {
            return Err(RebalanceError::Refused(format!(
                "weight {weight}: must be 1..={}",
                router::MAX_WEIGHT
            )));
        }
        let rows = self.shard_rows().await?;
        if rows.iter().any(|s| s.name == name) {
            return Err(RebalanceError::Refused(format!(
                "a shard named {name:?} exists already"
            )));
        }
        let id = ShardId(rows.iter().map(|s| s.id.0 + 1).max().unwrap_or(0));
        // Reachable first (a plain connection), so that a server that is
        // down is told apart from one that cannot be migrated.
        match tokio::time::timeout(
            std::time::Duration::from_millis(self.agent_config.connect_timeout_ms.max(1_000)),
            shard_agent::tls::connect(dsn),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(RebalanceError::Refused(format!(
                    "the server of {name:?} does not answer: {e}"
                )))
            }
            Err(_) => {
                return Err(RebalanceError::Refused(format!(
                    "the server of {name:?} does not answer (timed out)"
                )))
            }
        }
        shard_agent::migrate::migrate_shard(dsn)
            .await
            .map_err(|e| {
                RebalanceError::Refused(format!("the database of {name:?} cannot be migrated: {e}"))
            })?;
        let agent = ShardAgent::new(id, dsn, self.agent_config.clone())?;
        let max_prepared = agent.max_prepared_transactions().await?;
        if max_prepared == 0 {
            return Err(RebalanceError::Refused(format!(
                "the server of {name:?} has max_prepared_transactions = 0; two-phase commit needs more"
            )));
        }
        // A database that already holds users belongs to some cluster: adding
        // it would let two shards claim them.
        let (users, _) = holdings(&agent).await?;
        if users > 0 {
            return Err(RebalanceError::Refused(format!(
                "the database of {name:?} already holds {users} users"
            )));
        }
        let epoch = self.map().await?.epoch();
        agent.init_ownership(&[], epoch.0).await?;
        self.catalog.insert_shard(id, name, dsn, weight).await?;
        self.agents_mut().insert(id, agent);
        // Coordinators load the shard list with the map: a new epoch makes
        // them open the new shard now rather than at the first move.
        self.bump_epoch().await?;
        Ok(id)
    }

    /// Marks a shard draining: the plan moves every bucket off it.
    pub async fn drain(&self, name: &str) -> Result<ShardRow> {
        let row = self.shard_named(name).await?;
        if row.state == "removed" {
            return Err(RebalanceError::Refused(format!("{name:?} is removed")));
        }
        let others = self
            .shard_rows()
            .await?
            .into_iter()
            .filter(|s| s.state == "active" && s.id != row.id)
            .count();
        if others == 0 {
            return Err(RebalanceError::Refused(format!(
                "{name:?} is the last active shard: its buckets would have nowhere to go"
            )));
        }
        self.catalog.set_shard_state(row.id, "draining").await?;
        Ok(row)
    }

    /// Forgets a shard that owns no bucket and holds nothing in doubt.
    pub async fn remove(&self, name: &str) -> Result<ShardRow> {
        let row = self.shard_named(name).await?;
        if row.state == "removed" {
            return Err(RebalanceError::Refused(format!(
                "{name:?} is removed already"
            )));
        }
        let owned = self
            .map()
            .await?
            .bucket_counts()
            .get(&row.id)
            .copied()
            .unwrap_or(0);
        if owned > 0 {
            return Err(RebalanceError::Refused(format!(
                "{name:?} still owns {owned} buckets: run `wallet shards drain {name}` and `wallet shards rebalance` first"
            )));
        }
        let open = self.catalog.open_moves_of(row.id).await?;
        if open > 0 {
            return Err(RebalanceError::Refused(format!(
                "{open} moves from or to {name:?} are not finished: run `wallet shards rebalance`"
            )));
        }
        let mut in_doubt = 0;
        for agent in self.agents().values() {
            in_doubt += agent.in_doubt_for(row.id).await.map_err(|e| {
                RebalanceError::Refused(format!(
                    "cannot tell whether {name:?} holds anything in doubt ({e})"
                ))
            })?;
        }
        if in_doubt > 0 {
            return Err(RebalanceError::Refused(format!(
                "{in_doubt} prepared legs, undecided transfers or pending credits depend on {name:?}; recovery resolves them, try again shortly"
            )));
        }
        if let Some(agent) = self.agents().get(&row.id) {
            let stray = agent.stray_rows().await?;
            if !stray.is_empty() {
                return Err(RebalanceError::Refused(format!(
                    "{name:?} holds rows of {} buckets it does not serve: run `wallet shards rebalance` to clean them",
                    stray.len()
                )));
            }
        }
        self.catalog.set_shard_state(row.id, "removed").await?;
        self.bump_epoch().await?;
        Ok(row)
    }

    pub(crate) async fn bump_epoch(&self) -> Result<()> {
        Ok(self.catalog.bump_epoch().await?)
    }
}

/// Users served by `agent` and their balances per currency.
async fn holdings(
    agent: &ShardAgent,
) -> std::result::Result<(i64, BTreeMap<String, Decimal>), ShardError> {
    agent.served_totals().await
}
