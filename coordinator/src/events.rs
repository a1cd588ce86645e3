//! The event relay: publishes each shard's outbox (the events `wallet_post`
//! writes with the money, in the same transaction) to NATS JetStream, then
//! takes their rows out of the outbox (marks them published); prunes old
//! events after the retention; keeps the lag
//! that `/readyz` and `/metrics` show.
//!
//! Guarantees, and why they hold:
//! - **Nothing lost, nothing invented.** An event exists exactly when its
//!   ledger entry committed. The relay takes an event's outbox row out
//!   (marks it published) only after JetStream
//!   acknowledged it, so a crash between the two publishes it again.
//! - **Duplicates dropped by ID.** Every message carries the event's ID as
//!   its `Nats-Msg-Id`, so JetStream drops a re-publish within the stream's
//!   duplicate window (`duplicate_window_s`).
//! - **One relay per shard.** Every coordinator runs a relay, but a relay
//!   publishes a shard's outbox only while it holds the shard's lease (a row
//!   on the shard, taken for `lease_ms`), and marks events only under it. A
//!   publish round is bounded by `publish_timeout_ms`, well inside the lease.
//! - **Per-user order.** A shard's outbox is read in the order the events
//!   were written, which for one user is seq order; a consumer that applies a
//!   user's events by `seq` (skipping one it has seen) is exact even after a
//!   failed publish is retried behind later ones.
//!
//! Each shard has a task of its own, so a slow or unreachable shard delays
//! only its own events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use router::ShardId;
use serde::{Deserialize, Serialize};
use shard_agent::events::{Event, OutboxLag, Pending};
use shard_agent::money::format_money;
use shard_agent::{Currency, ShardAgent};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::cluster::Cluster;

/// Where events go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EventsMode {
    /// No broker: the outbox feeds `GET /v1/notifications` only, and rows are
    /// pruned after the retention.
    #[default]
    None,
    /// The relay publishes to NATS JetStream at `url`.
    Nats,
}

impl EventsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EventsMode::None => "none",
            EventsMode::Nats => "nats",
        }
    }
}

/// The `events` section of the configuration. Every bound is named here.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub mode: EventsMode,
    /// The broker, `nats://host:port` (required for `nats`).
    pub url: Option<String>,
    /// The JetStream stream, created if missing, holding `<subject_prefix>.>`.
    pub stream: String,
    /// Subjects are `<subject_prefix>.<type>.shard<id>`.
    pub subject_prefix: String,
    /// Events one publish round reads and publishes per shard.
    pub batch_max: usize,
    /// Pause of a shard's relay when its outbox is empty.
    pub poll_ms: u64,
    /// Longest wait for a round's acknowledgements (and to connect).
    pub publish_timeout_ms: u64,
    /// Length of a relay's lease on a shard's outbox; renewed every round.
    pub lease_ms: u64,
    /// JetStream's duplicate window on a stream this relay creates.
    pub duplicate_window_s: u64,
    /// How long a stream this relay creates keeps messages (0: until an
    /// operator removes them). Consumers must read within it.
    pub stream_max_age_s: u64,
    /// Events (published ones; with `none`, all) older than this are pruned.
    /// The notification feed reaches back this far.
    pub retention_s: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            mode: EventsMode::None,
            url: None,
            stream: "WALLET_EVENTS".into(),
            subject_prefix: "wallet.events".into(),
            batch_max: 256,
            poll_ms: 100,
            publish_timeout_ms: 5_000,
            lease_ms: 15_000,
            duplicate_window_s: 120,
            stream_max_age_s: 7 * 24 * 3600,
            retention_s: 30 * 24 * 3600,
        }
    }
}

impl EventsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.mode == EventsMode::Nats && self.url.is_none() {
            return Err("events.mode nats needs events.url (nats://host:port)".into());
        }
        if !(1..=shard_agent::events::EVENT_PAGE_MAX as usize).contains(&self.batch_max) {
            return Err("events.batch_max must be between 1 and 1000".into());
        }
        if self.publish_timeout_ms == 0 || self.lease_ms < 2 * self.publish_timeout_ms {
            return Err("events.lease_ms must be at least twice events.publish_timeout_ms".into());
        }
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|t| {
                    !t.is_empty()
                        && t.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
                })
        };
        if !token_ok(&self.subject_prefix) {
            return Err(
                "events.subject_prefix must be dot-separated letters, digits, _ or -".into(),
            );
        }
        if self.stream.is_empty()
            || !self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        {
            return Err("events.stream must be letters, digits, _ or -".into());
        }
        Ok(())
    }
}

/// What is published: one JSON object per event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMessage {
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    pub seq: i64,
    pub transfer_id: String,
    /// Signed, at the currency's scale: negative takes money out of the
    /// account (or, for a hold, sets it aside).
    pub amount: String,
    pub currency: String,
    pub balance_after: String,
    pub counterparty: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The shard whose relay published it.
    pub shard: u16,
}

impl EventMessage {
    pub fn new(e: &Event, shard: ShardId) -> EventMessage {
        let money = |v| match e.currency.parse::<Currency>() {
            Ok(c) => format_money(v, c),
            Err(_) => v.to_string(),
        };
        EventMessage {
            event_id: e.event_id.to_string(),
            kind: e.kind.clone(),
            user_id: e.user_id.to_string(),
            seq: e.seq,
            transfer_id: e.transfer_id.to_string(),
            amount: money(e.amount),
            currency: e.currency.clone(),
            balance_after: money(e.balance_after),
            counterparty: e.counterparty.clone(),
            created_at: e.created_at,
            shard: shard.0,
        }
    }
}

/// The subject of an event of `kind` published from `shard`.
pub fn subject(prefix: &str, kind: &str, shard: ShardId) -> String {
    format!("{prefix}.{kind}.shard{}", shard.0)
}

/// Pause between a shard's lag readings.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Pause of a shard's relay after an error (shard or broker), so a fault
/// costs one attempt a second, not a busy loop.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How often a shard's events are pruned, and how many rows one pass deletes.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_BATCH: i64 = 10_000;
/// How often the relay looks for shards added to the map.
const SHARDS_EVERY: Duration = Duration::from_secs(1);

/// The relay's state, shared with `/readyz` and `/metrics`.
pub struct Relay {
    config: EventsConfig,
    /// This relay's name in the shards' leases.
    holder: String,
    js: Option<jetstream::Context>,
    client: Option<async_nats::Client>,
    lag: Mutex<BTreeMap<ShardId, OutboxLag>>,
    /// Whether the stream is known to exist (checked again after an error).
    stream_ok: AtomicBool,
    /// Events this relay published and JetStream acknowledged.
    published: AtomicU64,
}

/// The relay's view for `/readyz`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct EventsReadiness {
    /// `none` or `nats`.
    pub mode: &'static str,
    /// With `nats`: whether the broker connection is up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_ok: Option<bool>,
    /// Unpublished events across the shards (with `nats`).
    pub unpublished: i64,
    /// Age in seconds of the oldest unpublished event (with `nats`).
    pub oldest_unpublished_s: f64,
    pub shards: Vec<ShardLag>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ShardLag {
    pub shard: u16,
    pub unpublished: i64,
    pub oldest_unpublished_s: f64,
}

impl Relay {
    /// Connects to the broker (in the background: a broker that is down
    /// delays events, never the coordinator) and starts the relay's tasks.
    pub async fn start(
        config: EventsConfig,
        cluster: Arc<Cluster>,
    ) -> Result<(Arc<Relay>, JoinHandle<()>), String> {
        config.validate()?;
        let (client, js) = match config.mode {
            EventsMode::None => (None, None),
            EventsMode::Nats => {
                let url = config.url.clone().unwrap_or_default();
                let client = async_nats::ConnectOptions::new()
                    .name("wallet-relay")
                    .connection_timeout(Duration::from_millis(config.publish_timeout_ms))
                    .retry_on_initial_connect()
                    .connect(url.as_str())
                    .await
                    .map_err(|e| format!("events.url {url}: {e}"))?;
                let mut js = jetstream::new(client.clone());
                js.set_timeout(Duration::from_millis(config.publish_timeout_ms));
                (Some(client), Some(js))
            }
        };
        let relay = Arc::new(Relay {
            holder: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
            config,
            js,
            client,
            lag: Mutex::new(BTreeMap::new()),
            stream_ok: AtomicBool::new(false),
            published: AtomicU64::new(0),
        });
        let task = tokio::spawn(relay.clone().supervise(cluster));
        Ok((relay, task))
    }

    pub fn mode(&self) -> EventsMode {
        self.config.mode
    }

    /// Events this relay has published (acknowledged by JetStream) so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// The lag as last read, per shard.
    pub fn lag(&self) -> BTreeMap<ShardId, OutboxLag> {
        self.lag
            .lock()
            .expect("invariant: the lag map's lock is never held across a panic")
            .clone()
    }

    pub fn readiness(&self) -> EventsReadiness {
        let lag = self.lag();
        EventsReadiness {
            mode: self.config.mode.as_str(),
            broker_ok: self
                .client
                .as_ref()
                .map(|c| c.connection_state() == async_nats::connection::State::Connected),
            unpublished: lag.values().map(|l| l.unpublished).sum(),
            oldest_unpublished_s: lag.values().map(|l| l.oldest_age_s).fold(0.0, f64::max),
            shards: lag
                .iter()
                .map(|(s, l)| ShardLag {
                    shard: s.0,
                    unpublished: l.unpublished,
                    oldest_unpublished_s: l.oldest_age_s,
                })
                .collect(),
        }
    }

    /// Starts a task per shard, and one for each shard a rebalance adds.
    /// A shard's task ends when the shard leaves the map.
    async fn supervise(self: Arc<Self>, cluster: Arc<Cluster>) {
        let mut running = ShardTasks::default();
        let mut tick = tokio::time::interval(SHARDS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let routing = cluster.routing();
            running.0.retain(|_, task| !task.is_finished());
            for id in routing.agents.keys() {
                if !running.0.contains_key(id) {
                    let task = tokio::spawn(self.clone().run_shard(cluster.clone(), *id));
                    running.0.insert(*id, task);
                }
            }
        }
    }

    /// One shard's relay and pruning, and its lag readings, until the shard
    /// leaves the map. The lag is read on its own clock: a round stuck on a
    /// dead broker lasts up to `publish_timeout_ms`, and `/readyz` must not
    /// show the lag from before the broker died for that long. Only the
    /// relay decides when the task ends, so the two always end together.
    async fn run_shard(self: Arc<Self>, cluster: Arc<Cluster>, shard: ShardId) {
        tokio::select! {
            () = self.watch_lag(&cluster, shard) => {}
            () = self.relay_shard(&cluster, shard) => {}
        }
        self.lag
            .lock()
            .expect("invariant: the lag map's lock is never held across a panic")
            .remove(&shard);
    }

    /// Reads the shard's lag every `LAG_EVERY`, for as long as it is polled.
    async fn watch_lag(&self, cluster: &Cluster, shard: ShardId) {
        loop {
            let agent = cluster.routing().agents.get(&shard).cloned();
            if let Some(agent) = agent {
                self.read_lag(&agent).await;
            }
            tokio::time::sleep(LAG_EVERY).await;
        }
    }

    /// Publishes the shard's outbox and prunes its events until it leaves
    /// the map.
    async fn relay_shard(&self, cluster: &Cluster, shard: ShardId) {
        let mut next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
        // Until when this relay holds the shard's lease, by its own clock,
        // counted from before the renewal was sent.
        let mut lease_until: Option<tokio::time::Instant> = None;
        // Whether the last round failed: a failure is logged once as a
        // warning when it starts, and the recovery once, not every second.
        let mut failing = false;
        loop {
            let Some(agent) = cluster.routing().agents.get(&shard).cloned() else {
                return;
            };
            let now = tokio::time::Instant::now();
            if now >= next_prune {
                next_prune = now + PRUNE_EVERY;
                self.prune(&agent).await;
            }
            let pause = match self.config.mode {
                EventsMode::None => SHARDS_EVERY,
                EventsMode::Nats => match self.publish_round(&agent, &mut lease_until).await {
                    Ok(round @ (Round::Full | Round::Partial)) => {
                        if std::mem::take(&mut failing) {
                            info!(%shard, "event relay publishing again");
                        }
                        if matches!(round, Round::Full) {
                            Duration::ZERO
                        } else {
                            Duration::from_millis(self.config.poll_ms)
                        }
                    }
                    // Another coordinator's relay has the shard: look again
                    // well before its lease could run out.
                    Ok(Round::NotOurs) => {
                        Duration::from_millis(self.config.lease_ms / 4).min(ERROR_PAUSE)
                    }
                    Err(e) => {
                        lease_until = None;
                        if std::mem::replace(&mut failing, true) {
                            debug!(%shard, error = %e, "event relay round failed");
                        } else {
                            warn!(%shard, error = %e, "event relay round failed; events wait in the outbox");
                        }
                        ERROR_PAUSE
                    }
                },
            };
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }

    async fn read_lag(&self, agent: &ShardAgent) {
        if self.config.mode == EventsMode::None {
            return;
        }
        match agent.outbox_lag().await {
            Ok(lag) => {
                self.lag
                    .lock()
                    .expect("invariant: the lag map's lock is never held across a panic")
                    .insert(agent.id(), lag);
            }
            Err(e) => debug!(shard = %agent.id(), error = %e, "could not read the outbox lag"),
        }
    }

    async fn prune(&self, agent: &ShardAgent) {
        let retention = Duration::from_secs(self.config.retention_s);
        match agent
            .prune_events(retention, self.config.mode == EventsMode::None, PRUNE_BATCH)
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(shard = %agent.id(), pruned = n, "pruned old events"),
            Err(e) => debug!(shard = %agent.id(), error = %e, "could not prune events"),
        }
    }

    /// Takes the shard's lease (renewed once half of it has passed, so a
    /// round always has at least `lease_ms / 2`, which the configuration
    /// keeps above `publish_timeout_ms`), publishes up to `batch_max`
    /// events, and marks the acknowledged ones.
    async fn publish_round(
        &self,
        agent: &ShardAgent,
        lease_until: &mut Option<tokio::time::Instant>,
    ) -> Result<Round, RelayError> {
        let js = self.js.as_ref().ok_or(RelayError::NoBroker)?;
        let lease = Duration::from_millis(self.config.lease_ms);
        let now = tokio::time::Instant::now();
        if lease_until.is_none_or(|until| until < now + lease / 2) {
            *lease_until = None;
            if !agent.take_relay_lease(&self.holder, lease).await? {
                return Ok(Round::NotOurs);
            }
            *lease_until = Some(now + lease);
        }
        // The round's bound: reading, publishing and the acks all within
        // it, so the round ends inside the lease it started with.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.publish_timeout_ms);
        let events = tokio::time::timeout_at(
            deadline,
            agent.unpublished_events(self.config.batch_max as i64),
        )
        .await
        .map_err(|_| RelayError::Broker("reading the outbox timed out".into()))??;
        if events.is_empty() {
            return Ok(Round::Partial);
        }
        let shard = agent.id();
        let (acked, duplicates) = self.publish(js, shard, &events, deadline).await;
        crate::error::crash_point!("relay-after-publish");
        self.published
            .fetch_add(acked.len() as u64, Ordering::Relaxed);
        let label = shard.0.to_string();
        metrics::counter!("wallet_events_published_total", "shard" => label.clone())
            .increment(acked.len() as u64);
        metrics::counter!("wallet_events_duplicates_total", "shard" => label).increment(duplicates);
        if !acked.is_empty() {
            let marked = agent.mark_published(&self.holder, &acked).await?;
            if marked < acked.len() as u64 {
                *lease_until = None;
                warn!(%shard, acked = acked.len(), marked, "relay lease lost: the next holder publishes those events again");
            }
        }
        if acked.len() < events.len() {
            self.stream_ok.store(false, Ordering::Relaxed);
            return Err(RelayError::Broker(format!(
                "{} of {} events acknowledged",
                acked.len(),
                events.len()
            )));
        }
        Ok(if events.len() >= self.config.batch_max {
            Round::Full
        } else {
            Round::Partial
        })
    }

    /// Publishes `events` in order until `deadline`, then waits for their
    /// acks until the same deadline. Returns the events JetStream
    /// acknowledged (whatever happened to the others: those are marked, the
    /// others are published again by a later round) and how many it called
    /// duplicates.
    async fn publish<'a>(
        &self,
        js: &jetstream::Context,
        shard: ShardId,
        events: &'a [Pending],
        deadline: tokio::time::Instant,
    ) -> (Vec<&'a Pending>, u64) {
        if let Err(e) = tokio::time::timeout_at(deadline, self.ensure_stream(js))
            .await
            .unwrap_or_else(|_| Err(RelayError::Broker("stream check timed out".into())))
        {
            debug!(%shard, error = %e, "event stream not ready");
            return (Vec::new(), 0);
        }
        let mut acks = Vec::with_capacity(events.len());
        for pending in events {
            let e = &pending.event;
            let body = match serde_json::to_vec(&EventMessage::new(e, shard)) {
                Ok(b) => b,
                Err(err) => {
                    warn!(%shard, event_id = %e.event_id, error = %err, "event not serializable");
                    break;
                }
            };
            let publish = jetstream::context::Publish::build()
                .payload(body.into())
                .message_id(e.event_id.to_string());
            let sent = tokio::time::timeout_at(
                deadline,
                js.send_publish(
                    subject(&self.config.subject_prefix, &e.kind, shard),
                    publish,
                ),
            )
            .await;
            match sent {
                Ok(Ok(ack)) => acks.push((pending, ack)),
                // What was sent before still counts once acknowledged.
                Ok(Err(err)) => {
                    debug!(%shard, error = %err, "event publish not sent");
                    break;
                }
                Err(_) => break,
            }
        }
        let mut acked = Vec::with_capacity(acks.len());
        let mut duplicates = 0u64;
        for (pending, ack) in acks {
            match tokio::time::timeout_at(deadline, ack).await {
                Ok(Ok(a)) => {
                    if a.duplicate {
                        duplicates += 1;
                    }
                    acked.push(pending);
                }
                Ok(Err(err)) => debug!(%shard, error = %err, "event publish not acknowledged"),
                // Past the deadline: what is acked so far is kept.
                Err(_) => break,
            }
        }
        (acked, duplicates)
    }

    /// Creates the stream if it does not exist (the broker may have come up
    /// empty).
    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<(), RelayError> {
        if self.stream_ok.load(Ordering::Relaxed) {
            return Ok(());
        }
        js.get_or_create_stream(jetstream::stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![format!("{}.>", self.config.subject_prefix)],
            duplicate_window: Duration::from_secs(self.config.duplicate_window_s),
            max_age: Duration::from_secs(self.config.stream_max_age_s),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| RelayError::Broker(format!("stream {}: {e}", self.config.stream)))?;
        self.stream_ok.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// How a relay round went.
enum Round {
    /// It read a whole batch: there may be more at once.
    Full,
    /// It read less than a batch (or nothing).
    Partial,
    /// Another relay holds the shard's lease.
    NotOurs,
}

/// Why a relay round stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("no broker configured")]
    NoBroker,
    #[error(transparent)]
    Shard(#[from] shard_agent::ShardError),
    #[error("broker: {0}")]
    Broker(String),
    #[error(transparent)]
    Crashed(#[from] crate::error::CoordinatorError),
}

/// The per-shard tasks, aborted when the supervisor is (the coordinator
/// stops).
#[derive(Default)]
struct ShardTasks(BTreeMap<ShardId, JoinHandle<()>>);

impl Drop for ShardTasks {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}
