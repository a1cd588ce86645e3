//! The wallet's operations, independent of HTTP: the API calls these, and so can a
//! benchmark or a test in-process.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use router::{bucket_of, UserId};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use shard_agent::disputes::{
    dispute_bucket, new_dispute_id, Dispute, DisputeState, Opened, Rejected,
};
use shard_agent::external::{Direction, ExternalOrder};
use shard_agent::idempotency::IdempotencyKey;
use shard_agent::policy::{HoldEnded, LimitRow, Refundable, RuleHit};
use shard_agent::records::UserRow;
use shard_agent::rules::WalletRules;
use shard_agent::transfer::{Submitted, TransferOrder};
use shard_agent::users::{AccountView, Created, NewUser};
use shard_agent::{
    Amount, Currency, ShardError, TransferId, TransferKind, TransferRecord, TransferState,
};
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};
use uuid::Uuid;

use crate::auth::{new_token, token_hash, token_user, AuthError, PasswordPolicy, PasswordWork};
use crate::batch::Batcher;
use crate::cluster::{Cluster, ClusterError, Routing};
use crate::config::{Config, Limits, LockMode};
use crate::error::CoordinatorError;
use crate::events::Relay;
use crate::inputs::{Email, IdemKey, Password, Username};
use crate::payments::{call_for, PaymentProvider};
use crate::recovery::{Recovery, RecoveryLimits};
use crate::redis_lock::LockService;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A shard runs SQL functions of another version than this build's.
    #[error(transparent)]
    Functions(ShardError),
}

/// Who pays for a transfer.
pub enum Payer {
    /// Read from their session already (the API's `Auth`), or trusted
    /// (in-process callers).
    Verified(UserRow),
    /// Named by a token whose session has not been read. It is read on the
    /// payer's shard: inside the group's check (`wallet_batch_check`), which
    /// saves a round trip per request, or, in Redis mode across shards, just
    /// before the transfer runs. Either way nothing moves without a live session.
    Claimed {
        username: Username,
        /// SHA-256 of the token, as the sessions table stores it.
        token_hash: Vec<u8>,
    },
}

impl Payer {
    pub fn username(&self) -> &str {
        match self {
            Payer::Verified(user) => &user.username,
            Payer::Claimed { username, .. } => username.as_str(),
        }
    }
}

/// Counts a transfer by path and outcome and times it by path (`/metrics`).
fn record_transfer(
    path: &'static str,
    result: &Result<Submitted, CoordinatorError>,
    took: Duration,
) {
    let outcome: String = match result {
        Ok(Submitted::New(r)) | Ok(Submitted::Replayed(r)) => match r.failure_code {
            None => "committed".into(),
            Some(code) => code.as_str().into(),
        },
        Ok(Submitted::InProgress(_)) => "in_progress".into(),
        Ok(Submitted::KeyReused) => "key_reused".into(),
        Err(CoordinatorError::Overloaded { .. }) => "overloaded".into(),
        Err(CoordinatorError::Unauthorized) => "unauthorized".into(),
        Err(_) => "error".into(),
    };
    metrics::counter!("wallet_transfers_total", "path" => path, "outcome" => outcome).increment(1);
    metrics::histogram!("wallet_transfer_duration_seconds", "path" => path)
        .record(took.as_secs_f64());
}

fn password_error(e: AuthError) -> CoordinatorError {
    match e {
        AuthError::Busy { queue_max } => CoordinatorError::Overloaded {
            queue: "password hashing",
            queued_max: queue_max,
        },
        other => CoordinatorError::Corrupt(other.to_string()),
    }
}

pub struct Session {
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub user: UserRow,
}

pub enum SignUp {
    Created(UserRow),
    UsernameTaken,
}

/// What opening a dispute came to, besides "no such transfer".
pub enum DisputeOpen {
    Opened(Dispute),
    /// The transfer has an open dispute: this one.
    Exists(Dispute),
    /// Refunds gave the whole transfer back.
    NothingToDispute,
    /// The transfer is older than `dispute_window_days`.
    WindowPassed,
}

/// What an admin's decision on a held transfer came to.
pub enum HeldDecided {
    /// Released (committed) or rejected by this decision.
    Now(TransferRecord),
    /// Not held: decided before, or expired; the record as it stands.
    NotHeld(TransferRecord),
    /// The release was refused on another count (a fault: retry).
    Refused(shard_agent::FailureCode),
}

/// Held transfers ended by one expiry pass, per shard, at most.
pub const HOLD_EXPIRY_BATCH: i64 = 100;

/// How often the expiry pass runs.
pub const HOLD_EXPIRY_PASS_MS: u64 = 1_000;

/// What an admin's decision on a dispute came to.
pub enum DisputeResolved {
    /// Resolved by this decision.
    Now(Dispute),
    /// Resolved before (by another decision): as it stands.
    Already(Dispute),
    /// The refund was refused (the payee's money does not cover it).
    Refused(shard_agent::FailureCode),
    /// The refund is still being decided; asking again answers.
    InProgress,
}

/// The coordinator: routing, the protocols, and the background recovery.
pub struct Coordinator {
    cluster: Arc<Cluster>,
    lock_mode: LockMode,
    locks: Option<Arc<LockService>>,
    recovery: Arc<Recovery>,
    provider: Arc<dyn PaymentProvider>,
    passwords: PasswordWork,
    limits: Limits,
    /// The wallet's rules as configured (the shards' checks enforce them).
    rules: Arc<WalletRules>,
    /// Every transfer's groups (in Redis mode, the same-shard ones).
    batcher: Arc<Batcher>,
    /// The outbox's relay (with `events.mode` none: its pruning and lag only).
    relay: Arc<Relay>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop_background();
    }
}

/// Refuses to start against a shard whose SQL functions are not this build's
/// (`shard_agent::functions`). A shard that does not answer now is not a
/// reason to stay down: its connections are checked as they are made, like
/// every connection.
async fn check_functions(cluster: &Cluster) -> Result<(), StartError> {
    let routing = cluster.routing();
    let checks =
        futures::future::join_all(routing.agents.values().map(|a| a.check_functions())).await;
    for checked in checks {
        match checked {
            Ok(()) => {}
            Err(e @ ShardError::FunctionsMismatch { .. }) => return Err(StartError::Functions(e)),
            Err(e) => warn!(%e, "could not check a shard's SQL functions at start"),
        }
    }
    Ok(())
}

impl Coordinator {
    /// Loads the bucket map and starts the epoch watch and the recovery loop (its
    /// first pass runs at once, finishing whatever an earlier crash left).
    pub async fn start(
        config: &Config,
        provider: Arc<dyn PaymentProvider>,
    ) -> Result<Coordinator, StartError> {
        config.validate().map_err(StartError::Config)?;
        let cluster = Arc::new(
            Cluster::open(&config.catalog_dsn, &config.shards, config.agent_config()).await?,
        );
        check_functions(&cluster).await?;
        let limits = config.limits.clone();
        // Recovery completes pending credits whenever Redis is configured, even in
        // 2PC mode, so switching modes never strands a Redis-mode transfer.
        let locks = match &config.redis {
            Some(r) => Some(Arc::new(
                LockService::new(r.clone(), cluster.clone())
                    .map_err(|e| StartError::Config(e.to_string()))?,
            )),
            None => None,
        };
        let recovery = Arc::new(Recovery::new(
            cluster.clone(),
            locks.clone(),
            Some((
                provider.clone(),
                Duration::from_millis(limits.payment_timeout_ms),
            )),
            RecoveryLimits {
                in_doubt_after: Duration::from_millis(limits.in_doubt_after_ms),
                probe_timeout: Duration::from_millis(limits.recovery_probe_timeout_ms),
                pass_max: Duration::from_millis(limits.recovery_pass_max_ms),
            },
        ));
        let (relay, relay_task) = Relay::start(config.events.clone(), cluster.clone())
            .await
            .map_err(StartError::Config)?;
        let tasks = vec![
            relay_task,
            tokio::spawn(
                cluster
                    .clone()
                    .watch(Duration::from_millis(limits.epoch_poll_ms)),
            ),
            tokio::spawn(
                recovery
                    .clone()
                    .run_forever(Duration::from_millis(limits.recovery_interval_ms)),
            ),
            tokio::spawn(expire_holds_forever(
                cluster.clone(),
                Duration::from_secs(config.rules.hold_expiry_s),
            )),
        ];
        let group_locks = match config.lock_mode {
            LockMode::TwoPc => None,
            LockMode::Redis => Some(locks.clone().ok_or_else(|| {
                StartError::Config("lock_mode redis needs a [redis] section".into())
            })?),
        };
        let batcher = Arc::new(Batcher::new(
            limits.batch_max,
            limits.batch_workers,
            Duration::from_micros(limits.batch_linger_us),
            limits.batch_queue_max,
            group_locks,
        ));
        info!(
            lock_mode = config.lock_mode.as_str(),
            batch_max = limits.batch_max,
            "coordinator started"
        );
        Ok(Coordinator {
            batcher,
            cluster,
            lock_mode: config.lock_mode,
            locks,
            recovery,
            provider,
            passwords: PasswordWork::new(
                PasswordPolicy {
                    memory_kib: limits.argon2_memory_kib,
                    iterations: limits.argon2_iterations,
                },
                limits.password_workers,
                limits.password_queue_max,
            ),
            limits,
            rules: Arc::new(config.rules.clone()),
            relay,
            tasks,
        })
    }

    /// The wallet's rules as configured.
    pub fn rules(&self) -> &WalletRules {
        &self.rules
    }

    /// The groups so far.
    pub fn batch_stats(&self) -> crate::batch::GroupStats {
        self.batcher.stats()
    }

    /// Users and shards whose transfers run alone for now (`crate::suspects`).
    pub fn marked(&self) -> usize {
        self.batcher.marked()
    }

    /// Stops the epoch watch and the recovery loop now, even while other holders of
    /// this coordinator (open HTTP connections) still exist: what a crash does to
    /// them. Dropping the last holder does the same.
    pub fn stop_background(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    pub fn recovery(&self) -> &Arc<Recovery> {
        &self.recovery
    }

    pub fn lock_mode(&self) -> LockMode {
        self.lock_mode
    }

    pub fn locks(&self) -> Option<&Arc<LockService>> {
        self.locks.as_ref()
    }

    /// The event relay (its lag, for `/readyz` and `/metrics`).
    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// `user`'s events with seq above `after`, at most `limit`, from the
    /// user's shard (the notification feed).
    pub async fn notifications(
        &self,
        user: &UserRow,
        after: i64,
        limit: i64,
    ) -> Result<Vec<shard_agent::events::Event>, CoordinatorError> {
        self.routed(|routing| async move {
            Ok(routing
                .agent_for(&user.user_id)
                .notifications(user.user_id, after, limit)
                .await?)
        })
        .await
    }

    fn move_wait(&self) -> Duration {
        Duration::from_millis(self.limits.move_wait_ms)
    }

    /// [`retry_moved`] with this coordinator's map and bound.
    async fn routed<T, Fut>(
        &self,
        op: impl FnMut(Arc<Routing>) -> Fut,
    ) -> Result<T, CoordinatorError>
    where
        Fut: std::future::Future<Output = Result<T, CoordinatorError>>,
    {
        retry_moved(&self.cluster, self.move_wait(), op).await
    }

    pub async fn sign_up(
        &self,
        username: Username,
        email: Email,
        password: Password,
        currency: Currency,
    ) -> Result<SignUp, CoordinatorError> {
        let user_id = username.user_id();
        let password_hash = self
            .passwords
            .hash(password.into_inner())
            .await
            .map_err(password_error)?;
        let new = NewUser {
            user_id,
            bucket: bucket_of(&user_id),
            username: username.as_str().to_owned(),
            email: email.as_str().to_owned(),
            password_hash,
            currency,
        };
        let created = self
            .routed(|routing| {
                let new = &new;
                async move { Ok(routing.agent_for(&user_id).create_user(new).await?) }
            })
            .await?;
        match created {
            Created::UsernameTaken => Ok(SignUp::UsernameTaken),
            Created::Yes => {
                info!(user = %user_id, "user signed up");
                Ok(SignUp::Created(UserRow {
                    user_id,
                    username: new.username,
                    email: new.email,
                    currency,
                    created_at: Utc::now(),
                }))
            }
        }
    }

    /// A new session, or `None` for a wrong username or password (indistinguishable).
    pub async fn log_in(
        &self,
        username: &str,
        password: String,
    ) -> Result<Option<Session>, CoordinatorError> {
        let found = match Username::parse(username) {
            Ok(name) => {
                let user_id = name.user_id();
                self.routed(|routing| async move {
                    Ok(routing.agent_for(&user_id).credentials(user_id).await?)
                })
                .await?
            }
            Err(_) => None,
        };
        let (user, stored) = match found {
            Some((user, hash)) => (Some(user), Some(hash)),
            None => (None, None),
        };
        if !self
            .passwords
            .verify(password, stored)
            .await
            .map_err(password_error)?
        {
            return Ok(None);
        }
        let Some(user) = user else { return Ok(None) };
        let name = Username::parse(&user.username).map_err(|e| {
            CoordinatorError::Corrupt(format!("stored username {:?}: {e}", user.username))
        })?;
        let token = new_token(&name);
        let ttl = chrono::Duration::seconds(self.limits.session_ttl_s as i64);
        let expires_at = Utc::now() + ttl;
        let hash = token_hash(&token);
        self.routed(|routing| {
            let hash = &hash;
            async move {
                Ok(routing
                    .agent_for(&user.user_id)
                    .create_session(user.user_id, hash, expires_at)
                    .await?)
            }
        })
        .await?;
        Ok(Some(Session {
            token,
            expires_at,
            user,
        }))
    }

    pub async fn authenticate(&self, token: &str) -> Result<Option<UserRow>, CoordinatorError> {
        let Some(user) = token_user(token) else {
            return Ok(None);
        };
        let found = self
            .cluster
            .routing()
            .agent_for(&user)
            .session_user(&token_hash(token))
            .await?;
        Ok(found.filter(|u| u.user_id == user))
    }

    pub async fn log_out(&self, token: &str) -> Result<bool, CoordinatorError> {
        let Some(user) = token_user(token) else {
            return Ok(false);
        };
        let hash = token_hash(token);
        self.routed(|routing| {
            let hash = &hash;
            async move { Ok(routing.agent_for(&user).revoke_session(user, hash).await?) }
        })
        .await
    }

    pub async fn account(
        &self,
        user: &UserRow,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Option<AccountView>, CoordinatorError> {
        self.routed(|routing| async move {
            Ok(routing
                .agent_for(&user.user_id)
                .account_view(user.user_id, limit, before)
                .await?)
        })
        .await
    }

    /// Moves `amount` from `payer` to `to`, in a group: one local statement
    /// when both live on one shard, two-phase commit otherwise (Redis mode:
    /// under its locks). Runs on its own task, so a client that hangs up cannot
    /// cut the protocol short.
    pub async fn transfer(
        &self,
        payer: Payer,
        to: &Username,
        amount: Amount,
        key: &IdemKey,
    ) -> Result<Submitted, CoordinatorError> {
        let (from, from_username, session) = match payer {
            Payer::Verified(user) => (user.user_id, user.username, None),
            Payer::Claimed {
                username,
                token_hash,
            } => (
                username.user_id(),
                username.as_str().to_owned(),
                Some(token_hash),
            ),
        };
        let order = TransferOrder {
            from,
            from_username,
            to: to.user_id(),
            to_username: to.as_str().to_owned(),
            amount,
            key: IdempotencyKey {
                user: from,
                key: key.as_str().to_owned(),
                fingerprint: fingerprint(&[
                    "transfer",
                    to.as_str(),
                    &amount.value().to_string(),
                    amount.currency().code(),
                ]),
            },
            refund_of: None,
            reason: None,
            dispute: None,
            release_of: None,
        };
        self.submit(order, session).await
    }

    /// Runs a transfer order (a transfer or a refund) in a group, on its own
    /// task, so a client that hangs up cannot cut the protocol short.
    async fn submit(
        &self,
        order: TransferOrder,
        session: Option<Vec<u8>>,
    ) -> Result<Submitted, CoordinatorError> {
        self.broken_limit_outside_check(&order).await?;
        let (from, to) = (order.from, order.to);
        let kind = if order.refund_of.is_some() {
            "refund"
        } else {
            "transfer"
        };
        let span = tracing::info_span!("transfer", kind, from = %order.from, to = %order.to, key = %order.key.key, transfer_id = tracing::field::Empty);
        let batcher = self.batcher.clone();
        let cluster = self.cluster.clone();
        let wait = self.move_wait();
        let task = tokio::spawn(
            // The group's check reads a claimed session.
            async move {
                retry_moved(&cluster, wait, |routing| {
                    batcher.transfer(routing, order.clone(), session.clone())
                })
                .await
            }
            .instrument(span),
        );
        let path = {
            let routing = self.cluster.routing();
            match (
                routing.agent_for(&from).id() == routing.agent_for(&to).id(),
                self.lock_mode,
            ) {
                (true, _) => "same_shard",
                (false, LockMode::TwoPc) => "2pc",
                (false, LockMode::Redis) => "redis",
            }
        };
        let started = std::time::Instant::now();
        let result = task
            .await
            .map_err(|e| CoordinatorError::Corrupt(format!("transfer task failed: {e}")))?;
        record_transfer(path, &result, started.elapsed());
        result
    }

    /// The chaos suite's broken limit variant (see
    /// `shard_agent::batch::broken_limit_outside_check`): the payer's usage is
    /// read here, before the transfer is queued, and the group's check is not
    /// told the limit. Nothing unless the `failpoints` feature is on.
    async fn broken_limit_outside_check(
        &self,
        order: &TransferOrder,
    ) -> Result<(), CoordinatorError> {
        #[cfg(feature = "failpoints")]
        if order.refund_of.is_none() && fail::eval("broken-limit-outside-check", |_| ()).is_some() {
            if let Some(limit) = self.rules.daily_limit(order.amount.currency()) {
                let payer = order.from;
                let view = self
                    .routed(|routing| async move {
                        Ok(routing
                            .agent_for(&payer)
                            .account_view(payer, 1, None)
                            .await?)
                    })
                    .await?;
                if let Some(view) = view {
                    if view.used_today + order.amount.value() > view.daily_limit.unwrap_or(limit) {
                        return Err(CoordinatorError::Refused(
                            shard_agent::FailureCode::LimitExceeded,
                        ));
                    }
                }
            }
        }
        let _ = order;
        Ok(())
    }

    /// A refund of transfer `of` by its payee `payee`, back to its payer:
    /// `amount`, or (`None`) whatever is left of it. `Ok(None)`: `of` is not a
    /// committed transfer to `payee`. The refund runs by the one protocol; its
    /// group's check holds the sum of refunds to the original under the
    /// payee's account lock.
    pub async fn refund(
        &self,
        payee: &UserRow,
        of: TransferId,
        amount: Option<Amount>,
        reason: Option<String>,
        key: &IdemKey,
    ) -> Result<Option<Submitted>, CoordinatorError> {
        let Some(original) = self.refundable(payee, of).await? else {
            return Ok(None);
        };
        let requested = amount.map(|a| a.value().to_string());
        let amount = match amount {
            Some(a) => a,
            // Nothing left: the original amount, which the check refuses with
            // refund_exceeds_original, unless the key replays an earlier answer.
            None => {
                let rest = original.amount - original.refunded;
                let value = if rest > Decimal::ZERO {
                    rest
                } else {
                    original.amount
                };
                Amount::parse(&value.to_string(), payee.currency).map_err(|e| {
                    CoordinatorError::Corrupt(format!("refundable amount {value}: {e}"))
                })?
            }
        };
        let to = UserId::for_username(&original.payer_username);
        let order = TransferOrder {
            from: payee.user_id,
            from_username: payee.username.clone(),
            to,
            to_username: original.payer_username.clone(),
            amount,
            key: IdempotencyKey {
                user: payee.user_id,
                key: key.as_str().to_owned(),
                fingerprint: fingerprint(&[
                    "refund",
                    &of.to_string(),
                    requested.as_deref().unwrap_or("rest"),
                    reason.as_deref().unwrap_or(""),
                ]),
            },
            refund_of: Some(of),
            reason,
            dispute: None,
            release_of: None,
        };
        self.submit(order, None).await.map(Some)
    }

    /// Opens a dispute of `payer`'s transfer `of`: its payee's shard holds
    /// what refunds left of it. `Ok(None)`: `of` is not a committed transfer
    /// `payer` made.
    pub async fn open_dispute(
        &self,
        payer: &UserRow,
        of: TransferId,
        reason: &str,
    ) -> Result<Option<DisputeOpen>, CoordinatorError> {
        let Some(original) = self.transfer_view(payer, of).await? else {
            return Ok(None);
        };
        let (Some(payee), TransferKind::Transfer, TransferState::Committed) =
            (original.to_user, original.kind, original.state)
        else {
            return Ok(None);
        };
        if original.from_user != Some(payer.user_id) {
            return Ok(None);
        }
        // From when the money moved: a transfer held for review moves when
        // it is released.
        let window = chrono::Duration::days(i64::from(self.rules.dispute_window_days));
        if original.decided_at.unwrap_or(original.created_at) + window < Utc::now() {
            return Ok(Some(DisputeOpen::WindowPassed));
        }
        let id = new_dispute_id(&payee);
        let opened = self
            .routed(|routing| async move {
                Ok(routing
                    .agent_for(&payee)
                    .open_dispute(id, of, payer.user_id, &payer.username, payee, reason)
                    .await?)
            })
            .await?;
        Ok(match opened {
            Opened::NotFound => None,
            Opened::Opened(d) => Some(DisputeOpen::Opened(d)),
            Opened::Exists(d) => Some(DisputeOpen::Exists(d)),
            Opened::NothingToDispute => Some(DisputeOpen::NothingToDispute),
        })
    }

    /// Dispute `id` as `user` may see it: its payer or its payee.
    pub async fn dispute(
        &self,
        user: &UserRow,
        id: Uuid,
    ) -> Result<Option<Dispute>, CoordinatorError> {
        let found = self.dispute_by_id(id).await?;
        Ok(found.filter(|d| d.payer == user.user_id || d.payee == user.user_id))
    }

    async fn dispute_by_id(&self, id: Uuid) -> Result<Option<Dispute>, CoordinatorError> {
        let Some(bucket) = dispute_bucket(&id) else {
            return Ok(None);
        };
        self.routed(|routing| async move {
            let shard = routing.map.shard_of_bucket(bucket);
            let Some(agent) = routing.agent(shard) else {
                return Ok(None);
            };
            Ok(agent.dispute(id, bucket).await?)
        })
        .await
    }

    /// An admin's decision on dispute `id`: `refund` gives the held money
    /// back to the payer by the one protocol (its group's check requires the
    /// dispute open and its apply closes it, so two admins' refunds are one),
    /// `reject` releases the hold. `Ok(None)`: no such dispute.
    pub async fn resolve_dispute(
        &self,
        id: Uuid,
        refund: bool,
    ) -> Result<Option<DisputeResolved>, CoordinatorError> {
        let Some(dispute) = self.dispute_by_id(id).await? else {
            return Ok(None);
        };
        if dispute.state != DisputeState::Open {
            return Ok(Some(DisputeResolved::Already(dispute)));
        }
        if !refund {
            let bucket =
                dispute_bucket(&id).expect("invariant: the dispute was found by its bucket");
            let payee = dispute.payee;
            let rejected = self
                .routed(|routing| async move {
                    Ok(routing.agent_for(&payee).reject_dispute(id, bucket).await?)
                })
                .await?;
            return Ok(match rejected {
                Rejected::Rejected(d) => Some(DisputeResolved::Now(d)),
                Rejected::Resolved(d) => Some(DisputeResolved::Already(d)),
                Rejected::NotFound => None,
            });
        }
        let amount = Amount::parse(&dispute.amount.to_string(), dispute.currency).map_err(|e| {
            CoordinatorError::Corrupt(format!("dispute {id} amount {}: {e}", dispute.amount))
        })?;
        let order = TransferOrder {
            from: dispute.payee,
            from_username: dispute.payee_username.clone(),
            to: dispute.payer,
            to_username: dispute.payer_username.clone(),
            amount,
            // A key per attempt: the dispute's state, checked and closed in
            // the refund's own transaction, is what makes two attempts one
            // refund, and a refusal (funds) must not be replayed to the next.
            key: IdempotencyKey {
                user: dispute.payee,
                key: format!("dispute-refund:{id}:{}", Uuid::now_v7().simple()),
                fingerprint: fingerprint(&["dispute_refund", &id.to_string()]),
            },
            refund_of: Some(dispute.transfer_id),
            reason: Some(dispute.reason.clone()),
            dispute: Some(id),
            release_of: None,
        };
        let submitted = self.submit(order, None).await?;
        let record = match submitted {
            Submitted::New(r) | Submitted::Replayed(r) | Submitted::InProgress(r) => r,
            Submitted::KeyReused => {
                return Err(CoordinatorError::Corrupt(format!(
                    "dispute {id}: its refund key was used for another request"
                )))
            }
        };
        let now = self.dispute_by_id(id).await?.ok_or_else(|| {
            CoordinatorError::Corrupt(format!("dispute {id} vanished while refunded"))
        })?;
        Ok(Some(match (record.state, record.failure_code) {
            (TransferState::Committed, _) => DisputeResolved::Now(now),
            (TransferState::Aborted, Some(shard_agent::FailureCode::DisputeNotOpen)) => {
                DisputeResolved::Already(now)
            }
            (TransferState::Aborted, Some(code)) => DisputeResolved::Refused(code),
            _ => DisputeResolved::InProgress,
        }))
    }

    /// Held transfer `tid`, found on whichever shard serves its payer: an
    /// admin names only the transfer. Every shard is asked at once; one that
    /// does not answer within its call bound only fails this lookup.
    async fn find_transfer(
        &self,
        tid: TransferId,
    ) -> Result<Option<TransferRecord>, CoordinatorError> {
        let routing = self.cluster.routing();
        let found = futures::future::join_all(
            routing
                .agents
                .values()
                .map(|agent| agent.served_transfer(tid)),
        )
        .await;
        let mut record = None;
        for f in found {
            if let Some(r) = f? {
                record = Some(r);
            }
        }
        Ok(record)
    }

    /// An admin's release of held transfer `tid`: it runs by the one
    /// protocol under its own ID, whose check requires it still held and
    /// spends the held money, and whose apply commits the record. `Ok(None)`:
    /// no such transfer.
    pub async fn release_held(
        &self,
        tid: TransferId,
    ) -> Result<Option<HeldDecided>, CoordinatorError> {
        let Some(record) = self.find_transfer(tid).await? else {
            return Ok(None);
        };
        if record.state != TransferState::Held {
            return Ok(Some(HeldDecided::NotHeld(record)));
        }
        let (Some(from), Some(from_username), Some(to), Some(to_username)) = (
            record.from_user,
            record.from_username.clone(),
            record.to_user,
            record.to_username.clone(),
        ) else {
            return Err(CoordinatorError::Corrupt(format!(
                "held transfer {tid} lacks a party"
            )));
        };
        let amount = Amount::parse(&record.amount.to_string(), record.currency).map_err(|e| {
            CoordinatorError::Corrupt(format!("held transfer {tid} amount {}: {e}", record.amount))
        })?;
        let order = TransferOrder {
            from,
            from_username,
            to,
            to_username,
            amount,
            // A key per attempt, as for a dispute's refund: the record's state
            // is what makes two releases one.
            key: IdempotencyKey {
                user: from,
                key: format!("release:{tid}:{}", Uuid::now_v7().simple()),
                fingerprint: fingerprint(&["release", &tid.to_string()]),
            },
            refund_of: None,
            reason: None,
            dispute: None,
            release_of: Some(tid),
        };
        let answer = match self.submit(order, None).await? {
            Submitted::New(r) | Submitted::Replayed(r) | Submitted::InProgress(r) => r,
            Submitted::KeyReused => {
                return Err(CoordinatorError::Corrupt(format!(
                    "release of {tid}: its key was used for another request"
                )))
            }
        };
        // The answer is the transfer's record: committed by this release, or
        // decided by someone else first (rejected, expired), or, still held,
        // a release the check refused on another count, which a retry may
        // pass.
        Ok(Some(match answer.state {
            TransferState::Committed if answer.decided_at.is_some() => HeldDecided::Now(answer),
            TransferState::Held => HeldDecided::Refused(self.why_not_released(&answer).await?),
            _ => HeldDecided::NotHeld(answer),
        }))
    }

    /// Why a release left its transfer held: the payer's day has no room
    /// for it (its limit is checked when it moves), or, failing that, a
    /// refusal a retry may pass.
    async fn why_not_released(
        &self,
        held: &TransferRecord,
    ) -> Result<shard_agent::FailureCode, CoordinatorError> {
        let Some(payer) = held.from_user else {
            return Ok(shard_agent::FailureCode::ShardBusy);
        };
        let view = self
            .routed(|routing| async move {
                Ok(routing
                    .agent_for(&payer)
                    .account_view(payer, 1, None)
                    .await?)
            })
            .await?;
        let over = view.is_some_and(|v| {
            v.daily_limit
                .or_else(|| self.rules.daily_limit(held.currency))
                .is_some_and(|limit| v.used_today + held.amount > limit)
        });
        Ok(if over {
            shard_agent::FailureCode::LimitExceeded
        } else {
            shard_agent::FailureCode::ShardBusy
        })
    }

    /// An admin's rejection of held transfer `tid`: aborted
    /// `transfer_rejected`, its hold released. `Ok(None)`: no such transfer.
    pub async fn reject_held(
        &self,
        tid: TransferId,
    ) -> Result<Option<HeldDecided>, CoordinatorError> {
        let Some(record) = self.find_transfer(tid).await? else {
            return Ok(None);
        };
        let Some(payer) = record.from_user else {
            return Ok(None);
        };
        let ended = self
            .routed(|routing| async move {
                Ok(routing
                    .agent_for(&payer)
                    .end_hold(tid, payer, shard_agent::FailureCode::TransferRejected, None)
                    .await?)
            })
            .await?;
        Ok(match ended {
            HoldEnded::Ended(r) => Some(HeldDecided::Now(r)),
            HoldEnded::NotHeld(r) => Some(HeldDecided::NotHeld(r)),
            HoldEnded::NotFound => None,
        })
    }

    /// Transfer `of` as `payee` may refund it.
    pub async fn refundable(
        &self,
        payee: &UserRow,
        of: TransferId,
    ) -> Result<Option<Refundable>, CoordinatorError> {
        self.routed(|routing| async move {
            Ok(routing
                .agent_for(&payee.user_id)
                .refundable(payee.user_id, of)
                .await?)
        })
        .await
    }

    /// The refunds of `record` (a transfer `user` may see), read on its
    /// payee's shard, where they are recorded.
    pub async fn refunds_of(
        &self,
        record: &TransferRecord,
    ) -> Result<Vec<TransferRecord>, CoordinatorError> {
        let Some(payee) = record.to_user else {
            return Ok(Vec::new());
        };
        let tid = record.transfer_id;
        self.routed(
            |routing| async move { Ok(routing.agent_for(&payee).refunds_of(payee, tid).await?) },
        )
        .await
    }

    /// Sets (or clears) `username`'s daily limit. `Ok(Ok(None))`: no such
    /// user; `Ok(Err(currency))`: `daily` has more decimals than the user's
    /// currency allows (nothing written).
    pub async fn set_daily_limit(
        &self,
        username: &Username,
        daily: Option<Decimal>,
    ) -> Result<Result<Option<LimitRow>, Currency>, CoordinatorError> {
        let user = username.user_id();
        self.routed(|routing| async move {
            let agent = routing.agent_for(&user);
            if let Some(d) = daily {
                // Currencies never change, so reading it first is safe.
                let Some(view) = agent.account_view(user, 1, None).await? else {
                    return Ok(Ok(None));
                };
                if d.normalize().scale() > view.user.currency.scale() {
                    return Ok(Err(view.user.currency));
                }
            }
            Ok(Ok(agent.set_daily_limit(user, daily).await?))
        })
        .await
    }

    /// The fraud rule a transfer of `amount` from `from` to `to` would meet
    /// now; nothing moves.
    pub async fn fraud_detection(
        &self,
        from: &Username,
        to: &Username,
        amount: Amount,
    ) -> Result<Option<RuleHit>, CoordinatorError> {
        let (payer, payee) = (from.user_id(), to.user_id());
        self.routed(|routing| async move {
            Ok(routing
                .agent_for(&payer)
                .fraud_check(payer, payee, amount)
                .await?)
        })
        .await
    }

    /// A deposit or a withdrawal through the payment provider.
    pub async fn external(
        &self,
        user: &UserRow,
        direction: Direction,
        amount: Amount,
        payment_token: &str,
        key: &IdemKey,
    ) -> Result<Submitted, CoordinatorError> {
        let op = match direction {
            Direction::Deposit => "deposit",
            Direction::Withdrawal => "withdrawal",
        };
        let order = ExternalOrder {
            user: user.user_id,
            username: user.username.clone(),
            direction,
            amount,
            key: IdempotencyKey {
                user: user.user_id,
                key: key.as_str().to_owned(),
                fingerprint: fingerprint(&[
                    op,
                    &amount.value().to_string(),
                    amount.currency().code(),
                    payment_token,
                ]),
            },
            provider: self.provider.name().to_owned(),
            payment_token: payment_token.to_owned(),
        };
        let cluster = self.cluster.clone();
        let wait = self.move_wait();
        let provider = self.provider.clone();
        let timeout = Duration::from_millis(self.limits.payment_timeout_ms);
        let task = tokio::spawn(
            async move {
                retry_moved(&cluster, wait, |routing| {
                    let (order, provider) = (&order, provider.clone());
                    async move {
                        let agent = routing.agent_for(&order.user);
                        Ok(agent
                            .run_external(order, |reference| async move {
                                call_for(provider.as_ref(), timeout, order, reference).await
                            })
                            .await?)
                    }
                })
                .await
            }
            .instrument(tracing::info_span!("external", user = %user.user_id, op)),
        );
        task.await
            .map_err(|e| CoordinatorError::Corrupt(format!("{op} task failed: {e}")))?
    }

    /// A transfer as `user` may see it (payer or payee); `None` otherwise.
    pub async fn transfer_view(
        &self,
        user: &UserRow,
        tid: TransferId,
    ) -> Result<Option<TransferRecord>, CoordinatorError> {
        self.routed(|routing| async move {
            Ok(routing
                .agent_for(&user.user_id)
                .transfer_for_party(user, tid)
                .await?)
        })
        .await
    }
}

/// Ends, every [`HOLD_EXPIRY_PASS_MS`], the transfers held for review
/// longer than `expiry` (aborted `hold_expired`, their hold released), at most
/// [`HOLD_EXPIRY_BATCH`] per shard a pass. Each end is judged on its shard,
/// under the payer's lock (`wallet_hold_end`), so an admin's decision made
/// meanwhile wins, and several coordinators' passes never end one twice.
async fn expire_holds_forever(cluster: Arc<Cluster>, expiry: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(HOLD_EXPIRY_PASS_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let routing = cluster.routing();
        for agent in routing.agents.values() {
            let expired = match agent.expired_holds(expiry, HOLD_EXPIRY_BATCH).await {
                Ok(e) => e,
                Err(e) => {
                    warn!(shard = %agent.id(), %e, "hold expiry: could not list held transfers");
                    continue;
                }
            };
            for (tid, payer) in expired {
                let owner = routing.agent_for(&payer);
                match owner
                    .end_hold(
                        tid,
                        payer,
                        shard_agent::FailureCode::HoldExpired,
                        Some(expiry),
                    )
                    .await
                {
                    Ok(HoldEnded::Ended(_)) => info!(transfer_id = %tid, "held transfer expired"),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(transfer_id = %tid, %e, "hold expiry: could not end a held transfer")
                    }
                }
            }
        }
    }
}

/// Runs `op` with the current map. A shard that refuses because it does not
/// serve the user's bucket ([`ShardError::NotOwner`]: nothing was written)
/// means the map is stale or a move's cutover is under way: the map is
/// reloaded and `op` runs again, after a pause that doubles from
/// [`MOVE_RETRY_FIRST_MS`] to [`MOVE_RETRY_MAX_MS`], until `wait` has passed;
/// then the refusal is the answer (409 `bucket_moving`).
pub async fn retry_moved<T, Fut>(
    cluster: &Cluster,
    wait: Duration,
    mut op: impl FnMut(Arc<Routing>) -> Fut,
) -> Result<T, CoordinatorError>
where
    Fut: std::future::Future<Output = Result<T, CoordinatorError>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(MOVE_RETRY_FIRST_MS);
    loop {
        let routing = cluster.routing();
        let epoch = routing.map.epoch();
        match op(routing).await {
            Err(CoordinatorError::Shard(ShardError::NotOwner {
                shard,
                bucket,
                state,
            })) if tokio::time::Instant::now() + pause < deadline => {
                info!(%shard, bucket, state, "bucket not served there; reloading the map");
                cluster.reload_after(epoch).await;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(MOVE_RETRY_MAX_MS));
            }
            other => return other,
        }
    }
}

/// First pause of [`retry_moved`].
pub const MOVE_RETRY_FIRST_MS: u64 = 5;
/// Longest pause of [`retry_moved`].
pub const MOVE_RETRY_MAX_MS: u64 = 100;

/// A digest of an operation's parameters: the same Idempotency-Key with a different
/// request is refused. Fields are length-prefixed so no two requests collide.
pub fn fingerprint(fields: &[&str]) -> Vec<u8> {
    let mut h = Sha256::new();
    for f in fields {
        h.update((f.len() as u64).to_le_bytes());
        h.update(f.as_bytes());
    }
    h.finalize().to_vec()
}
