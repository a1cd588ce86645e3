//! The invariant checker lives in the `checker` crate, so that `wallet bench`
//! runs the same checks; re-exported here for the harness and its tests.

pub use ::checker::*;
