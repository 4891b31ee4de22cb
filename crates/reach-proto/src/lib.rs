//! Sans-IO protocol core of reach.
//!
//! Everything here is pure computation: identities, wire formats, limits and
//! the protocol state machines. The rule that keeps it so: no sockets, no
//! async runtime, no clock and no threads in this crate. Time comes in as an
//! argument (`now: Duration` since an epoch the driver picks); inputs are
//! method calls, outputs are returned values, queued actions (`poll_*`) and
//! deadlines (`next_timeout`). The runtime crate `reach` drives this core
//! with tokio and quinn; the simulator `reach-sim` drives the very same code
//! in virtual time, and the unit tests here run in milliseconds of wall time.
//!
//! - [`identity`]: Ed25519 keypairs and the [`PeerId`] that is a node's
//!   address.
//! - [`wire`]: what goes on the wire: framed envelopes on QUIC streams, and
//!   the bare datagrams (STUN, control packets, relay frames) on the UDP
//!   socket.
//! - [`dht`]: the Kademlia DHT: keys, routing table, lookups, signed records
//!   and their store, the join-and-maintenance schedule.
//! - [`nat`]: external addresses as peers report them, and NAT
//!   classification.
//! - [`relay`]: acquiring a relay, and a relay's reservations and circuits.
//! - [`punch`]: hole punching: technique, coordination, upgrade from relayed
//!   to direct, liveness of the direct path.
//! - [`outbox`]: the durable outbox's policy: retry schedule, per-destination
//!   FIFO scheduler, the receiver's exactly-once log, the delivery frames.
//! - [`topics`]: publish/subscribe among the homes of a topic: signed
//!   messages, a spanning-tree overlay with lazy repair, exactly-once
//!   in-order delivery per publisher, presence.
//! - [`limits`]: the rate limiters (fixed window, token bucket) the other
//!   modules and the runtime share.

pub mod dht;
pub mod endpoint;
pub mod identity;
pub mod limits;
pub mod mailbox;
pub mod nat;
pub mod outbox;
pub mod punch;
pub mod relay;
pub mod ticket;
pub mod topics;
pub mod wire;

pub use identity::{Keypair, PeerId, PeerIdError};
pub use ticket::{Ticket, TicketError};
