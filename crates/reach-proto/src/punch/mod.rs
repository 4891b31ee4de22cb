//! Hole punching, sans-IO.
//!
//! - [`strategy`]: the technique for a pair of NAT classes, and the
//!   synchronised fire time computed from the coordinator's RTTs.
//! - [`coordinate`]: what each side tells the coordinator, and the two
//!   introductions the coordinator sends back.
//! - [`birthday`]: the budget and port order of the birthday technique for
//!   endpoint-dependent NATs.

pub mod birthday;
pub mod coordinate;
pub mod strategy;

pub use coordinate::{Introduction, PunchInfo, Role, Technique};
