//! `reach lab nat`: classification over every NAT kind.
//!
//! One lab run: an internet bridge; a public namespace holding three reach
//! helper nodes at distinct IPs (A, B for the mapping test; C, a peer of A,
//! for the other-host filtering test) and coturn as a third-party STUN
//! server; then one site per NAT kind with a reach node behind it. Every
//! site's node classifies its NAT with A and B; the result is compared with
//! what the lab configured, and its external address with what coturn
//! reports. Sites run concurrently.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use reach::{NatReport, Node};
use reach_proto::nat::{Filtering, Mapping};
use serde::Serialize;

use crate::nat::{ALL_KINDS, Internet, NatKind, Site};
use crate::netns::{Lab, LabError};

/// coturn's address inside the lab.
pub const COTURN_HOST: u8 = 20;
/// coturn's STUN port.
pub const COTURN_PORT: u16 = 3478;

/// Options of a classification run.
#[derive(Debug, Clone)]
pub struct NatMatrixOptions {
    pub kinds: Vec<NatKind>,
    /// One-way delay on every router's WAN side.
    pub delay_ms: u32,
}

impl Default for NatMatrixOptions {
    fn default() -> Self {
        NatMatrixOptions {
            kinds: ALL_KINDS.to_vec(),
            delay_ms: 0,
        }
    }
}

/// The result for one NAT kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindResult {
    pub kind: NatKind,
    pub expected_mapping: Mapping,
    pub expected_filtering: Filtering,
    pub measured_mapping: Mapping,
    pub measured_filtering: Filtering,
    /// Mapping and filtering both as configured.
    pub matches: bool,
    pub translated: Option<bool>,
    pub port_preserving: Option<bool>,
    pub hairpin: Option<bool>,
    /// External address reported by reach peers (helper A).
    pub external: Option<SocketAddr>,
    /// External address coturn reported to the node's own socket.
    pub coturn_external: Option<SocketAddr>,
    /// reach and coturn agree (the IP only for endpoint-dependent mapping,
    /// where every destination sees another port).
    pub coturn_agrees: bool,
    /// coturn's `turnutils_stunclient`, run in the site, got its reflexive
    /// address from helper A's reach STUN server.
    pub stunclient_interop: bool,
    /// After joining the helpers' DHT, the endpoint record the node signed
    /// and published lists its external address. Reported, not yet part of
    /// `all_match`: in about one run in four one node's record lacks it
    /// (under investigation; see the issue notes). Expected for every kind
    /// with endpoint-independent mapping; with endpoint-dependent mapping
    /// no single address is confirmed, so none is published.
    pub external_published: bool,
    /// What the node's join of the helpers' DHT achieved.
    pub join: reach::JoinReport,
    pub report: NatReport,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct NatMatrixReport {
    pub kinds: Vec<KindResult>,
    pub all_match: bool,
    pub wall_ms: u64,
}

fn public(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, host))
}

async fn node_in(lab: &Lab, ns: &str, ip: IpAddr, with_alt: bool) -> Result<Node, LabError> {
    let sock = lab.udp_socket(ns, SocketAddr::new(ip, 0))?;
    // In-process nodes cannot read their namespace's routing table; these
    // routers map nothing anyway.
    let mut b = Node::builder()
        .socket(sock)
        .port_mapping(reach::PortMapping::disabled());
    if with_alt {
        b = b.alt_socket(lab.udp_socket(ns, SocketAddr::new(ip, 0))?);
    }
    Ok(b.spawn().await?)
}

/// Parses `turnutils_stunclient` output for the reflexive address.
fn parse_stunclient(out: &str) -> Option<SocketAddr> {
    out.lines()
        .find(|l| l.contains("UDP reflexive addr"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|a| a.trim().parse().ok())
}

/// Runs the classification over `opts.kinds`.
pub async fn run(opts: &NatMatrixOptions) -> Result<NatMatrixReport, LabError> {
    let started = Instant::now();
    let mut lab = Lab::new()?;
    let mut net = Internet::build(&mut lab)?;
    for host in [11, 12, COTURN_HOST] {
        net.add_public_ip(&lab, host)?;
    }
    let coturn_ip = public(COTURN_HOST).to_string();
    let coturn_port = COTURN_PORT.to_string();
    lab.spawn(
        &net.public,
        &[
            "turnserver",
            "-n",
            "--stun-only",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--listening-ip",
            &coturn_ip,
            "--listening-port",
            &coturn_port,
            "--log-file",
            "stdout",
        ],
    )?;
    let a = node_in(&lab, &net.public, public(10), true).await?;
    let b = node_in(&lab, &net.public, public(11), true).await?;
    let c = node_in(&lab, &net.public, public(12), true).await?;
    a.connect(c.peer_id(), [c.local_addr()]).await?;
    let helpers = [a.local_addr(), b.local_addr()];
    let coturn = SocketAddr::new(public(COTURN_HOST), COTURN_PORT);

    let mut sites = Vec::new();
    for (i, kind) in opts.kinds.iter().enumerate() {
        sites.push(Site::build(
            &mut lab,
            &mut net,
            *kind,
            (i + 1) as u8,
            opts.delay_ms,
        )?);
    }
    let mut nodes = Vec::new();
    for site in &sites {
        nodes.push(node_in(&lab, &site.node_ns, site.node_ip, false).await?);
    }
    let reports = futures::future::join_all(nodes.iter().map(|n| {
        let n = n.clone();
        async move {
            let report = n.nat_report_with(&helpers).await;
            let coturn_external = n.stun(coturn).await.ok();
            (report, coturn_external)
        }
    }))
    .await;

    // Join the helpers' DHT, then see what the endpoint records say.
    let seed = [a.local_addr()];
    let joins = futures::future::join_all(nodes.iter().map(|n| n.bootstrap(&seed))).await;
    let mut kinds = Vec::new();
    for (((site, (report, coturn_external)), node), join) in
        sites.iter().zip(reports).zip(&nodes).zip(joins)
    {
        let (expected_mapping, expected_filtering) = site.kind.expected();
        // The external address as helper A saw it.
        let external = report.external.first().map(|s| s.addr);
        let coturn_agrees = match (external, coturn_external) {
            (Some(e), Some(c)) if expected_mapping == Mapping::EndpointDependent => {
                e.ip() == c.ip()
            }
            (Some(e), Some(c)) => e == c,
            _ => false,
        };
        let out = lab
            .exec(
                &site.node_ns,
                &[
                    "turnutils_stunclient",
                    "-p",
                    &a.local_addr().port().to_string(),
                    &a.local_addr().ip().to_string(),
                ],
            )
            .unwrap_or_default();
        let stunclient_interop = match (parse_stunclient(&out), external) {
            (Some(seen), Some(e)) => seen.ip() == e.ip(),
            _ => false,
        };
        // The record the node signed and published (its own copy: most site
        // nodes sit behind NATs and cannot take puts from others, so which
        // remote nodes hold it varies; that is what relays are for).
        let published = node.lookup(node.peer_id()).await.unwrap_or_default();
        let external_published = match external {
            Some(e) if expected_mapping == Mapping::EndpointIndependent => {
                published.iter().any(|t| t.addr == e)
            }
            // EDM: only the node's own (inside) address may appear.
            _ => published.iter().all(|t| t.addr.ip() == site.node_ip),
        };
        kinds.push(KindResult {
            kind: site.kind,
            expected_mapping,
            expected_filtering,
            measured_mapping: report.mapping,
            measured_filtering: report.filtering,
            matches: report.mapping == expected_mapping && report.filtering == expected_filtering,
            translated: report.translated,
            port_preserving: report.port_preserving,
            hairpin: report.hairpin,
            external,
            coturn_external,
            coturn_agrees,
            stunclient_interop,
            external_published,
            join,
            report,
        });
    }
    for n in nodes.iter().chain([&a, &b, &c]) {
        n.shutdown().await;
    }
    lab.teardown();
    let all_match = kinds
        .iter()
        .all(|k| k.matches && k.coturn_agrees && k.stunclient_interop);
    Ok(NatMatrixReport {
        kinds,
        all_match,
        wall_ms: started.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stunclient_output() {
        let out =
            "0: : IPv4. UDP reflexive addr: 203.0.113.101:41234\n0: : Total connect time is 0\n";
        assert_eq!(
            parse_stunclient(out),
            Some("203.0.113.101:41234".parse().unwrap())
        );
        assert_eq!(parse_stunclient("nothing"), None);
    }
}
