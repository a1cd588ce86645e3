//! The coordinator's view of the cluster: the bucket map and one agent per shard,
//! swapped as a whole when the catalog's epoch moves.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use router::{Epoch, ShardId, ShardMap, UserId};
use shard_agent::catalog::{Catalog, CatalogError, ShardEntry};
use shard_agent::{AgentConfig, ShardAgent, ShardError};
use tracing::{info, warn};

use crate::redis_lock::FenceFloor;

/// One consistent snapshot: every user routes through the same map.
#[derive(Debug)]
pub struct Routing {
    pub map: ShardMap,
    pub agents: BTreeMap<ShardId, ShardAgent>,
}

impl Routing {
    /// The agent of the shard that owns `user` (invariant 6: exactly one).
    pub fn agent_for(&self, user: &UserId) -> &ShardAgent {
        let shard = self.map.shard_of(user);
        self.agents.get(&shard).expect(
            "invariant: every shard in the map has an agent (checked when the snapshot is built)",
        )
    }

    pub fn agent(&self, shard: ShardId) -> Option<&ShardAgent> {
        self.agents.get(&shard)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("bucket map names shard {0}, which the catalog does not list")]
    UnknownShard(ShardId),
}

pub struct Cluster {
    catalog_dsn: String,
    agent_config: AgentConfig,
    routing: RwLock<Arc<Routing>>,
    /// One reload at a time, on one kept catalog connection: the callers
    /// that a refused write sends to [`Cluster::reload_after`] at once share
    /// one catalog read.
    reloading: tokio::sync::Mutex<Option<Catalog>>,
}

impl Cluster {
    /// Loads the map (bootstrapping an empty catalog from `shards`).
    pub async fn open(
        catalog_dsn: &str,
        shards: &[ShardEntry],
        agent_config: AgentConfig,
    ) -> Result<Cluster, ClusterError> {
        let mut catalog = Catalog::connect(catalog_dsn).await?;
        catalog.bootstrap(shards).await?;
        let routing = build(&mut catalog, &agent_config, None).await?;
        info!(epoch = %routing.map.epoch(), shards = routing.agents.len(), "loaded bucket map");
        let routing = Arc::new(routing);
        // In the background: a shard that is down must not hold up the start.
        tokio::spawn(record_ownership(routing.clone()));
        Ok(Cluster {
            catalog_dsn: catalog_dsn.to_owned(),
            agent_config,
            routing: RwLock::new(routing),
            reloading: tokio::sync::Mutex::new(None),
        })
    }

    pub fn routing(&self) -> Arc<Routing> {
        self.routing
            .read()
            .expect("invariant: routing lock is never held across a panic")
            .clone()
    }

    pub fn epoch(&self) -> Epoch {
        self.routing().map.epoch()
    }

    /// Reloads the map if the catalog's epoch moved. Agents of unchanged shards are
    /// kept, so their pools (and in-flight work) carry over.
    pub async fn refresh(&self) -> Result<bool, ClusterError> {
        let mut slot = self.reloading.lock().await;
        self.refresh_with(&mut slot).await
    }

    /// [`Cluster::refresh`] on the kept catalog connection (made again if
    /// it broke), under the reload lock, so that two reloads never race and
    /// an older map never replaces a newer one.
    async fn refresh_with(&self, slot: &mut Option<Catalog>) -> Result<bool, ClusterError> {
        let mut catalog = match slot.take() {
            Some(c) if !c.is_closed() => c,
            _ => Catalog::connect(&self.catalog_dsn).await?,
        };
        let result = async {
            if catalog.epoch().await? <= self.epoch() {
                return Ok(false);
            }
            let current = self.routing();
            let next = build(&mut catalog, &self.agent_config, Some(&current)).await?;
            info!(from = %current.map.epoch(), to = %next.map.epoch(), "bucket map changed");
            *self
                .routing
                .write()
                .expect("invariant: routing lock is never held across a panic") = Arc::new(next);
            Ok(true)
        }
        .await;
        *slot = Some(catalog);
        result
    }

    /// Reloads the map after a shard refused a write of a bucket it no longer
    /// serves (or serves only once a move's cutover ends), unless another
    /// caller already moved past `seen`, the epoch the refused call was
    /// routed with.
    pub async fn reload_after(&self, seen: Epoch) {
        let mut slot = self.reloading.lock().await;
        if self.epoch() != seen {
            return;
        }
        if let Err(e) = self.refresh_with(&mut slot).await {
            warn!(%e, "could not reload the bucket map");
        }
    }

    /// Polls the epoch forever; meant to be spawned.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.refresh().await {
                warn!(%e, "could not check the catalog epoch; keeping the current map");
            }
        }
    }
}

/// The fencing floor is read from every shard the current map knows; one shard
/// that cannot answer means no floor, so the lock service grants nothing.
impl FenceFloor for Cluster {
    fn highest_fence(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, String>> + Send + '_>> {
        Box::pin(async move {
            let routing = self.routing();
            let reads = futures::future::join_all(routing.agents.values().map(|a| a.max_fence()));
            let mut highest = 0;
            for read in reads.await {
                highest = highest.max(read.map_err(|e| format!("read the highest fence: {e}"))?);
            }
            Ok(highest)
        })
    }
}

/// Records on each shard whose ownership was never recorded the buckets the
/// catalog gives it (see `shard_agent::ownership`); shards already recorded
/// keep theirs, which only moves change.
async fn record_ownership(routing: Arc<Routing>) {
    let records = routing.agents.iter().map(|(id, agent)| {
        let buckets: Vec<u16> = routing.map.buckets_of(*id).iter().map(|b| b.0).collect();
        // A shard down now keeps serving every bucket the map gives it until
        // a later start, or the first rebalance, records them (a move records
        // every shard's first).
        let epoch = routing.map.epoch().0;
        async move {
            match agent.init_ownership(&buckets, epoch).await {
                Ok(true) => {
                    info!(shard = %id, buckets = buckets.len(), "recorded the shard's buckets")
                }
                Ok(false) => {}
                Err(e) => warn!(shard = %id, %e, "could not record the shard's buckets yet"),
            }
        }
    });
    futures::future::join_all(records).await;
}

async fn build(
    catalog: &mut Catalog,
    config: &AgentConfig,
    previous: Option<&Routing>,
) -> Result<Routing, ClusterError> {
    let (entries, map) = catalog.load().await?;
    let mut agents = BTreeMap::new();
    for entry in &entries {
        let reused = previous.and_then(|p| p.agents.get(&entry.id)).cloned();
        let agent = match reused {
            Some(a) => a,
            None => ShardAgent::new(entry.id, &entry.dsn, config.clone())?,
        };
        agents.insert(entry.id, agent);
    }
    if let Some(missing) = map.shards().into_iter().find(|s| !agents.contains_key(s)) {
        return Err(ClusterError::UnknownShard(missing));
    }
    Ok(Routing { map, agents })
}
