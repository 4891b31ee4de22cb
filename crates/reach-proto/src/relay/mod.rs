//! Relays, sans-IO.
//!
//! - [`acquire`]: the relay-acquisition state machine of a node that is not
//!   directly reachable (Acquiring → Holding → Lost → Backoff).
//! - [`service`]: a relay's reservations, limits and per-client rate caps.
//! - [`circuits`]: a relay's circuit table: caps, expiry, and who may
//!   forward to whom.
//! - [`rpc`]: the signalling messages (reserve, connect, incoming circuit).

pub mod acquire;
pub mod circuits;
pub mod rpc;
pub mod service;
