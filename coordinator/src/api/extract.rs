//! Extractors whose rejections are problem+json like every other error.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use shard_agent::records::UserRow;

use super::error::{ApiError, ErrorCode};
use super::AppState;
use crate::inputs::IdemKey;

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
    ApiError::detail(ErrorCode::InvalidRequest, rejection.body_text())
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
