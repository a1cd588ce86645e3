//! The events consumer of every chaos run (events are on in every scenario):
//! once the run has healed, it waits for the relay to publish the outboxes,
//! reads the whole stream, and checks it against the outboxes (exactly once
//! by ID, nothing invented, per-user numbering without gaps) and against the
//! clients' own history (each committed movement has its debit and credit
//! events, an aborted transfer has no money event).

use std::time::Duration;

use router::UserId;
use uuid::Uuid;

use crate::checker::events::{
    delivery_violations, history_violations, outboxes, read_stream, wait_published, Committed,
};
use crate::cluster::ChaosCluster;
use crate::workload::{Outcome, Record};

/// How long the relay may take to publish what waited during the run.
const PUBLISH_WITHIN: Duration = Duration::from_secs(60);

/// How many events the stream holds, and the violations the consumer finds
/// (none when every guarantee holds).
pub async fn consume(cluster: &ChaosCluster, records: &[Record]) -> (usize, Vec<String>) {
    if let Err(e) = wait_published(&cluster.direct, PUBLISH_WITHIN).await {
        return (0, vec![e]);
    }
    let outbox = match outboxes(&cluster.direct).await {
        Ok(o) => o,
        Err(e) => return (0, vec![e]),
    };
    let stream = match read_stream(
        &cluster.nats.url(),
        &cluster.config.events.stream,
        Duration::from_secs(60),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return (0, vec![format!("events: {e}")]),
    };
    let mut v = delivery_violations(&stream, &outbox);
    let user = |name: &str| *UserId::for_username(name).as_uuid();
    let committed: Vec<Committed> = records
        .iter()
        .filter(|r| r.dispute_of.is_none())
        .filter_map(|r| match r.outcome {
            Outcome::Acknowledged(id) => Some(Committed {
                transfer: id,
                payer: user(&r.from),
                payee: user(&r.to),
            }),
            _ => None,
        })
        .collect();
    let aborted: Vec<Uuid> = records
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Failed { transfer_id, .. } => *transfer_id,
            _ => None,
        })
        .collect();
    v.extend(history_violations(&stream, &committed, &aborted));
    (stream.len(), v)
}
