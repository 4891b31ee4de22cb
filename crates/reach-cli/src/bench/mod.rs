//! `reach bench …`: measurements that print JSON, one file per benchmark.

pub mod connect;
pub mod relay;

pub use connect::connect;
pub use relay::relay;
