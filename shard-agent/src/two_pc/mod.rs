//! The shard side of two-phase commit beyond a group's own statements
//! (`crate::batch`), one file per step:
//!
//! - [`decide`]: the compare-and-set of a `preparing` record's decision (the
//!   commit point of a Redis-mode transfer or a payment, and recovery's
//!   presumed abort);
//! - [`finish`]: `COMMIT PREPARED` / `ROLLBACK PREPARED`, on each participant;
//! - [`recover`]: resolves what a crash left behind, from the decision record,
//!   the group's decision row, or a tombstone written when there is neither.
//!
//! The coordinator drives the order; this crate owns every statement.

pub mod decide;
pub mod finish;
pub mod recover;
