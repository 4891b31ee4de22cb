//! Simulated scenarios, each printing one JSON report.

pub mod dhtnet;
pub mod lookup;
pub mod mailbox;
pub mod probe;
pub mod topics;
