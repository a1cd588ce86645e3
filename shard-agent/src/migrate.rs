//! Applies the SQL in `sql/` (embedded at build time) to a shard or to the catalog.
//!
//! A shard gets its versioned migrations (`sql/shard/V*.sql`: tables, indexes,
//! data), then its functions (`sql/shard/functions/`, see [`crate::functions`]).
//! refinery refuses to run when a migration it already applied has changed.
//! V4-V11 were edited once, when their functions moved to their own files: a
//! database migrated before that edit is refused, which was acceptable because
//! no such database is kept (there was no deployment; dev and test databases
//! are created fresh). A migration once released is never edited again.

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
    #[error("apply the shard's SQL functions: {0}")]
    Functions(#[source] crate::functions::ApplyError),
}

/// Brings a shard database up to the newest schema, then to this build's SQL
/// functions. Idempotent. Refuses ([`crate::functions::ApplyError::Newer`]) a
/// shard whose functions a newer build applied.
pub async fn migrate_shard(dsn: &str) -> Result<crate::functions::Applied, MigrateError> {
    let mut client = connect(dsn, "shard").await?;
    shard_migrations::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(|source| MigrateError::Migrate {
            what: "shard",
            source,
        })?;
    crate::functions::apply(&mut client)
        .await
        .map_err(MigrateError::Functions)
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
