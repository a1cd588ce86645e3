//! The payment provider money enters and leaves through.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shard_agent::external::{Direction, ExternalOrder, ProviderVerdict};
use shard_agent::{Amount, TransferId};

/// A card network, bank or PSP. `reference` is our transfer ID: a real provider
/// de-duplicates on it, so a retried request can never charge twice.
pub trait PaymentProvider: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn execute(
        &self,
        direction: Direction,
        token: &str,
        amount: Amount,
        reference: TransferId,
    ) -> Pin<Box<dyn Future<Output = ProviderVerdict> + Send + '_>>;
}

/// A built-in provider for development and tests, driven by the payment token:
/// `sandbox_ok` approves, `sandbox_declined` declines, `sandbox_timeout` never
/// answers (the caller's timeout ends it). Anything else is declined. Like a real
/// provider it answers a repeated reference as it did the first time (here: the
/// token decides), and it keeps the last references it saw, for inspection.
#[derive(Default)]
pub struct Sandbox {
    calls: std::sync::Mutex<std::collections::VecDeque<TransferId>>,
}

/// Bounds the sandbox's log of references.
pub const SANDBOX_CALLS_KEPT_MAX: usize = 10_000;

impl Sandbox {
    /// The references it was called with, oldest first.
    pub fn calls(&self) -> Vec<TransferId> {
        self.calls
            .lock()
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default()
    }
}

pub const SANDBOX_OK: &str = "sandbox_ok";
pub const SANDBOX_DECLINED: &str = "sandbox_declined";
pub const SANDBOX_TIMEOUT: &str = "sandbox_timeout";

impl PaymentProvider for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn execute(
        &self,
        _direction: Direction,
        token: &str,
        _amount: Amount,
        reference: TransferId,
    ) -> Pin<Box<dyn Future<Output = ProviderVerdict> + Send + '_>> {
        if let Ok(mut calls) = self.calls.lock() {
            if calls.len() == SANDBOX_CALLS_KEPT_MAX {
                calls.pop_front();
            }
            calls.push_back(reference);
        }
        let verdict = match token {
            SANDBOX_OK => Some(ProviderVerdict::Approved),
            SANDBOX_TIMEOUT => None,
            _ => Some(ProviderVerdict::Declined),
        };
        Box::pin(async move {
            match verdict {
                Some(v) => v,
                None => {
                    // Hang like an unresponsive provider; bounded by the caller's timeout.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    ProviderVerdict::TimedOut
                }
            }
        })
    }
}

/// Calls the provider for `order` (its direction, token and amount) under
/// `reference`, bounded by `timeout`; no answer in time is `TimedOut`. The one
/// way both a request and recovery reach the provider.
pub async fn call_for(
    provider: &dyn PaymentProvider,
    timeout: Duration,
    order: &ExternalOrder,
    reference: TransferId,
) -> ProviderVerdict {
    let call = provider.execute(
        order.direction,
        &order.payment_token,
        order.amount,
        reference,
    );
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(ProviderVerdict::TimedOut)
}

/// Which payment provider a deployment uses: `payment_provider` in the config.
/// There is no default for `wallet serve`: a deployment that forgot to choose
/// would otherwise hand out sandbox money to anyone who signs up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// Test money: `sandbox_ok` approves any amount. Development and tests only.
    Sandbox,
    /// A Stripe-compatible HTTP API (`POST /v1/payment_intents` for deposits,
    /// `POST /v1/payouts` for withdrawals, form-encoded, Bearer key,
    /// `Idempotency-Key` = our transfer ID).
    Http(HttpProviderConfig),
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpProviderConfig {
    /// e.g. `https://api.stripe.com`.
    pub base_url: String,
    /// The secret API key, sent as `Authorization: Bearer`.
    pub api_key: String,
    /// The secret the provider signs its webhooks with. Accepted (and kept out
    /// of logs) so a deployment's provider settings live in one place, but not
    /// used yet: the wallet receives no webhooks; an unanswered call is settled
    /// by asking the provider again under the same reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

impl std::fmt::Debug for HttpProviderConfig {
    // The secrets never reach a log line, even through `{:?}` of the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProviderConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"***")
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderConfigError {
    #[error("payment_provider.base_url {0:?} is not an http(s) URL")]
    BaseUrl(String),
    #[error("payment_provider.api_key is empty")]
    EmptyKey,
    #[error("build the payment provider's HTTP client: {0}")]
    Client(String),
}

impl ProviderConfig {
    /// The provider this configuration names, ready to call.
    pub fn build(&self) -> Result<std::sync::Arc<dyn PaymentProvider>, ProviderConfigError> {
        Ok(match self {
            ProviderConfig::Sandbox => std::sync::Arc::new(Sandbox::default()),
            ProviderConfig::Http(c) => std::sync::Arc::new(HttpProvider::new(c.clone())?),
        })
    }
}

/// A Stripe-compatible provider over HTTP. Amounts go out in minor units (cents;
/// yen as they are), the transfer ID is the idempotency key, so a retry after a
/// timeout is answered as the first call was and never charges twice.
pub struct HttpProvider {
    config: HttpProviderConfig,
    client: reqwest::Client,
}

/// How long one call to the provider may take at the HTTP level; the caller's
/// `payment_timeout_ms` bounds it too, whichever is shorter.
pub const PROVIDER_HTTP_TIMEOUT_MS: u64 = 10_000;

impl HttpProvider {
    pub fn new(config: HttpProviderConfig) -> Result<HttpProvider, ProviderConfigError> {
        let url = config.base_url.trim_end_matches('/');
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(ProviderConfigError::BaseUrl(config.base_url.clone()));
        }
        if config.api_key.is_empty() {
            return Err(ProviderConfigError::EmptyKey);
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(PROVIDER_HTTP_TIMEOUT_MS))
            .build()
            .map_err(|e| ProviderConfigError::Client(e.to_string()))?;
        Ok(HttpProvider {
            config: HttpProviderConfig {
                base_url: url.to_owned(),
                api_key: config.api_key,
                webhook_secret: config.webhook_secret,
            },
            client,
        })
    }

    async fn call(
        &self,
        direction: Direction,
        token: String,
        amount: Amount,
        reference: TransferId,
    ) -> ProviderVerdict {
        let (path, token_field, approved): (&str, &str, &[&str]) = match direction {
            Direction::Deposit => ("/v1/payment_intents", "payment_method", &["succeeded"]),
            Direction::Withdrawal => (
                "/v1/payouts",
                "destination",
                &["paid", "pending", "in_transit"],
            ),
        };
        let Some(minor) = minor_units(amount) else {
            tracing::error!(%reference, "amount does not fit the provider's minor units");
            return ProviderVerdict::Declined;
        };
        let reference = reference.to_string();
        let mut form = vec![
            ("amount", minor.to_string()),
            ("currency", amount.currency().code().to_ascii_lowercase()),
            (token_field, token),
            ("metadata[transfer_id]", reference.clone()),
        ];
        if direction == Direction::Deposit {
            form.push(("confirm", "true".to_owned()));
        }
        let response = self
            .client
            .post(format!("{}{path}", self.config.base_url))
            .bearer_auth(&self.config.api_key)
            .header("Idempotency-Key", &reference)
            .form(&form)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                // No answer: the charge may or may not exist. The record stays
                // unsettled and recovery asks again under the same key.
                tracing::warn!(%reference, error = %e, "payment provider did not answer");
                return ProviderVerdict::TimedOut;
            }
        };
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 409 {
            // 409: the same key is still being processed; 429 and 5xx: try again.
            tracing::warn!(%reference, %status, "payment provider answered: try again later");
            return ProviderVerdict::TimedOut;
        }
        if status.is_client_error() {
            // 402 card declined, 400 invalid token...: nothing was charged.
            tracing::info!(%reference, %status, "payment provider declined");
            return ProviderVerdict::Declined;
        }
        match response.json::<serde_json::Value>().await {
            Ok(body) => {
                let state = body.get("status").and_then(|s| s.as_str()).unwrap_or("");
                if approved.contains(&state) {
                    ProviderVerdict::Approved
                } else {
                    tracing::info!(%reference, state, "payment provider did not approve");
                    ProviderVerdict::Declined
                }
            }
            Err(e) => {
                tracing::warn!(%reference, error = %e, "payment provider's answer unreadable");
                ProviderVerdict::TimedOut
            }
        }
    }
}

/// The amount in the currency's minor units (its scale is the currency's).
pub fn minor_units(amount: Amount) -> Option<i64> {
    let scale = amount.currency().scale();
    let value = amount.value() * rust_decimal::Decimal::from(10i64.checked_pow(scale)?);
    use rust_decimal::prelude::ToPrimitive;
    value.normalize().to_i64()
}

impl PaymentProvider for HttpProvider {
    fn name(&self) -> &'static str {
        "http"
    }

    fn execute(
        &self,
        direction: Direction,
        token: &str,
        amount: Amount,
        reference: TransferId,
    ) -> Pin<Box<dyn Future<Output = ProviderVerdict> + Send + '_>> {
        Box::pin(self.call(direction, token.to_owned(), amount, reference))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use shard_agent::money::Currency;

    proptest! {
        #[test]
        fn minor_units_are_the_amount_times_the_currency_scale(cents in 1i64..1_000_000_000_000) {
            if let Ok(usd) = Amount::new(rust_decimal::Decimal::new(cents, 2), Currency::Usd) {
                prop_assert_eq!(minor_units(usd), Some(cents));
            }
            if let Ok(yen) = Amount::new(rust_decimal::Decimal::new(cents, 0), Currency::Jpy) {
                prop_assert_eq!(minor_units(yen), Some(cents));
            }
        }
    }

    #[test]
    fn the_config_names_its_provider_and_hides_its_key() {
        let c: ProviderConfig = serde_json::from_str(
            r#"{"type":"http","base_url":"https://psp.example","api_key":"sk_live_secret","webhook_secret":"whsec_hidden"}"#,
        )
        .expect("parses");
        assert!(!format!("{c:?}").contains("sk_live_secret"));
        assert!(!format!("{c:?}").contains("whsec_hidden"));
        let s: ProviderConfig = serde_json::from_str(r#"{"type":"sandbox"}"#).expect("parses");
        assert_eq!(s, ProviderConfig::Sandbox);
        assert!(serde_json::from_str::<ProviderConfig>(r#"{"type":"paypal"}"#).is_err());
        let bad = HttpProviderConfig {
            base_url: "ftp://x".into(),
            api_key: "k".into(),
            webhook_secret: None,
        };
        assert!(HttpProvider::new(bad).is_err());
    }
}
