//! `GET /v1/notifications`: the user's events, read from the outbox on the
//! user's shard, each with a sentence a wallet app can show.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use shard_agent::events::Event;
use shard_agent::money::format_money;
use shard_agent::Currency;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiResult, ErrorCode, Problem};
use super::extract::Auth;
use super::AppState;

/// Notifications per page when `limit` is not given.
pub const NOTIFICATIONS_PAGE_DEFAULT: i64 = 50;
/// The most notifications one page returns.
pub const NOTIFICATIONS_PAGE_MAX: i64 = 200;

#[derive(Deserialize, IntoParams)]
pub struct NotificationsQuery {
    /// Notifications per page, 1-200 (default 50).
    pub limit: Option<i64>,
    /// Only events with a higher `seq` (default 0: from the first kept).
    pub after: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct NotificationBody {
    /// The user's sequence number: 1, 2, 3… with no gaps.
    pub seq: i64,
    pub event_id: String,
    /// The event type (see README's Events section).
    #[serde(rename = "type")]
    pub kind: String,
    pub transfer_id: String,
    /// Signed: negative took money out of the account (or put it on hold).
    pub amount: String,
    pub currency: String,
    pub balance_after: String,
    pub counterparty: Option<String>,
    pub created_at: DateTime<Utc>,
    /// A sentence for the user, e.g. "you received 12.50 from alice".
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct NotificationsBody {
    pub notifications: Vec<NotificationBody>,
    /// The `seq` of the last notification here: pass it as `after` for the
    /// next page. Null when the page is empty (keep your `after`).
    pub next_cursor: Option<i64>,
}

#[utoipa::path(get, path = "/v1/notifications", tag = "accounts", params(NotificationsQuery), security(("bearer" = [])),
    responses(
        (status = 200, body = NotificationsBody),
        (status = 400, description = "`invalid_request` (bad limit or after)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthorized`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`bucket_moving`: the user's bucket is being moved; retry", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<NotificationsQuery>,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(NOTIFICATIONS_PAGE_DEFAULT);
    if !(1..=NOTIFICATIONS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::detail(
            ErrorCode::InvalidRequest,
            format!("limit must be between 1 and {NOTIFICATIONS_PAGE_MAX}"),
        ));
    }
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::detail(
            ErrorCode::InvalidRequest,
            "after must be a seq (0 or more)",
        ));
    }
    let events = state
        .coordinator
        .notifications(&auth.user, after, limit)
        .await?;
    let currency = auth.user.currency;
    let notifications: Vec<NotificationBody> = events
        .into_iter()
        .map(|e| NotificationBody::new(e, currency))
        .collect();
    Ok(axum::Json(NotificationsBody {
        next_cursor: notifications.last().map(|n| n.seq),
        notifications,
    })
    .into_response())
}

impl NotificationBody {
    fn new(e: Event, currency: Currency) -> NotificationBody {
        let currency = e.currency.parse().unwrap_or(currency);
        NotificationBody {
            message: message(&e.kind, e.amount, currency, e.counterparty.as_deref()),
            seq: e.seq,
            event_id: e.event_id.to_string(),
            transfer_id: e.transfer_id.to_string(),
            amount: format_money(e.amount, currency),
            currency: currency.code().to_owned(),
            balance_after: format_money(e.balance_after, currency),
            counterparty: e.counterparty,
            created_at: e.created_at,
            kind: e.kind,
        }
    }
}

/// The sentence shown for an event of `kind`.
pub fn message(kind: &str, amount: Decimal, currency: Currency, party: Option<&str>) -> String {
    let amt = format_money(amount.abs(), currency);
    let who = party.unwrap_or("someone");
    match kind {
        "transfer_debit" => format!("you sent {amt} to {who}"),
        "transfer_credit" => format!("you received {amt} from {who}"),
        "refund_debit" => format!("you refunded {amt} to {who}"),
        "refund_credit" => format!("{who} refunded you {amt}"),
        "dispute_refund_debit" => format!("{amt} was refunded to {who} after their dispute"),
        "dispute_refund_credit" => format!("your dispute was upheld: {who} refunded you {amt}"),
        "deposit" => format!("you deposited {amt}"),
        "withdrawal" => format!("you withdrew {amt}"),
        "review_hold" => format!("your transfer of {amt} to {who} is held for review"),
        "review_release" => format!("the hold of {amt} for your transfer to {who} was lifted"),
        "dispute_hold" => format!("{who} disputed a transfer: {amt} of your balance is on hold"),
        "dispute_release" => format!("the dispute by {who} is closed: {amt} is no longer on hold"),
        other => format!("{other}: {amt}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::dec;

    #[test]
    fn messages_read_as_the_issue_shows() {
        let usd: Currency = "USD".parse().expect("USD is a supported currency");
        assert_eq!(
            message("transfer_credit", dec!(12.5), usd, Some("alice")),
            "you received 12.50 from alice"
        );
        assert_eq!(
            message("transfer_debit", dec!(-3), usd, Some("bob")),
            "you sent 3.00 to bob"
        );
        assert_eq!(
            message("deposit", dec!(100), usd, Some("sandbox")),
            "you deposited 100.00"
        );
    }
}
