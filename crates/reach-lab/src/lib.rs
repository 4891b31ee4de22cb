//! The NAT lab: topologies of Linux network namespaces joined by veth pairs,
//! with nftables NAT on router namespaces, `tc netem` delay, and real
//! programs (reach nodes, coturn) inside.
//!
//! Everything the lab builds carries a per-run prefix and is torn down when
//! the [`Lab`] is dropped, also when a test panics. "Internet" addresses come
//! from TEST-NET ranges (203.0.113.0/24, 198.51.100.0/24) and LANs from
//! 10.0.0.0/8 / 100.64.0.0/10, all only inside the lab's namespaces: no
//! packet leaves them.
//!
//! - [`netns`]: namespaces, links, commands and sockets inside namespaces.
//! - [`nat`]: the NAT kinds, in RFC 4787 terms, as nftables rulesets.
//! - [`miniupnpd`]: the port-mapping daemon on `upnp` / `natpmp` / `pcp` routers.
//! - [`matrix`]: the classification run over every kind (`reach lab nat`).
//! - [`pairs`]: every pair of kinds connecting by PeerId (`reach lab matrix`).
//! - [`story`]: `reach demo` as root: dial by key, relayed, punched,
//!   port-mapped, in a small lab.
//! - [`rooms`]: topics across federated homes behind every NAT kind, a
//!   relay killed mid-stream (`reach lab rooms`).
//! - [`portmap`]: a node behind each miniupnpd router: mapped, verified,
//!   renewed, re-mapped, deleted (`reach lab portmap`).

pub mod matrix;
pub mod miniupnpd;
pub mod nat;
pub mod netns;
pub mod pairs;
pub mod portmap;
pub mod rooms;
pub mod story;

pub use netns::{Lab, LabError};
