//! Errors at the shard-agent boundary. Business outcomes (insufficient funds, an
//! unknown recipient) are not errors: they are values the protocol records.

use router::ShardId;

use crate::functions::{Found, Stamp};

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The shard could not be reached, or the call timed out. The outcome of the
    /// statement in flight is unknown: callers must not guess it.
    #[error("shard {shard} is unavailable: {reason}")]
    Unavailable { shard: ShardId, reason: String },
    /// A row lock was not granted within `lock_timeout`; nothing was written.
    /// Cross-shard deadlocks end this way, since PostgreSQL cannot see them.
    #[error("shard {shard}: lock not granted in time")]
    LockTimeout { shard: ShardId },
    /// PREPARE TRANSACTION did not leave a prepared transaction behind.
    #[error("shard {shard}: PREPARE TRANSACTION {gid} did not prepare")]
    PrepareFailed { shard: ShardId, gid: String },
    /// A statement failed in a way that is a bug or corrupt data, not a fault.
    #[error("shard {shard}: {context}: {detail}")]
    Database {
        shard: ShardId,
        context: &'static str,
        /// SQLSTATE and server message (the driver's own Display says only "db error").
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("shard {shard}: stored data is invalid: {detail}")]
    CorruptRow { shard: ShardId, detail: String },
    /// The shard does not serve `bucket` (SQLSTATE WB001 from `wallet_own`):
    /// the bucket is being moved (`fenced`, `moved`, `incoming`) or lives
    /// elsewhere (`gone`). Nothing was written. The caller's map is stale or
    /// the move's cutover is under way: reload the map and retry.
    #[error("shard {shard} does not serve bucket {bucket} ({state})")]
    NotOwner {
        shard: ShardId,
        bucket: u16,
        state: String,
    },
    /// The shard's SQL functions are not the ones this build was compiled with
    /// (another build's, none, or edited by hand since they were applied):
    /// nothing was sent to it. Migrating the shard with this build fixes it,
    /// unless a newer build applied its functions, which this one must not
    /// replace (`crate::functions`).
    #[error("shard {shard}: its SQL functions are {found}, this build's are {expected}")]
    FunctionsMismatch {
        shard: ShardId,
        expected: Stamp,
        found: Found,
    },
}

/// SQLSTATE of `wallet_own`'s refusal (sql/shard/functions/wallet_own.sql).
pub const NOT_OWNER: &str = "WB001";

impl ShardError {
    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ShardError::Unavailable { .. }
                | ShardError::LockTimeout { .. }
                | ShardError::NotOwner { .. }
        )
    }

    pub fn shard(&self) -> ShardId {
        match self {
            ShardError::Unavailable { shard, .. }
            | ShardError::LockTimeout { shard }
            | ShardError::PrepareFailed { shard, .. }
            | ShardError::Database { shard, .. }
            | ShardError::CorruptRow { shard, .. }
            | ShardError::NotOwner { shard, .. }
            | ShardError::FunctionsMismatch { shard, .. } => *shard,
        }
    }

    /// Classifies a driver error: connection trouble and timeouts become
    /// `Unavailable`, lock timeouts `LockTimeout`, anything else `Database`.
    pub fn from_pg(
        shard: ShardId,
        context: &'static str,
        err: tokio_postgres::Error,
    ) -> ShardError {
        use tokio_postgres::error::SqlState;
        if let Some(code) = err.code() {
            // A deadlock PostgreSQL saw on one shard ends like one it could not see
            // across shards: the transfer gave way, retry with the same key.
            if *code == SqlState::LOCK_NOT_AVAILABLE || *code == SqlState::T_R_DEADLOCK_DETECTED {
                return ShardError::LockTimeout { shard };
            }
            if code.code() == NOT_OWNER {
                let db = err.as_db_error();
                return ShardError::NotOwner {
                    shard,
                    bucket: db
                        .and_then(|d| d.detail())
                        .and_then(|d| d.parse().ok())
                        .unwrap_or(u16::MAX),
                    state: db.and_then(|d| d.hint()).unwrap_or("gone").to_owned(),
                };
            }
            if *code == SqlState::QUERY_CANCELED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || code.code().starts_with("08")
            {
                return ShardError::Unavailable {
                    shard,
                    reason: format!("{context}: {err}"),
                };
            }
            let detail = match err.as_db_error() {
                Some(db) => format!("{} {}", db.code().code(), db.message()),
                None => err.to_string(),
            };
            return ShardError::Database {
                shard,
                context,
                detail,
                source: err,
            };
        }
        // No SQLSTATE: the connection broke or could not be made.
        ShardError::Unavailable {
            shard,
            reason: format!("{context}: {err}"),
        }
    }
}

pub type ShardResult<T> = Result<T, ShardError>;
