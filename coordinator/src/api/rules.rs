//! The wallet's rules over HTTP: refunds, an admin's daily limits, and the
//! fraud rules' evaluation of a proposed transfer.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use shard_agent::money::format_money;
use shard_agent::rules::Action;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorCode, Problem};
use super::extract::{Admin, ApiJson, Auth, IdempotencyKeyHeader};
use super::money::{parse_money, submitted_response, LimitsBody, TransferBody};
use super::AppState;
use crate::inputs::Username;
use crate::service::HeldDecided;

/// Longest refund reason, in characters.
pub const REASON_MAX: usize = 500;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// The transfer to refund; the caller must be its payee.
    pub transfer_id: String,
    /// A decimal string in the transfer's currency; absent: whatever is left
    /// of the transfer.
    pub amount: Option<String>,
    /// Shown on the refund (at most 500 characters).
    pub reason: Option<String>,
}

#[utoipa::path(post, path = "/v1/refunds", tag = "transfers", request_body = RefundRequest, security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "Required. A retry with the same key and body gets the same answer.")),
    responses(
        (status = 201, description = "Refunded: the refund, a transfer of kind `refund` from the original's payee to its payer, naming the original in `refund_of`", body = super::money::TransferBody),
        (status = 400, description = "`invalid_request` (reason too long), `invalid_amount`, `missing_idempotency_key`, `invalid_idempotency_key`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`transfer_not_found`: no committed transfer with this ID credited the caller", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`request_in_progress`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`refund_exceeds_original` (with `remaining`), `insufficient_funds`, `idempotency_key_reused`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`, `shard_busy`, `lock_unavailable` (retry with the same key)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn refund(
    State(state): State<AppState>,
    auth: Auth,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    ApiJson(req): ApiJson<RefundRequest>,
) -> ApiResult<Response> {
    let of = req
        .transfer_id
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::TransferNotFound))?;
    let currency = auth.user.currency;
    let amount = req
        .amount
        .as_deref()
        .map(|a| parse_money(a, currency.code()))
        .transpose()?;
    if let Some(reason) = &req.reason {
        if reason.chars().count() > REASON_MAX {
            return Err(ApiError::detail(
                ErrorCode::InvalidRequest,
                format!("reason must be at most {REASON_MAX} characters"),
            ));
        }
    }
    let submitted = state
        .coordinator
        .refund(&auth.user, of, amount, req.reason, &key)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::TransferNotFound))?;
    submitted_response(submitted)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// The user's daily outgoing limit, a decimal string in their currency
    /// (`"0"` stops their transfers); `null` removes the override, so the
    /// configured default applies again.
    pub daily: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UserLimitsBody {
    pub username: String,
    pub currency: String,
    pub limits: LimitsBody,
}

#[utoipa::path(put, path = "/v1/admin/users/{username}/limits", tag = "admin", request_body = LimitsRequest, security(("admin" = [])),
    params(("username" = String, Path, description = "The user whose limit to set")),
    responses(
        (status = 200, description = "The user's limits as they now apply", body = UserLimitsBody),
        (status = 400, description = "`invalid_request`, `invalid_amount` (not a non-negative amount in the user's currency)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: not the admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`user_not_found`; `not_found` when no admin token is configured", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_limits(
    State(state): State<AppState>,
    _admin: Admin,
    Path(username): Path<String>,
    ApiJson(req): ApiJson<LimitsRequest>,
) -> ApiResult<Response> {
    let username =
        Username::parse(&username).map_err(|_| ApiError::new(ErrorCode::UserNotFound))?;
    let daily = req
        .daily
        .as_deref()
        .map(|d| {
            d.parse::<Decimal>()
                .ok()
                .filter(|v| !v.is_sign_negative())
                .ok_or_else(|| {
                    ApiError::detail(
                        ErrorCode::InvalidAmount,
                        "daily must be a non-negative decimal string",
                    )
                })
        })
        .transpose()?;
    let row = state
        .coordinator
        .set_daily_limit(&username, daily)
        .await?
        .map_err(|currency| {
            ApiError::detail(
                ErrorCode::InvalidAmount,
                format!(
                    "daily must be an amount in {currency} with at most {} decimals",
                    currency.scale()
                ),
            )
        })?
        .ok_or_else(|| ApiError::new(ErrorCode::UserNotFound))?;
    let daily = row
        .daily_limit
        .or_else(|| state.coordinator.rules().daily_limit(row.currency));
    Ok(axum::Json(UserLimitsBody {
        username: username.as_str().to_owned(),
        currency: row.currency.code().to_owned(),
        limits: LimitsBody::new(daily, row.used_today, row.currency),
    })
    .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FraudDetectionRequest {
    /// The payer's username.
    pub from: String,
    /// The recipient's username.
    pub to: String,
    pub amount: String,
    pub currency: String,
}

#[derive(Serialize, ToSchema)]
pub struct FraudDetectionBody {
    /// `allow`, `review` (the transfer would be held) or `block`.
    pub decision: String,
    /// The rule that decided; absent for `allow`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The amount as evaluated, at the currency's scale.
    pub amount: String,
    pub currency: String,
}

#[utoipa::path(post, path = "/v1/fraud_detection", tag = "admin", request_body = FraudDetectionRequest, security(("admin" = [])),
    responses(
        (status = 200, description = "What the fraud rules would decide for this transfer now; nothing moves", body = FraudDetectionBody),
        (status = 400, description = "`invalid_request`, `invalid_amount`, `unsupported_currency`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: not the admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`user_not_found` (the payer); `not_found` when no admin token is configured", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn fraud_detection(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(req): ApiJson<FraudDetectionRequest>,
) -> ApiResult<Response> {
    let amount = parse_money(&req.amount, &req.currency)?;
    let from = Username::parse(&req.from).map_err(|_| ApiError::new(ErrorCode::UserNotFound))?;
    let to = Username::parse(&req.to)
        .map_err(|_| ApiError::detail(ErrorCode::InvalidRequest, "`to` is not a username"))?;
    let hit = state
        .coordinator
        .fraud_detection(&from, &to, amount)
        .await?;
    let (decision, rule) = match hit {
        None => ("allow", None),
        Some(hit) => (
            match hit.action {
                Action::Block => "block",
                Action::Review => "review",
            },
            Some(hit.rule),
        ),
    };
    Ok(axum::Json(FraudDetectionBody {
        decision: decision.to_owned(),
        rule,
        amount: format_money(amount.value(), amount.currency()),
        currency: amount.currency().code().to_owned(),
    })
    .into_response())
}

fn held_answer(decided: Option<HeldDecided>) -> ApiResult<Response> {
    match decided.ok_or_else(|| ApiError::new(ErrorCode::TransferNotFound))? {
        HeldDecided::Now(r) => Ok(axum::Json(TransferBody::from_record(&r)).into_response()),
        HeldDecided::NotHeld(r) => Err(ApiError {
            transfer_id: Some(r.transfer_id.to_string()),
            ..ApiError::detail(
                ErrorCode::TransferNotHeld,
                format!("the transfer is {}", TransferBody::from_record(&r).status),
            )
        }),
        HeldDecided::Refused(code) => Err(ApiError::new(ErrorCode::from_failure(code))),
    }
}

fn transfer_id(id: &str) -> ApiResult<shard_agent::TransferId> {
    id.parse()
        .map_err(|_| ApiError::new(ErrorCode::TransferNotFound))
}

#[utoipa::path(post, path = "/v1/admin/transfers/{id}/release", tag = "admin", security(("admin" = [])),
    params(("id" = String, Path, description = "A transfer held for review")),
    responses(
        (status = 200, description = "Released: the transfer is committed, its money with the payee", body = TransferBody),
        (status = 401, description = "`unauthorized`: not the admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`transfer_not_found`; `not_found` when no admin token is configured", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`transfer_not_held`: released, rejected or expired before (`detail` says which)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`limit_exceeded`: the payer's day has no room left for it (it counts when it moves); reject it, or release it another day", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`, `shard_busy`, `lock_unavailable` (retry)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn release(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    held_answer(state.coordinator.release_held(transfer_id(&id)?).await?)
}

#[utoipa::path(post, path = "/v1/admin/transfers/{id}/reject", tag = "admin", security(("admin" = [])),
    params(("id" = String, Path, description = "A transfer held for review")),
    responses(
        (status = 200, description = "Rejected: aborted `transfer_rejected`, the money back in the payer's available balance", body = TransferBody),
        (status = 401, description = "`unauthorized`: not the admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`transfer_not_found`; `not_found` when no admin token is configured", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`transfer_not_held`: released, rejected or expired before (`detail` says which)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn reject(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    held_answer(state.coordinator.reject_held(transfer_id(&id)?).await?)
}
