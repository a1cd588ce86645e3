//! Online rebalancing: what `wallet shards` does.
//!
//! - [`Admin`] opens the catalog and one agent per shard: the shard list with
//!   its figures, adding, draining and removing shards ([`shards`]).
//! - [`plan`] is the set of bucket moves between the map as it is and the map
//!   the ring gives the active shards' weights.
//! - [`mover`] carries a move out by its journal in the catalog
//!   (`bucket_moves`): planned -> fenced -> copied -> verified -> switched ->
//!   cleaned, each step safe to repeat, so a killed rebalance resumes where
//!   the journal says.
//! - [`verify`] checks a cluster: every bucket on exactly one shard, no rows
//!   left where a bucket is not served, ledgers and conservation.

pub mod mover;
pub mod plan;
pub mod shards;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

use router::ShardId;
use shard_agent::catalog::CatalogError;
use shard_agent::moves::MoveCatalog;
use shard_agent::{AgentConfig, ShardAgent, ShardError};

pub use mover::{MoveOptions, RebalanceReport};
pub use plan::{Plan, PlannedMove};
pub use shard_agent::moves::{MoveRow, ShardRow};
pub use shards::ShardInfo;
pub use verify::Verdict;

#[derive(Debug, thiserror::Error)]
pub enum RebalanceError {
    #[error("catalog: {0}")]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Router(#[from] router::RouterError),
    #[error("no shard is named {0:?}")]
    UnknownShard(String),
    #[error("{0}")]
    Refused(String),
    /// A failpoint stopped the run where a crash would (tests only).
    #[error("stopped at failpoint {0}")]
    Crashed(&'static str),
}

pub type Result<T> = std::result::Result<T, RebalanceError>;

/// The catalog and the shards, as an operator's command sees them.
pub struct Admin {
    /// Every statement to the catalog goes through this (shard-agent's).
    pub(crate) catalog: MoveCatalog,
    pub(crate) agent_config: AgentConfig,
    /// One agent per shard not removed; `add` inserts the new one.
    pub(crate) agents: std::sync::RwLock<BTreeMap<ShardId, ShardAgent>>,
}

impl Admin {
    /// Connects to the catalog (already migrated and bootstrapped) and to
    /// every shard it lists that is not removed.
    pub async fn open(catalog_dsn: &str, agent_config: AgentConfig) -> Result<Arc<Admin>> {
        shard_agent::migrate::migrate_catalog(catalog_dsn)
            .await
            .map_err(|e| RebalanceError::Refused(format!("migrate the catalog: {e}")))?;
        let admin = Admin {
            catalog: MoveCatalog::connect(catalog_dsn).await?,
            agent_config,
            agents: std::sync::RwLock::new(BTreeMap::new()),
        };
        for row in admin.catalog.shard_rows().await? {
            if row.state != "removed" {
                let agent = ShardAgent::new(row.id, &row.dsn, admin.agent_config.clone())?;
                admin.agents_mut().insert(row.id, agent);
            }
        }
        Ok(Arc::new(admin))
    }

    /// The catalog's registry and move journal.
    pub fn catalog(&self) -> &MoveCatalog {
        &self.catalog
    }

    /// The agent of shard `id` (agents are cheap handles on a shared pool).
    pub(crate) fn agent(&self, id: ShardId) -> Result<ShardAgent> {
        self.agents()
            .get(&id)
            .cloned()
            .ok_or_else(|| RebalanceError::Refused(format!("shard {id} is not open")))
    }

    /// A copy of the agents, to use across awaits.
    pub(crate) fn agents(&self) -> BTreeMap<ShardId, ShardAgent> {
        self.agents
            .read()
            .expect("invariant: the agents' lock is never held across a panic")
            .clone()
    }

    pub(crate) fn agents_mut(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<ShardId, ShardAgent>> {
        self.agents
            .write()
            .expect("invariant: the agents' lock is never held across a panic")
    }
}
