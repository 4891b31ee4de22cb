//! `reach bench …`: measurements that print JSON, one file per benchmark.

pub mod connect;
pub mod flood;
pub mod outbox;
pub mod relay;
pub mod topics;

pub use connect::connect;
pub use flood::flood;
pub use outbox::outbox;
pub use relay::relay;
pub use topics::topics;
