//! Passwords (argon2id) and session tokens.
//!
//! A token is `<username>~<32 random bytes, base64url>`. The username routes the
//! lookup to the one shard holding the session (a user's ID is derived from their
//! name), and it is what `POST /v1/transfer` needs to queue a transfer before the
//! session is read: the read then happens on the payer's shard inside the
//! transfer's own check (`wallet_batch_check`). Only a SHA-256 of the whole token is
//! stored, so a leaked sessions table cannot be replayed. Tokens of the earlier
//! format, `<user id, 32 hex>.<secret>`, still route and are read as before.

use std::cell::RefCell;

use argon2::password_hash::{
    self, rand_core::OsRng, Output, ParamsString, PasswordHash, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use base64::Engine;
use rand::RngCore;
use router::UserId;
use sha2::{Digest, Sha256};

use crate::inputs::Username;

/// Separates a token's username from its secret; neither may contain it.
const TOKEN_SEPARATOR: char = '~';
/// Longest secret part a token may carry (ours are 43 characters).
const TOKEN_SECRET_LEN_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("argon2 parameters rejected: {0}")]
    Params(String),
    #[error("hash password: {0}")]
    Hash(String),
    /// Every password worker is busy and `queue_max` requests already wait.
    #[error("password hashing is saturated ({queue_max} waiting)")]
    Busy { queue_max: usize },
}

/// Runs argon2 on `workers` threads of its own, fed by a queue of `queue_max`
/// requests; more are refused at once. Each running hash holds `memory_kib`, so
/// this bounds the memory logins and sign-ups can take (unbounded, 200
/// concurrent logins took 4.9 GiB). Fixed threads, not the blocking pool: each
/// worker keeps its argon2 memory from one hash to the next, so the number of
/// threads that ever hashed is what the memory bound counts.
pub struct PasswordWork {
    policy: PasswordPolicy,
    jobs: std::sync::mpsc::SyncSender<Job>,
    queue_max: usize,
}

type Job = Box<dyn FnOnce() + Send>;

impl PasswordWork {
    /// `workers` of 0 means one per core.
    pub fn new(policy: PasswordPolicy, workers: usize, queue_max: usize) -> PasswordWork {
        let workers = match workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(queue_max);
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        for i in 0..workers {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-{i}"))
                .spawn(move || loop {
                    // The lock is held only to take one job; a worker ends when
                    // the PasswordWork (the sender) is dropped.
                    let job = match queue.lock() {
                        Ok(q) => q.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password worker");
            }
        }
        PasswordWork {
            policy,
            jobs,
            queue_max,
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(PasswordPolicy) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let policy = self.policy;
        let job: Job = Box::new(move || {
            let _ = tx.send(work(policy));
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                return Err(AuthError::Busy {
                    queue_max: self.queue_max,
                })
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(AuthError::Hash("password workers stopped".into()))
            }
        }
        rx.await
            .map_err(|_| AuthError::Hash("password worker dropped the job".into()))
    }

    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        self.run(move |policy| policy.hash_now(&password)).await?
    }

    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, AuthError> {
        self.run(move |policy| policy.verify_now(&password, stored.as_deref()))
            .await
    }
}

#[derive(Clone, Copy, Debug)]
pub struct PasswordPolicy {
    pub memory_kib: u32,
    pub iterations: u32,
}

thread_local! {
    /// This thread's argon2 working memory, kept from one hash to the next.
    /// Allocating it per hash (what `Argon2::hash_password` does) leaves the
    /// bound to the allocator: glibc keeps freed 19 MiB blocks in whichever
    /// arena served them, and with threads sharing arenas a process doing many
    /// logins grew to 300 MiB on two workers. Owning the block makes the bound
    /// exact: `password_workers` × `memory_kib` kept, plus one hash's memory
    /// while a stored hash of a larger policy is verified.
    static ARGON2_MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// The most memory a stored hash may ask for when it is verified (1 GiB),
/// whatever the policy: a larger one is refused (after the policy's own
/// work) rather than allocated.
const STORED_MEMORY_KIB_MAX: u32 = 1024 * 1024;
/// The most passes a stored hash may ask for when it is verified.
const STORED_ITERATIONS_MAX: u32 = 64;
/// The most lanes a stored hash may ask for when it is verified.
const STORED_LANES_MAX: u32 = 16;

/// Runs `work` on this thread's argon2 memory, grown to `blocks` when smaller,
/// and cut back to `keep` blocks afterwards when it grew past them (a stored
/// hash made under a larger policy), so what a worker keeps is the policy's.
/// The algorithm writes every block before it reads it, so what an earlier
/// hash left there does not matter.
fn with_argon2_memory<T>(blocks: usize, keep: usize, work: impl FnOnce(&mut [Block]) -> T) -> T {
    ARGON2_MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        let result = work(&mut memory[..blocks]);
        if memory.len() > keep {
            memory.truncate(keep);
            memory.shrink_to_fit();
        }
        result
    })
}

/// argon2 of `password` with `argon2`'s parameters, into `out` (whose length is
/// the output length), on this thread's kept memory; `keep` is the policy's
/// block count.
fn argon2_into(
    argon2: &Argon2<'_>,
    params: &Params,
    keep: usize,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    with_argon2_memory(params.block_count(), keep, |blocks| {
        argon2.hash_password_into_with_memory(password, salt, out, blocks)
    })
}

impl PasswordPolicy {
    fn params(&self) -> Result<Params, AuthError> {
        Params::new(self.memory_kib, self.iterations, 1, None)
            .map_err(|e| AuthError::Params(e.to_string()))
    }

    /// Hashes on this thread into a PHC string: argon2 is deliberately slow, so
    /// callers run it on the password workers ([`PasswordWork`]).
    fn hash_now(self, password: &str) -> Result<String, AuthError> {
        let params = self.params()?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let salt = SaltString::generate(&mut OsRng);
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt
            .as_salt()
            .decode_b64(&mut salt_bytes)
            .map_err(|e| AuthError::Hash(e.to_string()))?;
        let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let keep = params.block_count();
        let output = Output::init_with(output_len, |out| {
            argon2_into(&argon2, &params, keep, password.as_bytes(), salt_bytes, out)
                .map_err(|_| password_hash::Error::Crypto)
        })
        .map_err(|e| AuthError::Hash(e.to_string()))?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(|e| AuthError::Hash(e.to_string()))?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(phc.to_string())
    }

    /// Verifies against a stored PHC string (its own parameters apply). With no
    /// stored hash, or one that cannot be used, it still does the work of this
    /// policy, so unknown usernames take as long.
    fn verify_now(self, password: &str, stored: Option<&str>) -> bool {
        let verified = stored
            .and_then(|phc| PasswordHash::new(phc).ok())
            .and_then(|phc| self.verify_phc(password, &phc));
        match verified {
            Some(matched) => matched,
            None => {
                let _ = self.hash_now(password);
                false
            }
        }
    }

    /// Recomputes a stored hash with its own algorithm, version, parameters and
    /// salt, and compares in constant time (`Output`'s equality). `None` when
    /// the stored hash cannot be used: malformed, or asking for more than the
    /// `STORED_*_MAX` bounds.
    fn verify_phc(self, password: &str, phc: &PasswordHash<'_>) -> Option<bool> {
        let (salt, expected) = (phc.salt?, phc.hash?);
        let algorithm = Algorithm::try_from(phc.algorithm).ok()?;
        let version = phc
            .version
            .map_or(Ok(Version::default()), Version::try_from)
            .ok()?;
        let params = Params::try_from(phc).ok()?;
        if params.m_cost() > STORED_MEMORY_KIB_MAX
            || params.t_cost() > STORED_ITERATIONS_MAX
            || params.p_cost() > STORED_LANES_MAX
        {
            return None;
        }
        let keep = self.params().ok()?.block_count();
        let argon2 = Argon2::new(algorithm, version, params.clone());
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_bytes).ok()?;
        let computed = Output::init_with(expected.len(), |out| {
            argon2_into(&argon2, &params, keep, password.as_bytes(), salt_bytes, out)
                .map_err(|_| password_hash::Error::Crypto)
        })
        .ok()?;
        Some(computed == expected)
    }
}

/// 32 random bytes, base64url: a token's secret, or the dev cluster's admin token.
pub fn random_secret() -> String {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
}

/// A new session token for the user named `username`.
pub fn new_token(username: &Username) -> String {
    format!("{username}{TOKEN_SEPARATOR}{}", random_secret())
}

/// The user a token names, unverified: only for routing, or for a transfer whose
/// payer's session is read later on the payer's shard. `None` for a token of the
/// earlier format, or one that is malformed.
pub fn token_username(token: &str) -> Option<Username> {
    let (name, secret) = token.split_once(TOKEN_SEPARATOR)?;
    let secret_ok = (1..=TOKEN_SECRET_LEN_MAX).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !secret_ok {
        return None;
    }
    // Only the canonical spelling `new_token` writes: the name routes the read.
    Username::parse(name).ok().filter(|u| u.as_str() == name)
}

/// The user a token claims to belong to (unverified: only for routing).
pub fn token_user(token: &str) -> Option<UserId> {
    if let Some(name) = token_username(token) {
        return Some(name.user_id());
    }
    let (user, secret) = token.split_once('.')?;
    if user.len() != 32
        || secret.is_empty()
        || secret.len() > TOKEN_SECRET_LEN_MAX
        || secret.contains(TOKEN_SEPARATOR)
    {
        return None;
    }
    uuid::Uuid::try_parse(user).ok().map(UserId)
}

pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: PasswordPolicy = PasswordPolicy {
        memory_kib: 64,
        iterations: 2,
    };

    #[test]
    fn a_hash_verifies_its_own_password_only() {
        let phc = SMALL.hash_now("correct horse").expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=2,p=1$"), "{phc}");
        assert!(SMALL.verify_now("correct horse", Some(&phc)));
        assert!(!SMALL.verify_now("correct hors", Some(&phc)));
        assert_ne!(
            SMALL.hash_now("correct horse").expect("hash"),
            phc,
            "salted"
        );
    }

    /// Hashes stored before the kept memory (made by the crate's own hasher)
    /// still verify, and ours verify with the crate's verifier: the PHC strings
    /// are the same format.
    #[test]
    fn hashes_agree_with_the_argon2_crates_own() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let theirs = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(128, 1, 1, None).expect("params"),
        );
        let salt = SaltString::generate(&mut OsRng);
        let stored = theirs
            .hash_password(b"pw", &salt)
            .expect("hash")
            .to_string();
        // Their parameters apply, not the policy's: a smaller block count than
        // the thread's memory already holds is fine.
        let big = PasswordPolicy {
            memory_kib: 256,
            iterations: 1,
        };
        let _ = big.hash_now("grow the memory first").expect("hash");
        assert!(SMALL.verify_now("pw", Some(&stored)));
        assert!(!SMALL.verify_now("pW", Some(&stored)));
        let ours = SMALL.hash_now("pw").expect("hash");
        let parsed = PasswordHash::new(&ours).expect("a PHC string");
        assert!(theirs.verify_password(b"pw", &parsed).is_ok());
        assert!(theirs.verify_password(b"pw2", &parsed).is_err());
    }

    /// A stored hash asking for more than the bounds is refused without
    /// allocating what it asks for (2 GB here), and one of a larger policy
    /// than the worker's verifies without the worker keeping its memory.
    #[test]
    fn stored_hashes_cannot_make_a_worker_take_or_keep_more_memory() {
        let ours = SMALL.hash_now("pw").expect("hash");
        let greedy = ours.replacen("m=64,", "m=2000000,", 1);
        assert_ne!(greedy, ours);
        assert!(!SMALL.verify_now("pw", Some(&greedy)));
        let kept = || ARGON2_MEMORY.with(|m| m.borrow().len());
        assert_eq!(kept(), 64, "the policy's 64 blocks of 1 KiB");
        let bigger = PasswordPolicy {
            memory_kib: 512,
            iterations: 1,
        };
        let stored = bigger.hash_now("pw").expect("hash");
        assert!(SMALL.verify_now("pw", Some(&stored)));
        assert_eq!(kept(), 64, "cut back to the policy's after the larger hash");
    }

    #[test]
    fn a_missing_or_malformed_stored_hash_never_verifies() {
        for stored in [None, Some(""), Some("$argon2id$garbage"), Some("plain")] {
            assert!(!SMALL.verify_now("pw", stored), "{stored:?}");
        }
    }

    #[test]
    fn a_token_names_and_routes_to_its_user() {
        let alice = Username::parse("alice.b-2").expect("a valid name");
        let token = new_token(&alice);
        assert_eq!(
            token_username(&token).map(|u| u.as_str().to_owned()),
            Some("alice.b-2".to_owned())
        );
        assert_eq!(token_user(&token), Some(UserId::for_username("alice.b-2")));
        assert_ne!(new_token(&alice), token, "tokens are random");
    }

    #[test]
    fn a_token_of_the_earlier_format_still_routes_but_names_nobody() {
        let user = UserId::for_username("alice");
        let token = format!("{}.{}", user.as_uuid().simple(), random_secret());
        assert_eq!(token_user(&token), Some(user));
        assert_eq!(token_username(&token).map(|u| u.to_string()), None);
    }

    #[test]
    fn malformed_tokens_route_nowhere() {
        for bad in [
            "",
            "abc",
            "x.y",
            ".",
            "~",
            "alice~",
            "~secret",
            "Alice~secret",
            " alice~secret",
            "al ice~secret",
            "a~b~c",
            "abc~b~c",
            "abc~s3cr.t",
            "0123456789abcdef0123456789abcdef.",
            "0123456789abcdef0123456789abcdef.a~b",
            "not-hex-not-hex-not-hex-not-hex!.abc",
        ] {
            assert_eq!(token_user(bad), None, "{bad:?}");
        }
        let long = format!("alice~{}", "x".repeat(TOKEN_SECRET_LEN_MAX + 1));
        assert_eq!(token_user(&long), None, "an overlong secret");
    }

    #[tokio::test]
    async fn password_work_beyond_its_queue_is_refused_at_once() {
        let work = std::sync::Arc::new(PasswordWork::new(
            PasswordPolicy {
                memory_kib: 8 * 1024,
                iterations: 4,
            },
            1,
            2,
        ));
        let started = std::time::Instant::now();
        let all = futures::future::join_all((0..10).map(|_| {
            let work = work.clone();
            async move { work.verify("pw".into(), None).await }
        }))
        .await;
        let busy = all
            .iter()
            .filter(|r| matches!(r, Err(AuthError::Busy { queue_max: 2 })))
            .count();
        // Two wait in the queue and one or two more (the one the worker has
        // taken, if it took it in time) run; the rest are refused.
        assert!(
            (7..=8).contains(&busy),
            "{busy} refused in {:?}",
            started.elapsed()
        );
        assert_eq!(
            all.iter().filter(|r| matches!(r, Ok(false))).count(),
            10 - busy
        );
    }

    #[tokio::test]
    async fn passwords_verify_only_against_their_own_hash() {
        let work = PasswordWork::new(
            PasswordPolicy {
                memory_kib: 64,
                iterations: 1,
            },
            1,
            1,
        );
        let hash = work.hash("correct horse".into()).await.expect("hash");
        let verify = |pw: &'static str, stored: Option<String>| work.verify(pw.into(), stored);
        assert!(verify("correct horse", Some(hash.clone()))
            .await
            .expect("ran"));
        assert!(!verify("wrong horse", Some(hash)).await.expect("ran"));
        assert!(!verify("anything", None).await.expect("ran"));
    }
}
