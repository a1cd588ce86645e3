//! The catalog: the durable shard list and bucket -> shard table, with an epoch.
//!
//! Every coordinator loads the map from here at start and polls the epoch, so a
//! future rebalance (which bumps the epoch) reaches all of them without a restart.

use router::{Epoch, ShardId, ShardMap, ShardWeight, BUCKET_COUNT};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::tls::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog unreachable: {0}")]
    Unavailable(#[source] ConnectError),
    #[error("catalog query failed ({context}): {source}")]
    Query {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("catalog is inconsistent: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    Router(#[from] router::RouterError),
}

/// One shard as the catalog records it. `dsn` is kept as written, an
/// `env:`/`file:` reference included (resolved when connecting), so the
/// catalog need never hold a password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub id: ShardId,
    /// What operators call the shard (`wallet shards`); `shard<id>` if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub dsn: String,
    pub weight: u32,
}

impl ShardEntry {
    /// The shard's name, `shard<id>` unless one was given.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("shard{}", self.id.0))
    }
}

/// Shows the DSN redacted: entries end up in logs and in `Config`'s Debug.
impl std::fmt::Debug for ShardEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardEntry")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("dsn", &crate::dsn::redact(&self.dsn))
            .field("weight", &self.weight)
            .finish()
    }
}

/// A catalog connection, its connection task spawned.
pub(crate) async fn connect_client(dsn: &str) -> Result<Client, CatalogError> {
    let (client, connection) = crate::tls::connect(dsn)
        .await
        .map_err(CatalogError::Unavailable)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(%e, "catalog connection closed");
        }
    });
    Ok(client)
}

pub struct Catalog {
    client: Client,
}

impl Catalog {
    pub async fn connect(dsn: &str) -> Result<Catalog, CatalogError> {
        Ok(Catalog {
            client: connect_client(dsn).await?,
        })
    }

    /// Whether the connection is gone (make a new one).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// On an empty catalog, records `shards` and places every bucket with the
    /// consistent-hash ring at epoch 1. On a populated one, changes nothing: the
    /// stored map wins over configuration (shards are added by rebalancing, which
    /// moves data; editing a config file must never silently re-route users).
    pub async fn bootstrap(&mut self, shards: &[ShardEntry]) -> Result<(), CatalogError> {
        let q = |context| move |source| CatalogError::Query { context, source };
        let txn = self
            .client
            .transaction()
            .await
            .map_err(q("begin bootstrap"))?;
        txn.batch_execute("LOCK TABLE catalog_epoch IN EXCLUSIVE MODE")
            .await
            .map_err(q("lock catalog"))?;
        let populated = txn
            .query_opt("SELECT epoch FROM catalog_epoch", &[])
            .await
            .map_err(q("read epoch"))?
            .is_some();
        if populated {
            return Ok(());
        }
        let weights: Vec<ShardWeight> = shards
            .iter()
            .map(|s| ShardWeight {
                shard: s.id,
                weight: s.weight,
            })
            .collect();
        let map = ShardMap::from_weights(Epoch(1), &weights)?;
        for s in shards {
            txn.execute(
                "INSERT INTO shards (shard_id, name, dsn, weight) VALUES ($1, $2, $3, $4)",
                &[&i32::from(s.id.0), &s.name(), &s.dsn, &(s.weight as i32)],
            )
            .await
            .map_err(q("insert shard"))?;
        }
        let buckets: Vec<i32> = (0..i32::from(BUCKET_COUNT)).collect();
        let owners: Vec<i32> = map.table().iter().map(|s| i32::from(s.0)).collect();
        txn.execute(
            "INSERT INTO bucket_map (bucket, shard_id, epoch)
             SELECT b, s, 1 FROM unnest($1::int[], $2::int[]) AS t(b, s)",
            &[&buckets, &owners],
        )
        .await
        .map_err(q("insert bucket map"))?;
        txn.execute("INSERT INTO catalog_epoch (epoch) VALUES (1)", &[])
            .await
            .map_err(q("insert epoch"))?;
        txn.commit().await.map_err(q("commit bootstrap"))?;
        Ok(())
    }

    pub async fn epoch(&self) -> Result<Epoch, CatalogError> {
        let row = self
            .client
            .query_opt("SELECT epoch FROM catalog_epoch", &[])
            .await
            .map_err(|source| CatalogError::Query {
                context: "read epoch",
                source,
            })?
            .ok_or_else(|| {
                CatalogError::Inconsistent("catalog has no epoch; bootstrap it first".into())
            })?;
        Ok(Epoch(row.get::<_, i64>(0) as u64))
    }

    /// Reads the shard list and the bucket map as of one snapshot.
    pub async fn load(&mut self) -> Result<(Vec<ShardEntry>, ShardMap), CatalogError> {
        let q = |context| move |source| CatalogError::Query { context, source };
        let txn = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(q("begin load"))?;
        let epoch_row = txn
            .query_opt("SELECT epoch FROM catalog_epoch", &[])
            .await
            .map_err(q("read epoch"))?
            .ok_or_else(|| {
                CatalogError::Inconsistent("catalog has no epoch; bootstrap it first".into())
            })?;
        let epoch = Epoch(epoch_row.get::<_, i64>(0) as u64);
        let shards = txn
            .query("SELECT shard_id, name, dsn, weight FROM shards WHERE state <> 'removed' ORDER BY shard_id", &[])
            .await
            .map_err(q("read shards"))?
            .iter()
            .map(|r| ShardEntry {
                id: ShardId(r.get::<_, i32>("shard_id") as u16),
                name: Some(r.get("name")),
                dsn: r.get("dsn"),
                weight: r.get::<_, i32>("weight") as u32,
            })
            .collect::<Vec<_>>();
        let rows = txn
            .query(
                "SELECT bucket, shard_id FROM bucket_map ORDER BY bucket",
                &[],
            )
            .await
            .map_err(q("read bucket map"))?;
        let mut table = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            if r.get::<_, i32>("bucket") as usize != i {
                return Err(CatalogError::Inconsistent(format!(
                    "bucket {i} missing from bucket_map"
                )));
            }
            let owner = ShardId(r.get::<_, i32>("shard_id") as u16);
            if !shards.iter().any(|s| s.id == owner) {
                return Err(CatalogError::Inconsistent(format!(
                    "bucket {i} owned by unknown shard {owner}"
                )));
            }
            table.push(owner);
        }
        let map = ShardMap::from_table(epoch, table)?;
        txn.commit().await.map_err(q("end load"))?;
        Ok((shards, map))
    }
}
