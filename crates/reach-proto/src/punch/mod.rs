//! Hole punching, sans-IO.
//!
//! - [`strategy`]: the technique for a pair of NAT classes, and the
//!   synchronised fire time computed from the coordinator's RTTs.
//! - [`coordinate`]: what each side tells the coordinator, and the two
//!   introductions the coordinator sends back.
//! - [`birthday`]: the budget and port order of the birthday technique for
//!   endpoint-dependent NATs.
//! - [`upgrade`]: when to punch, how often and how many at once: attempts,
//!   retries with swapped roles, staying relayed, re-punching after a
//!   fallback.
//! - [`liveness`]: when a direct path that replaced a relayed one counts as
//!   dead.

pub mod birthday;
pub mod coordinate;
pub mod liveness;
pub mod strategy;
pub mod upgrade;

pub use coordinate::{Introduction, PunchInfo, Role, Technique};
