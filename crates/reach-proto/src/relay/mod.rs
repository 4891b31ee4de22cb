//! Relays, sans-IO.
//!
//! - [`acquire`]: the relay-acquisition state machine of a node that is not
//!   directly reachable (Acquiring → Holding → Lost → Backoff).
//! - [`service`]: a relay's reservations, limits and per-client rate caps.

pub mod acquire;
pub mod service;
