//! The shard side of two-phase commit, one file per step, in protocol order:
//!
//! 1. claim (in `crate::idempotency`): the key and a `preparing` record, on the home shard;
//! 2. [`prepare`]: apply one leg and `PREPARE TRANSACTION`, on each participant;
//! 3. [`decide`]: the compare-and-set of the decision, on the home shard (the commit point);
//! 4. [`finish`]: `COMMIT PREPARED` / `ROLLBACK PREPARED`, on each participant;
//! 5. [`recover`]: resolves what a crash left behind, from the decision record.
//!
//! A new Idempotency-Key takes the fast path instead ([`home`]): only the payee's
//! leg is prepared ([`prepare`]), and the payer's leg commits on the home shard in
//! the same local transaction as the key and the record, which is the decision.
//! Steps 1 to 3 become one home transaction; recovery's compare-and-set for it is
//! [`ShardAgent::tombstone`](crate::ShardAgent::tombstone).
//!
//! The coordinator drives the order; this crate owns every statement.

pub mod decide;
pub mod finish;
pub mod home;
pub mod prepare;
pub mod recover;
