//! Carrying out moves by the journal.
//!
//! One move, step by step (the crash rule of each is in ARCHITECTURE.md):
//!
//! 1. **planned**: journaled. Nothing is touched yet.
//! 2. **fenced**: on the source, under the bucket's advisory lock (waiting
//!    for the writes in flight, prepared legs included, at most
//!    `fence_wait_ms`), the bucket turns from owned to fenced: from then on
//!    every write of it there is refused (`wallet_own`) and its rows are
//!    frozen. The bucket's pause starts.
//! 3. **copied**: on the target, one transaction deletes whatever an earlier
//!    attempt left, copies every row of the bucket, and records it incoming.
//! 4. **verified**: row counts per table, balance and held sums, and the
//!    ledger-to-balance check agree between source and target. A mismatch,
//!    or a pause already past `pause_max_ms`, rolls the move back (target
//!    copy dropped, source unfenced) and it is tried again later. Once
//!    verified is journaled the move only goes forward.
//! 5. **switched**: the source's bucket turns moved (neither read nor
//!    written there any more), the target's owned, and the catalog gives the
//!    bucket to the target under a new epoch in the same transaction as the
//!    journal entry. The pause ends.
//! 6. **cleaned**: the source deletes the bucket's rows and its ownership row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rust_decimal::Decimal;
use serde::Serialize;
use shard_agent::ownership::Fenced;
use shard_agent::ShardError;
use tokio::sync::Mutex;
use tracing::{info, warn, Instrument};

use crate::{Admin, RebalanceError, Result};
use shard_agent::moves::MoveRow;

/// How a rebalance runs.
#[derive(Clone, Debug)]
pub struct MoveOptions {
    /// Moves running at once (`--max-parallel`).
    pub max_parallel: usize,
    /// Users moved per second at most (`--rate`); `None`: no throttle.
    pub rate_users_per_s: Option<f64>,
    /// Longest pause of a bucket: a cutover that has not verified by then is
    /// rolled back and tried again.
    pub pause_max_ms: u64,
    /// Longest wait of the fence for the bucket's writes in flight.
    pub fence_wait_ms: u64,
    /// Tries of one move before it is given up (rolled back for good).
    pub attempts_max: i32,
    /// Journal at most this many new moves this run (`--max-moves`); the
    /// rest stay for the next run. `None`: the whole plan.
    pub max_moves: Option<usize>,
}

/// Default of [`MoveOptions::pause_max_ms`].
pub const PAUSE_MAX_MS: u64 = 500;
/// Default of [`MoveOptions::fence_wait_ms`].
pub const FENCE_WAIT_MS: u64 = 200;
/// How long a rebalance waits for another's lock before it is refused.
pub const MOVER_LOCK_WAIT_MS: u64 = 3_000;

/// Default of [`MoveOptions::attempts_max`].
pub const ATTEMPTS_MAX: i32 = 10;

impl Default for MoveOptions {
    fn default() -> Self {
        MoveOptions {
            max_parallel: 1,
            rate_users_per_s: None,
            pause_max_ms: PAUSE_MAX_MS,
            fence_wait_ms: FENCE_WAIT_MS,
            attempts_max: ATTEMPTS_MAX,
            max_moves: None,
        }
    }
}

/// What a rebalance reports as it goes (a progress bar, or nothing).
pub trait Progress: Send + Sync {
    fn start(&self, _moves: usize) {}
    fn done(&self, _m: &MoveRow) {}
    fn retried(&self, _m: &MoveRow, _why: &str) {}
}

/// Reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// What `wallet shards rebalance` prints at the end.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RebalanceReport {
    /// Moves this run carried out (resumed ones included).
    pub moves: usize,
    pub cleaned: usize,
    pub rolled_back: usize,
    pub users: i64,
    pub money: Decimal,
    pub elapsed_ms: u64,
    pub users_per_s: f64,
    pub money_per_s: Decimal,
    /// The buckets' pauses (fence to switch), over this run's moves.
    pub pause_ms_max: i32,
    pub pause_ms_p99: i32,
    pub pause_ms_median: i32,
    /// Cutovers rolled back and tried again.
    pub retries: i64,
    pub errors: Vec<String>,
}

impl Admin {
    /// Journals the plan's moves, then carries out every open move (resumed
    /// ones first, in journal order). Returns when each is cleaned or rolled
    /// back for good.
    pub async fn rebalance(
        self: &Arc<Self>,
        opts: &MoveOptions,
        progress: &dyn Progress,
    ) -> Result<RebalanceReport> {
        let started = Instant::now();
        // A mover killed a moment ago may still hold the lock until its
        // server notices the closed connection: ask again for a while.
        let deadline = Instant::now() + Duration::from_millis(MOVER_LOCK_WAIT_MS);
        while !self.catalog.lock_mover().await? {
            if Instant::now() >= deadline {
                return Err(RebalanceError::Refused(
                    "another rebalance is running (it holds the catalog's rebalance lock)".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.record_ownership().await?;
        let mut plan = self.plan().await?;
        if let Some(max) = opts.max_moves {
            plan.moves.truncate(max);
        }
        let planned: Vec<(u16, router::ShardId, router::ShardId)> = plan
            .moves
            .iter()
            .map(|m| (m.bucket, m.from_id, m.to_id))
            .collect();
        self.catalog.journal_plan(&planned).await?;
        crash_point("move-planned")?;
        let open = self.catalog.open_moves().await?;
        progress.start(open.len());
        let sizes: std::collections::HashMap<u16, (i64, Decimal)> = plan
            .moves
            .iter()
            .map(|m| (m.bucket, (m.users, m.money)))
            .collect();
        let throttle = Throttle::new(opts.rate_users_per_s);
        let filled = Filled::default();
        let ids: Vec<i64> = open.iter().map(|m| m.move_id).collect();
        let results: Vec<Result<MoveRow>> = futures::stream::iter(open)
            .map(|m| {
                let (users, _) = sizes.get(&m.bucket).copied().unwrap_or((0, Decimal::ZERO));
                let (throttle, filled) = (&throttle, &filled);
                async move {
                    throttle.take(users).await;
                    let span = tracing::info_span!("move", move_id = m.move_id, bucket = m.bucket);
                    let done = self
                        .run_move(m, opts, progress, filled)
                        .instrument(span)
                        .await;
                    if let Ok(m) = &done {
                        progress.done(m);
                    }
                    done
                }
            })
            .buffer_unordered(opts.max_parallel.max(1))
            .collect()
            .await;
        let mut report = RebalanceReport {
            moves: ids.len(),
            elapsed_ms: started.elapsed().as_millis() as u64,
            ..RebalanceReport::default()
        };
        let mut pauses = Vec::new();
        for r in results {
            match r {
                Ok(m) if m.step == "cleaned" => {
                    report.cleaned += 1;
                    let (users, money) =
                        sizes.get(&m.bucket).copied().unwrap_or((0, Decimal::ZERO));
                    report.users += users;
                    report.money += money;
                    report.retries += i64::from(m.attempts);
                    pauses.extend(m.pause_ms);
                }
                Ok(m) => {
                    report.rolled_back += 1;
                    report.errors.push(format!(
                        "bucket {}: rolled back after {} attempts: {}",
                        m.bucket,
                        m.attempts,
                        m.error.unwrap_or_default()
                    ));
                }
                Err(RebalanceError::Crashed(at)) => return Err(RebalanceError::Crashed(at)),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        pauses.sort_unstable();
        let pick = |q: f64| {
            pauses
                .get(((pauses.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0)
        };
        report.pause_ms_max = pauses.last().copied().unwrap_or(0);
        report.pause_ms_p99 = pick(0.99);
        report.pause_ms_median = pick(0.5);
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        report.users_per_s = report.users as f64 / secs;
        report.money_per_s = report.money / Decimal::try_from(secs).unwrap_or(Decimal::ONE);
        Ok(report)
    }

    /// Records on every shard whose ownership was never recorded the buckets
    /// the catalog gives it (a coordinator does the same at start): a move
    /// fences by ownership, so every shard must check it first.
    pub async fn record_ownership(&self) -> Result<()> {
        let map = self.map().await?;
        for (id, agent) in &self.agents() {
            let buckets: Vec<u16> = map.buckets_of(*id).iter().map(|b| b.0).collect();
            agent.init_ownership(&buckets, map.epoch().0).await?;
        }
        Ok(())
    }

    /// Runs one move from its journaled step to cleaned or rolled back.
    async fn run_move(
        &self,
        mut m: MoveRow,
        opts: &MoveOptions,
        progress: &dyn Progress,
        filled: &Filled,
    ) -> Result<MoveRow> {
        let source = self.agent(m.from_id)?;
        let target = self.agent(m.to_id)?;
        loop {
            match m.step.as_str() {
                "planned" => match source
                    .fence_bucket(m.bucket, m.move_id, opts.fence_wait_ms)
                    .await
                {
                    Ok(Fenced::Yes) => {
                        crash_point("move-fenced")?;
                        self.catalog
                            .journal_step(m.move_id, "planned", "fenced")
                            .await?;
                    }
                    Ok(Fenced::NotOwned(state)) => {
                        let why = format!(
                            "the source does not own the bucket (it is {})",
                            state.as_deref().unwrap_or("not there")
                        );
                        warn!(%why, "move given up");
                        self.catalog.journal_retry(m.move_id, &why, 0).await?;
                    }
                    Err(ShardError::LockTimeout { .. }) => {
                        let why = format!(
                            "writes in flight held the bucket past the fence's {} ms",
                            opts.fence_wait_ms
                        );
                        progress.retried(&m, &why);
                        self.retry_later(&m, &why, opts).await?;
                    }
                    Err(e) => return Err(e.into()),
                },
                "fenced" | "copied" if paused_too_long(&m, opts) => {
                    let why = format!("the cutover ran past its {} ms bound", opts.pause_max_ms);
                    progress.retried(&m, &why);
                    self.roll_back(&m, &why, opts).await?;
                }
                "fenced" => {
                    let epoch = self.epoch().await?;
                    target
                        .copy_bucket_from(&source, m.bucket, m.move_id, epoch + 1)
                        .await?;
                    crash_point("move-copied")?;
                    self.catalog
                        .journal_step(m.move_id, "fenced", "copied")
                        .await?;
                }
                "copied" => {
                    let (at_source, at_target) = tokio::try_join!(
                        source.bucket_stats(m.bucket),
                        target.bucket_stats(m.bucket)
                    )?;
                    let mut problems = Vec::new();
                    if at_source != at_target {
                        problems.push(format!(
                            "source {at_source:?} and target {at_target:?} differ"
                        ));
                    }
                    if at_target.ledger_mismatches > 0 {
                        problems.push(format!(
                            "{} accounts' ledgers do not sum to their balance",
                            at_target.ledger_mismatches
                        ));
                    }
                    if !problems.is_empty() {
                        let why = format!("verification failed: {}", problems.join("; "));
                        warn!(%why, "move rolled back");
                        self.roll_back(&m, &why, opts).await?;
                    } else if paused_too_long(&m, opts) {
                        let why =
                            format!("the cutover ran past its {} ms bound", opts.pause_max_ms);
                        progress.retried(&m, &why);
                        self.roll_back(&m, &why, opts).await?;
                    } else {
                        crash_point("move-verified")?;
                        let rows = serde_json::to_value(&at_target.rows).unwrap_or_default();
                        self.catalog
                            .journal_verified(
                                m.move_id,
                                &rows,
                                at_target.balance_sum,
                                at_target.held_sum,
                                "ok: rows, balance and held sums, and ledgers match",
                            )
                            .await?;
                    }
                }
                "verified" => {
                    let epoch = self.epoch().await?;
                    source
                        .set_bucket_state(m.bucket, m.move_id, &["fenced"], "moved", epoch)
                        .await?;
                    target
                        .set_bucket_state(m.bucket, m.move_id, &["incoming"], "owned", epoch + 1)
                        .await?;
                    // Switch only if both changes hold (made now, or by an
                    // earlier run of this step): never give the catalog a
                    // bucket the target does not own, nor leave the source
                    // serving it.
                    let at_source = source.bucket_state(m.bucket).await?;
                    let at_target = target.bucket_state(m.bucket).await?;
                    if at_source != Some(("moved".into(), Some(m.move_id)))
                        || at_target.as_ref().map(|(s, _)| s.as_str()) != Some("owned")
                    {
                        return Err(RebalanceError::Refused(format!(
                            "move {} of bucket {}: cannot switch, the source is {at_source:?} and the target {at_target:?}",
                            m.move_id, m.bucket
                        )));
                    }
                    crash_point("move-switched")?;
                    let after = self.catalog.journal_switch(&m).await?;
                    info!(epoch = after, "bucket switched");
                }
                "switched" => {
                    source.drop_bucket(m.bucket, m.move_id, &["moved"]).await?;
                    crash_point("move-cleaned")?;
                    self.catalog
                        .journal_step(m.move_id, "switched", "cleaned")
                        .await?;
                    if filled.one_more(m.to_id) {
                        // Outside every bucket's pause; a failure costs only
                        // speed, so the move goes on.
                        if let Err(e) = target.refresh_planner_stats().await {
                            warn!(error = %e, shard = %m.to_id, "could not refresh the target's planner statistics");
                        }
                    }
                }
                _ => return Ok(m),
            }
            m = self.catalog.read_move(m.move_id).await?;
        }
    }

    /// Undoes a cutover that has not verified: the target's copy is dropped
    /// and the source serves the bucket again; the move is tried again later.
    async fn roll_back(&self, m: &MoveRow, why: &str, opts: &MoveOptions) -> Result<()> {
        self.agent(m.to_id)?
            .drop_bucket(m.bucket, m.move_id, &["incoming"])
            .await?;
        self.agent(m.from_id)?
            .set_bucket_state(m.bucket, m.move_id, &["fenced"], "owned", 1)
            .await?;
        self.retry_later(m, why, opts).await
    }

    async fn retry_later(&self, m: &MoveRow, why: &str, opts: &MoveOptions) -> Result<()> {
        if self
            .catalog
            .journal_retry(m.move_id, why, opts.attempts_max)
            .await?
        {
            // Back off, so that what held the bucket (a burst of transfers, an
            // in-doubt leg recovery has yet to resolve) can pass.
            let pause = 50 * u64::from(m.attempts.max(0) as u32 + 1);
            tokio::time::sleep(Duration::from_millis(pause.min(2_000))).await;
        }
        Ok(())
    }
}

fn paused_too_long(m: &MoveRow, opts: &MoveOptions) -> bool {
    m.fenced_at
        .is_some_and(|at| (chrono::Utc::now() - at).num_milliseconds() > opts.pause_max_ms as i64)
}

/// Where a crash test stops a move (`fail`; compiled out without the
/// `failpoints` feature).
fn crash_point(name: &'static str) -> Result<()> {
    let _ = name;
    fail::fail_point!(name, |_| Err(RebalanceError::Crashed(name)));
    Ok(())
}

/// Buckets moved onto each target this run. Its planner statistics are
/// refreshed ([`shard_agent::ShardAgent::refresh_planner_stats`]) each time
/// the count doubles (1, 2, 4, …): often while a new shard is small, when its
/// statistics are furthest from the truth, and a few times in all.
#[derive(Default)]
struct Filled(std::sync::Mutex<std::collections::HashMap<router::ShardId, u32>>);

impl Filled {
    /// Counts one more bucket on `target`; whether its statistics are due.
    fn one_more(&self, target: router::ShardId) -> bool {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(target).or_default();
        *n += 1;
        n.is_power_of_two()
    }
}

/// `--rate`: each move first takes its users' worth of time.
struct Throttle {
    rate: Option<f64>,
    next: Mutex<Instant>,
}

impl Throttle {
    fn new(rate: Option<f64>) -> Throttle {
        Throttle {
            rate: rate.filter(|r| *r > 0.0),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn take(&self, users: i64) {
        let Some(rate) = self.rate else { return };
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + Duration::from_secs_f64(users.max(1) as f64 / rate);
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}
