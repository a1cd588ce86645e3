//! Every error the API returns: `application/problem+json` (RFC 9457) with a
//! stable, documented `code`. Internal details are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shard_agent::{FailureCode, ShardError};
use utoipa::ToSchema;

use crate::error::CoordinatorError;

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_S: u32 = 1;

/// The stable error codes. Clients branch on these, never on `title` or `detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not the JSON this route expects.
    InvalidRequest,
    /// 400: the amount is not a positive decimal string within limits and currency scale.
    InvalidAmount,
    /// 400: the currency is not one the wallet holds.
    UnsupportedCurrency,
    /// 400: the Idempotency-Key header is absent.
    MissingIdempotencyKey,
    /// 400: the Idempotency-Key header is malformed.
    InvalidIdempotencyKey,
    /// 401: no valid session token.
    Unauthorized,
    /// 401: wrong username or password.
    InvalidCredentials,
    /// 402: the payment provider declined.
    PaymentDeclined,
    /// 404: no user with that username.
    RecipientNotFound,
    /// 404: no such transfer visible to this user.
    TransferNotFound,
    /// 404: no user with that username (admin and fraud routes).
    UserNotFound,
    /// 404: no such dispute, or the caller is neither its payer nor its payee.
    DisputeNotFound,
    /// 409: the transfer has an open dispute.
    DisputeExists,
    /// 409: the dispute is already refunded or rejected.
    DisputeResolved,
    /// 422: the transfer is older than the dispute window.
    DisputeWindowPassed,
    /// 422: refunds gave the whole transfer back; there is nothing to dispute.
    NothingToDispute,
    /// 409: the transfer is not held (released, rejected or expired before).
    TransferNotHeld,
    /// 422: a held transfer an admin rejected (its money stayed with the payer).
    TransferRejected,
    /// 422: a held transfer nobody decided in time (its money stayed with the payer).
    HoldExpired,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 408: the request's headers or body did not arrive in time.
    RequestTimeout,
    /// 409: the username is taken.
    UsernameTaken,
    /// 409: a request with this Idempotency-Key is still being processed.
    RequestInProgress,
    /// 413: the body is larger than the limit.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 422: payer and recipient are the same account.
    SameAccount,
    /// 422: the currency differs from the payer's or the recipient's account.
    CurrencyMismatch,
    /// 422: the payer's balance does not cover the amount.
    InsufficientFunds,
    /// 422: this Idempotency-Key was used with a different request.
    IdempotencyKeyReused,
    /// 422: the transfer is above what is left of the payer's daily limit
    /// (`remaining` says how much is left today, UTC).
    LimitExceeded,
    /// 422: a fraud rule blocks the transfer (`rule` names it).
    TransferBlocked,
    /// 422: the refund is above what is left of the original transfer
    /// (`remaining` says how much may still be refunded).
    RefundExceedsOriginal,
    /// 429: too many requests from this client, user or for this username;
    /// `Retry-After` says when to try again.
    RateLimited,
    /// 500: a bug; details are in the server log.
    Internal,
    /// 409: the user's bucket is moving between shards and its cutover took
    /// longer than the server waits; nothing was written, retry with the same
    /// key (`Retry-After`).
    BucketMoving,
    /// 503: a shard could not be reached or answered too late; retry with the same key.
    ShardUnavailable,
    /// 503: an account was locked by another transfer for too long; retry with the same key.
    ShardBusy,
    /// 503: a transfer's coordinator stopped mid-way and it was aborted; retry with the same key.
    CoordinatorTimeout,
    /// 503: a Redis lock could not be taken (Redis-lock mode); retry with the same key.
    LockUnavailable,
    /// 503: the server is at a bound (password work, connections); retry later.
    Overloaded,
    /// 504: the payment provider did not answer in time; nothing was booked.
    PaymentTimeout,
    /// 504: the request took longer than the server's whole-request bound.
    GatewayTimeout,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            InvalidRequest
            | InvalidAmount
            | UnsupportedCurrency
            | MissingIdempotencyKey
            | InvalidIdempotencyKey => StatusCode::BAD_REQUEST,
            Unauthorized | InvalidCredentials => StatusCode::UNAUTHORIZED,
            PaymentDeclined => StatusCode::PAYMENT_REQUIRED,
            RecipientNotFound | TransferNotFound | UserNotFound | DisputeNotFound | NotFound => {
                StatusCode::NOT_FOUND
            }
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RateLimited => StatusCode::TOO_MANY_REQUESTS,
            UsernameTaken | RequestInProgress | BucketMoving | DisputeExists | DisputeResolved
            | TransferNotHeld => StatusCode::CONFLICT,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            SameAccount
            | CurrencyMismatch
            | InsufficientFunds
            | IdempotencyKeyReused
            | LimitExceeded
            | TransferBlocked
            | RefundExceedsOriginal
            | DisputeWindowPassed
            | NothingToDispute
            | TransferRejected
            | HoldExpired => StatusCode::UNPROCESSABLE_ENTITY,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ShardUnavailable | ShardBusy | CoordinatorTimeout | LockUnavailable | Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            PaymentTimeout | GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn as_str(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The API code for a transfer's stored failure.
    pub fn from_failure(code: FailureCode) -> ErrorCode {
        match code {
            FailureCode::InsufficientFunds => ErrorCode::InsufficientFunds,
            FailureCode::RecipientNotFound => ErrorCode::RecipientNotFound,
            FailureCode::CurrencyMismatch => ErrorCode::CurrencyMismatch,
            FailureCode::ShardUnavailable => ErrorCode::ShardUnavailable,
            FailureCode::ShardBusy => ErrorCode::ShardBusy,
            FailureCode::CoordinatorTimeout => ErrorCode::CoordinatorTimeout,
            FailureCode::PaymentDeclined => ErrorCode::PaymentDeclined,
            FailureCode::PaymentTimeout => ErrorCode::PaymentTimeout,
            FailureCode::LockUnavailable => ErrorCode::LockUnavailable,
            FailureCode::TransferNotFound => ErrorCode::TransferNotFound,
            FailureCode::DisputeNotOpen => ErrorCode::DisputeResolved,
            FailureCode::NotHeld => ErrorCode::TransferNotHeld,
            FailureCode::TransferRejected => ErrorCode::TransferRejected,
            FailureCode::HoldExpired => ErrorCode::HoldExpired,
            // A held transfer is answered 202 with its record, never as an
            // error (`submitted_response`); reaching here is a bug.
            FailureCode::Held => ErrorCode::Internal,
            FailureCode::RefundExceedsOriginal => ErrorCode::RefundExceedsOriginal,
            FailureCode::TransferBlocked => ErrorCode::TransferBlocked,
            FailureCode::LimitExceeded => ErrorCode::LimitExceeded,
        }
    }
}

/// The problem+json body.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type: `urn:wallet:error:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub code: ErrorCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For a failed transfer: its ID (GET /v1/transfer/{id} shows it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_id: Option<String>,
    /// `transfer_blocked`: the name of the fraud rule that blocked it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `limit_exceeded`: what is left of today's limit; `refund_exceeds_original`:
    /// what is left of the original to refund. A decimal string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: Option<String>,
    pub transfer_id: Option<String>,
    pub replayed: bool,
    /// `Retry-After` in seconds; 503s default to [`RETRY_AFTER_S`].
    pub retry_after_s: Option<u64>,
    pub rule: Option<String>,
    pub remaining: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode) -> ApiError {
        ApiError {
            code,
            detail: None,
            transfer_id: None,
            replayed: false,
            retry_after_s: None,
            rule: None,
            remaining: None,
        }
    }

    pub fn detail(code: ErrorCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            code,
            detail: Some(detail.into()),
            transfer_id: None,
            replayed: false,
            retry_after_s: None,
            rule: None,
            remaining: None,
        }
    }

    fn title(&self) -> &'static str {
        self.code.status().canonical_reason().unwrap_or("Error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let body = Problem {
            kind: format!("urn:wallet:error:{}", self.code.as_str()),
            title: self.title().to_owned(),
            status: status.as_u16(),
            code: self.code,
            detail: self.detail,
            transfer_id: self.transfer_id,
            rule: self.rule,
            remaining: self.remaining,
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self.retry_after_s {
            Some(s) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            None if status == StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
            }
            None => {}
        }
        if self.replayed {
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(e: CoordinatorError) -> ApiError {
        match e {
            CoordinatorError::Shard(ShardError::LockTimeout { shard }) => {
                ApiError::detail(ErrorCode::ShardBusy, format!("shard {shard} is busy"))
            }
            CoordinatorError::Shard(e @ ShardError::NotOwner { .. }) => {
                tracing::warn!(%e, "request failed: bucket still moving");
                ApiError {
                    retry_after_s: Some(1),
                    ..ApiError::detail(ErrorCode::BucketMoving, e.to_string())
                }
            }
            CoordinatorError::Shard(e) if e.is_retryable() => {
                tracing::warn!(%e, "request failed: shard unavailable");
                ApiError::detail(
                    ErrorCode::ShardUnavailable,
                    format!("shard {} is unavailable", e.shard()),
                )
            }
            CoordinatorError::Overloaded {
                queue: queue @ "password hashing",
                queued_max,
            } => {
                tracing::warn!(queue, queued_max, "request refused: queue full");
                ApiError::detail(ErrorCode::Overloaded, format!("{queue} is saturated"))
            }
            CoordinatorError::Overloaded { queue, queued_max } => {
                tracing::warn!(queue, queued_max, "request refused: queue full");
                ApiError::detail(
                    ErrorCode::ShardBusy,
                    format!("too many transfers waiting ({queue})"),
                )
            }
            CoordinatorError::Crashed { at } => ApiError::detail(
                ErrorCode::ShardUnavailable,
                format!("coordinator stopped at {at}"),
            ),
            CoordinatorError::Unauthorized => ApiError::new(ErrorCode::Unauthorized),
            CoordinatorError::Refused(code) => ApiError::new(ErrorCode::from_failure(code)),
            CoordinatorError::PayerCurrency { holds } => ApiError::detail(
                ErrorCode::CurrencyMismatch,
                format!("your account holds {holds}"),
            ),
            other => {
                tracing::error!(error = %other, "internal error");
                ApiError::new(ErrorCode::Internal)
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
