//! Sign-up, login and logout.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorCode, Problem};
use super::extract::{ApiJson, Auth, SESSION_COOKIE};
use super::AppState;
use crate::inputs::{Email, Password, Username};
use crate::service::SignUp;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignUpRequest {
    /// 3-32 characters of a-z, 0-9, '_', '.', '-' (normalized to lower case).
    pub username: String,
    pub email: String,
    /// 8-128 characters.
    pub password: String,
    /// The account's currency: USD, EUR, GBP, CHF or JPY.
    pub currency: String,
}

#[derive(Serialize, ToSchema)]
pub struct UserBody {
    pub user_id: String,
    pub username: String,
    pub currency: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

#[derive(Serialize, ToSchema)]
pub struct LoginBody {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/v1/user", request_body = SignUpRequest, tag = "users",
    responses(
        (status = 201, description = "User created", body = UserBody),
        (status = 400, description = "`invalid_request` or `unsupported_currency`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`username_taken`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn sign_up(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<SignUpRequest>,
) -> ApiResult<Response> {
    let username = Username::parse(&req.username)
        .map_err(|e| ApiError::detail(ErrorCode::InvalidRequest, e))?;
    let email =
        Email::parse(&req.email).map_err(|e| ApiError::detail(ErrorCode::InvalidRequest, e))?;
    let password = Password::parse(&req.password)
        .map_err(|e| ApiError::detail(ErrorCode::InvalidRequest, e))?;
    let currency = req
        .currency
        .parse()
        .map_err(|e: shard_agent::money::MoneyError| {
            ApiError::detail(ErrorCode::UnsupportedCurrency, e.to_string())
        })?;
    match state
        .coordinator
        .sign_up(username, email, password, currency)
        .await?
    {
        SignUp::UsernameTaken => Err(ApiError::new(ErrorCode::UsernameTaken)),
        SignUp::Created(user) => Ok((
            StatusCode::CREATED,
            axum::Json(UserBody {
                user_id: user.user_id.to_string(),
                username: user.username,
                currency: user.currency.code().to_owned(),
            }),
        )
            .into_response()),
    }
}

#[utoipa::path(post, path = "/v1/login", request_body = LoginRequest, tag = "users",
    responses(
        (status = 200, description = "Session created; also set as the `wallet_session` cookie", body = LoginBody),
        (status = 400, description = "`invalid_request`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`invalid_credentials`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`: too many attempts for this username or from this address; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`, or `overloaded` (password work saturated)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn log_in(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Response> {
    // Counted before the password is checked, for names that exist or not, so
    // guessing one user's password runs at this rate whatever the answers.
    state.limiters.login_attempt(&req.username)?;
    let session = state
        .coordinator
        .log_in(&req.username, req.password)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidCredentials))?;
    let max_age = (session.expires_at - Utc::now()).num_seconds().max(0);
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}",
        session.token
    );
    let mut response = axum::Json(LoginBody {
        token: session.token,
        expires_at: session.expires_at,
    })
    .into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

#[utoipa::path(post, path = "/v1/logout", tag = "users", security(("bearer" = [])),
    responses(
        (status = 204, description = "Session revoked; the token is refused from now on"),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn log_out(State(state): State<AppState>, auth: Auth) -> ApiResult<Response> {
    state.coordinator.log_out(&auth.token).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "wallet_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(response)
}
