//! The HTTP API. [`app`] builds the router from state, so tests can drive it
//! without a socket; [`serve`] runs it with its connection bounds and graceful
//! shutdown.

pub mod disputes;
pub mod error;
pub mod extract;
pub mod limits;
pub mod money;
pub mod notifications;
pub mod ops;
pub mod rules;
pub mod server;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post, put};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Config;
use crate::service::Coordinator;

#[derive(Clone)]
pub struct AppState {
    pub coordinator: Arc<Coordinator>,
    pub admin_token: Option<Arc<str>>,
    pub limiters: Arc<limits::Limiters>,
}

impl AppState {
    /// State for `coordinator` under `config`'s admin token and rate limits.
    pub fn new(coordinator: Arc<Coordinator>, config: &Config) -> AppState {
        AppState {
            coordinator,
            admin_token: config.admin_token.as_deref().map(Arc::from),
            limiters: Arc::new(limits::Limiters::new(
                &config.rate_limits,
                config.http.trusted_client_ip_header.clone(),
            )),
        }
    }
}

/// The routes and every per-request bound of `config` (see [`server`] for the
/// order they apply in).
pub fn app(state: AppState, config: &Config) -> Router {
    let bounds = server::RequestBounds {
        body_bytes_max: config.limits.request_body_bytes_max,
        body_read_timeout: Duration::from_millis(config.http.body_read_timeout_ms),
        request_timeout: Duration::from_millis(config.http.request_timeout_ms),
    };
    let auth_routes = Router::new()
        .route("/v1/user", post(users::sign_up))
        .route("/v1/login", post(users::log_in))
        .route_layer(from_fn_with_state(state.clone(), limits::per_address));
    let money_routes = Router::new()
        .route("/v1/account", get(money::account))
        .route("/v1/transfer", post(money::transfer))
        .route("/v1/transfer/{id}", get(money::get_transfer))
        .route("/v1/deposit", post(money::deposit))
        .route("/v1/withdrawal", post(money::withdrawal))
        .route("/v1/refunds", post(rules::refund))
        .route("/v1/disputes", post(disputes::open))
        .route("/v1/disputes/{id}", get(disputes::get))
        .route("/v1/notifications", get(notifications::list))
        .route_layer(from_fn_with_state(state.clone(), limits::per_user));
    Router::new()
        .merge(auth_routes)
        .merge(money_routes)
        .route("/v1/logout", post(users::log_out))
        .route("/v1/admin/in-doubt", get(ops::in_doubt))
        .route("/v1/admin/users/{username}/limits", put(rules::set_limits))
        .route("/v1/fraud_detection", post(rules::fraud_detection))
        .route("/v1/admin/disputes/{id}/resolve", post(disputes::resolve))
        .route("/v1/admin/transfers/{id}/release", post(rules::release))
        .route("/v1/admin/transfers/{id}/reject", post(rules::reject))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ops::openapi_doc()))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state)
        // Innermost first. One semaphore shared by every route.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.limits.concurrent_requests_max,
        ))
        // Enforced again by the body extractors, so an oversized body always
        // gets problem+json.
        .layer(axum::extract::DefaultBodyLimit::max(
            config.limits.request_body_bytes_max,
        ))
        .layer(from_fn_with_state(bounds, server::read_body))
        .layer(from_fn(server::record))
        .layer(from_fn_with_state(bounds, server::whole_request))
        .layer(from_fn(server::problems_only))
        .layer(CatchPanicLayer::custom(|_| {
            use axum::response::IntoResponse;
            error::ApiError::new(error::ErrorCode::Internal).into_response()
        }))
        .layer(TraceLayer::new_for_http())
}

pub use server::serve;
