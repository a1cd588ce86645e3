//! The two ways into the wallet the benchmark measures: the coordinator called
//! in-process (protocol cost only) and the real HTTP API (plus HTTP, JSON and the
//! session lookup).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use shard_agent::transfer::Submitted;
use shard_agent::{Amount, FailureCode, TransferRecord, TransferState};

use super::load::{Driver, Outcome};
use super::setup::{BenchUser, CURRENCY};
use coordinator::api::error::ApiError;
use coordinator::inputs::{IdemKey, Username};
use coordinator::service::{Coordinator, Payer};

pub struct InProcess {
    pub coordinator: Arc<Coordinator>,
}

impl Driver for InProcess {
    fn transfer(
        &self,
        _client: usize,
        key: String,
        from: &BenchUser,
        to: &BenchUser,
        amount: Decimal,
    ) -> impl Future<Output = Outcome> + Send {
        let coordinator = self.coordinator.clone();
        let payer = from.row.clone();
        let payee = to.row.username.clone();
        async move {
            let (Ok(to), Ok(amount), Ok(key)) = (
                Username::parse(&payee),
                Amount::new(amount, CURRENCY),
                IdemKey::parse(&key),
            ) else {
                return Outcome::Failed("invalid input".into());
            };
            match coordinator
                .transfer(Payer::Verified(payer), &to, amount, &key)
                .await
            {
                Ok(Submitted::New(r) | Submitted::Replayed(r)) => outcome_of(&r),
                Ok(Submitted::InProgress(_)) => Outcome::Failed("request_in_progress".into()),
                Ok(Submitted::KeyReused) => Outcome::Failed("idempotency_key_reused".into()),
                Err(e) => Outcome::Failed(ApiError::from(e).code.as_str().to_owned()),
            }
        }
    }
}

fn outcome_of(r: &TransferRecord) -> Outcome {
    match (r.state, r.failure_code) {
        (TransferState::Committed, _) => Outcome::Committed,
        (TransferState::Aborted, Some(code)) if !code.is_retryable() => {
            Outcome::Rejected(code.as_str().to_owned())
        }
        (TransferState::Aborted, Some(code)) => Outcome::Failed(code.as_str().to_owned()),
        _ => Outcome::Failed("undecided".into()),
    }
}

/// Clients of the real HTTP API, each with its own keep-alive connection.
pub struct Http {
    /// `POST /v1/transfer`, parsed once: the load generator shares the cores
    /// it measures, so it does no work per request that a client need not.
    transfer_url: reqwest::Url,
    client: reqwest::Client,
}

/// The request body, serialized straight from a struct.
#[derive(serde::Serialize)]
struct TransferBody<'a> {
    to: &'a str,
    amount: String,
    currency: &'static str,
}

impl Http {
    pub fn new(base: &str, clients: usize) -> anyhow::Result<Http> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(clients)
            .timeout(Duration::from_secs(30))
            .build()?;
        let transfer_url = reqwest::Url::parse(&format!("{base}/v1/transfer"))?;
        Ok(Http {
            transfer_url,
            client,
        })
    }
}

impl Driver for Http {
    fn transfer(
        &self,
        _client: usize,
        key: String,
        from: &BenchUser,
        to: &BenchUser,
        amount: Decimal,
    ) -> impl Future<Output = Outcome> + Send {
        let request = self
            .client
            .post(self.transfer_url.clone())
            .bearer_auth(&from.token)
            .header("idempotency-key", key)
            .json(&TransferBody {
                to: &to.row.username,
                amount: amount.to_string(),
                currency: CURRENCY.code(),
            });
        async move {
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) => return Outcome::Failed(format!("http: {}", short(&e))),
            };
            if response.status().is_success() {
                return Outcome::Committed;
            }
            let status = response.status();
            let code = response
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned))
                .unwrap_or_else(|| format!("http {status}"));
            if code.parse::<FailureCode>().is_ok_and(|c| !c.is_retryable()) {
                Outcome::Rejected(code)
            } else {
                Outcome::Failed(code)
            }
        }
    }
}

fn short(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "request".into()
    }
}
