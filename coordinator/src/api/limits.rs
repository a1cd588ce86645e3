//! Rate limits: per client address on sign-up and login, per username on login,
//! per user on the money routes. Each is a GCRA limiter (governor) keyed by the
//! address, the username or the session; beyond it a request gets 429
//! `rate_limited` with `Retry-After`, before any password work or shard call.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::error::{ApiError, ErrorCode};
use super::extract::session_token;
use super::AppState;
use crate::auth::token_hash;
use crate::config::RateLimits;

/// How often limiter state that has fully recovered is dropped, which bounds
/// the memory the keys take to what arrived within about one window.
pub const LIMITER_SWEEP_MS: u64 = 10_000;

/// Which limit refused a request (the metrics label).
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    LoginPerUsername,
    AuthPerAddress,
    MoneyPerUser,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::LoginPerUsername => "login_per_username",
            Limit::AuthPerAddress => "auth_per_address",
            Limit::MoneyPerUser => "money_per_user",
        }
    }
}

pub struct Limiters {
    login_per_username: Option<DefaultKeyedRateLimiter<String>>,
    auth_per_address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    money_per_user: Option<DefaultKeyedRateLimiter<String>>,
    trusted_client_ip_header: Option<String>,
}

fn quota(per: Duration, rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Quota::with_period(per / rate.get()).map(|q| q.allow_burst(burst))
}

impl Limiters {
    pub fn new(limits: &RateLimits, trusted_client_ip_header: Option<String>) -> Limiters {
        let minute = Duration::from_secs(60);
        Limiters {
            login_per_username: quota(
                minute,
                limits.login_per_username_per_minute,
                limits.login_per_username_burst,
            )
            .map(RateLimiter::keyed),
            auth_per_address: quota(
                minute,
                limits.auth_per_address_per_minute,
                limits.auth_per_address_burst,
            )
            .map(RateLimiter::keyed),
            money_per_user: quota(
                Duration::from_secs(1),
                limits.money_per_user_per_second,
                limits.money_per_user_burst,
            )
            .map(RateLimiter::keyed),
            trusted_client_ip_header: trusted_client_ip_header.map(|h| h.to_ascii_lowercase()),
        }
    }

    /// Drops recovered state every [`LIMITER_SWEEP_MS`] while `self` lives.
    pub fn sweep_forever(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(LIMITER_SWEEP_MS));
            loop {
                tick.tick().await;
                let Some(limiters) = weak.upgrade() else {
                    return;
                };
                if let Some(l) = &limiters.login_per_username {
                    l.retain_recent();
                }
                if let Some(l) = &limiters.auth_per_address {
                    l.retain_recent();
                }
                if let Some(l) = &limiters.money_per_user {
                    l.retain_recent();
                }
            }
        })
    }

    /// Counts one login attempt for `username` (normalized as the lookup is).
    pub fn login_attempt(&self, username: &str) -> Result<(), ApiError> {
        let Some(l) = &self.login_per_username else {
            return Ok(());
        };
        refuse(
            Limit::LoginPerUsername,
            l.check_key(&username.trim().to_lowercase()),
        )
    }

    fn client_address(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
        match &self.trusted_client_ip_header {
            Some(name) => headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|a| a.trim().parse::<IpAddr>().ok())
                .next_back()
                .or(peer.map(|p| p.ip())),
            None => peer.map(|p| p.ip()),
        }
    }
}

fn refuse(
    limit: Limit,
    checked: Result<(), governor::NotUntil<governor::clock::QuantaInstant>>,
) -> Result<(), ApiError> {
    let Err(not_until) = checked else {
        return Ok(());
    };
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    metrics::counter!("wallet_rate_limited_total", "limit" => limit.as_str()).increment(1);
    let mut e = ApiError::detail(
        ErrorCode::RateLimited,
        format!("too many requests ({}); retry later", limit.as_str()),
    );
    // Whole seconds, rounded up: a client that waits that long gets in.
    e.retry_after_s = Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
    Err(e)
}

/// Middleware for sign-up and login: one request per call against the client
/// address's limit.
pub async fn per_address(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limiters = &state.limiters;
    if let Some(l) = &limiters.auth_per_address {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        if let Some(addr) = limiters.client_address(req.headers(), peer) {
            if let Err(e) = refuse(Limit::AuthPerAddress, l.check_key(&addr)) {
                return e.into_response();
            }
        }
    }
    next.run(req).await
}

/// Middleware for the money routes: one request per call against the user's
/// limit, kept per session token (checked later by the route itself); a
/// request without a token is left to get its 401.
pub async fn per_user(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(l) = &state.limiters.money_per_user {
        let (parts, body) = req.into_parts();
        if let Some(token) = session_token(&parts) {
            // Keyed by the session, not by the user the token names: anyone can
            // forge a token naming someone else, and would spend their budget.
            // A user's sessions are few, since logins are limited per username.
            let key = hex::encode(token_hash(&token));
            if let Err(e) = refuse(Limit::MoneyPerUser, l.check_key(&key)) {
                return e.into_response();
            }
        }
        return next.run(Request::from_parts(parts, body)).await;
    }
    next.run(req).await
}
