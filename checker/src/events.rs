//! The events consumer: reads a whole JetStream stream and checks it against
//! the shards' outboxes and against a client's history. Used by the delivery
//! tests, the chaos harness (every scenario runs with events on) and
//! `wallet bench`.
//!
//! What it asserts, once the relay has published everything:
//! - every event in the outboxes is in the stream exactly once (by ID), with
//!   the same user, seq, type, transfer and amount;
//! - the stream holds no event that is not in an outbox (none invented);
//! - each user's events in the stream are numbered 1, 2, 3… with no gaps;
//! - (with a history) every committed movement has its payer's debit and its
//!   payee's credit events, and an aborted transfer has no money event.
//!
//! That each outbox holds exactly one event per ledger entry is invariant 9
//! of the snapshot checker.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde::Deserialize;
use shard_agent::events::Event;
use shard_agent::ShardAgent;
use uuid::Uuid;

/// One message of the stream, as a consumer reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct StreamEvent {
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: Uuid,
    pub seq: i64,
    pub transfer_id: Uuid,
    pub amount: Decimal,
    pub currency: String,
    pub balance_after: Decimal,
    /// The message's own ID header (`Nats-Msg-Id`), filled in by the reader.
    #[serde(skip)]
    pub msg_id: Option<String>,
    /// The subject it was published on, filled in by the reader.
    #[serde(skip)]
    pub subject: String,
}

/// Reads every message of `stream` on the broker at `url`, in stream order,
/// waiting at most `within`.
pub async fn read_stream(
    url: &str,
    stream: &str,
    within: Duration,
) -> Result<Vec<StreamEvent>, String> {
    tokio::time::timeout(within, async {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(within)
            .connect(url)
            .await
            .map_err(|e| format!("connect to {url}: {e}"))?;
        let js = jetstream::new(client);
        let mut handle = js
            .get_stream(stream)
            .await
            .map_err(|e| format!("stream {stream}: {e}"))?;
        let total = handle
            .info()
            .await
            .map_err(|e| format!("stream {stream} info: {e}"))?
            .state
            .messages as usize;
        let mut out = Vec::with_capacity(total);
        if total == 0 {
            return Ok(out);
        }
        let consumer = handle
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("consumer on {stream}: {e}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| format!("read {stream}: {e}"))?;
        while out.len() < total {
            let Some(message) = messages.next().await else {
                break;
            };
            let message = message.map_err(|e| format!("read {stream}: {e}"))?;
            let mut event: StreamEvent = serde_json::from_slice(&message.payload)
                .map_err(|e| format!("message on {}: {e}", message.subject))?;
            event.msg_id = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.as_str().to_owned());
            event.subject = message.subject.to_string();
            out.push(event);
        }
        Ok(out)
    })
    .await
    .map_err(|_| format!("reading stream {stream} took longer than {within:?}"))?
}

/// Waits until no shard has an unpublished event, at most `within`.
pub async fn wait_published(agents: &[ShardAgent], within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut left = 0;
        let mut unreadable = 0;
        for agent in agents {
            match agent.outbox_lag().await {
                Ok(lag) => left += lag.unpublished,
                Err(_) => unreadable += 1,
            }
        }
        if left == 0 && unreadable == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "events: {left} events still unpublished {within:?} after healing ({unreadable} shards unreadable)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every event in the shards' outboxes.
pub async fn outboxes(agents: &[ShardAgent]) -> Result<Vec<Event>, String> {
    let mut all = Vec::new();
    for agent in agents {
        all.extend(
            agent
                .served_events()
                .await
                .map_err(|e| format!("events: read the outbox of shard {}: {e}", agent.id()))?,
        );
    }
    Ok(all)
}

/// The stream against the outboxes: exactly once by ID, nothing invented,
/// gapless per-user numbering, and the same content.
pub fn delivery_violations(stream: &[StreamEvent], outbox: &[Event]) -> Vec<String> {
    let mut v = Vec::new();
    let mut seen: HashMap<Uuid, &StreamEvent> = HashMap::new();
    let mut duplicates = 0;
    for e in stream {
        if e.msg_id.as_deref() != Some(e.event_id.to_string().as_str()) {
            v.push(format!(
                "events: {} was published with message ID {:?}",
                e.event_id, e.msg_id
            ));
        }
        if seen.insert(e.event_id, e).is_some() {
            duplicates += 1;
            if duplicates <= 10 {
                v.push(format!(
                    "events: {} is in the stream more than once",
                    e.event_id
                ));
            }
        }
    }
    if duplicates > 10 {
        v.push(format!(
            "events: {duplicates} duplicates in the stream in all"
        ));
    }
    let kept: HashMap<Uuid, &Event> = outbox.iter().map(|e| (e.event_id, e)).collect();
    let mut missing = 0;
    for e in outbox {
        match seen.get(&e.event_id) {
            None => {
                missing += 1;
                if missing <= 10 {
                    v.push(format!(
                        "events: {} ({} seq {} of user {}) is not in the stream",
                        e.event_id, e.kind, e.seq, e.user_id
                    ));
                }
            }
            Some(s) => {
                if (
                    s.user_id,
                    s.seq,
                    s.kind.as_str(),
                    s.transfer_id,
                    s.amount,
                    s.balance_after,
                ) != (
                    e.user_id,
                    e.seq,
                    e.kind.as_str(),
                    e.transfer_id,
                    e.amount,
                    e.balance_after,
                ) {
                    v.push(format!(
                        "events: {} differs between the stream and the outbox",
                        e.event_id
                    ));
                }
            }
        }
    }
    if missing > 10 {
        v.push(format!(
            "events: {missing} committed events are not in the stream in all"
        ));
    }
    let invented: Vec<_> = seen.keys().filter(|id| !kept.contains_key(id)).collect();
    if !invented.is_empty() {
        v.push(format!(
            "events: {} events in the stream are in no outbox (e.g. {})",
            invented.len(),
            invented[0]
        ));
    }
    let mut by_user: BTreeMap<Uuid, Vec<i64>> = BTreeMap::new();
    for e in seen.values() {
        by_user.entry(e.user_id).or_default().push(e.seq);
    }
    let mut gaps = 0;
    for (user, mut seqs) in by_user {
        seqs.sort_unstable();
        if seqs.iter().enumerate().any(|(i, s)| *s != i as i64 + 1) {
            gaps += 1;
            if gaps <= 10 {
                v.push(format!(
                    "events: user {user}'s sequence numbers in the stream are not 1..{} without gaps",
                    seqs.len()
                ));
            }
        }
    }
    v
}

/// A client's view of one movement: `payer` paid `payee` under `transfer`.
#[derive(Clone, Copy, Debug)]
pub struct Committed {
    pub transfer: Uuid,
    pub payer: Uuid,
    pub payee: Uuid,
}

/// The stream against a client's history: each committed movement has its
/// payer's debit and payee's credit, and each aborted transfer no money event
/// (only a held transfer's hold and release may name it).
pub fn history_violations(
    stream: &[StreamEvent],
    committed: &[Committed],
    aborted: &[Uuid],
) -> Vec<String> {
    let mut by_transfer: HashMap<Uuid, Vec<&StreamEvent>> = HashMap::new();
    for e in stream {
        by_transfer.entry(e.transfer_id).or_default().push(e);
    }
    let mut v = Vec::new();
    let mut missing = 0;
    for c in committed {
        let events = by_transfer
            .get(&c.transfer)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let debit = events.iter().any(|e| {
            e.user_id == c.payer && e.kind.ends_with("_debit") && e.amount < Decimal::ZERO
        });
        let credit = events.iter().any(|e| {
            e.user_id == c.payee && e.kind.ends_with("_credit") && e.amount > Decimal::ZERO
        });
        if !(debit && credit) {
            missing += 1;
            if missing <= 10 {
                let lacking = match (debit, credit) {
                    (false, false) => "debit and credit events",
                    (false, true) => "debit event",
                    _ => "credit event",
                };
                v.push(format!(
                    "events: committed transfer {} lacks its {lacking}",
                    c.transfer
                ));
            }
        }
    }
    let aborted: HashSet<&Uuid> = aborted.iter().collect();
    let mut invented = 0;
    for e in stream {
        if aborted.contains(&e.transfer_id)
            && !matches!(e.kind.as_str(), "review_hold" | "review_release")
        {
            invented += 1;
            if invented <= 10 {
                v.push(format!(
                    "events: aborted transfer {} has a {} event",
                    e.transfer_id, e.kind
                ));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(user: u8, seq: i64, transfer: u8, amount: i64) -> Event {
        Event {
            event_id: Uuid::from_u128(u128::from(user) << 64 | seq as u128),
            user_id: Uuid::from_u128(u128::from(user)),
            seq,
            kind: if amount < 0 {
                "transfer_debit"
            } else {
                "transfer_credit"
            }
            .into(),
            transfer_id: Uuid::from_u128(1000 + u128::from(transfer)),
            amount: Decimal::from(amount),
            currency: "USD".into(),
            balance_after: Decimal::ZERO,
            counterparty: None,
            created_at: chrono::DateTime::UNIX_EPOCH,
        }
    }

    fn published(e: &Event) -> StreamEvent {
        StreamEvent {
            event_id: e.event_id,
            kind: e.kind.clone(),
            user_id: e.user_id,
            seq: e.seq,
            transfer_id: e.transfer_id,
            amount: e.amount,
            currency: e.currency.clone(),
            balance_after: e.balance_after,
            msg_id: Some(e.event_id.to_string()),
            subject: format!("wallet.events.{}.shard0", e.kind),
        }
    }

    /// An outbox of `users` users with `per_user` events each, numbered 1..n.
    fn outbox(users: u8, per_user: i64) -> Vec<Event> {
        (0..users)
            .flat_map(|u| {
                (1..=per_user).map(move |s| event(u, s, u, if s % 2 == 0 { 5 } else { -5 }))
            })
            .collect()
    }

    proptest! {
        #[test]
        fn a_faithful_stream_in_any_order_passes(users in 1u8..6, per_user in 1i64..8, seed in any::<u64>()) {
            let out = outbox(users, per_user);
            let mut stream: Vec<StreamEvent> = out.iter().map(published).collect();
            // Any order: a consumer orders by seq.
            let n = stream.len();
            stream.rotate_left((seed as usize) % n);
            prop_assert_eq!(delivery_violations(&stream, &out), Vec::<String>::new());
        }

        #[test]
        fn a_copy_a_loss_or_an_invention_is_caught(users in 1u8..6, per_user in 1i64..8, pick in any::<usize>(), fault in 0u8..4) {
            let out = outbox(users, per_user);
            let mut stream: Vec<StreamEvent> = out.iter().map(published).collect();
            let i = pick % stream.len();
            match fault {
                0 => { let copy = stream[i].clone(); stream.push(copy); }
                1 => { stream.remove(i); }
                2 => { let mut extra = stream[i].clone(); extra.event_id = Uuid::from_u128(u128::MAX - 1); extra.msg_id = Some(extra.event_id.to_string()); stream.push(extra); }
                _ => { stream[i].msg_id = None; }
            }
            prop_assert!(!delivery_violations(&stream, &out).is_empty());
        }
    }

    #[test]
    fn the_history_check_wants_both_legs_and_no_money_event_of_an_aborted_transfer() {
        let out = [event(1, 1, 7, -5), event(2, 1, 7, 5)];
        let stream: Vec<StreamEvent> = out.iter().map(published).collect();
        let committed = Committed {
            transfer: Uuid::from_u128(1007),
            payer: Uuid::from_u128(1),
            payee: Uuid::from_u128(2),
        };
        assert!(history_violations(&stream, &[committed], &[]).is_empty());
        assert_eq!(history_violations(&stream[..1], &[committed], &[]).len(), 1);
        assert_eq!(
            history_violations(&stream, &[], &[committed.transfer]).len(),
            2
        );
    }
}
