//! Disputes: a payer contests a transfer (its amount is held on the payee's
//! account), both parties read it, an admin resolves it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shard_agent::disputes::Dispute;
use shard_agent::money::format_money;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorCode, Problem};
use super::extract::{Admin, ApiJson, Auth};
use super::AppState;
use crate::service::{DisputeOpen, DisputeResolved};

/// Longest dispute reason, in characters.
pub const REASON_MAX: usize = 500;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisputeRequest {
    /// The transfer to dispute; the caller must be its payer.
    pub transfer_id: String,
    /// Why (1-500 characters).
    pub reason: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// `refund`: the held money goes back to the payer; `reject`: the hold is
    /// released and the payee keeps the money.
    pub outcome: String,
}

#[derive(Serialize, ToSchema)]
pub struct DisputeBody {
    pub dispute_id: String,
    /// The disputed transfer.
    pub transfer_id: String,
    /// open, refunded or rejected.
    pub status: String,
    /// What the dispute holds on the payee's account: the transfer's amount
    /// less its refunds when the dispute was opened.
    pub amount: String,
    pub currency: String,
    pub reason: String,
    /// The transfer's payer, who opened the dispute.
    pub payer: String,
    /// The transfer's payee, whose account holds the amount while it is open.
    pub payee: String,
    pub created_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// A refunded dispute: the transfer that gave the money back.
    pub refund_transfer_id: Option<String>,
}

impl DisputeBody {
    fn from(d: &Dispute) -> DisputeBody {
        DisputeBody {
            dispute_id: d.dispute_id.to_string(),
            transfer_id: d.transfer_id.to_string(),
            status: d.state.as_str().to_owned(),
            amount: format_money(d.amount, d.currency),
            currency: d.currency.code().to_owned(),
            reason: d.reason.clone(),
            payer: d.payer_username.clone(),
            payee: d.payee_username.clone(),
            created_at: d.created_at,
            resolved_at: d.resolved_at,
            refund_transfer_id: d.refund_id.map(|t| t.to_string()),
        }
    }
}

fn with_dispute(code: ErrorCode, d: &Dispute) -> ApiError {
    ApiError::detail(code, format!("dispute {}", d.dispute_id))
}

#[utoipa::path(post, path = "/v1/disputes", tag = "disputes", request_body = DisputeRequest, security(("bearer" = [])),
    responses(
        (status = 201, description = "Opened: the amount is held on the payee's account", body = DisputeBody),
        (status = 400, description = "`invalid_request` (reason empty or too long)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`transfer_not_found`: no committed transfer with this ID paid by the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`dispute_exists`: the transfer has an open dispute (its ID is in `detail`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`dispute_window_passed` (older than the configured window), `nothing_to_dispute` (refunded in full)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn open(
    State(state): State<AppState>,
    auth: Auth,
    ApiJson(req): ApiJson<DisputeRequest>,
) -> ApiResult<Response> {
    let of = req
        .transfer_id
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::TransferNotFound))?;
    let reason = req.reason.trim();
    if reason.is_empty() || reason.chars().count() > REASON_MAX {
        return Err(ApiError::detail(
            ErrorCode::InvalidRequest,
            format!("reason must be 1-{REASON_MAX} characters"),
        ));
    }
    let opened = state
        .coordinator
        .open_dispute(&auth.user, of, reason)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::TransferNotFound))?;
    match opened {
        DisputeOpen::Opened(d) => {
            Ok((StatusCode::CREATED, axum::Json(DisputeBody::from(&d))).into_response())
        }
        DisputeOpen::Exists(d) => Err(with_dispute(ErrorCode::DisputeExists, &d)),
        DisputeOpen::NothingToDispute => Err(ApiError::new(ErrorCode::NothingToDispute)),
        DisputeOpen::WindowPassed => Err(ApiError::new(ErrorCode::DisputeWindowPassed)),
    }
}

fn dispute_id(id: &str) -> ApiResult<uuid::Uuid> {
    id.parse()
        .map_err(|_| ApiError::new(ErrorCode::DisputeNotFound))
}

#[utoipa::path(get, path = "/v1/disputes/{id}", tag = "disputes", security(("bearer" = [])),
    params(("id" = String, Path, description = "The dispute ID")),
    responses(
        (status = 200, body = DisputeBody),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`dispute_not_found`: no such dispute, or the caller is neither its payer nor its payee", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let d = state
        .coordinator
        .dispute(&auth.user, dispute_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::DisputeNotFound))?;
    Ok(axum::Json(DisputeBody::from(&d)).into_response())
}

#[utoipa::path(post, path = "/v1/admin/disputes/{id}/resolve", tag = "admin", request_body = ResolveRequest, security(("admin" = [])),
    params(("id" = String, Path, description = "The dispute ID")),
    responses(
        (status = 200, description = "Resolved: the dispute as it now stands", body = DisputeBody),
        (status = 400, description = "`invalid_request` (outcome is not refund or reject)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: not the admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`dispute_not_found`; `not_found` when no admin token is configured", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`dispute_resolved`: already refunded or rejected; `request_in_progress`: its refund is still being decided", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`insufficient_funds`: the payee's balance does not cover the refund (reject, or try again later)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`, `shard_busy`, `lock_unavailable` (retry)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resolve(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ResolveRequest>,
) -> ApiResult<Response> {
    let refund = match req.outcome.as_str() {
        "refund" => true,
        "reject" => false,
        _ => {
            return Err(ApiError::detail(
                ErrorCode::InvalidRequest,
                "outcome must be \"refund\" or \"reject\"",
            ))
        }
    };
    let resolved = state
        .coordinator
        .resolve_dispute(dispute_id(&id)?, refund)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::DisputeNotFound))?;
    match resolved {
        DisputeResolved::Now(d) => Ok(axum::Json(DisputeBody::from(&d)).into_response()),
        DisputeResolved::Already(d) => Err(with_dispute(ErrorCode::DisputeResolved, &d)),
        DisputeResolved::Refused(code) => Err(ApiError::new(ErrorCode::from_failure(code))),
        DisputeResolved::InProgress => Err(ApiError::new(ErrorCode::RequestInProgress)),
    }
}
