//! Redis locks with fencing tokens, for the Redis-lock mode.
//!
//! A grant locks every account of a transfer at once, in one round trip: each
//! lock is `<prefix>lock:<user>` set to the grant's owner with a TTL, and
//! either all of them are free and taken, or none is (so a transfer never holds
//! one lock while it waits for another, and two transfers cannot wait on each
//! other in a cycle). Releasing is one compare-and-delete round trip (a holder
//! whose lock expired cannot release its successor's). Each grant returns one
//! fencing token that every shard write under it checks.
//!
//! Tokens are the Redis server's clock in microseconds, forced strictly above
//! the high-water key `<prefix>fence`, the last token issued. Tokens must never
//! go backwards, yet Redis may lose that key (a restart without persistence, a
//! flush, a failover to a replica that had not seen it) and its clock may be
//! behind the one that issued the stored tokens. So:
//! - no lock is granted while the high-water key is missing: it is first seeded
//!   above the largest fence stored on every shard ([`FenceFloor`]), and a shard
//!   that cannot be read means no grant (503), never a guess;
//! - a write refused by its fence reports the account's fence, and the caller
//!   raises the high-water key above it ([`LockService::raise_floor`]), so a
//!   key that came back behind costs one refused (and retried) write, not a
//!   credit stranded forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use router::UserId;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// A grant for several transfers at once: KEYS[1] is the high-water key, then
/// each transfer's lock keys in turn, ARGV[3..] saying how many each has. Each
/// transfer gets all of its locks or none: a lock already held by this grant's
/// owner ARGV[1] (another transfer of the same group, paying the same payee)
/// counts as free. Returns the grant's one token followed by a 1 or 0 per
/// transfer (the token is 0 when nothing was granted), or `{-1}` when the
/// high-water key is missing (nothing granted: it must be seeded first). ARGV[2]
/// is the TTL in milliseconds.
const GRANT_LUA: &str = r"
local stored = redis.call('GET', KEYS[1])
if not stored then
  return {-1}
end
local out = {0}
local any = false
local k = 2
for t = 3, #ARGV do
  local n = tonumber(ARGV[t])
  local free = true
  for i = k, k + n - 1 do
    local holder = redis.call('GET', KEYS[i])
    if holder and holder ~= ARGV[1] then
      free = false
      break
    end
  end
  if free then
    for i = k, k + n - 1 do
      redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    end
    any = true
  end
  out[#out + 1] = free and 1 or 0
  k = k + n
end
if any then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local fence = math.max(now, tonumber(stored) + 1)
  redis.call('SET', KEYS[1], string.format('%.0f', fence))
  out[1] = fence
end
return out
";

/// Raises the high-water key to at least ARGV[1]; never lowers it. A missing
/// key is created only when ARGV[2] is '1' (seeding from every shard's fences):
/// one account's fence alone is no floor for the others.
const RAISE_LUA: &str = r"
local floor = tonumber(ARGV[1])
local stored = redis.call('GET', KEYS[1])
if not stored then
  if ARGV[2] ~= '1' then
    return 0
  end
  stored = '-1'
end
if tonumber(stored) < floor then
  redis.call('SET', KEYS[1], string.format('%.0f', floor))
end
return 1
";

/// Deletes each of KEYS that still belongs to the grant ARGV[1].
const RELEASE_LUA: &str = r"
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    released = released + redis.call('DEL', KEYS[i])
  end
end
return released
";

#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// May hold a password, so Debug shows it redacted; may be an
    /// `env:`/`file:` reference in the config file (`crate::secrets`).
    pub url: String,
    /// Namespaces every key, so deployments (or tests) can share a server.
    pub key_prefix: String,
    /// A lock expires after this long even if its holder never releases it.
    pub lock_ttl_ms: u64,
    /// How long to wait for a lock held by someone else before answering 503.
    pub lock_wait_ms: u64,
    pub response_timeout_ms: u64,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &shard_agent::dsn::redact(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("lock_ttl_ms", &self.lock_ttl_ms)
            .field("lock_wait_ms", &self.lock_wait_ms)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            key_prefix: "wallet:".into(),
            lock_ttl_ms: 5_000,
            lock_wait_ms: 2_000,
            response_timeout_ms: 1_000,
        }
    }
}

/// Where the lock service learns the largest fencing token already stored,
/// before it grants anything after losing its high-water key.
pub trait FenceFloor: Send + Sync {
    /// The largest fence stored on any shard; an error if any shard cannot say.
    fn highest_fence(&self) -> Pin<Box<dyn Future<Output = Result<i64, String>> + Send + '_>>;
}

/// Attempts at a grant that keeps finding the high-water key missing (each
/// finding seeds it): Redis being flushed over and over is an outage.
const SEED_ATTEMPTS_MAX: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("Redis is unreachable: {0}")]
    Unavailable(String),
    #[error("fencing token source not seeded: {0}")]
    Unseeded(String),
    #[error("locks on {users:?} not granted within {waited_ms} ms")]
    NotGranted { users: Vec<UserId>, waited_ms: u64 },
}

/// The locks of one grant: its accounts, its owner token and its fencing token.
#[derive(Debug)]
pub struct Held {
    users: Vec<UserId>,
    owner: String,
    fence: i64,
}

impl Held {
    /// The grant's fencing token.
    pub fn token(&self) -> i64 {
        self.fence
    }

    /// The fencing token of the lock on `user`'s account.
    pub fn fence(&self, user: UserId) -> Option<i64> {
        self.users.contains(&user).then_some(self.fence)
    }
}

pub struct LockService {
    client: redis::Client,
    config: RedisConfig,
    /// Made on first use and kept (it reconnects by itself), so a coordinator can
    /// start while Redis is down.
    conn: Mutex<Option<ConnectionManager>>,
    grant: Script,
    raise: Script,
    release: Script,
    floor: Arc<dyn FenceFloor>,
    seeding: Mutex<()>,
}

impl LockService {
    pub fn new(config: RedisConfig, floor: Arc<dyn FenceFloor>) -> Result<LockService, LockError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| LockError::Unavailable(e.to_string()))?;
        Ok(LockService {
            client,
            config,
            conn: Mutex::new(None),
            grant: Script::new(GRANT_LUA),
            raise: Script::new(RAISE_LUA),
            release: Script::new(RELEASE_LUA),
            floor,
            seeding: Mutex::new(()),
        })
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    async fn conn(&self) -> Result<ConnectionManager, LockError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let timeout = Some(Duration::from_millis(self.config.response_timeout_ms));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1);
        let c = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| LockError::Unavailable(e.to_string()))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    pub async fn ping(&self) -> Result<(), LockError> {
        let mut c = self.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map_err(|e| LockError::Unavailable(e.to_string()))?;
        Ok(())
    }

    fn fence_key(&self) -> String {
        format!("{}fence", self.config.key_prefix)
    }

    /// Raises the high-water key to at least `fence`, so the next token is
    /// above it. Called with the account's fence when a write was refused by it.
    /// A missing key is left missing: the next grant seeds it from every shard.
    pub async fn raise_floor(&self, fence: i64) -> Result<(), LockError> {
        self.raise_key(fence, false).await
    }

    async fn raise_key(&self, fence: i64, create: bool) -> Result<(), LockError> {
        let mut c = self.conn().await?;
        self.raise
            .key(self.fence_key())
            .arg(fence)
            .arg(if create { "1" } else { "0" })
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(|e| LockError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Seeds a missing high-water key above every fence stored on the shards.
    /// One seeding at a time per coordinator: the requests that found the key
    /// missing meanwhile find it seeded and read no shard.
    async fn seed(&self) -> Result<(), LockError> {
        let _one_at_a_time = self.seeding.lock().await;
        let mut c = self.conn().await?;
        let present: bool = redis::cmd("EXISTS")
            .arg(self.fence_key())
            .query_async(&mut c)
            .await
            .map_err(|e| LockError::Unavailable(e.to_string()))?;
        if present {
            return Ok(());
        }
        let floor = self
            .floor
            .highest_fence()
            .await
            .map_err(LockError::Unseeded)?;
        tracing::warn!(
            floor,
            "fencing high-water key missing in Redis (restart, flush or failover): seeded from the shards"
        );
        self.raise_key(floor, true).await
    }

    fn key(&self, user: UserId) -> String {
        format!("{}lock:{}", self.config.key_prefix, user)
    }

    /// One round trip for a whole group: each transfer (its accounts) gets
    /// all of its locks or none, and every lock granted shares one owner and
    /// one fencing token. Returns what was granted (`None` when nothing was)
    /// and, per transfer, whether it was.
    pub async fn grant(
        &self,
        transfers: &[Vec<UserId>],
    ) -> Result<(Option<Held>, Vec<bool>), LockError> {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let mut c = self.conn().await?;
        for attempt in 0..=SEED_ATTEMPTS_MAX {
            let mut call = self.grant.key(self.fence_key());
            for users in transfers {
                for user in users {
                    call.key(self.key(*user));
                }
            }
            call.arg(&owner).arg(self.config.lock_ttl_ms);
            for users in transfers {
                call.arg(users.len());
            }
            let out: Vec<i64> = match call.invoke_async(&mut c).await {
                Ok(out) => out,
                Err(e) => {
                    // The script may have run and its answer been lost: free
                    // whatever it granted (only this grant's owner), rather
                    // than leave those accounts locked until the TTL.
                    let all: Vec<UserId> = transfers.iter().flatten().copied().collect();
                    self.release(Held {
                        users: all,
                        owner: owner.clone(),
                        fence: 0,
                    })
                    .await;
                    return Err(LockError::Unavailable(e.to_string()));
                }
            };
            let Some((&fence, granted)) = out.split_first() else {
                return Err(LockError::Unavailable("empty answer to a grant".into()));
            };
            if fence == -1 {
                if attempt == SEED_ATTEMPTS_MAX {
                    break;
                }
                self.seed().await?;
                continue;
            }
            let granted: Vec<bool> = granted.iter().map(|&g| g == 1).collect();
            if granted.len() != transfers.len() {
                return Err(LockError::Unavailable(format!(
                    "a grant for {} transfers answered {}",
                    transfers.len(),
                    granted.len()
                )));
            }
            let mut users: Vec<UserId> = transfers
                .iter()
                .zip(&granted)
                .filter(|(_, &g)| g)
                .flat_map(|(u, _)| u.iter().copied())
                .collect();
            users.sort();
            users.dedup();
            let held = (fence > 0).then_some(Held {
                users,
                owner: owner.clone(),
                fence,
            });
            return Ok((held, granted));
        }
        Err(LockError::Unseeded(format!(
            "high-water key still missing after {SEED_ATTEMPTS_MAX} seedings"
        )))
    }

    /// Locks every account in `users` at once, all or none, retrying for up
    /// to `lock_wait_ms` while one of them is held.
    pub async fn acquire(&self, users: &[UserId]) -> Result<Held, LockError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.lock_wait_ms);
        let users = vec![users.to_vec()];
        loop {
            if let (Some(held), _) = self.grant(&users).await? {
                return Ok(held);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LockError::NotGranted {
                    users: users[0].clone(),
                    waited_ms: self.config.lock_wait_ms,
                });
            }
            let pause = rand::thread_rng().gen_range(2..15);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// Releases what is still ours, in one round trip; a lock that expired
    /// (and may be someone else's now) is left alone. Errors are ignored: the
    /// TTL frees the locks.
    pub async fn release(&self, held: Held) {
        let Ok(mut c) = self.conn().await else { return };
        let mut call = self.release.prepare_invoke();
        for user in &held.users {
            call.key(self.key(*user));
        }
        let released: Result<i64, _> = call.arg(&held.owner).invoke_async(&mut c).await;
        if let Err(e) = released {
            tracing::debug!(%e, users = ?held.users, "lock release failed; their TTL will free them");
        }
    }
}
