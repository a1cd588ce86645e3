//! Concurrent clients through the real HTTP API. Each transfer has its own
//! Idempotency-Key; a timeout, a 503 or a 409 `request_in_progress` is retried
//! with the same key (bounded), and every request's final outcome is recorded.
//! Some requests are refunds: the payee of a transfer acknowledged earlier in
//! the run gives part of it back (`POST /v1/refunds`), so refunds race each
//! other and transfers under every fault too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

pub const PASSWORD: &str = "chaos password";

/// Users set up at once before a run (sign-up is bounded per client address
/// only when rate limits are on, which the harness turns off).
const SETUP_PARALLEL: usize = 8;

/// How many times a setup request is sent while the server answers 503.
const SETUP_ATTEMPTS: u32 = 20;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub token: String,
}

/// What the client learned about one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// 201: the transfer is committed.
    Acknowledged(Uuid),
    /// 202: the transfer is held for review; what became of it (an admin's
    /// release or rejection, its expiry) is read after the run.
    Held(Uuid),
    /// A definite failure (4xx other than 409 in-progress): nothing may have moved.
    Failed {
        code: String,
        transfer_id: Option<Uuid>,
    },
    /// No definite answer within the retry budget.
    Unknown,
}

#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub key: String,
    /// Who pays: for a refund, the original's payee.
    pub from: String,
    pub to: String,
    pub amount: String,
    /// A refund's original transfer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_of: Option<Uuid>,
    /// A dispute opened by `from` (the payer) of this transfer: its outcome,
    /// when acknowledged, is the dispute's ID, and `amount` what it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispute_of: Option<Uuid>,
    pub attempts: u32,
    pub outcome: Outcome,
}

#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub tasks: usize,
    pub transfers: usize,
    pub seed: u64,
    pub attempts_max: u32,
    pub request_timeout: Duration,
    /// Amounts are drawn uniformly from 0.01 to this many cents / 100.
    pub amount_cents_max: i64,
    /// Of every 100 requests, how many are refunds (of a transfer some task
    /// saw acknowledged), and how many are disputes (opened by the payer of
    /// such a transfer, or, as often, an admin's decision on one opened
    /// before), the rest transfers.
    pub refund_percent: u32,
    pub dispute_percent: u32,
    /// The admin token, for deciding disputes (none: disputes stay open).
    pub admin_token: Option<String>,
}

/// A dispute opened during the run.
#[derive(Clone, Debug)]
struct Opened {
    id: Uuid,
}

/// A transfer acknowledged during the run, which its payee may refund.
#[derive(Clone, Debug)]
struct Refundable {
    id: Uuid,
    payer: usize,
    payee: usize,
    cents: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("setup request {what} failed: {detail}")]
    Setup { what: String, detail: String },
}

impl Client {
    pub fn new(base: impl Into<String>, request_timeout: Duration) -> Client {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .pool_max_idle_per_host(64)
            .build()
            .expect("invariant: a reqwest client with only a timeout always builds");
        Client {
            http,
            base: base.into(),
        }
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Value,
    ) -> Result<(StatusCode, Value), reqwest::Error> {
        let mut req = self.http.post(format!("{}{}", self.base, path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Signs up, logs in and funds `count` users named `<prefix><i>`, eight at
    /// a time (each user's three requests in order), in index order.
    pub async fn setup_users(
        &self,
        prefix: &str,
        count: usize,
        deposit: &str,
    ) -> Result<Vec<User>, WorkloadError> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        stream::iter(0..count)
            .map(|i| self.setup_user(format!("{prefix}{i}"), deposit))
            .buffered(SETUP_PARALLEL)
            .try_collect()
            .await
    }

    async fn setup_user(&self, name: String, deposit: &str) -> Result<User, WorkloadError> {
        let fail = |what: &str, detail: String| WorkloadError::Setup {
            what: format!("{what} {name}"),
            detail,
        };
        let (s, b) = self
            .post_retrying("/v1/user", None, None, json!({"username": name, "email": format!("{name}@example.com"), "password": PASSWORD, "currency": "USD"}))
            .await
            .map_err(|e| fail("sign up", e.to_string()))?;
        if s != StatusCode::CREATED {
            return Err(fail("sign up", format!("{s} {b}")));
        }
        let (s, b) = self
            .post_retrying(
                "/v1/login",
                None,
                None,
                json!({"username": name, "password": PASSWORD}),
            )
            .await
            .map_err(|e| fail("login", e.to_string()))?;
        let token = b["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| fail("login", format!("{s} {b}")))?;
        let (s, b) = self
            .post_retrying(
                "/v1/deposit",
                Some(&token),
                Some(&format!("fund-{name}")),
                json!({"amount": deposit, "currency": "USD", "payment_token": "sandbox_ok"}),
            )
            .await
            .map_err(|e| fail("deposit", e.to_string()))?;
        if s != StatusCode::CREATED {
            return Err(fail("deposit", format!("{s} {b}")));
        }
        Ok(User { name, token })
    }

    /// A setup request, sent again while the server answers 503 (its
    /// password-hashing queue is bounded, and setups run side by side), at most
    /// [`SETUP_ATTEMPTS`] times. Sign-up and the deposit are safe to repeat: a
    /// repeated sign-up of the same name is refused as taken only if the
    /// first got through, which a 503 says it did not; the deposit has its key.
    async fn post_retrying(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Value,
    ) -> Result<(StatusCode, Value), reqwest::Error> {
        let mut attempt = 1;
        loop {
            let answer = self.post(path, token, key, body.clone()).await?;
            if answer.0 != StatusCode::SERVICE_UNAVAILABLE || attempt >= SETUP_ATTEMPTS {
                return Ok(answer);
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// One transfer, retried with the same key on timeouts, 503s and 409s.
    pub async fn transfer(
        &self,
        from: &User,
        to: &str,
        amount: &str,
        key: &str,
        attempts_max: u32,
    ) -> (u32, Outcome) {
        let body = json!({"to": to, "amount": amount, "currency": "USD"});
        self.send_money("/v1/transfer", from, body, key, attempts_max)
            .await
    }

    /// One refund of `of` by its payee `from`, retried like a transfer.
    pub async fn refund(
        &self,
        from: &User,
        of: Uuid,
        amount: &str,
        key: &str,
        attempts_max: u32,
    ) -> (u32, Outcome) {
        let body = json!({"transfer_id": of, "amount": amount, "reason": "chaos"});
        self.send_money("/v1/refunds", from, body, key, attempts_max)
            .await
    }

    /// Opens a dispute of `of` as its payer `from`, retried on timeouts and
    /// 503s. Acknowledged with the dispute's ID (a retry that finds its own
    /// earlier attempt's dispute open gets 409 `dispute_exists` naming it).
    pub async fn open_dispute(
        &self,
        from: &User,
        of: Uuid,
        attempts_max: u32,
    ) -> (u32, Outcome, String) {
        let body = json!({"transfer_id": of, "reason": "chaos"});
        for attempt in 1..=attempts_max {
            match self
                .post("/v1/disputes", Some(&from.token), None, body.clone())
                .await
            {
                Ok((s, b)) if s.is_success() => {
                    let id = b["dispute_id"]
                        .as_str()
                        .and_then(|t| Uuid::parse_str(t).ok());
                    let amount = b["amount"].as_str().unwrap_or_default().to_owned();
                    return (
                        attempt,
                        id.map_or(Outcome::Unknown, Outcome::Acknowledged),
                        amount,
                    );
                }
                Ok((s, b)) if s == StatusCode::CONFLICT && b["code"] == "dispute_exists" => {
                    let id = b["detail"]
                        .as_str()
                        .and_then(|d| d.strip_prefix("dispute "))
                        .and_then(|t| Uuid::parse_str(t).ok());
                    return (
                        attempt,
                        id.map_or(Outcome::Unknown, Outcome::Acknowledged),
                        String::new(),
                    );
                }
                Ok((s, _)) if s == StatusCode::SERVICE_UNAVAILABLE => {}
                Ok((_, b)) => {
                    let code = b["code"].as_str().unwrap_or("unknown").to_owned();
                    return (
                        attempt,
                        Outcome::Failed {
                            code,
                            transfer_id: None,
                        },
                        String::new(),
                    );
                }
                Err(_) => {}
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        (attempts_max, Outcome::Unknown, String::new())
    }

    /// An admin's decision on dispute `id`, retried on timeouts and 503s; what
    /// became of it is read at the end (`dispute_state`).
    pub async fn resolve_dispute(&self, admin: &str, id: Uuid, refund: bool, attempts_max: u32) {
        let body = json!({"outcome": if refund { "refund" } else { "reject" }});
        let path = format!("/v1/admin/disputes/{id}/resolve");
        for attempt in 1..=attempts_max {
            match self.post(&path, Some(admin), None, body.clone()).await {
                Ok((s, _)) if s == StatusCode::SERVICE_UNAVAILABLE => {}
                Ok(_) => return,
                Err(_) => {}
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// An admin's release (or rejection) of held transfer `id`, retried on
    /// timeouts and 503s; what became of it is read at the end.
    pub async fn decide_held(&self, admin: &str, id: Uuid, release: bool, attempts_max: u32) {
        let path = format!(
            "/v1/admin/transfers/{id}/{}",
            if release { "release" } else { "reject" }
        );
        for attempt in 1..=attempts_max {
            match self.post(&path, Some(admin), None, json!({})).await {
                Ok((s, _)) if s == StatusCode::SERVICE_UNAVAILABLE => {}
                Ok(_) => return,
                Err(_) => {}
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// Transfer `id` as its payer `user` reads it (`GET /v1/transfer/{id}`).
    pub async fn transfer_state(&self, user: &User, id: Uuid) -> Option<Value> {
        let resp = self
            .http
            .get(format!("{}/v1/transfer/{id}", self.base))
            .bearer_auth(&user.token)
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json::<Value>().await.ok()
    }

    /// Dispute `id` as `user` (a party) reads it: its status and, once
    /// refunded, the amount and the refund's transfer ID.
    pub async fn dispute_state(&self, user: &User, id: Uuid) -> Option<Value> {
        let resp = self
            .http
            .get(format!("{}/v1/disputes/{id}", self.base))
            .bearer_auth(&user.token)
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json::<Value>().await.ok()
    }

    async fn send_money(
        &self,
        path: &str,
        from: &User,
        body: Value,
        key: &str,
        attempts_max: u32,
    ) -> (u32, Outcome) {
        for attempt in 1..=attempts_max {
            match self
                .post(path, Some(&from.token), Some(key), body.clone())
                .await
            {
                Ok((s, b)) if s.is_success() => {
                    let id = b["transfer_id"]
                        .as_str()
                        .and_then(|t| Uuid::parse_str(t).ok());
                    let answered = if s == StatusCode::ACCEPTED {
                        Outcome::Held
                    } else {
                        Outcome::Acknowledged
                    };
                    return (attempt, id.map_or(Outcome::Unknown, answered));
                }
                Ok((s, b))
                    if s == StatusCode::SERVICE_UNAVAILABLE
                        || (s == StatusCode::CONFLICT && b["code"] == "request_in_progress") => {}
                Ok((_, b)) => {
                    let code = b["code"].as_str().unwrap_or("unknown").to_owned();
                    let transfer_id = b["transfer_id"]
                        .as_str()
                        .and_then(|t| Uuid::parse_str(t).ok());
                    return (attempt, Outcome::Failed { code, transfer_id });
                }
                Err(_) => {}
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        (attempts_max, Outcome::Unknown)
    }

    /// Runs `config.transfers` random transfers among `users` on `config.tasks`
    /// concurrent tasks. Deterministic choices for a given seed.
    pub async fn run(&self, users: Arc<Vec<User>>, config: &WorkloadConfig) -> Vec<Record> {
        let per_task = config.transfers.div_ceil(config.tasks);
        let limits = (0..config.tasks)
            .map(|t| Some(per_task.min(config.transfers.saturating_sub(t * per_task))));
        self.run_tasks(users, config, limits.collect(), None).await
    }

    /// Runs random transfers until `stop` is set; each task finishes the transfer
    /// it is on (with its retries) and then returns.
    pub async fn run_until(
        &self,
        users: Arc<Vec<User>>,
        config: &WorkloadConfig,
        stop: Arc<AtomicBool>,
    ) -> Vec<Record> {
        self.run_tasks(users, config, vec![None; config.tasks], Some(stop))
            .await
    }

    async fn run_tasks(
        &self,
        users: Arc<Vec<User>>,
        config: &WorkloadConfig,
        limits: Vec<Option<usize>>,
        stop: Option<Arc<AtomicBool>>,
    ) -> Vec<Record> {
        let mut handles = Vec::with_capacity(limits.len());
        let acknowledged: Arc<std::sync::Mutex<Vec<Refundable>>> = Arc::default();
        let disputes: Arc<std::sync::Mutex<Vec<Opened>>> = Arc::default();
        let held: Arc<std::sync::Mutex<Vec<Uuid>>> = Arc::default();
        for (t, limit) in limits.into_iter().enumerate() {
            let (client, users, config, stop, acknowledged, disputes, held) = (
                self.clone(),
                users.clone(),
                config.clone(),
                stop.clone(),
                acknowledged.clone(),
                disputes.clone(),
                held.clone(),
            );
            handles.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(
                    config.seed.wrapping_mul(1_000_003).wrapping_add(t as u64),
                );
                let mut records = Vec::new();
                for i in 0.. {
                    if limit.is_some_and(|n| i >= n)
                        || stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
                    {
                        break;
                    }
                    let key = format!("s{}-t{t}-{i}", config.seed);
                    let roll = rng.gen_range(0..100);
                    let pick = |rng: &mut StdRng| {
                        let seen = acknowledged
                            .lock()
                            .expect("invariant: no task panics holding the list");
                        (!seen.is_empty()).then(|| seen[rng.gen_range(0..seen.len())].clone())
                    };
                    if roll >= config.refund_percent
                        && roll < config.refund_percent + config.dispute_percent
                    {
                        let decide = rng.gen_bool(0.5);
                        let open = disputes
                            .lock()
                            .expect("invariant: no task panics holding the list")
                            .clone();
                        let waiting = held
                            .lock()
                            .expect("invariant: no task panics holding the list")
                            .clone();
                        let on_held = rng.gen_bool(0.5);
                        match (&config.admin_token, decide && !open.is_empty()) {
                            (Some(admin), true) if on_held && !waiting.is_empty() => {
                                let chosen = waiting[rng.gen_range(0..waiting.len())];
                                let release = rng.gen_bool(0.5);
                                client
                                    .decide_held(admin, chosen, release, config.attempts_max)
                                    .await;
                            }
                            (Some(admin), true) => {
                                let chosen = open[rng.gen_range(0..open.len())].id;
                                let refund = rng.gen_bool(0.5);
                                client
                                    .resolve_dispute(admin, chosen, refund, config.attempts_max)
                                    .await;
                            }
                            _ => {
                                let Some(original) = pick(&mut rng) else {
                                    continue;
                                };
                                let (attempts, outcome, amount) = client
                                    .open_dispute(
                                        &users[original.payer],
                                        original.id,
                                        config.attempts_max,
                                    )
                                    .await;
                                if let Outcome::Acknowledged(id) = outcome {
                                    disputes
                                        .lock()
                                        .expect("invariant: no task panics holding the list")
                                        .push(Opened { id });
                                }
                                records.push(Record {
                                    key,
                                    from: users[original.payer].name.clone(),
                                    to: users[original.payee].name.clone(),
                                    amount,
                                    refund_of: None,
                                    dispute_of: Some(original.id),
                                    attempts,
                                    outcome,
                                });
                            }
                        }
                        continue;
                    }
                    let refund = (roll < config.refund_percent)
                        .then(|| pick(&mut rng))
                        .flatten();
                    if let Some(original) = refund {
                        // Up to the whole original: concurrent and repeated
                        // refunds of one transfer must still never exceed it.
                        let cents = rng.gen_range(1..=original.cents);
                        let amount = format!("{}.{:02}", cents / 100, cents % 100);
                        let (attempts, outcome) = client
                            .refund(
                                &users[original.payee],
                                original.id,
                                &amount,
                                &key,
                                config.attempts_max,
                            )
                            .await;
                        records.push(Record {
                            key,
                            from: users[original.payee].name.clone(),
                            to: users[original.payer].name.clone(),
                            amount,
                            refund_of: Some(original.id),
                            dispute_of: None,
                            attempts,
                            outcome,
                        });
                        continue;
                    }
                    let from = rng.gen_range(0..users.len());
                    let mut to = rng.gen_range(0..users.len() - 1);
                    if to >= from {
                        to += 1;
                    }
                    let cents = rng.gen_range(1..=config.amount_cents_max);
                    let amount = format!("{}.{:02}", cents / 100, cents % 100);
                    let (attempts, outcome) = client
                        .transfer(
                            &users[from],
                            &users[to].name,
                            &amount,
                            &key,
                            config.attempts_max,
                        )
                        .await;
                    if let Outcome::Held(id) = outcome {
                        held.lock()
                            .expect("invariant: no task panics holding the list")
                            .push(id);
                    }
                    if let Outcome::Acknowledged(id) = outcome {
                        acknowledged
                            .lock()
                            .expect("invariant: no task panics holding the list")
                            .push(Refundable {
                                id,
                                payer: from,
                                payee: to,
                                cents,
                            });
                    }
                    records.push(Record {
                        key,
                        from: users[from].name.clone(),
                        to: users[to].name.clone(),
                        amount,
                        refund_of: None,
                        dispute_of: None,
                        attempts,
                        outcome,
                    });
                }
                records
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.expect("invariant: workload tasks do not panic"));
        }
        all
    }

    /// Resolves an unknown outcome by replaying its key and body until a definite
    /// answer or `within` passes.
    pub async fn replay(&self, record: &Record, users: &[User], within: Duration) -> Outcome {
        let Some(from) = users.iter().find(|u| u.name == record.from) else {
            return Outcome::Unknown;
        };
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let (_, outcome) = match (record.refund_of, record.dispute_of) {
                (_, Some(of)) => {
                    let (attempts, outcome, _) = self.open_dispute(from, of, 1).await;
                    (attempts, outcome)
                }
                (Some(of), None) => self.refund(from, of, &record.amount, &record.key, 1).await,
                (None, None) => {
                    self.transfer(from, &record.to, &record.amount, &record.key, 1)
                        .await
                }
            };
            if outcome != Outcome::Unknown {
                return outcome;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Outcome::Unknown
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(1_000))
}

/// Counts of outcomes, for reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub attempted: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub unknown: usize,
    /// Held for review when answered (counted in `acknowledged` too: the
    /// request was accepted).
    pub held: usize,
    pub retries: u64,
    pub failed_by_code: std::collections::BTreeMap<String, usize>,
}

pub fn summarize(records: &[Record]) -> Summary {
    let mut s = Summary {
        attempted: records.len(),
        ..Summary::default()
    };
    for r in records {
        s.retries += u64::from(r.attempts.saturating_sub(1));
        match r.outcome {
            Outcome::Acknowledged(_) => s.acknowledged += 1,
            Outcome::Held(_) => {
                s.acknowledged += 1;
                s.held += 1;
            }
            Outcome::Failed { ref code, .. } => {
                s.failed += 1;
                *s.failed_by_code.entry(code.clone()).or_default() += 1;
            }
            Outcome::Unknown => s.unknown += 1,
        }
    }
    s
}
