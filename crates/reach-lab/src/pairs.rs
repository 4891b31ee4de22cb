//! `reach lab matrix`: can every pair of NAT kinds reach each other by
//! PeerId alone?
//!
//! One lab run: three public infrastructure nodes (bootstrap, and relays by
//! the default `auto` mode once they find themselves reachable); two sites
//! of every kind (one site with two hosts for `same-nat`), each with a
//! default-configured reach node that joins through the first public node,
//! checks its reachability and, behind a NAT, acquires a relay. Then, for
//! every unordered pair of kinds, side A connects to side B knowing only
//! B's PeerId, sends a message and B must receive it; the connection is
//! closed before the next run, so every run dials afresh.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use reach::{Event, Node, NodeEvent, PathKind, Reachability};
use serde::Serialize;

use crate::nat::{Internet, MATRIX_KINDS, NatKind, Site};
use crate::netns::{Lab, LabError};

/// Time a node has to join, check its reachability and settle (hold a relay
/// when it needs one).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Time one connect-and-deliver run may take before it counts as failed.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a relayed connection has to finish its punch attempts (three
/// attempts of at most five seconds, a second apart, plus margin).
pub const PUNCH_WAIT: Duration = Duration::from_secs(25);

/// Options of a matrix run.
#[derive(Debug, Clone)]
pub struct PairMatrixOptions {
    pub kinds: Vec<NatKind>,
    /// Connect-and-deliver runs per pair.
    pub runs: u32,
    /// One-way delay on every router's WAN side (needs `tc netem`).
    pub delay_ms: u32,
}

impl Default for PairMatrixOptions {
    fn default() -> Self {
        PairMatrixOptions {
            kinds: MATRIX_KINDS.to_vec(),
            runs: 1,
            delay_ms: 0,
        }
    }
}

/// The outcome of one pair.
#[derive(Debug, Clone, Serialize)]
pub struct PairResult {
    pub a: NatKind,
    pub b: NatKind,
    pub runs: u32,
    /// Runs where A connected to B by PeerId and B received A's message.
    pub connected: u32,
    /// Runs whose first connection was direct (no punch needed).
    pub direct: u32,
    /// Runs whose first connection was relayed.
    pub relayed: u32,
    /// Key-exchange groups of the connected runs' connections, by name
    /// (`X25519MLKEM768`: post-quantum hybrid, the default).
    pub kx_groups: BTreeMap<String, u32>,
    /// Punch phases that upgraded a relayed connection to a direct one (a
    /// message then crossed the direct path).
    pub upgraded: u32,
    pub failed: u32,
    pub connect_ms_p50: Option<f64>,
    /// Punch phases that ended on a direct path (punched, or B public), of
    /// all runs.
    pub direct_rate: f64,
    /// The punch technique of this pair (the coordinator's choice), or
    /// `direct_dial` when no run needed one.
    pub strategy: String,
    /// Punch phases per technique (`direct_dial`: B is public, no punch
    /// needed; `failed`: the phase itself failed).
    pub strategies: BTreeMap<String, u32>,
    /// Median time from punch request to the first packet from the peer's
    /// direct address, over the upgraded runs.
    pub time_to_direct_ms_p50: Option<f64>,
    /// The first failure's error, if any.
    pub error: Option<String>,
    /// The first failed punch's error, if any.
    pub punch_error: Option<String>,
}

/// How a site's node settled.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSettled {
    pub kind: NatKind,
    pub side: char,
    pub reachability: Reachability,
    pub relay: Option<reach::PeerId>,
    /// From the end of the lab build until settled (nodes settle
    /// concurrently; this is when this one was seen settled).
    pub settle_ms: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct PairMatrixReport {
    pub pairs: Vec<PairResult>,
    pub nodes: Vec<NodeSettled>,
    pub runs_per_pair: u32,
    pub delay_ms: u32,
    /// Every pair connected in every run.
    pub all_connected: bool,
    pub wall_ms: u64,
}

impl PairMatrixReport {
    /// The punch results as a Markdown grid of kinds (mirrored: each pair
    /// was measured once, with A = the kind that comes first): per cell the
    /// direct rate, the technique and the median time to direct in ms.
    pub fn punch_markdown(&self) -> String {
        let mut kinds: Vec<NatKind> = Vec::new();
        for p in &self.pairs {
            for k in [p.a, p.b] {
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        let short = |s: &str| {
            match s {
                "direct_dial" => "dial",
                "simultaneous_open" => "open",
                "lan_first" => "lan",
                "birthday" => "bday",
                "stay_relayed" => "relay",
                other => other,
            }
            .to_string()
        };
        let cell = |a: NatKind, b: NatKind| {
            let p = self
                .pairs
                .iter()
                .find(|p| (p.a, p.b) == (a, b) || (p.a, p.b) == (b, a))?;
            let time = p
                .time_to_direct_ms_p50
                .map_or_else(String::new, |t| format!(" {t:.0}"));
            Some(format!(
                "{:.0}% {}{time}",
                p.direct_rate * 100.0,
                short(&p.strategy)
            ))
        };
        let mut out = format!(
            "| A \\ B | {} |\n|---|{}\n",
            kinds
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(kinds.len())
        );
        for a in &kinds {
            let cells: Vec<String> = kinds
                .iter()
                .map(|b| cell(*a, *b).unwrap_or_else(|| "-".into()))
                .collect();
            out.push_str(&format!("| {} | {} |\n", a.name(), cells.join(" | ")));
        }
        out
    }
}

fn public(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, host))
}

pub(crate) async fn node_in(
    lab: &Lab,
    ns: &str,
    ip: IpAddr,
    seed: Option<SocketAddr>,
    gateway: Option<IpAddr>,
) -> Result<Node, LabError> {
    Ok(node_builder_in(lab, ns, ip, seed, gateway)?.spawn().await?)
}

/// The builder [`node_in`] spawns, for callers that configure more (a
/// keypair, relay modes, topic federation) before spawning.
pub(crate) fn node_builder_in(
    lab: &Lab,
    ns: &str,
    ip: IpAddr,
    seed: Option<SocketAddr>,
    gateway: Option<IpAddr>,
) -> Result<reach::NodeBuilder, LabError> {
    let sock = lab.udp_socket(ns, SocketAddr::new(ip, 0))?;
    let bound = sock.local_addr().map_err(LabError::Io)?;
    let alt = lab.udp_socket(ns, SocketAddr::new(ip, 0))?;
    // TCP links (for UDP-blocked peers) on the same port number, and
    // outgoing ones from inside the namespace too.
    let mut b = Node::builder()
        .socket(sock)
        .alt_socket(alt)
        .tcp_listener(lab.tcp_listener(ns, bound)?)
        .tcp_connector(lab.tcp_connector(ns))
        .udp_binder(lab.udp_binder(ns))
        // The node asks its router for a port mapping when the router runs
        // miniupnpd (the lab names it: in-process nodes cannot read their
        // namespace's routing table); elsewhere there is nobody to ask.
        .port_mapping(match gateway {
            Some(gw) => reach::PortMapping {
                gateway: Some(gw),
                ..reach::PortMapping::default()
            },
            None => reach::PortMapping::disabled(),
        });
    if let Some(s) = seed {
        b = b.bootstrap([s]);
    }
    Ok(b)
}

/// Waits until `node` has joined and decided about relays: public, or
/// holding a relay.
pub(crate) async fn settle(node: &Node) -> bool {
    let wait = async {
        node.joined().await;
        loop {
            let st = node.relay_status();
            match st.reachability {
                Reachability::Public(_) => return,
                Reachability::Private if st.held_relay.is_some() => return,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    tokio::time::timeout(SETTLE_TIMEOUT, wait).await.is_ok()
}

/// How a run's punch phase ended: technique, direct, time to direct,
/// punch error.
type PunchRun = (String, bool, Option<Duration>, Option<String>);

/// Waits for the punch A started towards `peer` after outcome `after` to
/// end; when it went direct, a message must cross the direct path.
async fn punch_result(
    a: &Node,
    b: &Node,
    after: Option<u64>,
    tag: u32,
) -> Result<PunchRun, String> {
    let peer = b.peer_id();
    let wait = async {
        loop {
            let found = a
                .punch_stats()
                .recent
                .into_iter()
                .find(|o| o.peer == peer && Some(o.seq) != after);
            if let Some(o) = found {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let o = tokio::time::timeout(PUNCH_WAIT, wait)
        .await
        .map_err(|_| format!("the punch did not end within {PUNCH_WAIT:?}"))?;
    if o.direct {
        let on_direct = a
            .connected_peers()
            .iter()
            .any(|p| p.peer == peer && p.relay.is_none());
        if !on_direct {
            return Err("the punch reported direct, but the connection is relayed".into());
        }
        deliver_once(a, b, &format!("matrix run {tag}, direct")).await?;
    }
    Ok((
        o.technique.to_string(),
        o.direct,
        o.time_to_direct_ms.map(Duration::from_millis),
        o.error,
    ))
}

/// A sends `payload` to B, and B receives it.
pub(crate) async fn deliver_once(a: &Node, b: &Node, payload: &str) -> Result<(), String> {
    a.send(b.peer_id(), payload.as_bytes().to_vec())
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match b.next_event().await {
            Some(Event::Message { from, data })
                if from == a.peer_id() && data == payload.as_bytes() =>
            {
                return Ok(());
            }
            Some(_) => continue,
            None => return Err("B shut down".to_string()),
        }
    }
}

/// The sequence number of `node`'s latest punch outcome with `peer`, so a
/// run can wait for the next one.
fn last_punch(node: &Node, peer: &reach::PeerId) -> Option<u64> {
    node.punch_stats()
        .recent
        .iter()
        .find(|o| o.peer == *peer)
        .map(|o| o.seq)
}

/// One run: A connects to B by id, sends, B receives; then both close. A
/// relayed connection's punch is let finish first, so that it cannot
/// overlap the punch phase that follows.
async fn one_run(a: &Node, b: &Node, tag: u32) -> Result<(Duration, bool, String), String> {
    let before = last_punch(a, &b.peer_id());
    // Dial afresh: close what DHT traffic may have opened between them
    // (a connection carrying a relay reservation stays: see `disconnect`).
    a.disconnect(b.peer_id());
    b.disconnect(a.peer_id());
    let started = Instant::now();
    let run = async {
        a.connect(b.peer_id(), [])
            .await
            .map_err(|e| e.to_string())?;
        let took = started.elapsed();
        let (relayed, group) = a
            .connected_peers()
            .into_iter()
            .find(|p| p.peer == b.peer_id())
            .map(|p| (p.relay.is_some(), p.kx_group.unwrap_or_default()))
            .ok_or("connected, but no connection listed")?;
        deliver_once(a, b, &format!("matrix run {tag}")).await?;
        Ok((took, relayed, group))
    };
    let res = tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err(format!("no delivery within {RUN_TIMEOUT:?}")));
    if matches!(res, Ok((_, true, _))) {
        // Its result is not this phase's measure (DHT traffic may have
        // opened the NATs already): only its end matters.
        let _ = punch_result(a, b, before, tag).await;
    }
    a.disconnect(b.peer_id());
    b.disconnect(a.peer_id());
    res
}

/// One side of the matrix: its settled node and where it lives.
struct Side {
    kind: NatKind,
    node: Node,
    ns: String,
    ip: IpAddr,
}

/// A fresh node at `side`'s place that is not in the DHT, so no DHT
/// traffic between it and its target can open their NATs before a punch
/// does: every punch starts from NATs with no state between the two. It
/// learns its mapping by probing two infrastructure nodes, as a DHT join
/// would.
pub(crate) async fn fresh_dialer(
    lab: &Lab,
    ns: &str,
    ip: IpAddr,
    infra: &[Node; 3],
) -> Result<Node, String> {
    let sock = lab
        .udp_socket(ns, SocketAddr::new(ip, 0))
        .map_err(|e| e.to_string())?;
    let node = Node::builder()
        .socket(sock)
        .udp_binder(lab.udp_binder(ns))
        .port_mapping(reach::PortMapping::disabled())
        .relay_service(reach::RelayMode::Off)
        .acquire_relay(reach::RelayMode::Off)
        .spawn()
        .await
        .map_err(|e| e.to_string())?;
    for n in &infra[1..] {
        node.observed_addr(n.local_addr())
            .await
            .map_err(|e| format!("probing {}: {e}", n.local_addr()))?;
    }
    Ok(node)
}

/// The punch phase of a run: a dialer at A's place reaches B through B's
/// relay (or directly, if B is public), a message crosses, and the punch
/// that follows must end with a message over the direct path, or say why
/// not. A UDP-blocked A dials from its settled node (a fresh one could not
/// reach the relay without first finding out that UDP is blocked).
async fn punch_run(
    lab: &Lab,
    a: &Side,
    b: &Side,
    infra: &[Node; 3],
    tag: u32,
) -> Result<PunchRun, String> {
    let target = &b.node;
    let fresh = a.kind != NatKind::UdpBlocked;
    let dialer = if fresh {
        fresh_dialer(lab, &a.ns, a.ip, infra).await?
    } else {
        a.node.disconnect(target.peer_id());
        a.node.clone()
    };
    let status = target.relay_status();
    let run = async {
        if let Reachability::Public(addr) = status.reachability {
            dialer
                .connect(target.peer_id(), [addr])
                .await
                .map_err(|e| e.to_string())?;
            deliver_once(&dialer, target, &format!("punch run {tag}")).await?;
            return Ok(("direct_dial".to_string(), true, None, None));
        }
        let (Some(relay), Some(relay_addr)) = (status.held_relay, status.held_relay_addr) else {
            return Err("B is neither public nor holding a relay".to_string());
        };
        let before = last_punch(&dialer, &target.peer_id());
        dialer
            .connect_via_relay(target.peer_id(), relay, relay_addr)
            .await
            .map_err(|e| e.to_string())?;
        deliver_once(&dialer, target, &format!("punch run {tag}, relayed")).await?;
        punch_result(&dialer, target, before, tag).await
    };
    let res = tokio::time::timeout(RUN_TIMEOUT + PUNCH_WAIT, run)
        .await
        .unwrap_or_else(|_| Err("the punch phase timed out".to_string()));
    if fresh {
        dialer.shutdown().await;
    } else {
        dialer.disconnect(target.peer_id());
    }
    res
}

/// The median, in milliseconds with microsecond resolution.
fn p50_ms(mut v: Vec<Duration>) -> Option<f64> {
    v.sort_unstable();
    let mid = v.get(v.len().saturating_sub(1) / 2)?;
    Some((mid.as_micros() as f64 / 1000.0 * 100.0).round() / 100.0)
}

/// A fresh lab with its internet and the three public infrastructure nodes
/// (.10, .11 and .12; the last two join through the first).
pub(crate) async fn lab_with_infrastructure() -> Result<(Lab, Internet, [Node; 3]), LabError> {
    let mut lab = Lab::new()?;
    let net = Internet::build(&mut lab)?;
    for host in [11, 12] {
        net.add_public_ip(&lab, host)?;
    }
    let a = node_in(&lab, &net.public, public(10), None, None).await?;
    let seed = Some(a.local_addr());
    let b = node_in(&lab, &net.public, public(11), seed, None).await?;
    let c = node_in(&lab, &net.public, public(12), seed, None).await?;
    Ok((lab, net, [a, b, c]))
}

/// Runs the matrix over `opts.kinds`.
pub async fn run(opts: &PairMatrixOptions) -> Result<PairMatrixReport, LabError> {
    let started = Instant::now();
    let (mut lab, mut net, infra) = lab_with_infrastructure().await?;
    let seed = infra[0].local_addr();

    // Two sides per kind: two sites, or one same-nat site's two hosts.
    let mut sides: BTreeMap<(usize, char), Side> = BTreeMap::new();
    // Kept until the end: a site's miniupnpd stops when the site is dropped.
    let mut sites: Vec<Site> = Vec::new();
    let mut site_no = 0u8;
    for (k, kind) in opts.kinds.iter().enumerate() {
        if *kind == NatKind::SameNat {
            site_no += 1;
            let site = Site::build(&mut lab, &mut net, *kind, site_no, opts.delay_ms)?;
            let (ns2, ip2) = site
                .peer
                .clone()
                .ok_or_else(|| LabError::Other("same-nat site without a second host".into()))?;
            sides.insert(
                (k, 'a'),
                Side {
                    kind: *kind,
                    node: node_in(&lab, &site.node_ns, site.node_ip, Some(seed), None).await?,
                    ns: site.node_ns.clone(),
                    ip: site.node_ip,
                },
            );
            sides.insert(
                (k, 'b'),
                Side {
                    kind: *kind,
                    node: node_in(&lab, &ns2, ip2, Some(seed), None).await?,
                    ns: ns2,
                    ip: ip2,
                },
            );
        } else {
            for side in ['a', 'b'] {
                site_no += 1;
                let site = Site::build(&mut lab, &mut net, *kind, site_no, opts.delay_ms)?;
                let gateway = site.miniupnpd.as_ref().map(|m| m.lan_ip());
                sides.insert(
                    (k, side),
                    Side {
                        kind: *kind,
                        node: node_in(&lab, &site.node_ns, site.node_ip, Some(seed), gateway)
                            .await?,
                        ns: site.node_ns.clone(),
                        ip: site.node_ip,
                    },
                );
                sites.push(site);
            }
        }
    }
    let settle_started = Instant::now();
    for n in &infra {
        settle(n).await;
    }
    let settled = futures::future::join_all(sides.iter().map(|((_, side), s)| async move {
        settle(&s.node).await;
        let st = s.node.relay_status();
        NodeSettled {
            kind: s.kind,
            side: *side,
            reachability: st.reachability,
            relay: st.held_relay,
            settle_ms: settle_started.elapsed().as_millis() as u64,
        }
    }))
    .await;

    let mut pairs = Vec::new();
    for i in 0..opts.kinds.len() {
        for j in i..opts.kinds.len() {
            let (sa, sb) = (&sides[&(i, 'a')], &sides[&(j, 'b')]);
            let (ka, a, kb, b) = (&sa.kind, &sa.node, &sb.kind, &sb.node);
            let mut times = Vec::new();
            let mut to_direct = Vec::new();
            let mut result = PairResult {
                a: *ka,
                b: *kb,
                runs: opts.runs,
                connected: 0,
                direct: 0,
                relayed: 0,
                kx_groups: BTreeMap::new(),
                upgraded: 0,
                failed: 0,
                connect_ms_p50: None,
                direct_rate: 0.0,
                strategy: String::new(),
                strategies: BTreeMap::new(),
                time_to_direct_ms_p50: None,
                error: None,
                punch_error: None,
            };
            let mut ended_direct = 0;
            for r in 0..opts.runs {
                match one_run(a, b, r).await {
                    Ok((took, relayed, group)) => {
                        result.connected += 1;
                        *result.kx_groups.entry(group).or_default() += 1;
                        times.push(took);
                        if relayed {
                            result.relayed += 1;
                        } else {
                            result.direct += 1;
                        }
                    }
                    Err(e) => {
                        result.failed += 1;
                        result.error.get_or_insert(e);
                    }
                }
                match punch_run(&lab, sa, sb, &infra, r).await {
                    Ok((technique, direct, time, error)) => {
                        if direct {
                            ended_direct += 1;
                            if technique != "direct_dial" {
                                result.upgraded += 1;
                            }
                        }
                        to_direct.extend(time);
                        if let Some(e) = error {
                            result.punch_error.get_or_insert(e);
                        }
                        *result.strategies.entry(technique).or_default() += 1;
                    }
                    Err(e) => {
                        *result.strategies.entry("failed".into()).or_default() += 1;
                        result.punch_error.get_or_insert(e);
                    }
                }
            }
            result.connect_ms_p50 = p50_ms(times);
            result.time_to_direct_ms_p50 = p50_ms(to_direct);
            result.direct_rate = f64::from(ended_direct) / f64::from(opts.runs.max(1));
            // The coordinator's choice when a punch ran, else direct dial.
            result.strategy = result
                .strategies
                .iter()
                .filter(|(k, _)| k.as_str() != "direct_dial")
                .max_by_key(|(_, n)| **n)
                .or_else(|| result.strategies.iter().next())
                .map_or_else(|| "none".to_string(), |(k, _)| k.clone());
            pairs.push(result);
        }
    }
    for s in sides.values() {
        s.node.shutdown().await;
    }
    for n in &infra {
        n.shutdown().await;
    }
    lab.teardown();
    let all_connected = pairs.iter().all(|p| p.connected == p.runs);
    Ok(PairMatrixReport {
        pairs,
        nodes: settled,
        runs_per_pair: opts.runs,
        delay_ms: opts.delay_ms,
        all_connected,
        wall_ms: started.elapsed().as_millis() as u64,
    })
}

/// What `failover` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    /// From the relay's death until the NATed node held a new relay.
    pub new_relay_ms: u64,
    /// Until its republished record (new relay first) was served.
    pub republished_ms: u64,
    /// Until the peer that was talking to it had delivered a message again,
    /// dialing by key with no help.
    pub reconnected_ms: u64,
    pub old_relay: reach::PeerId,
    pub new_relay: Option<reach::PeerId>,
}

/// `talker` sends `tag` to `target` by PeerId; `target` must receive it.
async fn deliver(talker: &Node, target: &Node, tag: &str) -> Result<(), LabError> {
    talker
        .send(target.peer_id(), tag.as_bytes().to_vec())
        .await
        .map_err(|e| LabError::Other(format!("send {tag}: {e}")))?;
    loop {
        match target.next_event().await {
            Some(Event::Message { data, .. }) if data == tag.as_bytes() => return Ok(()),
            Some(_) => continue,
            None => return Err(LabError::Other("target shut down".into())),
        }
    }
}

/// Relay failover across real NATs: a node behind an eim-apdf NAT holds a
/// relay and a peer behind another NAT talks to it through it; the relay
/// dies; the node must hold a new relay and republish, and the peer must
/// get through again by PeerId alone.
pub async fn failover() -> Result<FailoverReport, LabError> {
    let fail = |what: &str| LabError::Other(format!("failover: {what}"));
    let (mut lab, mut net, infra) = lab_with_infrastructure().await?;
    let seed = infra[0].local_addr();
    let s1 = Site::build(&mut lab, &mut net, NatKind::EimApdf, 1, 0)?;
    let s2 = Site::build(&mut lab, &mut net, NatKind::EimApdf, 2, 0)?;
    let target = node_in(&lab, &s1.node_ns, s1.node_ip, Some(seed), None).await?;
    let talker = node_in(&lab, &s2.node_ns, s2.node_ip, Some(seed), None).await?;
    for n in infra.iter().chain([&target, &talker]) {
        if !settle(n).await {
            return Err(fail("a node did not settle"));
        }
    }
    let old = target
        .relay_status()
        .held_relay
        .ok_or_else(|| fail("no relay held"))?;
    let relay = infra
        .iter()
        .find(|n| n.peer_id() == old)
        .ok_or_else(|| fail("the relay is not an infrastructure node"))?;
    let checker = infra
        .iter()
        .find(|n| n.peer_id() != old)
        .ok_or_else(|| fail("no second infrastructure node"))?;
    tokio::time::timeout(RUN_TIMEOUT, async {
        talker
            .connect(target.peer_id(), [])
            .await
            .map_err(|e| fail(&e.to_string()))?;
        deliver(&talker, &target, "before").await
    })
    .await
    .map_err(|_| fail("first delivery timed out"))??;

    let lost_at = Instant::now();
    relay.shutdown().await;
    tokio::time::timeout(RUN_TIMEOUT, async {
        loop {
            match target.relay_status().held_relay {
                Some(r) if r != old => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .map_err(|_| fail("no new relay"))?;
    let new_relay_ms = lost_at.elapsed().as_millis() as u64;
    let new_relay = target.relay_status().held_relay;
    tokio::time::timeout(RUN_TIMEOUT, async {
        loop {
            if let Ok(addrs) = checker.lookup(target.peer_id()).await
                && addrs
                    .first()
                    .is_some_and(|a| a.kind == reach::AddrKind::Relay && a.via == new_relay)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .map_err(|_| fail("not republished"))?;
    let republished_ms = lost_at.elapsed().as_millis() as u64;
    tokio::time::timeout(RUN_TIMEOUT, deliver(&talker, &target, "after"))
        .await
        .map_err(|_| fail("no delivery after the failover"))??;
    let reconnected_ms = lost_at.elapsed().as_millis() as u64;
    for n in infra.iter().chain([&target, &talker]) {
        n.shutdown().await;
    }
    lab.teardown();
    Ok(FailoverReport {
        new_relay_ms,
        republished_ms,
        reconnected_ms,
        old_relay: old,
        new_relay,
    })
}

/// What `upgrade` measured.
#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    /// Messages sent (while the punch ran, then after the direct path died).
    pub sent: u32,
    /// Distinct messages the target received.
    pub received: u32,
    /// Messages the target's application got more than once.
    pub duplicates: u32,
    /// Sends that returned an error.
    pub send_errors: u32,
    pub technique: String,
    /// From the relayed connection until the connection was direct.
    pub direct_ms: u64,
    /// From cutting the direct path until traffic was back on the relay.
    pub fallback_ms: u64,
    /// Messages the dialer sent again after the direct path died with
    /// them unacknowledged.
    pub resent: u64,
    /// From restoring the path until the connection was direct again (the
    /// dialer punches again a while after a fallback).
    pub direct_again_ms: u64,
    /// The paths the dialer's node reported for the target, in order
    /// (`NodeEvent::PeerConnected` then each `PathChanged`): "relayed",
    /// "direct", "tcp_link".
    pub path_events: Vec<String>,
}

/// Upgrade and fall back across real NATs: a dialer behind an eim-apdf
/// NAT reaches a target behind another through the target's relay, and
/// keeps sending while the punch upgrades the connection; then the direct
/// path between the two NATs is cut and it keeps sending; then the path
/// comes back and the connection must become direct again by itself.
/// Every message must arrive exactly once and no send may fail.
pub async fn upgrade() -> Result<UpgradeReport, LabError> {
    const DURING_UPGRADE: u32 = 300;
    const AFTER_CUT: u32 = 100;
    const AFTER_REPAIR: u32 = 20;
    let fail = |what: &str| LabError::Other(format!("upgrade: {what}"));
    let (mut lab, mut net, infra) = lab_with_infrastructure().await?;
    let seed = infra[0].local_addr();
    let s1 = Site::build(&mut lab, &mut net, NatKind::EimApdf, 1, 0)?;
    let s2 = Site::build(&mut lab, &mut net, NatKind::EimApdf, 2, 0)?;
    let target = node_in(&lab, &s2.node_ns, s2.node_ip, Some(seed), None).await?;
    for n in infra.iter().chain([&target]) {
        if !settle(n).await {
            return Err(fail("a node did not settle"));
        }
    }
    let st = target.relay_status();
    let (Some(relay), Some(relay_addr)) = (st.held_relay, st.held_relay_addr) else {
        return Err(fail("the target holds no relay"));
    };
    let dialer = fresh_dialer(&lab, &s1.node_ns, s1.node_ip, &infra)
        .await
        .map_err(|e| fail(&e))?;
    let total = DURING_UPGRADE + AFTER_CUT + AFTER_REPAIR;
    // What the dialer's node says about its path to the target.
    let path_events = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorder = {
        let mut events = dialer.subscribe();
        let target_id = target.peer_id();
        let paths = path_events.clone();
        tokio::spawn(async move {
            let push = |p: &str| {
                if let Ok(mut v) = paths.lock() {
                    v.push(p.to_string());
                }
            };
            while let Some(ev) = events.next().await {
                let path = match ev {
                    NodeEvent::PeerConnected { peer, path, .. }
                    | NodeEvent::PathChanged { peer, path }
                        if peer == target_id =>
                    {
                        path
                    }
                    NodeEvent::PeerDisconnected { peer } if peer == target_id => {
                        push("disconnected");
                        continue;
                    }
                    _ => continue,
                };
                push(match path {
                    PathKind::Direct => "direct",
                    PathKind::Relayed { .. } => "relayed",
                    PathKind::TcpLink => "tcp_link",
                    _ => "other",
                });
            }
        })
    };
    // The target's application: counts every message it gets.
    let receiver = {
        let target = target.clone();
        tokio::spawn(async move {
            let mut got: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
            let all = async {
                while got.len() < total as usize {
                    match target.next_event().await {
                        Some(Event::Message { data, .. }) => {
                            *got.entry(data.to_vec()).or_default() += 1;
                        }
                        Some(_) => {}
                        None => return,
                    }
                }
            };
            let _ =
                tokio::time::timeout(RUN_TIMEOUT * 2 + reach::punch::REPUNCH_AFTER_FALLBACK, all)
                    .await;
            got
        })
    };
    let send_range = |from: u32, to: u32| {
        let dialer = dialer.clone();
        let peer = target.peer_id();
        tokio::spawn(async move {
            let mut errors = 0;
            for i in from..to {
                if dialer
                    .send(peer, format!("message {i}").into_bytes())
                    .await
                    .is_err()
                {
                    errors += 1;
                }
            }
            errors
        })
    };
    let connected_at = Instant::now();
    tokio::time::timeout(
        RUN_TIMEOUT,
        dialer.connect_via_relay(target.peer_id(), relay, relay_addr),
    )
    .await
    .map_err(|_| fail("relayed connect timed out"))?
    .map_err(|e| fail(&e.to_string()))?;
    let during = send_range(0, DURING_UPGRADE);
    if !dialer.wait_direct(target.peer_id(), PUNCH_WAIT).await {
        return Err(fail(&format!(
            "never direct: {:?}",
            dialer.punch_stats().recent
        )));
    }
    let direct_ms = connected_at.elapsed().as_millis() as u64;
    let mut send_errors = during.await.map_err(|_| fail("sender panicked"))?;

    s1.cut_off(&lab, s2.public_ip)?;
    let cut_at = Instant::now();
    let after = send_range(DURING_UPGRADE, DURING_UPGRADE + AFTER_CUT);
    let relayed_again = async {
        loop {
            let relayed = dialer
                .connected_peers()
                .iter()
                .any(|p| p.peer == target.peer_id() && p.relay.is_some());
            if relayed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(RUN_TIMEOUT, relayed_again)
        .await
        .map_err(|_| fail("traffic never went back to the relay"))?;
    let fallback_ms = cut_at.elapsed().as_millis() as u64;
    send_errors += tokio::time::timeout(RUN_TIMEOUT, after)
        .await
        .map_err(|_| fail("sending after the cut timed out"))?
        .map_err(|_| fail("sender panicked"))?;
    // The path comes back: the dialer punches again by itself.
    s1.reconnect(&lab)?;
    let repaired_at = Instant::now();
    let wait = reach::punch::REPUNCH_AFTER_FALLBACK + PUNCH_WAIT;
    if !dialer.wait_direct(target.peer_id(), wait).await {
        return Err(fail("never direct again after the path came back"));
    }
    let direct_again_ms = repaired_at.elapsed().as_millis() as u64;
    send_errors += send_range(DURING_UPGRADE + AFTER_CUT, total)
        .await
        .map_err(|_| fail("sender panicked"))?;
    let got = receiver.await.map_err(|_| fail("receiver panicked"))?;
    let technique = dialer
        .punch_stats()
        .recent
        .first()
        .map_or_else(String::new, |o| o.technique.to_string());
    let report = UpgradeReport {
        sent: total,
        received: got.len() as u32,
        duplicates: got.values().map(|n| n - 1).sum(),
        send_errors,
        technique,
        direct_ms,
        fallback_ms,
        resent: dialer.stats().core.messages_resent,
        direct_again_ms,
        path_events: Vec::new(),
    };
    let mut report = report;
    // The recorder may be a moment behind the peer table: four paths
    // (relayed, direct, relayed, direct) are expected.
    let recorded = || path_events.lock().map(|v| v.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(5);
    while recorded().len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    recorder.abort();
    report.path_events = recorded();
    dialer.shutdown().await;
    for n in infra.iter().chain([&target]) {
        n.shutdown().await;
    }
    lab.teardown();
    Ok(report)
}
