//! The HTTP API. [`app`] builds the router from state, so tests can drive it
//! without a socket; [`serve`] runs it with graceful shutdown.

pub mod error;
pub mod extract;
pub mod money;
pub mod ops;
pub mod users;

use std::future::Future;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::service::Coordinator;

#[derive(Clone)]
pub struct AppState {
    pub coordinator: Arc<Coordinator>,
    pub admin_token: Option<Arc<str>>,
}

pub fn app(state: AppState, body_bytes_max: usize, concurrent_requests_max: usize) -> Router {
    Router::new()
        .route("/v1/user", post(users::sign_up))
        .route("/v1/login", post(users::log_in))
        .route("/v1/logout", post(users::log_out))
        .route("/v1/account", get(money::account))
        .route("/v1/transfer", post(money::transfer))
        .route("/v1/transfer/{id}", get(money::get_transfer))
        .route("/v1/deposit", post(money::deposit))
        .route("/v1/withdrawal", post(money::withdrawal))
        .route("/v1/admin/in-doubt", get(ops::in_doubt))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(ops::openapi))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state)
        // Enforced by the body extractors, so an oversized body gets problem+json.
        .layer(axum::extract::DefaultBodyLimit::max(body_bytes_max))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            concurrent_requests_max,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            use axum::response::IntoResponse;
            error::ApiError::new(error::ErrorCode::Internal).into_response()
        }))
        .layer(TraceLayer::new_for_http())
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
