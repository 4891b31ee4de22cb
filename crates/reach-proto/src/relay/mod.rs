//! Relays, sans-IO.
//!
//! - [`acquire`]: the relay-acquisition state machine of a node that is not
//!   directly reachable (Acquiring → Holding → Lost → Backoff).

pub mod acquire;
