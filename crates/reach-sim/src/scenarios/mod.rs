//! Simulated scenarios, each printing one JSON report.

pub mod probe;
