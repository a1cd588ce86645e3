//! The `+events` scenarios' relay figures: how fast the relay publishes to
//! the bench's nats-server while the load runs, how far behind it falls, and
//! how long it takes to catch up once the load stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::events::Relay;
use serde::Serialize;
use shard_agent::ShardAgent;

/// What one `+events` run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RelayFigures {
    /// Events published (acknowledged by JetStream) while the load ran.
    pub published: u64,
    /// `published` over the load's wall time.
    pub publish_rate_per_s: f64,
    /// The most unpublished events seen at once (read once a second).
    pub max_unpublished: i64,
    /// The oldest unpublished event's age at its worst, in seconds.
    pub max_lag_s: f64,
    /// From the load's end until every event was published.
    pub drain_after_load_ms: u128,
}

impl RelayFigures {
    /// Several rounds as one: sums and worst cases, the rate over them all.
    pub fn merge(all: &[RelayFigures]) -> Option<RelayFigures> {
        if all.is_empty() {
            return None;
        }
        let n = all.len() as f64;
        Some(RelayFigures {
            published: all.iter().map(|f| f.published).sum(),
            publish_rate_per_s: all.iter().map(|f| f.publish_rate_per_s).sum::<f64>() / n,
            max_unpublished: all.iter().map(|f| f.max_unpublished).max().unwrap_or(0),
            max_lag_s: all.iter().map(|f| f.max_lag_s).fold(0.0, f64::max),
            drain_after_load_ms: all.iter().map(|f| f.drain_after_load_ms).max().unwrap_or(0),
        })
    }
}

/// Waits until no shard has an unpublished event; returns how long that took.
pub async fn drain(agents: &[ShardAgent], max: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let mut left = 0;
        for agent in agents {
            left += agent.outbox_lag().await?.unpublished;
        }
        if left == 0 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < max,
            "the relay left {left} events unpublished for {max:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Samples a relay's lag while a load runs.
pub struct RelayWatch {
    relay: Arc<Relay>,
    published_before: u64,
    started: Instant,
    stop: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<(i64, f64)>,
}

impl RelayWatch {
    pub fn start(relay: Arc<Relay>) -> RelayWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (relay, stop) = (relay.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut most, mut worst) = (0i64, 0f64);
                // The relay reads its lag once a second: what it holds at
                // first may date from the drain before the load.
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                while !stop.load(Ordering::Relaxed) {
                    let lag = relay.lag();
                    most = most.max(lag.values().map(|l| l.unpublished).sum());
                    worst = lag.values().map(|l| l.oldest_age_s).fold(worst, f64::max);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                (most, worst)
            })
        };
        RelayWatch {
            published_before: relay.published(),
            relay,
            started: Instant::now(),
            stop,
            sampler,
        }
    }

    /// Called when the load has stopped: waits for the relay to catch up.
    pub async fn finish(self, agents: &[ShardAgent], max: Duration) -> RelayFigures {
        let wall = self.started.elapsed();
        let published = self.relay.published() - self.published_before;
        let drained = drain(agents, max).await.unwrap_or(max);
        self.stop.store(true, Ordering::Relaxed);
        let (max_unpublished, max_lag_s) = self.sampler.await.unwrap_or_default();
        RelayFigures {
            published,
            publish_rate_per_s: published as f64 / wall.as_secs_f64().max(1e-9),
            max_unpublished,
            max_lag_s,
            drain_after_load_ms: drained.as_millis(),
        }
    }
}
