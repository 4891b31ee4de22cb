//! Sans-IO protocol core of reach.
//!
//! Everything here is pure computation: identities, wire formats and (as the
//! project grows) the protocol state machines. There are no sockets, no async
//! runtime and no clock in this crate: time comes in as an argument and output
//! goes out as values. The runtime crate `reach` drives this core with tokio and
//! quinn; the simulator `reach-sim` drives the very same code in virtual time.

pub mod dht;
pub mod identity;
pub mod limits;
pub mod nat;
pub mod punch;
pub mod relay;
pub mod wire;

pub use identity::{Keypair, PeerId, PeerIdError};
