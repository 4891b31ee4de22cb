//! # reach
//!
//! Reach any peer by its public key. A [`Node`] owns an Ed25519 identity and
//! one UDP socket; it speaks mutually authenticated QUIC (TLS 1.3, the key is
//! the identity) and shares the socket with STUN and reach's own small
//! control packets, so NAT mappings opened by probes are the ones QUIC uses.
//!
//! ```no_run
//! # async fn demo() -> reach::Result<()> {
//! use reach::{Event, Node};
//!
//! let node = Node::builder()
//!     .bind("0.0.0.0:4433".parse().unwrap())
//!     .data_dir("/var/lib/reach")
//!     .spawn()
//!     .await?;
//! println!("I am {}", node.peer_id());
//! while let Some(event) = node.next_event().await {
//!     match event {
//!         Event::Message { from, data } => println!("{from}: {} bytes", data.len()),
//!         Event::Stream(stream) => println!("{} opened a stream", stream.peer),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The sans-IO protocol core lives in [`reach_proto`]; this crate drives it
//! with tokio and quinn.

pub(crate) mod advertise;
pub mod api;
pub mod datadir;
pub mod dht;
pub mod error;
pub mod eventlog;
pub mod events;
pub mod handshake;
pub mod histogram;
pub mod keystore;
pub(crate) mod messaging;
pub mod nat;
pub mod node;
pub mod outbox;
pub(crate) mod peers;
pub mod portmap;
pub mod punch;
pub mod relay;
pub mod socket;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod topics;
pub mod transport;
pub(crate) mod util;
pub(crate) mod vaddr;

pub use dht::DhtMode;
pub use dht::join::JoinReport;
pub use error::{Error, Result};
pub use events::{DurableMessage, Event, PathKind, Stream};
pub use handshake::PostQuantum;
pub use nat::NatReport;
pub use node::{
    ConnectionLimits, Direction, Node, NodeBuilder, NodeEvent, NodeEvents, NodeStats, PeerInfo,
    ProtocolListener,
};
pub use outbox::{MessageId, PendingInfo};
pub use portmap::{PortMapProtocol, PortMapState, PortMapStatus, PortMapping};
pub use quinn::{RecvStream, SendStream};
pub use reach_proto::dht::record::{AddrKind, TypedAddr};
pub use reach_proto::dht::store::StoreLimits;
pub use reach_proto::outbox::Delivery;
pub use reach_proto::relay::service::RelayLimits;
/// A topic home's rate limits ([`NodeBuilder::topic_limits`]).
pub use reach_proto::topics::OverlayConfig as TopicLimits;
pub use reach_proto::wire::envelope::MAX_MESSAGE_LEN;
pub use reach_proto::{Keypair, PeerId, PeerIdError, Ticket, TicketError};
pub use relay::{Reachability, RelayMode, RelayStatus};
pub use topics::{
    PublishReport, Subscription, TopicDelivery, TopicEvent, TopicFederation, TopicRefusal,
    TopicsStatus,
};

/// The README's code blocks, compiled by `cargo test --doc` so the library
/// example there cannot drift from the API (its non-Rust blocks are marked
/// `sh`, `toml` or `text`).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
mod readme {}
