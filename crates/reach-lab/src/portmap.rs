//! `reach lab portmap`: a reach node behind a router running real
//! miniupnpd, for each port-mapping protocol (PCP, NAT-PMP, UPnP-IGD):
//! how fast it maps its port, whether a stranger on the internet then
//! reaches it directly by PeerId, whether it renews, how fast it re-maps
//! after the router restarts (its table lost) and after the router's table
//! is flushed under a running miniupnpd, and whether a clean shutdown
//! leaves no mapping behind. What the router holds is read from
//! miniupnpd's own nftables chains, never from the node.
//!
//! Each kind gets a lab of its own (an internet, a bootstrap node, one
//! site), so one router's state never leaks into another's figures.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use reach::{Event, Node, PortMapProtocol, Reachability};
use reach_proto::nat::portmap::Protocol;
use serde::Serialize;

use crate::miniupnpd::MiniUpnpd;
use crate::nat::{Internet, NatKind, PORTMAP_KINDS, Site};
use crate::netns::{Lab, LabError};

/// Target: PCP and NAT-PMP mapped within this from the node's start (a
/// router on the LAN answers in milliseconds).
pub const MAPPED_TARGET_MS: u64 = 300;
/// Target for UPnP-IGD, which needs an SSDP search, a description fetch
/// and SOAP calls over TCP.
pub const UPNP_MAPPED_TARGET_MS: u64 = 1500;
/// Target: mapped again within this after the router restarted.
pub const RESTART_REMAP_TARGET_MS: u64 = 5000;
/// Target: mapped again within this after the router's table was flushed
/// (nobody tells the node; it finds out by asking again).
pub const FLUSH_REMAP_TARGET_MS: u64 = 60_000;
/// Lease the node asks for by default in the lab: short, so renewals are
/// seen within seconds (the default in production is an hour).
pub const DEFAULT_LEASE_SECS: u64 = 6;
/// How long one step (mapped, verified, renewed, reachable, re-mapped
/// after a restart) may take before it counts as failed.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the re-map after a flush may take before it counts as failed
/// (the target plus margin).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(90);
/// How often the router's chains and the node's status are read while
/// waiting (they announce nothing the lab could wait on).
const POLL: Duration = Duration::from_millis(10);

/// Options of a run.
#[derive(Debug, Clone)]
pub struct PortmapOptions {
    pub kinds: Vec<NatKind>,
    /// Lease the node asks for.
    pub lease: Duration,
}

impl Default for PortmapOptions {
    fn default() -> Self {
        PortmapOptions {
            kinds: PORTMAP_KINDS.to_vec(),
            lease: Duration::from_secs(DEFAULT_LEASE_SECS),
        }
    }
}

/// One kind's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PortmapResult {
    pub kind: NatKind,
    /// The protocol the node found the router speaking.
    pub protocol: Option<PortMapProtocol>,
    /// Milliseconds from the node's start to the router granting the
    /// mapping (the node's own measure).
    pub mapped_ms: Option<u64>,
    /// The router's chain forwards the node's UDP port to the node.
    pub router_forwards: bool,
    /// The node verified the mapping from outside (a helper's unsolicited
    /// probe came through it) and published it.
    pub verified: bool,
    /// The node's endpoint record, as the DHT serves it, carries the mapped
    /// address as a direct one.
    pub in_record_as_direct: bool,
    /// A stranger on the internet dialed the node by PeerId alone and got a
    /// direct connection (no relay) that carried a message; the node holds
    /// no relay.
    pub reachable_from_outside: bool,
    /// The node renewed the mapping (lease `lease_secs`).
    pub renewed: bool,
    /// Milliseconds from the router's restart (mappings lost, epoch back
    /// to 0) until its chain forwards the node's port again.
    pub remap_after_restart_ms: Option<u64>,
    /// Milliseconds from the flush of the router's chains (miniupnpd keeps
    /// running) until its chain forwards the node's port again.
    pub remap_after_flush_ms: Option<u64>,
    /// Mappings in the router's chains after the node's clean shutdown.
    pub left_after_shutdown: Option<usize>,
    /// The first thing that went wrong.
    pub error: Option<String>,
    /// Every target above met.
    pub targets_met: bool,
}

impl PortmapResult {
    fn new(kind: NatKind) -> Self {
        PortmapResult {
            kind,
            protocol: None,
            mapped_ms: None,
            router_forwards: false,
            verified: false,
            in_record_as_direct: false,
            reachable_from_outside: false,
            renewed: false,
            remap_after_restart_ms: None,
            remap_after_flush_ms: None,
            left_after_shutdown: None,
            error: None,
            targets_met: false,
        }
    }

    fn meets_targets(&self) -> bool {
        let mapped_target = if self.kind == NatKind::Upnp {
            UPNP_MAPPED_TARGET_MS
        } else {
            MAPPED_TARGET_MS
        };
        self.error.is_none()
            && self.mapped_ms.is_some_and(|ms| ms <= mapped_target)
            && self.router_forwards
            && self.verified
            && self.in_record_as_direct
            && self.reachable_from_outside
            && self.renewed
            && self
                .remap_after_restart_ms
                .is_some_and(|ms| ms <= RESTART_REMAP_TARGET_MS)
            && self
                .remap_after_flush_ms
                .is_some_and(|ms| ms <= FLUSH_REMAP_TARGET_MS)
            && self.left_after_shutdown == Some(0)
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct PortmapReport {
    pub results: Vec<PortmapResult>,
    /// Per kind, a router that lies about its external address: the lie
    /// must be caught by the node's outside check.
    pub lying_routers: Vec<LyingRouter>,
    /// The first error of a lying-router run, if one failed to run.
    pub lying_error: Option<String>,
    /// A node behind the lab's IPv6 firewall opens a PCP pinhole (when
    /// `pcp` is among the kinds).
    pub ipv6: Option<Ipv6Pinhole>,
    /// Why the IPv6 check failed to run, if it did.
    pub ipv6_error: Option<String>,
    pub lease_secs: u64,
    pub all_met: bool,
    pub wall_ms: u64,
}

/// Runs every kind in `opts`, one lab each.
pub async fn run(opts: &PortmapOptions) -> Result<PortmapReport, LabError> {
    crate::netns::check_prerequisites()?;
    crate::miniupnpd::check_miniupnpd()?;
    let started = Instant::now();
    let mut results = Vec::new();
    for kind in &opts.kinds {
        if kind.portmap_protocol().is_none() {
            return Err(LabError::Other(format!(
                "{} is not a port-mapping kind (upnp, natpmp, pcp)",
                kind.name()
            )));
        }
        let mut r = PortmapResult::new(*kind);
        if let Err(e) = measure(*kind, opts.lease, &mut r).await {
            r.error = Some(e);
        }
        r.targets_met = r.meets_targets();
        results.push(r);
    }
    let mut lying_routers = Vec::new();
    let mut lying_error = None;
    for kind in &opts.kinds {
        match lying_router(*kind).await {
            Ok(l) => lying_routers.push(l),
            Err(e) => {
                lying_error.get_or_insert(format!("{}: {e}", kind.name()));
            }
        }
    }
    let (mut ipv6, mut ipv6_error) = (None, None);
    if opts.kinds.contains(&NatKind::Pcp) {
        match ipv6_pinhole().await {
            Ok(p) => ipv6 = Some(p),
            Err(e) => ipv6_error = Some(e),
        }
    }
    Ok(PortmapReport {
        all_met: results.iter().all(|r| r.targets_met)
            && lying_error.is_none()
            && lying_routers.iter().all(LyingRouter::caught)
            && ipv6_error.is_none()
            && ipv6.as_ref().is_none_or(Ipv6Pinhole::ok),
        ipv6,
        ipv6_error,
        results,
        lying_routers,
        lying_error,
        lease_secs: opts.lease.as_secs(),
        wall_ms: started.elapsed().as_millis() as u64,
    })
}

/// A node in namespace `ns` at `ip`, with TCP links and punching inside
/// the namespace too; `port_mapping` as given.
async fn node_in(
    lab: &Lab,
    ns: &str,
    ip: IpAddr,
    seed: Option<SocketAddr>,
    port_mapping: reach::PortMapping,
) -> Result<Node, String> {
    let e = |e: LabError| e.to_string();
    let sock = lab.udp_socket(ns, SocketAddr::new(ip, 0)).map_err(e)?;
    let bound = sock.local_addr().map_err(|e| e.to_string())?;
    let alt = lab.udp_socket(ns, SocketAddr::new(ip, 0)).map_err(e)?;
    let mut b = Node::builder()
        .socket(sock)
        .alt_socket(alt)
        .tcp_listener(lab.tcp_listener(ns, bound).map_err(e)?)
        .tcp_connector(lab.tcp_connector(ns))
        .udp_binder(lab.udp_binder(ns))
        .port_mapping(port_mapping);
    if let Some(s) = seed {
        b = b.bootstrap([s]);
    }
    b.spawn().await.map_err(|e| e.to_string())
}

/// Polls `f` every [`POLL`] until it gives `Some`, for at most `limit`.
async fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`poll`], for a check that awaits (a DHT lookup).
async fn poll_async<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(v)) = tokio::time::timeout_at(deadline.into(), f()).await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL * 10).await;
    }
}

/// Whether the router's chains forward UDP `port` to `node_ip`.
fn forwards(daemon: &MiniUpnpd, lab: &Lab, node_ip: IpAddr, port: u16) -> bool {
    daemon.mappings(lab).is_ok_and(|maps| {
        maps.iter()
            .any(|m| m.protocol == Protocol::Udp && m.internal == SocketAddr::new(node_ip, port))
    })
}

/// The bootstrap node's address on the lab's internet.
fn public(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, host))
}

/// A lab of its own for one port-mapping router: the internet, a
/// bootstrap node on it (203.0.113.10, no port mapping), and one site of
/// `kind` whose router runs miniupnpd. Fields drop in order: the site's
/// miniupnpd stops before the lab's namespaces go.
struct Bench {
    site: Site,
    seed: Node,
    net: Internet,
    lab: Lab,
}

async fn bench(kind: NatKind) -> Result<Bench, String> {
    let e = |e: LabError| e.to_string();
    let mut lab = Lab::new().map_err(e)?;
    let mut net = Internet::build(&mut lab).map_err(e)?;
    let seed = node_in(
        &lab,
        &net.public,
        public(10),
        None,
        reach::PortMapping::disabled(),
    )
    .await?;
    let site = Site::build(&mut lab, &mut net, kind, 1, 0).map_err(e)?;
    if site.miniupnpd.is_none() {
        return Err(format!("a {} site has no miniupnpd", kind.name()));
    }
    Ok(Bench {
        site,
        seed,
        net,
        lab,
    })
}

/// Measures one kind into `r`; an `Err` says which step failed.
async fn measure(kind: NatKind, lease: Duration, r: &mut PortmapResult) -> Result<(), String> {
    let e = |e: LabError| e.to_string();
    // Bound lab first, so it drops last (after the site's miniupnpd).
    let Bench {
        lab,
        net,
        seed,
        mut site,
    } = bench(kind).await?;
    net.add_public_ip(&lab, 11).map_err(e)?;
    let gateway = site
        .miniupnpd
        .as_ref()
        .map(|d| d.lan_ip())
        .ok_or("the site has no miniupnpd")?;
    let node = node_in(
        &lab,
        &site.node_ns,
        site.node_ip,
        Some(seed.local_addr()),
        reach::PortMapping {
            enabled: true,
            gateway: Some(gateway),
            lifetime: lease,
        },
    )
    .await?;
    let port = node.local_addr().port();

    // Mapped, and the router's own chain forwards the port.
    let status = poll(STEP_TIMEOUT, || {
        let s = node.port_mapping();
        s.mapped_after_ms.is_some().then_some(s)
    })
    .await
    .ok_or_else(|| {
        format!(
            "not mapped within {STEP_TIMEOUT:?}: {:?}",
            node.port_mapping()
        )
    })?;
    r.protocol = status.protocol;
    r.mapped_ms = status.mapped_after_ms;
    let daemon = site.miniupnpd.as_mut().ok_or("the site has no miniupnpd")?;
    r.router_forwards = poll(STEP_TIMEOUT, || {
        forwards(daemon, &lab, site.node_ip, port).then_some(())
    })
    .await
    .is_some();

    // Verified from outside and published.
    let published = poll(STEP_TIMEOUT, || node.port_mapping().published)
        .await
        .ok_or_else(|| format!("not verified: {:?}", node.port_mapping()))?;
    r.verified = true;

    // A stranger reaches it directly by PeerId; it holds no relay.
    let stranger = node_in(
        &lab,
        &net.public,
        public(11),
        Some(seed.local_addr()),
        reach::PortMapping::disabled(),
    )
    .await?;
    stranger.joined().await;
    r.in_record_as_direct = poll_async(STEP_TIMEOUT, || async {
        let record = stranger.lookup(node.peer_id()).await.ok()?;
        record
            .iter()
            .any(|a| a.addr == published && a.kind == reach::AddrKind::Direct)
            .then_some(())
    })
    .await
    .is_some();
    let relay_free = poll(STEP_TIMEOUT, || {
        let st = node.relay_status();
        (st.reachability == Reachability::Public(published) && st.held_relay.is_none())
            .then_some(())
    })
    .await
    .is_some();
    let reached = tokio::time::timeout(STEP_TIMEOUT, async {
        stranger.connect(node.peer_id(), []).await.ok()?;
        let direct = stranger
            .connected_peers()
            .iter()
            .any(|p| p.peer == node.peer_id() && p.relay.is_none() && p.addr == published);
        stranger
            .send(node.peer_id(), b"through the mapping".to_vec())
            .await
            .ok()?;
        loop {
            match node.next_event().await? {
                Event::Message { from, data }
                    if from == stranger.peer_id() && data.as_ref() == b"through the mapping" =>
                {
                    return Some(direct);
                }
                _ => continue,
            }
        }
    })
    .await
    .ok()
    .flatten();
    r.reachable_from_outside = relay_free && reached == Some(true);
    stranger.shutdown().await;

    // Renewed.
    r.renewed = poll(lease * 3 + STEP_TIMEOUT, || {
        (node.port_mapping().renewals >= 1).then_some(())
    })
    .await
    .is_some();

    // The router restarts: its mappings are gone and its epoch is back at 0.
    daemon.restart(&lab).map_err(e)?;
    let t = Instant::now();
    r.remap_after_restart_ms = poll(STEP_TIMEOUT, || {
        forwards(daemon, &lab, site.node_ip, port).then(|| t.elapsed().as_millis() as u64)
    })
    .await;

    // The router's table is flushed under a running miniupnpd.
    daemon.flush(&lab).map_err(e)?;
    let t = Instant::now();
    r.remap_after_flush_ms = poll(FLUSH_TIMEOUT, || {
        forwards(daemon, &lab, site.node_ip, port).then(|| t.elapsed().as_millis() as u64)
    })
    .await;

    // A clean shutdown deletes every mapping.
    node.shutdown().await;
    r.left_after_shutdown = Some(daemon.mappings(&lab).map_err(e)?.len());
    seed.shutdown().await;
    Ok(())
}

/// The address the lab's lying router claims as its external one: inside
/// the lab's port-mapping WAN range, but no router has it.
pub const LIED_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(11, 250, 0, 250);

/// What a node did behind a router that lies about its external address.
#[derive(Debug, Clone, Serialize)]
pub struct LyingRouter {
    pub kind: NatKind,
    /// The external address the router granted (with the lie in it).
    pub claimed: Option<SocketAddr>,
    /// The node's port-mapping state once its outside check ended.
    pub state: Option<reach::PortMapState>,
    /// Outside checks that failed.
    pub verify_failures: u64,
    /// The node announced the claimed address as mapped (must not).
    pub announced: bool,
    /// The claimed address is in the node's endpoint record as the DHT
    /// serves it (must not be).
    pub in_record: bool,
}

impl LyingRouter {
    /// The lie was caught: granted, checked, failed, never published.
    pub fn caught(&self) -> bool {
        self.claimed
            .is_some_and(|c| c.ip() == IpAddr::V4(LIED_EXTERNAL_IP))
            && self.state == Some(reach::PortMapState::Unverified)
            && self.verify_failures >= 1
            && !self.announced
            && !self.in_record
    }
}

/// A node behind a `kind` router whose miniupnpd reports
/// [`LIED_EXTERNAL_IP`] as its external address: the node's outside check
/// must catch the lie, and the address must never be published.
pub async fn lying_router(kind: NatKind) -> Result<LyingRouter, String> {
    let e = |e: LabError| e.to_string();
    // Bound lab first, so it drops last (after the site's miniupnpd).
    let Bench {
        lab,
        net: _net,
        seed,
        mut site,
    } = bench(kind).await?;
    let daemon = site.miniupnpd.as_mut().ok_or("the site has no miniupnpd")?;
    daemon.config.ext_ip = Some(LIED_EXTERNAL_IP);
    daemon.restart(&lab).map_err(e)?;
    let gateway = daemon.lan_ip();
    let node = node_in(
        &lab,
        &site.node_ns,
        site.node_ip,
        Some(seed.local_addr()),
        reach::PortMapping {
            gateway: Some(gateway),
            ..reach::PortMapping::default()
        },
    )
    .await?;
    let mut events = node.subscribe();
    let status = poll(STEP_TIMEOUT, || {
        let s = node.port_mapping();
        (s.state == reach::PortMapState::Unverified).then_some(s)
    })
    .await
    .ok_or_else(|| {
        format!(
            "no failed check within {STEP_TIMEOUT:?}: {:?}",
            node.port_mapping()
        )
    })?;
    node.joined().await;
    let mut announced = false;
    while let Some(Some(ev)) = futures::FutureExt::now_or_never(events.next()) {
        announced |= matches!(ev, reach::NodeEvent::PortMapped { .. });
    }
    let record = seed
        .lookup(node.peer_id())
        .await
        .map_err(|e| e.to_string())?;
    let in_record = record
        .iter()
        .any(|a| a.addr.ip() == IpAddr::V4(LIED_EXTERNAL_IP));
    let report = LyingRouter {
        kind,
        claimed: status.external,
        state: Some(node.port_mapping().state),
        verify_failures: node.stats().portmap.verify_failures,
        announced,
        in_record,
    };
    node.shutdown().await;
    seed.shutdown().await;
    Ok(report)
}

/// A node behind the lab's IPv6 firewall (a `pcp` router whose miniupnpd
/// also opens IPv6 pinholes), with an IPv6 socket and the router's LAN
/// IPv6 address as its gateway.
#[derive(Debug, Clone, Serialize)]
pub struct Ipv6Pinhole {
    /// Milliseconds from the node's start to the pinhole being granted.
    pub mapped_ms: Option<u64>,
    /// The pinhole's address (the node's own IPv6 address and port).
    pub external: Option<SocketAddr>,
    /// A helper's unsolicited probe reached the node through the pinhole
    /// (the firewall drops unsolicited IPv6 otherwise) and the node
    /// published it.
    pub verified: bool,
    /// Pinholes left in the router's chains after a clean shutdown.
    pub left_after_shutdown: Option<usize>,
}

impl Ipv6Pinhole {
    /// The pinhole was opened, verified from outside, and deleted.
    pub fn ok(&self) -> bool {
        self.verified && self.left_after_shutdown == Some(0)
    }
}

/// Runs the IPv6 pinhole check (see [`Ipv6Pinhole`]).
pub async fn ipv6_pinhole() -> Result<Ipv6Pinhole, String> {
    let e = |e: LabError| e.to_string();
    let mut lab = Lab::new().map_err(e)?;
    let mut net = Internet::build(&mut lab).map_err(e)?;
    let mut site = Site::build(&mut lab, &mut net, NatKind::Pcp, 1, 0).map_err(e)?;
    let node6 = site.enable_ipv6(&lab, &mut net).map_err(e)?;
    let public6 = net.enable_ipv6(&lab).map_err(e)?;
    let daemon = site.miniupnpd.as_ref().ok_or("the site has no miniupnpd")?;
    let gateway = daemon
        .lan_ip6()
        .ok_or("miniupnpd does not listen on IPv6")?;
    let seed = node_in(
        &lab,
        &net.public,
        IpAddr::V6(public6),
        None,
        reach::PortMapping::disabled(),
    )
    .await?;
    let node = node_in(
        &lab,
        &site.node_ns,
        IpAddr::V6(node6),
        Some(seed.local_addr()),
        reach::PortMapping {
            gateway: Some(IpAddr::V6(gateway)),
            ..reach::PortMapping::default()
        },
    )
    .await?;
    let published = poll(STEP_TIMEOUT, || node.port_mapping().published).await;
    let status = node.port_mapping();
    let mut report = Ipv6Pinhole {
        mapped_ms: status.mapped_after_ms,
        external: status.external,
        verified: published.is_some_and(|p| p.ip() == IpAddr::V6(node6)),
        left_after_shutdown: None,
    };
    node.shutdown().await;
    report.left_after_shutdown = Some(daemon.mappings(&lab).map_err(e)?.len());
    seed.shutdown().await;
    Ok(report)
}
