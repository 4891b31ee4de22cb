//! NAT awareness, sans-IO: what a node can conclude about the NAT in front
//! of it from what peers report.
//!
//! - [`observed`]: the scored set of external addresses peers report.
//! - [`classify`]: RFC 4787 mapping and filtering behaviour from
//!   observations.
//! - [`portmap`]: port mapping (NAT-PMP, PCP) codecs and the lifecycle of a
//!   mapping.

pub mod classify;
pub mod observed;
pub mod portmap;

pub use classify::{Filtering, FilteringObservation, Mapping, MappingObservation, MappingResult};
pub use observed::{AddrChange, OBSERVED_ADDR_TTL, ObservedAddrs};
