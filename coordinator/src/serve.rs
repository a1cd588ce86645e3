//! `wallet serve`: the API against shards someone else runs.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use shard_agent::migrate::{migrate_catalog, migrate_shard};

use crate::api::{self, AppState};
use crate::config::Config;
use crate::payments::ProviderConfig;
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
    let provider = match &config.payment_provider {
        None => anyhow::bail!(
            "payment_provider is not set: choose {{\"type\": \"http\", \"base_url\": …, \"api_key\": …}} \
             for real money, or {{\"type\": \"sandbox\"}} for test money (anyone can deposit any amount)"
        ),
        Some(ProviderConfig::Sandbox) => {
            tracing::warn!(
                "payment_provider is SANDBOX: any signed-up user can deposit any amount of test money; \
                 never use it where balances are worth anything"
            );
            ProviderConfig::Sandbox.build()?
        }
        Some(other) => other.build()?,
    };
    let coordinator = Arc::new(Coordinator::start(config, provider).await?);
    on_ready();
    serve_coordinator(listener, coordinator, config, shutdown).await?;
    Ok(())
}

/// Serves the API of a started `coordinator` on `listener`, with every bound of
/// `config`, until `shutdown` resolves and in-flight requests drained. The one
/// way the API is served: `wallet serve`, `wallet dev`, the tests and the bench.
pub async fn serve_coordinator(
    listener: tokio::net::TcpListener,
    coordinator: Arc<Coordinator>,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState::new(coordinator, config);
    let sweeper = state.limiters.sweep_forever();
    let router = api::app(state, config);
    let served = api::serve(listener, router, &config.http, shutdown).await;
    sweeper.abort();
    served
}

/// Resolves on Ctrl-C or SIGTERM: how `wallet serve` and `wallet dev` are stopped.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
