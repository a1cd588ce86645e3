//! Extractors whose rejections are problem+json like every other error.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use shard_agent::records::UserRow;

use super::error::{ApiError, ErrorCode};
use super::AppState;
use crate::auth::{token_hash, token_username};
use crate::inputs::IdemKey;
use crate::service::Payer;

/// The session cookie `POST /v1/login` sets (an alternative to the Bearer header).
pub const SESSION_COOKIE: &str = "wallet_session";

/// `axum::Json`, with rejections as problem+json.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(ErrorCode::PayloadTooLarge);
    }
    if rejection.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        return ApiError::detail(
            ErrorCode::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        );
    }
    ApiError::detail(ErrorCode::InvalidRequest, rejection.body_text())
}

/// An admin request: `Authorization: Bearer <admin_token>`. Without an
/// `admin_token` configured the admin routes do not exist (404 `not_found`);
/// a wrong or missing token is 401 `unauthorized`.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = state.admin_token.as_deref() else {
            return Err(ApiError::new(ErrorCode::NotFound));
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), expected.as_bytes())) {
            Ok(Admin)
        } else {
            Err(ApiError::new(ErrorCode::Unauthorized))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The authenticated user, from `Authorization: Bearer <token>` or the session cookie.
pub struct Auth {
    pub user: UserRow,
    pub token: String,
}

pub fn session_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let text = value.to_str().ok()?;
        let (scheme, token) = text.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_owned())
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = session_token(parts).ok_or_else(|| ApiError::new(ErrorCode::Unauthorized))?;
        match state.coordinator.authenticate(&token).await? {
            Some(user) => Ok(Auth { user, token }),
            None => Err(ApiError::new(ErrorCode::Unauthorized)),
        }
    }
}

/// The payer of `POST /v1/transfer`. A token that names its user is not read
/// here: its session is read on the payer's shard when the transfer runs, in
/// the group's own check when it is batched (saving a round trip per request).
/// A token of the earlier format is read now, as by [`Auth`]. Either way a
/// request without a live session moves nothing and gets 401; a body that
/// fails validation may get its 400 first.
pub struct TransferPayer(pub Payer);

impl FromRequestParts<AppState> for TransferPayer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = session_token(parts).ok_or_else(|| ApiError::new(ErrorCode::Unauthorized))?;
        if let Some(username) = token_username(&token) {
            return Ok(TransferPayer(Payer::Claimed {
                username,
                token_hash: token_hash(&token),
            }));
        }
        match state.coordinator.authenticate(&token).await? {
            Some(user) => Ok(TransferPayer(Payer::Verified(user))),
            None => Err(ApiError::new(ErrorCode::Unauthorized)),
        }
    }
}

/// The required `Idempotency-Key` header.
pub struct IdempotencyKeyHeader(pub IdemKey);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKeyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get("idempotency-key")
            .ok_or_else(|| ApiError::new(ErrorCode::MissingIdempotencyKey))?;
        let text = value.to_str().map_err(|_| {
            ApiError::detail(
                ErrorCode::InvalidIdempotencyKey,
                "Idempotency-Key must be ASCII",
            )
        })?;
        IdemKey::parse(text)
            .map(IdempotencyKeyHeader)
            .map_err(|e| ApiError::detail(ErrorCode::InvalidIdempotencyKey, e))
    }
}
