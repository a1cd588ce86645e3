//! The databases of one wallet cluster on running local servers: shared by
//! `wallet dev`, `wallet bench`, the test kit and the chaos harness.

use anyhow::Context;
use router::ShardId;
use shard_agent::catalog::ShardEntry;
use shard_agent::migrate::{migrate_catalog, migrate_shard};

use crate::{create_database, PgServer};

/// Creates (if missing) and migrates `<prefix>_shard<i>` for each shard, spread
/// round-robin over `servers`, and `<prefix>_catalog` on the first server.
pub async fn provision(
    servers: &[&PgServer],
    shards: usize,
    prefix: &str,
) -> anyhow::Result<(String, Vec<ShardEntry>)> {
    let first = servers
        .first()
        .context("provision needs at least one server")?;
    let catalog_db = format!("{prefix}_catalog");
    create_database(first, &catalog_db)
        .await
        .with_context(|| format!("create database {catalog_db}"))?;
    let catalog_dsn = first.dsn(&catalog_db);
    migrate_catalog(&catalog_dsn).await?;
    let mut entries = Vec::with_capacity(shards);
    for i in 0..shards {
        let server = servers[i % servers.len()];
        let db = format!("{prefix}_shard{i}");
        create_database(server, &db)
            .await
            .with_context(|| format!("create database {db}"))?;
        let dsn = server.dsn(&db);
        migrate_shard(&dsn)
            .await
            .with_context(|| format!("migrate shard {i}"))?;
        entries.push(ShardEntry {
            id: ShardId(i as u16),
            name: None,
            dsn,
            weight: 1,
        });
    }
    Ok((catalog_dsn, entries))
}
