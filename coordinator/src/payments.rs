//! The payment provider money enters and leaves through.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

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
