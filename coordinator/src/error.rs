//! Errors at the coordinator's boundary (the API maps each to problem+json).

use shard_agent::{Currency, ShardError};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A failpoint stopped the protocol here, as a crash would (tests only).
    #[error("coordinator stopped at failpoint {at}")]
    Crashed { at: &'static str },
    #[error("stored transfer record is invalid: {0}")]
    Corrupt(String),
    /// A transfer's payer, named by their token and read only when the transfer
    /// ran, has no live session (`service::Payer::Claimed`).
    #[error("the payer's session is not live")]
    Unauthorized,
    /// A bounded queue is full: nothing was claimed or written, retry later.
    #[error("{queue} is full ({queued_max} waiting)")]
    Overloaded {
        queue: &'static str,
        queued_max: usize,
    },
    /// A transfer's payer, read when the transfer ran, holds another currency.
    #[error("the payer's account holds {holds}")]
    PayerCurrency { holds: Currency },
    /// Refused before any shard was asked to move anything (only the chaos
    /// suite's broken limit variant refuses this way).
    #[error("refused: {}", .0.as_str())]
    Refused(shard_agent::FailureCode),
}

/// A named failpoint that stops the protocol at this step as a crash would.
/// `return` makes the protocol future end here (nothing after it runs);
/// `return(abort)` aborts the whole process, for the chaos harness's real crashes.
/// Compiled to nothing unless the `failpoints` feature is on.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |arg: Option<String>| {
            if arg.as_deref() == Some("abort") {
                eprintln!("failpoint {}: aborting the process", $name);
                std::process::abort();
            }
            Err($crate::error::CoordinatorError::Crashed { at: $name }.into())
        })
    };
}
pub(crate) use crash_point;

/// A named failpoint that stalls the protocol, asynchronously, for the number of
/// milliseconds given as `return(MS)` (a lock holder "paused" past its TTL). Unlike
/// the `fail` crate's own `sleep` and `pause`, it never blocks a runtime thread,
/// which could strand other tasks queued on it. No-op without `failpoints`.
macro_rules! stall_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        if let Some(Some(ms)) = fail::eval($name, |arg| arg.and_then(|a| a.parse::<u64>().ok())) {
            tracing::warn!(failpoint = $name, ms, "stalling");
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    };
}
pub(crate) use stall_point;
