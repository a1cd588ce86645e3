//! `GET /metrics`: Prometheus text from the `metrics` crate's exporter.
//!
//! Events are recorded where they happen (HTTP requests, transfers, groups,
//! rate-limit refusals); state that already lives elsewhere (recovery's view of
//! the in-doubt transactions, the shard pools) is read when the page is scraped,
//! so it is never stale and costs nothing between scrapes.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::service::Coordinator;

/// Latency buckets in seconds: sub-millisecond to the 30 s request bound.
const LATENCY_BUCKETS_S: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];
/// Group sizes up to the largest `batch_max` worth running.
const GROUP_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use. One per process: every
/// coordinator in it (tests run several) reports into the same registry.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_S)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("wallet_batch_group_size".into()),
                    GROUP_SIZE_BUCKETS,
                )
            });
        match builder {
            Ok(b) => {
                let recorder = b.build_recorder();
                let handle = recorder.handle();
                if metrics::set_global_recorder(recorder).is_err() {
                    tracing::warn!(
                        "a metrics recorder was already installed; /metrics stays empty"
                    );
                }
                handle
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics buckets rejected; /metrics stays empty");
                PrometheusBuilder::new().build_recorder().handle()
            }
        }
    })
}

/// Sets the gauges read at scrape time from `coordinator`, then renders.
pub fn render(coordinator: &Coordinator) -> String {
    // The recorder first: gauges set before it is installed are lost.
    let handle = handle();
    let routing = coordinator.cluster().routing();
    for (shard, lag) in coordinator.relay().lag() {
        let shard = shard.0.to_string();
        metrics::gauge!("wallet_events_unpublished", "shard" => shard.clone())
            .set(lag.unpublished as f64);
        metrics::gauge!("wallet_events_oldest_unpublished_age_seconds", "shard" => shard)
            .set(lag.oldest_age_s);
    }
    for agent in routing.agents.values() {
        let shard = agent.id().0.to_string();
        let (size, idle, waiting) = agent.pool_status();
        metrics::gauge!("wallet_pool_connections", "shard" => shard.clone()).set(size as f64);
        metrics::gauge!("wallet_pool_idle", "shard" => shard.clone()).set(idle as f64);
        metrics::gauge!("wallet_pool_waiting", "shard" => shard).set(waiting as f64);
    }
    let status = coordinator.recovery().status();
    for (shard, s) in &status.prepared {
        let shard = shard.0.to_string();
        metrics::gauge!("wallet_in_doubt", "shard" => shard.clone()).set(s.count as f64);
        metrics::gauge!("wallet_in_doubt_oldest_age_seconds", "shard" => shard)
            .set(s.oldest_age_ms as f64 / 1000.0);
    }
    for (shard, s) in &status.pending_credits {
        let shard = shard.0.to_string();
        metrics::gauge!("wallet_pending_credits_in_doubt", "shard" => shard.clone())
            .set(s.count as f64);
        metrics::gauge!("wallet_pending_credits_oldest_age_seconds", "shard" => shard)
            .set(s.oldest_age_ms as f64 / 1000.0);
    }
    for (action, n) in [
        ("committed", status.committed),
        ("rolled_back", status.rolled_back),
        ("aborted_stale", status.aborted_stale),
        ("forwarded", status.forwarded),
        ("settled_external", status.settled_external),
        ("deferred", status.deferred),
        ("skipped", status.skipped),
        ("fence_rejected", status.fence_rejected),
        ("error", status.errors),
    ] {
        metrics::counter!("wallet_recovery_actions_total", "action" => action).absolute(n);
    }
    metrics::counter!("wallet_recovery_passes_total").absolute(status.passes);
    metrics::gauge!("wallet_shards_unreachable").set(status.unreachable.len() as f64);
    handle.render()
}
