//! Hole punching, sans-IO (groundwork; the runtime does not punch yet).
//!
//! - [`strategy`]: the technique for a pair of NAT classes, and the
//!   synchronised fire time computed from the coordinator's RTTs.

pub mod strategy;
