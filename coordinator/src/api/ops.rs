//! Health, readiness, the admin view of in-doubt transactions, and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorCode, Problem};
use super::extract::Admin;
use super::AppState;
use crate::config::LockMode;

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct ShardReadiness {
    pub shard: u16,
    pub ok: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// "ready" when every shard answers, else "degraded".
    pub status: &'static str,
    /// How cross-shard transfers are carried out: "2pc" or "redis".
    pub lock_mode: &'static str,
    /// In Redis-lock mode: whether Redis answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_ok: Option<bool>,
    /// The bucket map's epoch.
    pub epoch: u64,
    pub shards: Vec<ShardReadiness>,
    /// The event relay: its mode, the broker's connection, and how far
    /// behind it is. Lag never makes the coordinator unready: transfers do
    /// not wait for the broker.
    pub events: crate::events::EventsReadiness,
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
pub async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = Readiness), (status = 503, description = "A shard does not answer", body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let routing = state.coordinator.cluster().routing();
    let checks = futures::future::join_all(routing.agents.values().map(|a| async move {
        ShardReadiness {
            shard: a.id().0,
            ok: a.ping().await.is_ok(),
        }
    }))
    .await;
    let mode = state.coordinator.lock_mode();
    let redis_ok = match (mode, state.coordinator.locks()) {
        (LockMode::Redis, Some(locks)) => Some(locks.ping().await.is_ok()),
        (LockMode::Redis, None) => Some(false),
        (LockMode::TwoPc, _) => None,
    };
    let ready = checks.iter().all(|c| c.ok) && redis_ok != Some(false);
    let body = Readiness {
        status: if ready { "ready" } else { "degraded" },
        lock_mode: mode.as_str(),
        redis_ok,
        epoch: routing.map.epoch().0,
        shards: checks,
        events: state.coordinator.relay().readiness(),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// In-doubt prepared transactions, as the last recovery pass saw them.
#[utoipa::path(get, path = "/v1/admin/in-doubt", tag = "ops", security(("admin" = [])),
    responses(
        (status = 200, description = "Recovery status: per-shard count and oldest age of our prepared transactions, and (Redis-lock mode) of pending credits older than in_doubt_after, with how many failed an attempt"),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: no admin token configured", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn in_doubt(State(state): State<AppState>, _admin: Admin) -> ApiResult<Response> {
    let status = state.coordinator.recovery().status();
    Ok(axum::Json(serde_json::json!({
        "in_doubt": status.in_doubt_count(),
        "oldest_in_doubt_ms": status.oldest_age_ms(),
        "pending_credits_in_doubt": status.pending_credit_count(),
        "recovery": status,
    }))
    .into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound)
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed)
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Wallet transfer coordinator", description = "Sharded wallet: users, accounts, idempotent cross-shard transfers. Every error is application/problem+json with a stable `code` (see the ErrorCode schema)."),
    paths(
        super::users::sign_up, super::users::log_in, super::users::log_out,
        super::money::account, super::money::transfer, super::money::get_transfer,
        super::notifications::list,
        super::money::deposit, super::money::withdrawal,
        super::rules::refund, super::rules::set_limits, super::rules::fraud_detection,
        super::disputes::open, super::disputes::get, super::disputes::resolve,
        super::rules::release, super::rules::reject,
        healthz, readyz, in_doubt, metrics,
    ),
    components(schemas(Problem, ErrorCode)),
    modifiers(&SecurityAddon, &ServerBounds),
)]
pub struct ApiDoc;

/// The answers every route may give because of the server's own bounds
/// (`api::server`, `api::limits`), added to each operation that does not
/// document them itself, so the document lists every status a client can see.
struct ServerBounds;

impl utoipa::Modify for ServerBounds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::content::ContentBuilder;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::{Ref, ResponseBuilder};
        let problem = |description: &str, retry_after: bool| {
            let mut response = ResponseBuilder::new().description(description).content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            );
            if retry_after {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .description(Some("Seconds to wait before retrying"))
                        .build(),
                );
            }
            response.build()
        };
        let common = [
            (
                "400",
                "`invalid_request`: a query string, path or body that does not parse",
                false,
            ),
            (
                "408",
                "`request_timeout`: the body did not arrive within `http.body_read_timeout_ms`",
                false,
            ),
            (
                "413",
                "`payload_too_large`: the body exceeds `limits.request_body_bytes_max`",
                false,
            ),
            ("429", "`rate_limited`: see Retry-After", true),
            (
                "503",
                "`overloaded` (a server bound), or a shard or lock code; see Retry-After",
                true,
            ),
            (
                "504",
                "`gateway_timeout`: the request exceeded `http.request_timeout_ms`",
                false,
            ),
        ];
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                (item.get.as_mut(), false),
                (item.post.as_mut(), true),
                (item.put.as_mut(), true),
                (item.delete.as_mut(), false),
                (item.patch.as_mut(), true),
            ];
            for (op, has_body) in operations {
                let Some(op) = op else { continue };
                let responses = &mut op.responses.responses;
                for (status, description, retry_after) in common {
                    responses
                        .entry(status.to_owned())
                        .or_insert_with(|| problem(description, retry_after).into());
                }
                responses
                    .entry("405".to_owned())
                    .or_insert_with(|| problem("`method_not_allowed`", false).into());
                if has_body {
                    responses.entry("415".to_owned()).or_insert_with(|| {
                        problem("`unsupported_media_type`: send application/json", false).into()
                    });
                }
            }
        }
    }
}

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer =
            || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        components.add_security_scheme("bearer", bearer());
        components.add_security_scheme("admin", bearer());
    }
}

/// The OpenAPI document, served at `/openapi.json` and rendered at `/docs`.
pub fn openapi_doc() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    ApiDoc::openapi()
}

/// Prometheus text: requests, transfers, groups, in-doubt, recovery, pools,
/// rate-limit refusals (README lists the series).
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = crate::metrics::render(&state.coordinator);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
