//! `wallet serve`: the API against shards someone else runs.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use shard_agent::migrate::{migrate_catalog, migrate_shard};

use crate::api::{self, AppState};
use crate::config::Config;
use crate::payments::Sandbox;
use crate::service::Coordinator;

/// Applies migrations (unless `migrate` is false), starts the coordinator and
/// serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    migrate: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if migrate {
        migrate_catalog(&config.catalog_dsn).await?;
        for shard in &config.shards {
            migrate_shard(&shard.dsn)
                .await
                .with_context(|| format!("migrate shard {}", shard.id))?;
        }
    }
    serve(&config, || {
        tracing::info!(listen = %config.listen, shards = config.shards.len(), lock_mode = config.lock_mode.as_str(), "serving")
    }, shutdown)
    .await
}

/// Binds `config.listen`, starts the coordinator, calls `on_ready`, and serves
/// until `shutdown` resolves. Shared by `wallet serve` and `wallet dev`.
pub async fn serve(
    config: &Config,
    on_ready: impl FnOnce(),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let coordinator = Arc::new(Coordinator::start(config, Arc::new(Sandbox::default())).await?);
    on_ready();
    let router = api::app(
        AppState {
            coordinator,
            admin_token: config.admin_token.as_deref().map(Arc::from),
        },
        config.limits.request_body_bytes_max,
        config.limits.concurrent_requests_max,
    );
    api::serve(listener, router, shutdown).await?;
    Ok(())
}
