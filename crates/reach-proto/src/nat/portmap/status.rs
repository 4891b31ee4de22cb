//! What a port mapper reports: the data `reach nat`, the control API and
//! the lab read (the runtime fills it in; it lives here, below every
//! runtime capability, so NAT discovery's report can carry it).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// The protocol a mapping was made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortMapProtocol {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886).
    Natpmp,
    /// UPnP Internet Gateway Device (v1 or v2).
    Upnp,
}

/// Where port mapping stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortMapState {
    /// Turned off by configuration, or the node is bound to loopback
    /// (nothing outside could use a mapping).
    Off,
    /// No gateway to ask: none in the routing table, or it is not on a
    /// private network.
    NoGateway,
    /// Probing the gateway for PCP, NAT-PMP and UPnP-IGD.
    Discovering,
    /// The gateway speaks none of them (tried again later).
    Unavailable,
    /// A mapping is being asked for.
    Requesting,
    /// The router granted a mapping; it is being checked from outside.
    Verifying,
    /// The mapping is verified and published: the node is reachable at
    /// [`PortMapStatus::published`].
    Active,
    /// The router granted a mapping that did not reach the node from
    /// outside (a double NAT, or a router that lies): not published.
    Unverified,
    /// No mapping now: refused, or revoked after failed renewals (asked
    /// for again later).
    Revoked,
    /// The node shut down and deleted its mappings.
    Stopped,
}

impl PortMapState {
    /// Whether the outcome is known (nothing is being asked or checked
    /// right now): what reachability waits for.
    pub fn is_settled(self) -> bool {
        !matches!(
            self,
            PortMapState::Discovering | PortMapState::Requesting | PortMapState::Verifying
        )
    }
}

/// What port mapping did, as `reach nat` and `/v1/nat` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapStatus {
    /// Where port mapping stands.
    pub state: PortMapState,
    /// The router asked.
    pub gateway: Option<IpAddr>,
    /// The protocol the router answered (PCP preferred, then NAT-PMP, then
    /// UPnP-IGD).
    pub protocol: Option<PortMapProtocol>,
    /// The external address of the UDP (QUIC) mapping, as the router
    /// granted it.
    pub external: Option<SocketAddr>,
    /// The external address verified from outside and published as a
    /// direct address.
    pub published: Option<SocketAddr>,
    /// The external address of the TCP (links) mapping.
    pub tcp_external: Option<SocketAddr>,
    /// The lease the router granted the UDP mapping, in seconds.
    pub lease_secs: Option<u32>,
    /// Renewals the router granted (both mappings).
    pub renewals: u64,
    /// Milliseconds from the node's start to the first granted mapping.
    pub mapped_after_ms: Option<u64>,
    /// Why there is no mapping, as a stable kind (`portmap_no_gateway`,
    /// `portmap_unavailable`, `portmap_refused`, `portmap_unverified`).
    pub error: Option<String>,
}

impl PortMapStatus {
    /// A status in `state` with nothing known yet.
    pub fn new(state: PortMapState) -> Self {
        PortMapStatus {
            state,
            gateway: None,
            protocol: None,
            external: None,
            published: None,
            tcp_external: None,
            lease_secs: None,
            renewals: 0,
            mapped_after_ms: None,
            error: None,
        }
    }
}
