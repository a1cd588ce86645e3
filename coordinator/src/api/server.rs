//! The HTTP server around the routes: every bound a slow, idle or hostile client
//! could otherwise hold, and the answers those bounds give (all problem+json).
//!
//! A request passes, outermost first:
//! 1. the connection limit (`http.connections_max`, waiting in the accept
//!    backlog) and hyper's header-read timeout (`http.header_read_timeout_ms`);
//! 2. the whole-request timeout (`http.request_timeout_ms`, 504);
//! 3. the body read (`http.body_read_timeout_ms`, 408; `request_body_bytes_max`,
//!    413), done before the request takes a slot, so a client that trickles
//!    its body holds a connection, never a slot;
//! 4. one global concurrency limit (`limits.concurrent_requests_max`);
//! 5. the routes, with the rate limits of `limits.rs`.
//!
//! Any error answer that is not JSON yet (axum's own rejections of a
//! query string or a path, 405s, a layer's refusal) is rewritten as one here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;

use super::error::{ApiError, ErrorCode};
use crate::config::HttpLimits;

/// Longest error body of another layer that is kept as a problem's `detail`.
const DETAIL_BYTES_MAX: usize = 512;

/// The per-request bounds the middlewares read.
#[derive(Clone, Copy, Debug)]
pub struct RequestBounds {
    pub body_bytes_max: usize,
    pub body_read_timeout: Duration,
    pub request_timeout: Duration,
}

/// Reads the whole body within its bounds before anything else runs.
pub async fn read_body(State(bounds): State<RequestBounds>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > bounds.body_bytes_max as u64) {
        return ApiError::new(ErrorCode::PayloadTooLarge).into_response();
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, bounds.body_bytes_max);
    match tokio::time::timeout(bounds.body_read_timeout, read).await {
        Err(_) => ApiError::detail(ErrorCode::RequestTimeout, "the body did not arrive in time")
            .into_response(),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                ApiError::new(ErrorCode::PayloadTooLarge).into_response()
            } else {
                ApiError::detail(ErrorCode::InvalidRequest, "the body could not be read")
                    .into_response()
            }
        }
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    }
}

/// Bounds the whole request. The transfer behind it runs on its own task, so
/// answering 504 abandons nothing half-done: the key tells its outcome later.
pub async fn whole_request(
    State(bounds): State<RequestBounds>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(bounds.request_timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::detail(
            ErrorCode::GatewayTimeout,
            "the request took longer than the server allows; retry with the same Idempotency-Key",
        )
        .into_response(),
    }
}

/// Counts requests by route and status, and times them by route.
pub async fn record(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("wallet_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("wallet_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Rewrites any error answer that is not JSON into problem+json, keeping its
/// status and `Retry-After`, with the original text as `detail`.
pub async fn problems_only(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    // Problems pass, and so does a route's own JSON for an error status (the
    // `/readyz` body of a degraded cluster); what is left is text or nothing.
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(b"application/problem+json")
                || v.as_bytes().starts_with(b"application/json")
        });
    if is_json {
        return response;
    }
    let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
    let code = match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Overloaded,
        StatusCode::GATEWAY_TIMEOUT => ErrorCode::GatewayTimeout,
        s if s.is_client_error() => ErrorCode::InvalidRequest,
        _ => ErrorCode::Internal,
    };
    let text = axum::body::to_bytes(response.into_body(), DETAIL_BYTES_MAX)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .filter(|t| !t.trim().is_empty());
    let mut problem = match text {
        // Internal errors never show their text.
        Some(t) if code != ErrorCode::Internal => ApiError::detail(code, t),
        _ => ApiError::new(code),
    };
    if let Some(s) = retry_after
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        problem.retry_after_s = Some(s);
    }
    let mut response = problem.into_response();
    // A status the code does not map to (e.g. 411) keeps its own.
    *response.status_mut() = status;
    response
}

/// Serves `app` on `listener` until `shutdown` resolves, then gives in-flight
/// requests `http.shutdown_drain_ms` to finish and closes what is left.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    http: &HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = Arc::new(tokio::sync::Semaphore::new(http.connections_max));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(http.header_read_timeout_ms));
    builder.http2().timer(TokioTimer::new());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = tower::ServiceExt::map_request(app.clone(), move |mut req: Request<_>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            req
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service),
            );
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let drain = Duration::from_millis(http.shutdown_drain_ms);
    tracing::info!(
        drain_ms = http.shutdown_drain_ms,
        "shutting down: no new connections; draining in-flight requests"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("drained: every in-flight request finished"),
        () = tokio::time::sleep(drain) => tracing::warn!(
            drain_ms = http.shutdown_drain_ms,
            "drain bound reached: closing the connections still open"
        ),
    }
    Ok(())
}
