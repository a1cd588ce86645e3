//! Account view, transfers, deposits and withdrawals.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use shard_agent::external::Direction;
use shard_agent::money::format_money;
use shard_agent::records::UserRow;
use shard_agent::transfer::Submitted;
use shard_agent::{Amount, Currency, FailureCode, TransferKind, TransferRecord, TransferState};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiResult, ErrorCode, Problem};
use super::extract::{ApiJson, Auth, IdempotencyKeyHeader, TransferPayer};
use super::AppState;
use crate::inputs::Username;
use crate::service::Payer;

pub const ACCOUNT_PAGE_DEFAULT: i64 = 50;

#[derive(Deserialize, IntoParams)]
pub struct AccountQuery {
    /// Entries per page, 1-200 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct EntryBody {
    pub transfer_id: String,
    /// transfer, deposit, withdrawal, refund, hold (a dispute holds money:
    /// the balance is unchanged, `available` drops), release (the hold ends)
    /// or dispute_refund. The sign of `amount` says which way the money went.
    pub kind: String,
    /// Signed: negative amounts left the account.
    pub amount: String,
    pub balance_after: String,
    pub counterparty: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A user's daily outgoing limit (transfers only; the day is UTC).
#[derive(Serialize, ToSchema)]
pub struct LimitsBody {
    /// The limit: an admin's override, else the configured default for the
    /// currency; `null` when there is none.
    pub daily: Option<String>,
    /// What transfers took out today.
    pub used_today: String,
    /// `daily - used_today` (never below zero); `null` without a limit.
    pub remaining: Option<String>,
}

impl LimitsBody {
    pub fn new(daily: Option<Decimal>, used_today: Decimal, currency: Currency) -> LimitsBody {
        LimitsBody {
            daily: daily.map(|d| format_money(d, currency)),
            used_today: format_money(used_today, currency),
            remaining: daily.map(|d| format_money((d - used_today).max(Decimal::ZERO), currency)),
        }
    }
}

/// The kind of a ledger entry as the API shows it.
fn entry_kind(kind: &str) -> String {
    match kind {
        "transfer_debit" | "transfer_credit" => "transfer",
        "refund_debit" | "refund_credit" => "refund",
        "dispute_refund_debit" | "dispute_refund_credit" => "dispute_refund",
        other => other,
    }
    .to_owned()
}

#[derive(Serialize, ToSchema)]
pub struct AccountBody {
    pub user_id: String,
    pub username: String,
    pub currency: String,
    pub balance: String,
    /// The balance less the money held on it (withdrawals waiting on their
    /// provider): what transfers may spend.
    pub available: String,
    pub limits: LimitsBody,
    /// Newest first.
    pub transactions: Vec<EntryBody>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// The recipient's username.
    pub to: String,
    /// A decimal string, e.g. "12.50"; at most the currency's decimal places.
    pub amount: String,
    pub currency: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalRequest {
    pub amount: String,
    pub currency: String,
    /// Sandbox tokens: `sandbox_ok`, `sandbox_declined`, `sandbox_timeout`.
    pub payment_token: String,
}

#[derive(Serialize, ToSchema)]
pub struct TransferBody {
    pub transfer_id: String,
    /// committed, aborted, preparing, or held (for review by a fraud rule).
    pub status: String,
    /// transfer, deposit or withdrawal.
    pub kind: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub amount: String,
    pub currency: String,
    pub created_at: DateTime<Utc>,
    /// Why an aborted transfer failed (an error code).
    pub failure_code: Option<String>,
    /// A refund: the transfer it gives money back from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_of: Option<String>,
    /// A refund: the reason its payer gave.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A held transfer: the fraud rule that holds it for review.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A committed transfer, in `GET /v1/transfer/{id}`: its refunds, oldest
    /// first (committed and refused ones), and the sum of the committed ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refunds: Option<Vec<RefundBody>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refunded: Option<String>,
}

/// One refund of a transfer, as the transfer's view lists it.
#[derive(Serialize, ToSchema)]
pub struct RefundBody {
    pub transfer_id: String,
    /// committed or aborted.
    pub status: String,
    pub amount: String,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub failure_code: Option<String>,
}

impl RefundBody {
    fn from_record(r: &TransferRecord) -> RefundBody {
        let body = TransferBody::from_record(r);
        RefundBody {
            transfer_id: body.transfer_id,
            status: body.status,
            amount: body.amount,
            reason: body.reason,
            created_at: body.created_at,
            failure_code: body.failure_code,
        }
    }
}

impl TransferBody {
    pub fn from_record(r: &TransferRecord) -> TransferBody {
        TransferBody {
            transfer_id: r.transfer_id.to_string(),
            status: match r.state {
                TransferState::Preparing => "preparing",
                TransferState::Committed => "committed",
                TransferState::Aborted => "aborted",
                TransferState::Held => "held",
            }
            .to_owned(),
            kind: match r.kind {
                TransferKind::Transfer => "transfer",
                TransferKind::Deposit => "deposit",
                TransferKind::Withdrawal => "withdrawal",
                TransferKind::Refund => "refund",
                TransferKind::DisputeRefund => "dispute_refund",
            }
            .to_owned(),
            from: r.from_username.clone(),
            to: r.to_username.clone(),
            amount: format_money(r.amount, r.currency),
            currency: r.currency.code().to_owned(),
            created_at: r.created_at,
            failure_code: r.failure_code.map(|c| c.as_str().to_owned()),
            refund_of: r.refund_of.map(|t| t.to_string()),
            reason: r.reason.clone(),
            rule: (r.state == TransferState::Held)
                .then(|| r.failure_detail.clone())
                .flatten(),
            refunds: None,
            refunded: None,
        }
    }
}

#[utoipa::path(get, path = "/v1/account", tag = "accounts", params(AccountQuery), security(("bearer" = [])),
    responses(
        (status = 200, body = AccountBody),
        (status = 400, description = "`invalid_request` (bad cursor or limit)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn account(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<AccountQuery>,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(ACCOUNT_PAGE_DEFAULT);
    if !(1..=shard_agent::users::LEDGER_PAGE_MAX).contains(&limit) {
        return Err(ApiError::detail(
            ErrorCode::InvalidRequest,
            "limit must be between 1 and 200",
        ));
    }
    let before = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(c.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::detail(
                ErrorCode::InvalidRequest,
                "cursor is not one this API issued",
            )
        })?),
    };
    let view = state
        .coordinator
        .account(&auth.user, limit, before)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized))?;
    let currency = view.user.currency;
    let daily = view
        .daily_limit
        .or_else(|| state.coordinator.rules().daily_limit(currency));
    Ok(axum::Json(AccountBody {
        user_id: view.user.user_id.to_string(),
        username: view.user.username,
        currency: currency.code().to_owned(),
        balance: format_money(view.balance, currency),
        available: format_money(view.balance - view.held, currency),
        limits: LimitsBody::new(daily, view.used_today, currency),
        transactions: view
            .entries
            .into_iter()
            .map(|e| EntryBody {
                transfer_id: e.transfer_id.to_string(),
                kind: entry_kind(&e.kind),
                amount: format_money(e.amount, currency),
                balance_after: format_money(e.balance_after, currency),
                counterparty: e.counterparty,
                created_at: e.created_at,
            })
            .collect(),
        next_cursor: view.next_before.map(|n| n.to_string()),
    })
    .into_response())
}

pub(crate) fn parse_money(amount: &str, currency: &str) -> ApiResult<Amount> {
    let currency: Currency = currency
        .parse()
        .map_err(|e: shard_agent::money::MoneyError| {
            ApiError::detail(ErrorCode::UnsupportedCurrency, e.to_string())
        })?;
    Amount::parse(amount, currency)
        .map_err(|e| ApiError::detail(ErrorCode::InvalidAmount, e.to_string()))
}

fn payer_currency_matches(user: &UserRow, amount: &Amount) -> ApiResult<()> {
    if user.currency != amount.currency() {
        return Err(ApiError::detail(
            ErrorCode::CurrencyMismatch,
            format!("your account holds {}", user.currency),
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/transfer", tag = "transfers", request_body = TransferRequest, security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "Required. 1-255 visible ASCII characters; a retry with the same key and body gets the same answer.")),
    responses(
        (status = 201, description = "Committed (a replay also carries `Idempotent-Replayed: true`)", body = TransferBody),
        (status = 202, description = "Accepted and held for review by a fraud rule (`status` held, `rule` names it): the amount leaves the payer's available balance and reaches nobody until an admin releases it", body = TransferBody),
        (status = 400, description = "`invalid_request`, `invalid_amount`, `unsupported_currency`, `missing_idempotency_key`, `invalid_idempotency_key`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`: the session is read on the payer's shard where the transfer runs, so a malformed body may get its 400 first", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`recipient_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`request_in_progress`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`same_account`, `currency_mismatch`, `insufficient_funds`, `idempotency_key_reused`, `limit_exceeded` (with `remaining`), `transfer_blocked` (with `rule`); a replay of a held transfer an admin rejected or that expired: `transfer_rejected`, `hold_expired`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`, `shard_busy`, `coordinator_timeout`, `lock_unavailable` (with Retry-After; retry with the same key)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn transfer(
    State(state): State<AppState>,
    TransferPayer(payer): TransferPayer,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    ApiJson(req): ApiJson<TransferRequest>,
) -> ApiResult<Response> {
    let amount = parse_money(&req.amount, &req.currency)?;
    let to = Username::parse(&req.to)
        .map_err(|_| ApiError::detail(ErrorCode::RecipientNotFound, "no such user"))?;
    if to.as_str() == payer.username() {
        return Err(ApiError::new(ErrorCode::SameAccount));
    }
    // A payer not read yet has their currency checked with their session.
    if let Payer::Verified(user) = &payer {
        payer_currency_matches(user, &amount)?;
    }
    let submitted = state.coordinator.transfer(payer, &to, amount, &key).await?;
    submitted_response(submitted)
}

#[utoipa::path(post, path = "/v1/deposit", tag = "transfers", request_body = ExternalRequest, security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "Required.")),
    responses(
        (status = 201, description = "Deposited", body = TransferBody),
        (status = 400, description = "`invalid_request`, `invalid_amount`, `unsupported_currency`, `missing_idempotency_key`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 402, description = "`payment_declined`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`request_in_progress`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`currency_mismatch`, `idempotency_key_reused`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "`payment_timeout`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn deposit(
    State(state): State<AppState>,
    auth: Auth,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    ApiJson(req): ApiJson<ExternalRequest>,
) -> ApiResult<Response> {
    external(state, auth, key, req, Direction::Deposit).await
}

#[utoipa::path(post, path = "/v1/withdrawal", tag = "transfers", request_body = ExternalRequest, security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header, description = "Required.")),
    responses(
        (status = 201, description = "Withdrawn", body = TransferBody),
        (status = 400, description = "`invalid_request`, `invalid_amount`, `unsupported_currency`, `missing_idempotency_key`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 402, description = "`payment_declined`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`request_in_progress`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`currency_mismatch`, `insufficient_funds`, `idempotency_key_reused`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "`payment_timeout`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn withdrawal(
    State(state): State<AppState>,
    auth: Auth,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    ApiJson(req): ApiJson<ExternalRequest>,
) -> ApiResult<Response> {
    external(state, auth, key, req, Direction::Withdrawal).await
}

async fn external(
    state: AppState,
    auth: Auth,
    key: crate::inputs::IdemKey,
    req: ExternalRequest,
    direction: Direction,
) -> ApiResult<Response> {
    let amount = parse_money(&req.amount, &req.currency)?;
    payer_currency_matches(&auth.user, &amount)?;
    if req.payment_token.is_empty() || req.payment_token.len() > 255 {
        return Err(ApiError::detail(
            ErrorCode::InvalidRequest,
            "payment_token must be 1-255 characters",
        ));
    }
    let submitted = state
        .coordinator
        .external(&auth.user, direction, amount, &req.payment_token, &key)
        .await?;
    submitted_response(submitted)
}

#[utoipa::path(get, path = "/v1/transfer/{id}", tag = "transfers", security(("bearer" = [])),
    params(("id" = String, Path, description = "The transfer ID")),
    responses(
        (status = 200, body = TransferBody),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`transfer_not_found`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_transfer(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let tid = id
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::TransferNotFound))?;
    let record = state
        .coordinator
        .transfer_view(&auth.user, tid)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::TransferNotFound))?;
    let mut body = TransferBody::from_record(&record);
    if record.kind == TransferKind::Transfer && record.state == TransferState::Committed {
        let refunds = state.coordinator.refunds_of(&record).await?;
        let refunded: Decimal = refunds
            .iter()
            .filter(|r| r.state == TransferState::Committed)
            .map(|r| r.amount)
            .sum();
        body.refunded = Some(format_money(refunded, record.currency));
        body.refunds = Some(refunds.iter().map(RefundBody::from_record).collect());
    }
    Ok(axum::Json(body).into_response())
}

/// The one place a protocol outcome becomes an HTTP answer, for new and replayed
/// requests alike, so a replay is byte-for-byte the original.
pub fn submitted_response(submitted: Submitted) -> ApiResult<Response> {
    let (record, replayed) = match submitted {
        Submitted::New(r) => (r, false),
        Submitted::Replayed(r) => (r, true),
        Submitted::InProgress(r) => {
            return Err(ApiError {
                code: ErrorCode::RequestInProgress,
                detail: Some("a request with this Idempotency-Key is still being processed".into()),
                transfer_id: Some(r.transfer_id.to_string()),
                replayed: false,
                retry_after_s: None,
                rule: None,
                remaining: None,
            })
        }
        Submitted::KeyReused => return Err(ApiError::new(ErrorCode::IdempotencyKeyReused)),
    };
    match (record.state, record.failure_code) {
        // Accepted, held for review: 202, and the record says why.
        (TransferState::Held, _) => {
            let mut response = (
                StatusCode::ACCEPTED,
                axum::Json(TransferBody::from_record(&record)),
            )
                .into_response();
            if replayed {
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            Ok(response)
        }
        (TransferState::Committed, _) => {
            let mut response = (
                StatusCode::CREATED,
                axum::Json(TransferBody::from_record(&record)),
            )
                .into_response();
            if replayed {
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            Ok(response)
        }
        (TransferState::Aborted, Some(code)) => {
            let detail = record.failure_detail.clone();
            let (rule, remaining) = match code {
                FailureCode::TransferBlocked => (detail, None),
                FailureCode::LimitExceeded | FailureCode::RefundExceedsOriginal => (
                    None,
                    detail.map(|d| d.parse().map_or(d, |v| format_money(v, record.currency))),
                ),
                _ => (None, None),
            };
            Err(ApiError {
                code: ErrorCode::from_failure(code),
                detail: None,
                transfer_id: Some(record.transfer_id.to_string()),
                replayed,
                retry_after_s: None,
                rule,
                remaining,
            })
        }
        _ => Err(ApiError {
            code: ErrorCode::RequestInProgress,
            detail: None,
            transfer_id: Some(record.transfer_id.to_string()),
            replayed,
            retry_after_s: None,
            rule: None,
            remaining: None,
        }),
    }
}
