//! Applies the SQL in `sql/` (embedded at build time) to a shard or to the catalog.

use crate::tls::ConnectError;

mod shard_migrations {
    refinery::embed_migrations!("../sql/shard");
}

mod catalog_migrations {
    refinery::embed_migrations!("../sql/catalog");
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("connect to {what} for migrations: {source}")]
    Connect {
        what: &'static str,
        #[source]
        source: ConnectError,
    },
    #[error("migrate {what}: {source}")]
    Migrate {
        what: &'static str,
        #[source]
        source: refinery::Error,
    },
}

/// Brings a shard database up to the newest schema. Idempotent.
pub async fn migrate_shard(dsn: &str) -> Result<(), MigrateError> {
    let mut client = connect(dsn, "shard").await?;
    shard_migrations::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(|source| MigrateError::Migrate {
            what: "shard",
            source,
        })?;
    Ok(())
}

/// Brings the catalog database up to the newest schema. Idempotent.
pub async fn migrate_catalog(dsn: &str) -> Result<(), MigrateError> {
    let mut client = connect(dsn, "catalog").await?;
    catalog_migrations::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(|source| MigrateError::Migrate {
            what: "catalog",
            source,
        })?;
    Ok(())
}

async fn connect(dsn: &str, what: &'static str) -> Result<tokio_postgres::Client, MigrateError> {
    let (client, connection) = crate::tls::connect(dsn)
        .await
        .map_err(|source| MigrateError::Connect { what, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%e, "migration connection closed");
        }
    });
    Ok(client)
}
