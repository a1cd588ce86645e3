//! Accounts and shards that recently stalled a transfer, so that their next
//! transfers run alone instead of in a group.
//!
//! A group waits for all its members. One member whose account row is held
//! outside any group (an in-doubt prepared leg, a slow transaction) or whose
//! shard does not answer would hold up every other member, and every group
//! after it. So a fault met by a transfer marks what it touched: the users on
//! a row-lock timeout, the shard on "no answer". Until the mark expires,
//! transfers touching a marked user or shard skip the batch lanes and run
//! alone, where only they wait. A mark is refreshed each time a transfer meets
//! the same fault, and expires `SUSPECT_FOR` after the last one; then the next
//! transfer tries a group again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use router::{ShardId, UserId};
use shard_agent::ShardAgent;
use tracing::warn;

/// How long a fault keeps its user or shard out of the groups.
pub const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// Most marks kept at once; past it the expired ones are swept, and if all
/// are live the new mark is not kept (those transfers then take their chance
/// in a group, as without marks).
pub const SUSPECTS_MAX: usize = 10_000;

/// The marks, and when the last of them expires: past that, all are stale and
/// are dropped at once instead of scanned.
#[derive(Debug, Default)]
struct Marks {
    until: HashMap<Suspect, Instant>,
    last: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Suspect {
    User(UserId),
    Shard(ShardId),
}

#[derive(Debug, Default)]
pub struct Suspects {
    until: Mutex<Marks>,
    /// False while no mark may be live: every transfer asks, and in the usual
    /// case (no fault) the answer needs no lock.
    maybe_any: AtomicBool,
}

impl Suspects {
    /// Marks `who` for `SUSPECT_FOR` from now.
    pub fn mark(&self, who: impl IntoIterator<Item = Suspect>) {
        let now = Instant::now();
        let expires = now + SUSPECT_FOR;
        let mut marks = self.lock();
        for s in who {
            if marks.until.len() >= SUSPECTS_MAX && !marks.until.contains_key(&s) {
                marks.until.retain(|_, t| *t > now);
                if marks.until.len() >= SUSPECTS_MAX {
                    continue;
                }
            }
            marks.until.insert(s, expires);
            marks.last = Some(expires);
            self.maybe_any.store(true, Ordering::Release);
        }
    }

    /// Whether any of `who` is marked and its mark has not expired.
    pub fn any(&self, who: impl IntoIterator<Item = Suspect>) -> bool {
        if !self.maybe_any.load(Ordering::Acquire) {
            return false;
        }
        let mut marks = self.lock();
        let now = Instant::now();
        if marks.last.is_none_or(|last| last <= now) {
            marks.until.clear();
            marks.last = None;
            self.maybe_any.store(false, Ordering::Release);
            return false;
        }
        who.into_iter()
            .any(|s| marks.until.get(&s).is_some_and(|t| *t > now))
    }

    /// Marks currently live, for the logs and tests.
    pub fn live(&self) -> usize {
        let now = Instant::now();
        self.lock().until.values().filter(|t| **t > now).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.until
            .lock()
            .expect("invariant: the suspects lock is never held across a panic")
    }
}

/// A fault a lone transfer met, as far as it tells (`batch::Job::fault_of`).
pub(crate) enum Fault {
    None,
    /// A row of one of these users is held outside any group.
    RowHeld([UserId; 2]),
    /// One of these shards may not answer.
    ShardSilent(Vec<ShardAgent>),
}

/// How long a shard may take to answer a ping before a fault report against
/// it is believed and the shard marked. A report alone may be a busy pool or
/// a slow statement; a shard that cannot answer a ping is taken as silent.
const PROBE_MS: u64 = 300;

/// Marks what `fault` points at (`crate::suspects`), so the next transfers
/// touching it run alone instead of stalling a group.
pub(crate) async fn settle_fault(suspects: &Suspects, fault: Fault) {
    match fault {
        Fault::None => {}
        Fault::RowHeld(users) => {
            warn!("row lock held outside any group; these users' transfers run alone for a while");
            suspects.mark(users.map(Suspect::User));
        }
        Fault::ShardSilent(agents) => mark_silent(suspects, agents).await,
    }
}

/// Marks each of `agents` whose shard does not answer a ping within
/// [`PROBE_MS`].
pub(crate) async fn mark_silent(suspects: &Suspects, agents: Vec<ShardAgent>) {
    let probes = join_all(agents.into_iter().map(|a| async move {
        let answered = tokio::time::timeout(Duration::from_millis(PROBE_MS), a.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        (a.id(), answered)
    }))
    .await;
    for (shard, answered) in probes {
        if !answered {
            warn!(%shard, "shard does not answer; its transfers run alone for a while");
            suspects.mark([Suspect::Shard(shard)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_covers_its_user_or_shard_only() {
        let s = Suspects::default();
        let (alice, bob) = (UserId::for_username("alice"), UserId::for_username("bob"));
        assert!(!s.any([Suspect::User(alice)]));
        s.mark([Suspect::User(alice), Suspect::Shard(ShardId(2))]);
        assert!(s.any([Suspect::User(bob), Suspect::User(alice)]));
        assert!(s.any([Suspect::Shard(ShardId(2))]));
        assert!(!s.any([Suspect::User(bob), Suspect::Shard(ShardId(1))]));
        assert_eq!(s.live(), 2);
    }

    #[test]
    fn marks_are_bounded() {
        let s = Suspects::default();
        s.mark((0..SUSPECTS_MAX as u16 + 10).map(|i| Suspect::Shard(ShardId(i))));
        assert_eq!(s.live(), SUSPECTS_MAX);
    }
}
