//! Simulated scenarios, each printing one JSON report.

pub mod lookup;
pub mod probe;
pub mod topics;
