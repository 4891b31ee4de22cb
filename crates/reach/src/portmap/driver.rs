//! The port-mapping task: finds the gateway, picks the protocol it speaks,
//! and drives one [`Lifecycle`] per mapping (the node's UDP port, and its
//! TCP port when it listens for links) until shutdown deletes them.
//!
//! Everything the router sends is untrusted: replies come only through a
//! socket connected to the gateway's port 5351, announcements are taken
//! only from the gateway's IP, everything is decoded by reach-proto's
//! codecs (a reply that does not decode is dropped and counted), and a
//! granted address is published only after a helper peer's probe reached
//! the node through it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use reach_proto::nat::portmap::lifecycle::{Action, EpochRule, Grant, Lifecycle, State};
use reach_proto::nat::portmap::{CLIENT_PORT, MAX_MESSAGE_LEN, Protocol, SERVER_PORT, natpmp, pcp};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::upnp::{self, UpnpError, UpnpNet};
use super::{
    EPOCH_CHECK_INTERVAL, MAPPING_DESCRIPTION, PCP_GRACE, PREFERRED_WAIT_AFTER_UPNP, PROBE_TIMEOUT,
    PortMap, PortMapProtocol, PortMapState, PortMapStatus, REDISCOVER_AFTER, REFRESH_INTERVAL,
    UPNP_DISCOVERY_TIMEOUT, VERIFY_HELPERS, VERIFY_WAIT, gateway,
};
use crate::node::NodeEvent;
use crate::node::stats;

/// Verification results in flight at most (one per granted address).
const VERIFY_QUEUE: usize = 4;
/// Far enough in the future to mean "no timer".
const NO_TIMER: Duration = Duration::from_secs(24 * 3600);

/// How a session with the gateway ended.
enum Ended {
    /// Shutdown: the mappings are deleted.
    Stopped,
    /// Nothing to ask: no gateway, or no protocol answered.
    NoGateway,
    Unavailable,
}

/// The protocol spoken with the gateway, and what it needs.
enum Wire {
    Pcp {
        sock: UdpSocket,
        /// Our address as the gateway sees it (PCP carries it).
        client: IpAddr,
    },
    NatPmp {
        sock: UdpSocket,
        /// The router's external address (NAT-PMP's map answers carry
        /// only ports).
        external_ip: Ipv4Addr,
    },
    Upnp {
        /// Connected to the gateway's 5351 like the others' (nothing
        /// arrives on it; it keeps the driver's loop one shape).
        sock: UdpSocket,
        igd: upnp::Igd,
        net: UpnpNet,
        /// Our LAN address: the mappings' internal client.
        client: IpAddr,
        /// The router's BOOTID.UPNP.ORG as last seen: a new one in an SSDP
        /// NOTIFY means it restarted.
        boot_id: Option<u32>,
    },
}

impl Wire {
    fn protocol(&self) -> PortMapProtocol {
        match self {
            Wire::Pcp { .. } => PortMapProtocol::Pcp,
            Wire::NatPmp { .. } => PortMapProtocol::Natpmp,
            Wire::Upnp { .. } => PortMapProtocol::Upnp,
        }
    }

    fn sock(&self) -> &UdpSocket {
        match self {
            Wire::Pcp { sock, .. } | Wire::NatPmp { sock, .. } | Wire::Upnp { sock, .. } => sock,
        }
    }
}

/// Whether the outside check of a mapping is out or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Pending,
    Failed,
}

/// One mapping: its lifecycle and what names it on the wire.
struct Mapping {
    protocol: Protocol,
    internal_port: u16,
    lc: Lifecycle,
    /// PCP's name for the mapping (the same for every renewal).
    nonce: pcp::Nonce,
    check: Check,
    /// The external port granted last (UPnP deletes by it).
    external_port: Option<u16>,
}

impl PortMap {
    /// Runs until shutdown: a session with the gateway, again after
    /// [`REDISCOVER_AFTER`] when no protocol answered.
    pub(super) async fn run(self: Arc<Self>) {
        let stopping = self.core.tasks.stopping();
        loop {
            match self.session(&stopping).await {
                Ended::Stopped => {
                    self.update(|s| s.state = PortMapState::Stopped);
                    return;
                }
                Ended::NoGateway => {
                    self.update(|s| {
                        s.state = PortMapState::NoGateway;
                        s.error = Some("portmap_no_gateway".into());
                    });
                    return;
                }
                Ended::Unavailable => {
                    self.update(|s| {
                        s.state = PortMapState::Unavailable;
                        s.error = Some("portmap_unavailable".into());
                    });
                    tokio::select! {
                        _ = stopping.cancelled() => return,
                        _ = tokio::time::sleep(REDISCOVER_AFTER) => {}
                    }
                }
            }
        }
    }

    /// The gateway to ask: configured, or the routing table's default if
    /// it is on a private network.
    fn gateway(&self) -> Option<IpAddr> {
        if let Some(gw) = self.config.gateway {
            return Some(gw);
        }
        if self.core.local_addr.is_ipv6() && !self.core.local_addr.ip().is_unspecified() {
            // Only IPv4 gateways are found on their own; an IPv6 gateway
            // (a PCP firewall) is configured.
            return None;
        }
        gateway::default_gateway_v4()
            .map(IpAddr::V4)
            .filter(|gw| gateway::is_lan_gateway(*gw))
    }

    async fn session(self: &Arc<Self>, stopping: &CancellationToken) -> Ended {
        let Some(gw) = self.gateway() else {
            return Ended::NoGateway;
        };
        self.update(|s| {
            s.state = PortMapState::Discovering;
            s.gateway = Some(gw);
            s.error = None;
        });
        let found = tokio::select! {
            _ = stopping.cancelled() => return Ended::Stopped,
            w = self.discover(gw) => w,
        };
        let Some(wire) = found else {
            return Ended::Unavailable;
        };
        tracing::info!(%gw, protocol = ?wire.protocol(), "the gateway maps ports");
        self.update(|s| {
            s.protocol = Some(wire.protocol());
            s.state = PortMapState::Requesting;
        });
        self.drive(gw, wire, stopping).await;
        Ended::Stopped
    }

    /// A UDP socket in the node's network, connected to the gateway's
    /// port-mapping port (so only the gateway's replies arrive on it).
    fn client_socket(&self, gw: IpAddr) -> Option<UdpSocket> {
        let node_ip = self.core.local_addr.ip();
        let bind_ip = if !node_ip.is_unspecified() && node_ip.is_ipv4() == gw.is_ipv4() {
            node_ip
        } else if gw.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let sock = (self.net.udp)(SocketAddr::new(bind_ip, 0), 1)
            .ok()?
            .into_iter()
            .next()?;
        sock.connect(SocketAddr::new(gw, SERVER_PORT)).ok()?;
        sock.set_nonblocking(true).ok()?;
        UdpSocket::from_std(sock).ok()
    }

    /// Finds the protocol the gateway speaks: PCP and NAT-PMP probed on
    /// 5351 while UPnP-IGD is searched for, all at once; PCP preferred,
    /// then NAT-PMP, then UPnP (a router answering PCP or NAT-PMP does not
    /// wait for UPnP's search).
    async fn discover(&self, gw: IpAddr) -> Option<Wire> {
        let sock = self.client_socket(gw)?;
        let client = sock.local_addr().ok()?.ip();
        let net = UpnpNet {
            udp: self.net.udp.clone(),
            tcp: self.net.tcp.clone(),
        };
        let started = Instant::now();
        let probe = self.probe_5351(sock, client, gw);
        let search = upnp::discover(&net, client, gw, UPNP_DISCOVERY_TIMEOUT);
        tokio::pin!(probe, search);
        let mut probe_failed = false;
        // `Some` once the search ended: the gateway, if it answered.
        let mut searched: Option<Option<upnp::Igd>> = None;
        loop {
            let upnp_found = matches!(searched, Some(Some(_)));
            tokio::select! {
                _ = tokio::time::sleep_until(started + PREFERRED_WAIT_AFTER_UPNP), if upnp_found => {
                    let igd = searched.take().flatten()?;
                    return self.upnp_wire(igd, net.clone(), client, gw);
                }
                w = &mut probe, if !probe_failed => {
                    if w.is_some() {
                        return w;
                    }
                    probe_failed = true;
                    if let Some(igd) = searched.take() {
                        return self.upnp_wire(igd?, net.clone(), client, gw);
                    }
                }
                r = &mut search, if searched.is_none() => {
                    let igd = r
                        .inspect_err(|e| tracing::debug!(%gw, error = %e, kind = e.kind(), "no UPnP-IGD"))
                        .ok();
                    if probe_failed {
                        return self.upnp_wire(igd?, net.clone(), client, gw);
                    }
                    searched = Some(igd);
                }
            }
        }
    }

    fn upnp_wire(&self, igd: upnp::Igd, net: UpnpNet, client: IpAddr, gw: IpAddr) -> Option<Wire> {
        Some(Wire::Upnp {
            sock: self.client_socket(gw)?,
            boot_id: igd.boot_id(),
            igd,
            net,
            client,
        })
    }

    /// Probes the gateway for PCP and NAT-PMP at once, from one socket
    /// (both listen on 5351; the version byte tells the answers apart).
    /// PCP is preferred: after a NAT-PMP answer, a PCP answer still has
    /// [`PCP_GRACE`].
    async fn probe_5351(&self, sock: UdpSocket, client: IpAddr, gw: IpAddr) -> Option<Wire> {
        let announce = pcp::Request::Announce { client }.encode();
        let ask_external = natpmp::Request::ExternalAddress.encode();
        let started = Instant::now();
        let mut natpmp_external: Option<(Ipv4Addr, Instant)> = None;
        let mut resend_at = started;
        let mut wait = reach_proto::nat::portmap::lifecycle::RETRANSMIT_INITIAL;
        let mut buf = vec![0u8; MAX_MESSAGE_LEN + 1];
        loop {
            let now = Instant::now();
            if let Some((ip, at)) = natpmp_external
                && now >= at + PCP_GRACE
            {
                return Some(Wire::NatPmp {
                    sock,
                    external_ip: ip,
                });
            }
            if now >= started + PROBE_TIMEOUT {
                return None;
            }
            if now >= resend_at {
                let _ = sock.send(&announce).await;
                if gw.is_ipv4() {
                    let _ = sock.send(&ask_external).await;
                }
                resend_at = now + wait;
                wait *= 2;
            }
            let mut until = (started + PROBE_TIMEOUT).min(resend_at);
            if let Some((_, at)) = natpmp_external {
                until = until.min(at + PCP_GRACE);
            }
            let Ok(Ok(n)) = tokio::time::timeout_at(until, sock.recv(&mut buf)).await else {
                continue;
            };
            let bytes = &buf[..n];
            match bytes.first() {
                Some(&pcp::VERSION) => match pcp::Response::decode(bytes) {
                    // Any PCP answer, even an error, says a PCP server is there.
                    Ok(_) => return Some(Wire::Pcp { sock, client }),
                    Err(_) => stats::bump(&self.counters.bad_replies),
                },
                Some(&natpmp::VERSION) => match natpmp::Response::decode(bytes) {
                    Ok(natpmp::Response::ExternalAddress { external, .. }) => {
                        natpmp_external.get_or_insert((external, Instant::now()));
                    }
                    Ok(_) => {}
                    Err(_) => stats::bump(&self.counters.bad_replies),
                },
                _ => stats::bump(&self.counters.bad_replies),
            }
        }
    }

    /// The socket the gateway's restart announcements arrive on
    /// (multicast to 224.0.0.1:5350, RFC 6886 §3.2.1, RFC 6887 §14.1.3).
    /// Best effort: another program may hold the port.
    fn announce_socket(&self, gw: IpAddr, local: IpAddr) -> Option<UdpSocket> {
        let (IpAddr::V4(_), IpAddr::V4(local)) = (gw, local) else {
            return None;
        };
        let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), CLIENT_PORT);
        let sock = (self.net.udp)(bind, 1).ok()?.into_iter().next()?;
        let _ = sock.join_multicast_v4(&Ipv4Addr::new(224, 0, 0, 1), &local);
        sock.set_nonblocking(true).ok()?;
        UdpSocket::from_std(sock).ok()
    }

    /// The socket UPnP routers' SSDP NOTIFYs arrive on (multicast to
    /// 239.255.255.250:1900). Best effort: another UPnP stack on this host
    /// may hold the port; then the mapping itself is checked instead (see
    /// [`EPOCH_CHECK_INTERVAL`]).
    fn ssdp_socket(&self, local: IpAddr) -> Option<UdpSocket> {
        let IpAddr::V4(local) = local else {
            return None;
        };
        let bind = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            reach_proto::nat::portmap::upnp::SSDP_PORT,
        );
        let sock = (self.net.udp)(bind, 1).ok()?.into_iter().next()?;
        sock.join_multicast_v4(&reach_proto::nat::portmap::upnp::SSDP_MULTICAST_V4, &local)
            .ok()?;
        sock.set_nonblocking(true).ok()?;
        UdpSocket::from_std(sock).ok()
    }

    /// Carries out a UPnP request inline (an HTTP exchange bounded by the
    /// client's timeouts): a lifetime of 0 deletes. A SOAP fault is a
    /// refusal; no answer at all is left to the lifecycle's retransmission.
    async fn upnp_request(
        &self,
        igd: &upnp::Igd,
        net: &UpnpNet,
        client: IpAddr,
        m: &mut Mapping,
        lifetime_secs: u32,
        clock: Instant,
    ) {
        let answer = if lifetime_secs == 0 {
            let port = m.external_port.unwrap_or(m.internal_port);
            igd.delete_port_mapping(net, m.protocol, port)
                .await
                .map(|()| Grant {
                    external: SocketAddr::new(client, port),
                    lifetime_secs: 0,
                    epoch: None,
                })
        } else {
            let internal = SocketAddr::new(client, m.internal_port);
            async {
                let mapped = igd
                    .add_port_mapping(
                        net,
                        m.protocol,
                        internal,
                        lifetime_secs,
                        MAPPING_DESCRIPTION,
                    )
                    .await?;
                let ip = igd.external_ip(net).await?;
                Ok::<_, UpnpError>(Grant {
                    external: SocketAddr::new(ip, mapped.external_port),
                    // A permanent mapping (lease 0) is renewed at our pace
                    // and deleted at shutdown like any other.
                    lifetime_secs: if mapped.lease_secs == 0 {
                        lifetime_secs
                    } else {
                        mapped.lease_secs
                    },
                    epoch: None,
                })
            }
            .await
        };
        let now = clock.elapsed();
        match answer {
            Ok(grant) => {
                if lifetime_secs != 0 {
                    m.external_port = Some(grant.external.port());
                }
                m.lc.granted(now, grant);
            }
            Err(e) if e.soap_code().is_some() => {
                tracing::debug!(error = %e, "the UPnP gateway refused");
                m.lc.refused(now);
            }
            Err(e) => {
                tracing::debug!(error = %e, kind = e.kind(), "no answer from the UPnP gateway")
            }
        }
    }

    /// Asks a UPnP gateway whether it still holds the UDP mapping; one it
    /// lost (a flush, a restart unannounced) is made again at once.
    async fn upnp_check(&self, wire: &Wire, maps: &mut [Mapping], clock: Instant) {
        let Wire::Upnp { igd, net, .. } = wire else {
            return;
        };
        let Some(port) = maps
            .iter()
            .find(|m| m.protocol == Protocol::Udp && matches!(m.lc.state(), State::Mapped(_)))
            .and_then(|m| m.external_port)
        else {
            return;
        };
        if let Ok(false) = igd.mapping_exists(net, Protocol::Udp, port).await {
            tracing::debug!(port, "the UPnP gateway lost the mapping");
            for m in maps.iter_mut() {
                m.lc.server_lost_state(clock.elapsed());
            }
        }
    }

    /// Maps the node's ports and keeps the mappings alive until shutdown,
    /// then deletes them.
    async fn drive(self: &Arc<Self>, gw: IpAddr, mut wire: Wire, stopping: &CancellationToken) {
        let clock = Instant::now();
        let now = || clock.elapsed();
        let rule = match wire {
            Wire::Pcp { .. } => Some(EpochRule::Pcp),
            Wire::NatPmp { .. } => Some(EpochRule::NatPmp),
            Wire::Upnp { .. } => None,
        };
        let port = self.core.local_addr.port();
        let mut protocols = vec![Protocol::Udp];
        if self.tcp_listener {
            protocols.push(Protocol::Tcp);
        }
        let mut maps: Vec<Mapping> = Vec::new();
        for protocol in protocols {
            let mut nonce = [0u8; 12];
            if getrandom::fill(&mut nonce).is_err() {
                return;
            }
            maps.push(Mapping {
                protocol,
                internal_port: port,
                lc: Lifecycle::new(now(), self.config.lifetime, rule)
                    .with_max_renew_interval(REFRESH_INTERVAL),
                nonce,
                check: Check::None,
                external_port: None,
            });
        }
        let local = wire.sock().local_addr().map(|a| a.ip());
        // Where the router says it restarted: PCP / NAT-PMP announcements,
        // or UPnP's SSDP NOTIFYs.
        let announcements = local.ok().and_then(|l| match wire {
            Wire::Upnp { .. } => self.ssdp_socket(l),
            _ => self.announce_socket(gw, l),
        });
        let (vtx, mut vrx) = mpsc::channel::<(SocketAddr, bool)>(VERIFY_QUEUE);
        let mut stopped = false;
        let mut epoch_check = tokio::time::interval(EPOCH_CHECK_INTERVAL);
        epoch_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ask_epoch = match &wire {
            Wire::Pcp { client, .. } => Some(pcp::Request::Announce { client: *client }.encode()),
            Wire::NatPmp { .. } => Some(natpmp::Request::ExternalAddress.encode()),
            Wire::Upnp { .. } => None,
        };
        let mut buf = vec![0u8; MAX_MESSAGE_LEN + 1];
        let mut abuf = vec![0u8; MAX_MESSAGE_LEN + 1];
        loop {
            for m in &mut maps {
                self.act(&wire, m, clock, &vtx, stopped).await;
            }
            self.show(&wire, &maps);
            if stopped && maps.iter().all(|m| m.lc.is_done()) {
                return;
            }
            let next = maps
                .iter()
                .filter_map(|m| m.lc.poll_timeout())
                .min()
                .unwrap_or(now() + NO_TIMER);
            tokio::select! {
                _ = stopping.cancelled(), if !stopped => {
                    stopped = true;
                    for m in &mut maps {
                        m.lc.shutdown(now());
                    }
                }
                r = wire.sock().recv(&mut buf) => {
                    if let Ok(n) = r {
                        self.on_reply(&mut wire, &mut maps, &buf[..n], now());
                    }
                }
                r = recv_from_opt(announcements.as_ref(), &mut abuf) => {
                    if let Some((n, from)) = r
                        && from.ip() == gw
                    {
                        self.on_announcement(&mut wire, &mut maps, &abuf[..n], now());
                    }
                }
                Some((external, reachable)) = vrx.recv(), if !stopped => {
                    for m in maps.iter_mut().filter(|m| m.protocol == Protocol::Udp) {
                        if m.check == Check::Pending {
                            m.check = if reachable { Check::None } else { Check::Failed };
                        }
                        if !reachable {
                            stats::bump(&self.counters.verify_failures);
                        }
                        m.lc.verified(now(), external, reachable);
                    }
                }
                _ = epoch_check.tick(), if !stopped => {
                    match &ask_epoch {
                        Some(ask) => {
                            let _ = wire.sock().send(ask).await;
                        }
                        // UPnP has no epoch; without the SSDP listener the
                        // mapping itself is asked for.
                        None if announcements.is_none() => {
                            self.upnp_check(&wire, &mut maps, clock).await;
                        }
                        None => {}
                    }
                }
                _ = tokio::time::sleep_until(clock + next) => {
                    for m in &mut maps {
                        m.lc.handle_timeout(now());
                    }
                }
            }
        }
    }

    /// Carries out what the mapping's lifecycle asks, in order.
    async fn act(
        self: &Arc<Self>,
        wire: &Wire,
        m: &mut Mapping,
        clock: Instant,
        vtx: &mpsc::Sender<(SocketAddr, bool)>,
        stopped: bool,
    ) {
        while let Some(action) = m.lc.poll_action() {
            let now = clock.elapsed();
            match action {
                Action::SendRequest {
                    lifetime_secs,
                    suggested_external,
                } => match wire {
                    Wire::Upnp {
                        igd, net, client, ..
                    } => {
                        let was = m.lc.state();
                        self.upnp_request(igd, net, *client, m, lifetime_secs, clock)
                            .await;
                        self.count(was, m.lc.state());
                    }
                    _ => {
                        if let Some(bytes) = request(wire, m, lifetime_secs, suggested_external) {
                            let _ = wire.sock().send(&bytes).await;
                        }
                    }
                },
                Action::Verify(external) if m.protocol == Protocol::Tcp => {
                    // The TCP mapping serves TCP links at the address the
                    // UDP mapping publishes; it is not published on its
                    // own, so there is nothing to check from outside.
                    m.lc.verified(now, external, true);
                }
                Action::Verify(external) => {
                    if stopped {
                        continue;
                    }
                    m.check = Check::Pending;
                    let nat = self.nat.clone();
                    let tx = vtx.clone();
                    self.core.spawn(async move {
                        let ok = nat
                            .check_mapped(external, VERIFY_WAIT, VERIFY_HELPERS)
                            .await;
                        let _ = tx.send((external, ok)).await;
                    });
                }
                Action::Publish(external) => {
                    if m.protocol == Protocol::Udp {
                        tracing::info!(%external, "port mapping verified: reachable directly");
                        self.update(|s| s.published = Some(external));
                        self.core.bus.emit(NodeEvent::PortMapped { external });
                    }
                }
                Action::Unpublish(external) => {
                    if m.protocol == Protocol::Udp {
                        self.update(|s| s.published = None);
                        self.core.bus.emit(NodeEvent::PortUnmapped { external });
                    }
                }
            }
        }
    }

    /// A datagram from the gateway: an answer to a request, or an
    /// announcement (a restart, a new external address).
    fn on_reply(&self, wire: &mut Wire, maps: &mut [Mapping], bytes: &[u8], now: Duration) {
        let before: Vec<State> = maps.iter().map(|m| m.lc.state()).collect();
        match wire {
            Wire::Pcp { .. } => match pcp::Response::decode(bytes) {
                Ok(r) => on_pcp(maps, &r, now),
                Err(_) => stats::bump(&self.counters.bad_replies),
            },
            Wire::NatPmp { external_ip, .. } => match natpmp::Response::decode(bytes) {
                Ok(r) => on_natpmp(external_ip, maps, &r, now),
                Err(_) => stats::bump(&self.counters.bad_replies),
            },
            // UPnP answers come over its own HTTP exchanges.
            Wire::Upnp { .. } => {}
        }
        for (m, was) in maps.iter().zip(before) {
            self.count(was, m.lc.state());
        }
    }

    /// A multicast announcement from the gateway (RFC 6886 §3.2.1, RFC
    /// 6887 §14.1.3): after a restart or an address change. A router that
    /// speaks both protocols may announce in either (miniupnpd sends a PCP
    /// ANNOUNCE with epoch 0 at start even to NAT-PMP clients), so both are
    /// read whatever the wire: a PCP epoch that went back re-maps, and a
    /// NAT-PMP address announcement is handled like an answer.
    fn on_announcement(&self, wire: &mut Wire, maps: &mut [Mapping], bytes: &[u8], now: Duration) {
        if let Wire::Upnp { boot_id, .. } = wire {
            // A NOTIFY with a new BOOTID.UPNP.ORG: the router restarted
            // (UPnP "answering afresh") and lost its mappings.
            if let Some((_, Some(new))) = upnp::decode_notify(bytes)
                && *boot_id != Some(new)
            {
                tracing::debug!(?boot_id, new, "the UPnP gateway restarted");
                *boot_id = Some(new);
                for m in maps.iter_mut() {
                    m.lc.server_lost_state(now);
                }
            }
            return;
        }
        match bytes.first() {
            Some(&pcp::VERSION) => match pcp::Response::decode(bytes) {
                Ok(r) if r.opcode == pcp::Opcode::Announce => {
                    for m in maps.iter_mut() {
                        m.lc.observe_epoch(now, r.epoch);
                    }
                }
                Ok(_) => {}
                Err(_) => stats::bump(&self.counters.bad_replies),
            },
            Some(&natpmp::VERSION) if matches!(wire, Wire::NatPmp { .. }) => {
                self.on_reply(wire, maps, bytes, now);
            }
            _ => stats::bump(&self.counters.bad_replies),
        }
    }

    /// Counts what a reply did to one mapping.
    fn count(&self, was: State, is: State) {
        let c = &self.counters;
        match (was, is) {
            (State::Requesting, State::Mapped(_)) => {
                stats::bump(&c.granted);
                let ms = self.started.elapsed().as_millis() as u64;
                self.update(|s| {
                    s.mapped_after_ms.get_or_insert(ms);
                });
            }
            (State::Renewing { .. }, State::Mapped(_)) => stats::bump(&c.renewals),
            (State::Deleting, State::Done) => stats::bump(&c.deleted),
            _ => {}
        }
    }

    /// Publishes the mappings' state in the status.
    fn show(&self, wire: &Wire, maps: &[Mapping]) {
        let mut lc_stats = reach_proto::nat::portmap::lifecycle::Stats::default();
        for m in maps {
            let s = m.lc.stats();
            lc_stats.renewals += s.renewals;
            lc_stats.renewal_failures += s.renewal_failures;
            lc_stats.remaps += s.remaps;
            lc_stats.revocations += s.revocations;
            lc_stats.request_failures += s.request_failures;
        }
        let c = &self.counters;
        c.renewal_failures
            .store(lc_stats.renewal_failures, Ordering::Relaxed);
        c.remaps.store(lc_stats.remaps, Ordering::Relaxed);
        c.revocations.store(lc_stats.revocations, Ordering::Relaxed);
        c.request_failures
            .store(lc_stats.request_failures, Ordering::Relaxed);
        let lease_of = |p: Protocol| {
            maps.iter()
                .find(|m| m.protocol == p)
                .and_then(|m| match m.lc.state() {
                    State::Mapped(l) | State::Renewing { lease: l, .. } => Some(l),
                    _ => None,
                })
        };
        let udp = maps.iter().find(|m| m.protocol == Protocol::Udp);
        let state = match udp.map(|m| (m.lc.state(), m.check, m.lc.published())) {
            None => PortMapState::Requesting,
            Some((State::Requesting, ..)) => PortMapState::Requesting,
            Some((State::Revoked, ..)) => PortMapState::Revoked,
            Some((State::Deleting | State::Done, ..)) => PortMapState::Stopped,
            Some((_, _, Some(_))) => PortMapState::Active,
            Some((_, Check::Failed, None)) => PortMapState::Unverified,
            Some((_, _, None)) => PortMapState::Verifying,
        };
        let protocol = wire.protocol();
        let udp_lease = lease_of(Protocol::Udp);
        let tcp_lease = lease_of(Protocol::Tcp);
        self.update(|s: &mut PortMapStatus| {
            s.state = state;
            s.protocol = Some(protocol);
            s.external = udp_lease.map(|l| l.external);
            s.tcp_external = tcp_lease.map(|l| l.external);
            s.lease_secs = udp_lease.map(|l| l.lifetime.as_secs() as u32);
            s.renewals = lc_stats.renewals;
            s.error = match state {
                PortMapState::Revoked => Some("portmap_refused".into()),
                PortMapState::Unverified => Some("portmap_unverified".into()),
                _ => None,
            };
        });
    }
}

/// The request bytes for what a lifecycle asks.
fn request(
    wire: &Wire,
    m: &Mapping,
    lifetime_secs: u32,
    suggested: Option<SocketAddr>,
) -> Option<Vec<u8>> {
    Some(match wire {
        Wire::Pcp { client, .. } => {
            let mut r =
                pcp::MapRequest::new(*client, m.nonce, m.protocol, m.internal_port, lifetime_secs);
            if let Some(s) = suggested {
                r.suggested_external_port = s.port();
                r.suggested_external_ip = s.ip();
            }
            pcp::Request::Map(r).encode()
        }
        Wire::NatPmp { .. } => {
            let r = if lifetime_secs == 0 {
                natpmp::MapRequest::delete(m.protocol, m.internal_port)
            } else {
                natpmp::MapRequest {
                    protocol: m.protocol,
                    internal_port: m.internal_port,
                    suggested_external_port: suggested.map_or(m.internal_port, |s| s.port()),
                    lifetime_secs,
                }
            };
            natpmp::Request::Map(r).encode()
        }
        // Not datagrams: see `PortMap::upnp_request`.
        Wire::Upnp { .. } => return None,
    })
}

/// A PCP message from the gateway: a MAP answer goes to the mapping it
/// names (by nonce, protocol and internal port, RFC 6887 §11.4); every
/// epoch is watched by every mapping (an ANNOUNCE after a restart carries a
/// small one).
fn on_pcp(maps: &mut [Mapping], r: &pcp::Response, now: Duration) {
    let answered = r.map.and_then(|mr| {
        maps.iter().position(|m| {
            mr.nonce == m.nonce && mr.protocol == m.protocol && mr.internal_port == m.internal_port
        })
    });
    for (i, m) in maps.iter_mut().enumerate() {
        if Some(i) != answered {
            m.lc.observe_epoch(now, r.epoch);
            continue;
        }
        match (r.result, r.map) {
            (pcp::ResultCode::Success, Some(mr)) => m.lc.granted(
                now,
                Grant {
                    external: mr.external,
                    lifetime_secs: r.lifetime_secs,
                    epoch: Some(r.epoch),
                },
            ),
            _ => m.lc.refused(now),
        }
    }
}

/// A NAT-PMP message from the gateway: a map answer goes to the mapping of
/// its protocol and internal port; an external-address message (an answer
/// or the announcement after a restart or an address change) updates the
/// address and every mapping watches its epoch; a new address re-maps.
fn on_natpmp(
    external_ip: &mut Ipv4Addr,
    maps: &mut [Mapping],
    r: &natpmp::Response,
    now: Duration,
) {
    match *r {
        natpmp::Response::ExternalAddress { epoch, external } => {
            let moved = external != *external_ip;
            *external_ip = external;
            for m in maps.iter_mut() {
                m.lc.observe_epoch(now, epoch);
                if moved {
                    m.lc.server_lost_state(now);
                }
            }
        }
        natpmp::Response::Map(mr) => {
            for m in maps.iter_mut() {
                if m.protocol == mr.protocol && m.internal_port == mr.internal_port {
                    m.lc.granted(
                        now,
                        Grant {
                            external: SocketAddr::new(IpAddr::V4(*external_ip), mr.external_port),
                            lifetime_secs: mr.lifetime_secs,
                            epoch: Some(mr.epoch),
                        },
                    );
                } else {
                    m.lc.observe_epoch(now, mr.epoch);
                }
            }
        }
        natpmp::Response::Failure { request, epoch, .. } => {
            for m in maps.iter_mut() {
                if request == natpmp::Opcode::Map(m.protocol) {
                    m.lc.refused(now);
                } else {
                    m.lc.observe_epoch(now, epoch);
                }
            }
        }
    }
}

/// Receives from `sock`, or never when there is none.
async fn recv_from_opt(sock: Option<&UdpSocket>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 4433;

    fn mapping(protocol: Protocol, nonce: u8, rule: EpochRule) -> Mapping {
        let mut lc = Lifecycle::new(Duration::ZERO, Duration::from_secs(3600), Some(rule));
        while lc.poll_action().is_some() {}
        Mapping {
            protocol,
            internal_port: PORT,
            lc,
            nonce: [nonce; 12],
            check: Check::None,
            external_port: None,
        }
    }

    fn pcp_map_answer(nonce: u8, protocol: Protocol, epoch: u32) -> pcp::Response {
        pcp::Response {
            opcode: pcp::Opcode::Map,
            result: pcp::ResultCode::Success,
            lifetime_secs: 3600,
            epoch,
            map: Some(pcp::MapResponse {
                nonce: [nonce; 12],
                protocol,
                internal_port: PORT,
                external: "198.51.100.9:4433".parse().unwrap(),
            }),
        }
    }

    #[test]
    fn a_pcp_answer_grants_only_the_mapping_its_nonce_names() {
        let mut maps = [
            mapping(Protocol::Udp, 1, EpochRule::Pcp),
            mapping(Protocol::Tcp, 2, EpochRule::Pcp),
        ];
        let t = Duration::from_millis(5);
        // A forged or stale answer (unknown nonce) grants nothing.
        on_pcp(&mut maps, &pcp_map_answer(9, Protocol::Udp, 10), t);
        assert!(maps.iter().all(|m| m.lc.state() == State::Requesting));
        // The right nonce but the other protocol: not this mapping's.
        on_pcp(&mut maps, &pcp_map_answer(1, Protocol::Tcp, 10), t);
        assert!(maps.iter().all(|m| m.lc.state() == State::Requesting));
        on_pcp(&mut maps, &pcp_map_answer(1, Protocol::Udp, 10), t);
        assert!(matches!(maps[0].lc.state(), State::Mapped(_)));
        assert_eq!(maps[1].lc.state(), State::Requesting);
    }

    #[test]
    fn an_announce_with_an_epoch_gone_back_remaps_at_once() {
        let mut maps = [mapping(Protocol::Udp, 1, EpochRule::Pcp)];
        on_pcp(
            &mut maps,
            &pcp_map_answer(1, Protocol::Udp, 100),
            Duration::ZERO,
        );
        while maps[0].lc.poll_action().is_some() {}
        let announce = pcp::Response {
            opcode: pcp::Opcode::Announce,
            result: pcp::ResultCode::Success,
            lifetime_secs: 0,
            epoch: 0,
            map: None,
        };
        on_pcp(&mut maps, &announce, Duration::from_secs(10));
        assert!(matches!(maps[0].lc.state(), State::Renewing { .. }));
        assert!(matches!(
            maps[0].lc.poll_action(),
            Some(Action::SendRequest { .. })
        ));
        assert_eq!(maps[0].lc.stats().remaps, 1);
    }

    #[test]
    fn natpmp_grants_use_the_external_address_and_a_new_one_remaps() {
        let mut ip = Ipv4Addr::new(198, 51, 100, 9);
        let mut maps = [mapping(Protocol::Udp, 0, EpochRule::NatPmp)];
        let answer = natpmp::Response::Map(natpmp::MapResponse {
            protocol: Protocol::Udp,
            epoch: 50,
            internal_port: PORT,
            external_port: 5000,
            lifetime_secs: 3600,
        });
        on_natpmp(&mut ip, &mut maps, &answer, Duration::ZERO);
        let State::Mapped(lease) = maps[0].lc.state() else {
            panic!("not mapped: {:?}", maps[0].lc.state());
        };
        assert_eq!(lease.external, "198.51.100.9:5000".parse().unwrap());
        while maps[0].lc.poll_action().is_some() {}
        // The router's address changed: the mapping is asked for again.
        let moved = natpmp::Response::ExternalAddress {
            epoch: 55,
            external: Ipv4Addr::new(198, 51, 100, 77),
        };
        on_natpmp(&mut ip, &mut maps, &moved, Duration::from_secs(5));
        assert_eq!(ip, Ipv4Addr::new(198, 51, 100, 77));
        assert!(matches!(maps[0].lc.state(), State::Renewing { .. }));
    }

    #[test]
    fn a_refusal_for_one_protocol_leaves_the_other_alone() {
        let mut ip = Ipv4Addr::new(198, 51, 100, 9);
        let mut maps = [
            mapping(Protocol::Udp, 0, EpochRule::NatPmp),
            mapping(Protocol::Tcp, 0, EpochRule::NatPmp),
        ];
        let refused = natpmp::Response::Failure {
            request: natpmp::Opcode::Map(Protocol::Tcp),
            result: natpmp::ResultCode::NotAuthorized,
            epoch: 3,
        };
        on_natpmp(&mut ip, &mut maps, &refused, Duration::ZERO);
        assert_eq!(maps[0].lc.state(), State::Requesting);
        assert_eq!(maps[1].lc.state(), State::Revoked);
    }
}
