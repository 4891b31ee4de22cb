//! `reach demo` as root: the whole story in a small NAT lab. Three public
//! nodes (bootstrap, relays), and one node each behind an eim-apdf NAT, an
//! endpoint-dependent (edm) NAT, a network that blocks UDP, and a router
//! that maps ports (pcp, real miniupnpd). Every node is default-configured;
//! each step dials by public key alone and delivers a message:
//!
//! 1. eim-apdf → pcp: direct at once (the pcp node's router maps its port,
//!    verified from outside, so it holds no relay);
//! 2. eim-apdf → edm: through the edm node's relay first, then punched to
//!    direct (the birthday technique), the message crossing the direct path;
//! 3. udp-blocked → eim-apdf: over a TCP link through the relay (no UDP gets
//!    out, so it stays relayed by design).

use std::time::{Duration, Instant};

use reach::{Node, Reachability};
use serde::Serialize;

use crate::nat::{NatKind, Site};
use crate::netns::LabError;
use crate::pairs::{deliver_once, lab_with_infrastructure, node_in, settle};

/// How long a step's dial and delivery may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a relayed connection's punch may take to make it direct (three
/// attempts of at most five seconds, a second apart, plus margin).
pub const PUNCH_WAIT: Duration = Duration::from_secs(25);

/// How one site's node settled.
#[derive(Debug, Clone, Serialize)]
pub struct StoryNode {
    pub kind: NatKind,
    pub reachability: Reachability,
    /// The relay it holds, if it needs one.
    pub relay: Option<reach::PeerId>,
    /// Its port mapping's state (`active` behind the pcp router).
    pub port_mapping: reach::PortMapState,
}

/// One step of the story.
#[derive(Debug, Clone, Serialize)]
pub struct StoryStep {
    pub from: NatKind,
    pub to: NatKind,
    /// How the first connection went: `direct` or `relayed`.
    pub first_path: String,
    /// Milliseconds from the dial by key to the connection.
    pub connect_ms: u64,
    /// The message arrived.
    pub delivered: bool,
    /// The connection ended direct (a punch made it so, or it was direct).
    pub ended_direct: bool,
    /// Milliseconds from the relayed connection to the direct one.
    pub time_to_direct_ms: Option<u64>,
    pub error: Option<String>,
}

/// The whole story.
#[derive(Debug, Clone, Serialize)]
pub struct StoryReport {
    pub nodes: Vec<StoryNode>,
    pub steps: Vec<StoryStep>,
    /// Every step delivered its message and went as the story says.
    pub as_told: bool,
    pub wall_ms: u64,
}

/// Builds the lab and runs the steps; `progress` hears each line as it
/// happens.
pub async fn run(progress: &dyn Fn(&str)) -> Result<StoryReport, LabError> {
    let started = Instant::now();
    progress("building the lab: an internet, three public nodes, four sites");
    let (mut lab, mut net, infra) = lab_with_infrastructure().await?;
    let seed = Some(infra[0].local_addr());
    let kinds = [
        NatKind::EimApdf,
        NatKind::Edm,
        NatKind::UdpBlocked,
        NatKind::Pcp,
    ];
    // Kept to the end: a site's miniupnpd stops when the site is dropped.
    let mut sites: Vec<Site> = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let site = Site::build(&mut lab, &mut net, *kind, i as u8 + 1, 0)?;
        let gateway = site.miniupnpd.as_ref().map(|m| m.lan_ip());
        nodes.push(node_in(&lab, &site.node_ns, site.node_ip, seed, gateway).await?);
        sites.push(site);
    }
    progress("nodes joining the DHT, checking reachability, mapping ports, acquiring relays");
    for n in infra.iter().chain(&nodes) {
        settle(n).await;
    }
    let settled: Vec<StoryNode> = kinds
        .iter()
        .zip(&nodes)
        .map(|(kind, n)| {
            let st = n.relay_status();
            StoryNode {
                kind: *kind,
                reachability: st.reachability,
                relay: st.held_relay,
                port_mapping: n.port_mapping().state,
            }
        })
        .collect();
    for s in &settled {
        progress(&format!(
            "  {:<11} {}{}",
            s.kind.name(),
            match s.reachability {
                Reachability::Public(a) => format!("public at {a}"),
                Reachability::Private => "private".to_string(),
                Reachability::Unknown => "unknown".to_string(),
            },
            match (s.relay, s.port_mapping) {
                (Some(r), _) => format!(", holding relay {}", short(&r)),
                (None, reach::PortMapState::Active) => ", port mapped by its router".to_string(),
                _ => String::new(),
            }
        ));
    }
    let [apdf, edm, blocked, pcp] = [&nodes[0], &nodes[1], &nodes[2], &nodes[3]];
    let mut steps = Vec::new();

    progress("1. eim-apdf dials the pcp node by key");
    steps.push(step(apdf, pcp, (NatKind::EimApdf, NatKind::Pcp), "1", false).await);

    progress("2. a fresh node behind the eim-apdf NAT dials the edm node by key");
    let site = &sites[0];
    let fresh = match dht_client_in(&lab, &site.node_ns, site.node_ip, infra[0].local_addr()).await
    {
        Ok(n) => Some(n),
        Err(e) => {
            steps.push(failed((NatKind::EimApdf, NatKind::Edm), e));
            None
        }
    };
    if let Some(fresh) = fresh {
        steps.push(step(&fresh, edm, (NatKind::EimApdf, NatKind::Edm), "2", true).await);
        fresh.shutdown().await;
    }

    progress("3. the udp-blocked node dials the eim-apdf node by key");
    steps.push(
        step(
            blocked,
            apdf,
            (NatKind::UdpBlocked, NatKind::EimApdf),
            "3",
            false,
        )
        .await,
    );

    for s in &steps {
        progress(&format!(
            "  {} -> {}: {} in {} ms, {}{}{}",
            s.from.name(),
            s.to.name(),
            s.first_path,
            s.connect_ms,
            if s.delivered {
                "delivered"
            } else {
                "NOT delivered"
            },
            match (s.first_path.as_str(), s.ended_direct, s.time_to_direct_ms) {
                ("relayed", true, Some(t)) => format!(", punched to direct {t} ms later"),
                ("relayed", false, _) => ", stayed relayed".to_string(),
                _ => String::new(),
            },
            s.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ));
    }
    let as_told = steps.len() == 3
        && steps.iter().all(|s| s.delivered && s.error.is_none())
        && steps[0].first_path == "direct"
        && steps[1].first_path == "relayed"
        && steps[1].ended_direct
        && steps[2].first_path == "relayed";
    for n in infra.iter().chain(&nodes) {
        n.shutdown().await;
    }
    drop(sites);
    Ok(StoryReport {
        nodes: settled,
        steps,
        as_told,
        wall_ms: started.elapsed().as_millis() as u64,
    })
}

/// A fresh node in namespace `ns` that joins the DHT as a client through
/// `seed` (so it can dial by key, and no node's routing table learns it).
async fn dht_client_in(
    lab: &crate::netns::Lab,
    ns: &str,
    ip: std::net::IpAddr,
    seed: std::net::SocketAddr,
) -> Result<Node, String> {
    let sock = lab
        .udp_socket(ns, std::net::SocketAddr::new(ip, 0))
        .map_err(|e| e.to_string())?;
    let node = Node::builder()
        .socket(sock)
        .udp_binder(lab.udp_binder(ns))
        .port_mapping(reach::PortMapping::disabled())
        .dht_mode(reach::DhtMode::Client)
        .relay_service(reach::RelayMode::Off)
        .acquire_relay(reach::RelayMode::Off)
        .bootstrap([seed])
        .spawn()
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(STEP_TIMEOUT, node.joined())
        .await
        .map_err(|_| format!("the fresh node did not join within {STEP_TIMEOUT:?}"))?;
    Ok(node)
}

fn short(p: &reach::PeerId) -> String {
    p.to_string().chars().take(8).collect()
}

fn failed(kinds: (NatKind, NatKind), e: String) -> StoryStep {
    StoryStep {
        from: kinds.0,
        to: kinds.1,
        first_path: "none".into(),
        connect_ms: 0,
        delivered: false,
        ended_direct: false,
        time_to_direct_ms: None,
        error: Some(e),
    }
}

/// `a` dials `b` by key and sends; with `punch`, waits for the relayed
/// connection to turn direct and sends again over it.
async fn step(a: &Node, b: &Node, kinds: (NatKind, NatKind), tag: &str, punch: bool) -> StoryStep {
    // Dial afresh: close what DHT traffic opened between them.
    a.disconnect(b.peer_id());
    b.disconnect(a.peer_id());
    let t = Instant::now();
    let connected = tokio::time::timeout(STEP_TIMEOUT, a.connect(b.peer_id(), [])).await;
    let connect_ms = t.elapsed().as_millis() as u64;
    match connected {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return failed(kinds, e.to_string()),
        Err(_) => return failed(kinds, format!("no connection within {STEP_TIMEOUT:?}")),
    }
    let relayed = a
        .connected_peers()
        .iter()
        .any(|p| p.peer == b.peer_id() && p.relay.is_some());
    let delivered = tokio::time::timeout(
        STEP_TIMEOUT,
        deliver_once(a, b, &format!("story step {tag}")),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let mut s = StoryStep {
        from: kinds.0,
        to: kinds.1,
        first_path: if relayed { "relayed" } else { "direct" }.into(),
        connect_ms,
        delivered,
        ended_direct: !relayed,
        time_to_direct_ms: None,
        error: None,
    };
    if punch && relayed {
        let t = Instant::now();
        if a.wait_direct(b.peer_id(), PUNCH_WAIT).await {
            s.time_to_direct_ms = Some(t.elapsed().as_millis() as u64);
            s.ended_direct = tokio::time::timeout(
                STEP_TIMEOUT,
                deliver_once(a, b, &format!("story step {tag}, direct")),
            )
            .await
            .is_ok_and(|r| r.is_ok());
        }
    }
    s
}

/// Whether this machine can build the lab (root and the lab's tools,
/// miniupnpd among them), and if not, why.
pub fn available() -> Result<(), String> {
    crate::netns::check_prerequisites().map_err(|e| e.to_string())?;
    crate::miniupnpd::check_miniupnpd().map_err(|e| e.to_string())
}
