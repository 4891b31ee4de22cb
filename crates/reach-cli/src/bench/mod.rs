//! `reach bench …`: measurements that print JSON, one file per benchmark.

pub mod relay;

pub use relay::relay;
