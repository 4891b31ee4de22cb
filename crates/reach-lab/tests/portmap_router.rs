//! The lab's port-mapping routers (kinds `upnp`, `natpmp`, `pcp`): real
//! miniupnpd on an eim-apdf router, asked from the LAN host's namespace with
//! reach-proto's NAT-PMP / PCP codecs (UPnP: SSDP and SOAP by hand), and
//! checked with real packets from the lab's "internet". Needs root and
//! miniupnpd-nftables (scripts/test.sh installs it); without them each test
//! says why and passes, unless REACH_LAB_REQUIRED=1 (CI).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use reach_lab::miniupnpd::{
    MiniUpnpd, PORTMAP_SERVER_PORT, PortMapProtocol, RouterMapping, check_miniupnpd,
};
use reach_lab::nat::{Internet, NatKind, Site};
use reach_lab::netns::lab_available_for_tests;
use reach_lab::{Lab, LabError};
use reach_proto::nat::portmap::{Protocol, natpmp, pcp};

/// How long a router gets to answer a request (lab-local: about 1 ms).
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// How long a probe from the internet gets to arrive (lab-local: < 1 ms).
const ARRIVE_WAIT: Duration = Duration::from_millis(700);
/// How long to wait for a start announcement after a restart (miniupnpd
/// sends them within a few ms of listening).
const ANNOUNCE_WAIT: Duration = Duration::from_secs(2);
/// How long to wait for miniupnpd's epoch to reach 2 s (so that a restart
/// makes it go back): a little over 2 s.
const EPOCH_WAIT: Duration = Duration::from_secs(5);
/// The port the LAN host maps (any free port; the lab is its own network).
const PORT: u16 = 40000;
/// Lease asked for the mappings under test: long enough to outlive a test.
const LIFETIME_SECS: u32 = 120;
/// SSDP's multicast group.
const SSDP_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);

fn available() -> bool {
    if !lab_available_for_tests() {
        return false;
    }
    match check_miniupnpd() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("REACH_LAB_REQUIRED").as_deref() == Ok("1") {
                panic!("the port-mapping lab is required here but cannot run: {e}");
            }
            eprintln!("skipping the port-mapping lab: {e}");
            false
        }
    }
}

/// One site of a port-mapping kind on the lab's internet. Fields drop in
/// order: the site (and its miniupnpd) before the lab's namespaces.
struct Bench {
    site: Site,
    net: Internet,
    lab: Lab,
}

impl Bench {
    fn new(kind: NatKind) -> Result<Bench, LabError> {
        let mut lab = Lab::new()?;
        let mut net = Internet::build(&mut lab)?;
        let site = Site::build(&mut lab, &mut net, kind, 1, 0)?;
        Ok(Bench { site, net, lab })
    }

    fn daemon(&self) -> &MiniUpnpd {
        self.site
            .miniupnpd
            .as_ref()
            .expect("a port-mapping site runs miniupnpd")
    }

    fn restart(&mut self) {
        let Bench { site, lab, .. } = self;
        let started = Instant::now();
        site.miniupnpd
            .as_mut()
            .expect("miniupnpd")
            .restart(lab)
            .expect("restart");
        eprintln!("restart took {:?}", started.elapsed());
    }

    fn mappings(&self) -> Vec<RouterMapping> {
        self.daemon().mappings(&self.lab).expect("mappings")
    }

    /// A UDP socket of the LAN host.
    fn lan_socket(&self, addr: SocketAddr) -> UdpSocket {
        let s = self
            .lab
            .udp_socket(&self.site.node_ns, addr)
            .expect("lan socket");
        s.set_read_timeout(Some(ANSWER_WAIT)).expect("timeout");
        s
    }

    /// Whether a packet sent from a fresh socket on the internet (a new
    /// source port each time, so no old conntrack entry helps it) to `to`
    /// arrives at `lan`, unsolicited.
    fn probe_arrives(&self, lan: &UdpSocket, to: SocketAddr) -> bool {
        let any: SocketAddr = match to {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("addr"),
            SocketAddr::V6(_) => "[::]:0".parse().expect("addr"),
        };
        let out = self
            .lab
            .udp_socket(&self.net.public, any)
            .expect("internet socket");
        let token: [u8; 8] = rand_token();
        out.send_to(&token, to).expect("send probe");
        received(lan, ARRIVE_WAIT, |bytes, _| bytes == token).is_some()
    }
}

fn rand_token() -> [u8; 8] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    ((nanos as u64) ^ (u64::from(std::process::id()) << 32)).to_be_bytes()
}

/// Waits at most `wait` for a datagram on `sock` that `want` accepts; other
/// datagrams are skipped.
fn received(
    sock: &UdpSocket,
    wait: Duration,
    want: impl Fn(&[u8], SocketAddr) -> bool,
) -> Option<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).ok()?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if want(&buf[..n], from) => return Some((buf[..n].to_vec(), from)),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            // An ICMP error reported on the socket (port unreachable):
            // no answer.
            Err(_) => continue,
        }
    }
}

/// Sends `request` to `to` and returns the first answer from `to`.
fn ask(sock: &UdpSocket, to: SocketAddr, request: &[u8], wait: Duration) -> Option<Vec<u8>> {
    sock.send_to(request, to).expect("send request");
    received(sock, wait, |_, from| from == to).map(|(b, _)| b)
}

fn natpmp_ask(sock: &UdpSocket, gw: IpAddr, request: natpmp::Request) -> Option<natpmp::Response> {
    let to = SocketAddr::new(gw, PORTMAP_SERVER_PORT);
    let answer = ask(sock, to, &request.encode(), ANSWER_WAIT)?;
    Some(natpmp::Response::decode(&answer).expect("miniupnpd's NAT-PMP answer decodes"))
}

fn natpmp_map(sock: &UdpSocket, gw: IpAddr, port: u16, lifetime_secs: u32) -> natpmp::MapResponse {
    let request = natpmp::Request::Map(natpmp::MapRequest {
        protocol: Protocol::Udp,
        internal_port: port,
        suggested_external_port: port,
        lifetime_secs,
    });
    match natpmp_ask(sock, gw, request) {
        Some(natpmp::Response::Map(m)) => m,
        other => panic!("NAT-PMP map of {port} for {lifetime_secs} s: {other:?}"),
    }
}

fn natpmp_epoch(sock: &UdpSocket, gw: IpAddr) -> u32 {
    match natpmp_ask(sock, gw, natpmp::Request::ExternalAddress) {
        Some(r) => r.epoch(),
        None => panic!("no NAT-PMP answer from {gw}"),
    }
}

fn pcp_ask(sock: &UdpSocket, gw: IpAddr, request: pcp::Request) -> Option<pcp::Response> {
    let to = SocketAddr::new(gw, PORTMAP_SERVER_PORT);
    let answer = ask(sock, to, &request.encode(), ANSWER_WAIT)?;
    Some(pcp::Response::decode(&answer).expect("miniupnpd's PCP answer decodes"))
}

/// A fresh PCP mapping nonce. The same nonce must be used for a mapping's
/// renewals and delete: miniupnpd refuses a delete with another nonce
/// (NOT_AUTHORIZED, RFC 6887 §11.3).
fn new_nonce() -> pcp::Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&rand_token());
    n[8..].copy_from_slice(&std::process::id().to_be_bytes());
    n
}

/// A PCP MAP of UDP `port` from `client`; returns the answer and checks
/// that it answers this request (nonce, protocol, port).
fn pcp_map(
    sock: &UdpSocket,
    gw: IpAddr,
    client: IpAddr,
    nonce: pcp::Nonce,
    port: u16,
    lifetime_secs: u32,
) -> pcp::Response {
    let request = pcp::MapRequest::new(client, nonce, Protocol::Udp, port, lifetime_secs);
    let response = pcp_ask(sock, gw, pcp::Request::Map(request))
        .unwrap_or_else(|| panic!("no PCP answer to MAP {port} from {client}"));
    if let Some(m) = &response.map {
        assert!(
            m.answers(&request),
            "PCP answer for another request: {response:?}"
        );
    }
    response
}

fn pcp_announce(sock: &UdpSocket, gw: IpAddr, client: IpAddr) -> Option<pcp::Response> {
    pcp_ask(sock, gw, pcp::Request::Announce { client })
}

/// Polls miniupnpd's epoch (seconds since its start) until it is at least
/// 2, so that a restart visibly sends it back.
fn wait_epoch_at_least_2(epoch: impl Fn() -> u32) -> u32 {
    let deadline = Instant::now() + EPOCH_WAIT;
    loop {
        let e = epoch();
        if e >= 2 {
            return e;
        }
        assert!(Instant::now() < deadline, "epoch stuck at {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends an SSDP M-SEARCH for an IGD and returns the first answer's text.
fn ssdp_search(sock: &UdpSocket) -> Option<String> {
    let request = "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n";
    let to = SocketAddr::new(IpAddr::V4(SSDP_GROUP), 1900);
    sock.send_to(request.as_bytes(), to).expect("send M-SEARCH");
    // The answer comes from the router's unicast address.
    received(sock, Duration::from_secs(2), |b, _| {
        b.starts_with(b"HTTP/1.1 200")
    })
    .map(|(b, _)| String::from_utf8_lossy(&b).to_string())
}

fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One HTTP/1.1 exchange from the LAN host (`Connection: close`), returning
/// the whole response.
fn http(bench: &Bench, to: SocketAddr, request: &str) -> String {
    let connect = bench.lab.tcp_connector(&bench.site.node_ns);
    let mut stream = connect(to).expect("connect to miniupnpd's HTTP port");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    stream
        .write_all(request.as_bytes())
        .expect("send HTTP request");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// The WANIPConnection control URL path from the router's description.
fn control_path(bench: &Bench, location: &str) -> (SocketAddr, String) {
    let rest = location.strip_prefix("http://").expect("http location");
    let (host, path) = rest.split_once('/').expect("location path");
    let addr: SocketAddr = host.parse().expect("location host:port");
    let desc = http(
        bench,
        addr,
        &format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    );
    let at = desc
        .find("service:WANIPConnection:")
        .expect("a WANIPConnection service in the description");
    let after = &desc[at..];
    let start = after.find("<controlURL>").expect("controlURL") + "<controlURL>".len();
    let end = after[start..]
        .find("</controlURL>")
        .expect("controlURL end");
    let version = after["service:WANIPConnection:".len()..]
        .chars()
        .next()
        .unwrap_or('1');
    (addr, format!("{}|{version}", &after[start..start + end]))
}

/// A SOAP call to WANIPConnection; returns the HTTP response.
fn soap(bench: &Bench, control: &(SocketAddr, String), action: &str, args: &str) -> String {
    let (addr, path_version) = control;
    let (path, version) = path_version.split_once('|').expect("path|version");
    let service = format!("urn:schemas-upnp-org:service:WANIPConnection:{version}");
    let body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:{action} xmlns:u=\"{service}\">{args}</u:{action}></s:Body></s:Envelope>"
    );
    http(
        bench,
        *addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nSOAPAction: \"{service}#{action}\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn upnp_add(bench: &Bench, control: &(SocketAddr, String), port: u16) -> String {
    let args = format!(
        "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>UDP</NewProtocol><NewInternalPort>{port}</NewInternalPort><NewInternalClient>{}</NewInternalClient><NewEnabled>1</NewEnabled><NewPortMappingDescription>reach lab</NewPortMappingDescription><NewLeaseDuration>{LIFETIME_SECS}</NewLeaseDuration>",
        bench.site.node_ip
    );
    soap(bench, control, "AddPortMapping", &args)
}

fn upnp_delete(bench: &Bench, control: &(SocketAddr, String), port: u16) -> String {
    let args = format!(
        "<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>UDP</NewProtocol>"
    );
    soap(bench, control, "DeletePortMapping", &args)
}

fn the_mapping(bench: &Bench, port: u16) -> Vec<RouterMapping> {
    vec![RouterMapping {
        protocol: Protocol::Udp,
        external_port: port,
        internal: SocketAddr::new(bench.site.node_ip, port),
    }]
}

#[test]
fn natpmp_router_maps_forwards_forgets_on_restart_and_flush() {
    if !available() {
        return;
    }
    let started = Instant::now();
    let mut bench = Bench::new(NatKind::Natpmp).expect("natpmp site");
    eprintln!("site with miniupnpd built in {:?}", started.elapsed());
    assert_eq!(bench.daemon().protocol(), PortMapProtocol::Natpmp);
    let gw = bench.daemon().lan_ip();
    let node = bench.site.node_ip;
    let wan = SocketAddr::new(bench.site.public_ip, PORT);
    let sock = bench.lan_socket(SocketAddr::new(node, PORT));

    // NAT-PMP answers with the router's WAN address; PCP and UPnP do not.
    match natpmp_ask(&sock, gw, natpmp::Request::ExternalAddress) {
        Some(natpmp::Response::ExternalAddress { external, .. }) => {
            assert_eq!(IpAddr::V4(external), bench.site.public_ip)
        }
        other => panic!("NAT-PMP external address: {other:?}"),
    }
    assert_eq!(pcp_announce(&sock, gw, node), None, "PCP must not answer");
    assert_eq!(ssdp_search(&sock), None, "UPnP must not answer");

    // eim-apdf: nothing unsolicited arrives before the mapping.
    assert!(
        !bench.probe_arrives(&sock, wan),
        "arrived before any mapping"
    );
    let asked = Instant::now();
    let m = natpmp_map(&sock, gw, PORT, LIFETIME_SECS);
    eprintln!("NAT-PMP map answered in {:?}: {m:?}", asked.elapsed());
    assert_eq!((m.internal_port, m.external_port), (PORT, PORT));
    assert_eq!(m.lifetime_secs, LIFETIME_SECS);
    assert!(
        bench.probe_arrives(&sock, wan),
        "mapped port does not forward"
    );
    assert_eq!(bench.mappings(), the_mapping(&bench, PORT));

    // A short lease is granted as asked (min_lifetime is 2 s).
    let short = natpmp_map(&sock, gw, PORT, 5);
    eprintln!("NAT-PMP asked 5 s, granted {} s", short.lifetime_secs);
    assert_eq!(short.lifetime_secs, 5);

    // Delete (lifetime 0): gone from the chain, nothing forwards.
    let del = natpmp_ask(
        &sock,
        gw,
        natpmp::Request::Map(natpmp::MapRequest::delete(Protocol::Udp, PORT)),
    );
    assert!(
        matches!(del, Some(natpmp::Response::Map(_))),
        "delete: {del:?}"
    );
    assert_eq!(bench.mappings(), vec![]);
    assert!(!bench.probe_arrives(&sock, wan), "arrived after the delete");

    // A router reboot loses the mapping and sends the epoch back; no
    // NAT-PMP announcement is sent at start (miniupnpd sends only PCP's,
    // which this router drops).
    natpmp_map(&sock, gw, PORT, LIFETIME_SECS);
    let before = wait_epoch_at_least_2(|| natpmp_epoch(&sock, gw));
    let listener = bench.lan_socket("0.0.0.0:5350".parse().expect("addr"));
    bench.restart();
    let after = natpmp_epoch(&sock, gw);
    eprintln!("epoch before restart {before}, after {after}");
    assert!(after < before, "epoch did not go back: {before} -> {after}");
    let announced = received(&listener, ANNOUNCE_WAIT, |_, from| from.ip() == gw);
    assert_eq!(announced, None, "a start announcement on the natpmp router");
    assert_eq!(bench.mappings(), vec![]);
    assert!(
        !bench.probe_arrives(&sock, wan),
        "mapping survived the restart"
    );

    // A flush under a running miniupnpd empties its chains; mapping again
    // forwards again.
    natpmp_map(&sock, gw, PORT, LIFETIME_SECS);
    assert_eq!(bench.mappings(), the_mapping(&bench, PORT));
    bench.daemon().flush(&bench.lab).expect("flush");
    assert_eq!(bench.mappings(), vec![]);
    assert!(!bench.probe_arrives(&sock, wan), "forwards after the flush");
    natpmp_map(&sock, gw, PORT, LIFETIME_SECS);
    assert!(
        bench.probe_arrives(&sock, wan),
        "re-mapped port does not forward"
    );

    let stopping = Instant::now();
    let Bench { site, lab, .. } = &mut bench;
    site.miniupnpd
        .as_mut()
        .expect("miniupnpd")
        .stop(lab)
        .expect("stop");
    eprintln!("stop took {:?}", stopping.elapsed());
    assert_eq!(
        bench.mappings(),
        the_mapping(&bench, PORT),
        "miniupnpd 2.3.1 leaves its rules on SIGTERM"
    );
    assert_eq!(bench.daemon().pid(), None);
    // ... and writes them to its lease file, which the next start reloads:
    // with the chains emptied by hand, a start without a reboot's cleanup
    // brings the mapping back.
    bench.daemon().flush(&bench.lab).expect("flush");
    assert_eq!(bench.mappings(), vec![]);
    let Bench { site, lab, .. } = &mut bench;
    site.miniupnpd
        .as_mut()
        .expect("miniupnpd")
        .start(lab)
        .expect("start");
    assert_eq!(bench.mappings(), the_mapping(&bench, PORT));
}

#[test]
fn pcp_router_maps_forwards_announces_and_forgets_on_restart_and_flush() {
    if !available() {
        return;
    }
    let mut bench = Bench::new(NatKind::Pcp).expect("pcp site");
    assert_eq!(bench.daemon().protocol(), PortMapProtocol::Pcp);
    let gw = bench.daemon().lan_ip();
    let node = bench.site.node_ip;
    let wan = SocketAddr::new(bench.site.public_ip, PORT);
    let sock = bench.lan_socket(SocketAddr::new(node, PORT));

    // PCP answers; NAT-PMP and UPnP do not.
    let announce = pcp_announce(&sock, gw, node).expect("PCP ANNOUNCE answered");
    assert_eq!(announce.result, pcp::ResultCode::Success);
    assert_eq!(
        natpmp_ask(&sock, gw, natpmp::Request::ExternalAddress),
        None
    );
    assert_eq!(ssdp_search(&sock), None, "UPnP must not answer");

    assert!(
        !bench.probe_arrives(&sock, wan),
        "arrived before any mapping"
    );
    let nonce = new_nonce();
    let asked = Instant::now();
    let r = pcp_map(&sock, gw, node, nonce, PORT, LIFETIME_SECS);
    eprintln!("PCP MAP answered in {:?}: {r:?}", asked.elapsed());
    assert_eq!(r.result, pcp::ResultCode::Success);
    assert_eq!(r.lifetime_secs, LIFETIME_SECS);
    let m = r.map.expect("MAP data");
    assert_eq!(m.external, wan, "external address and port");
    assert!(
        bench.probe_arrives(&sock, wan),
        "mapped port does not forward"
    );
    assert_eq!(bench.mappings(), the_mapping(&bench, PORT));

    // Lifetimes: 5 s asked, 5 s granted; 1 s asked, min_lifetime granted.
    // 7200 s asked, max_lifetime granted.
    let cfg = bench.daemon().config;
    for (ask_secs, want) in [
        (5, 5),
        (1, cfg.min_lifetime_secs),
        (7200, cfg.max_lifetime_secs),
    ] {
        let r = pcp_map(&sock, gw, node, nonce, PORT, ask_secs);
        eprintln!("PCP asked {ask_secs} s, granted {} s", r.lifetime_secs);
        assert_eq!(r.lifetime_secs, want);
    }

    // Delete: lifetime 0, with the mapping's nonce; another nonce is
    // refused and the mapping stays.
    let wrong = pcp_map(&sock, gw, node, new_nonce(), PORT, 0);
    assert_eq!(wrong.result, pcp::ResultCode::NotAuthorized);
    assert_eq!(bench.mappings(), the_mapping(&bench, PORT));
    let del = pcp_map(&sock, gw, node, nonce, PORT, 0);
    assert_eq!(del.result, pcp::ResultCode::Success);
    assert_eq!(bench.mappings(), vec![]);
    assert!(!bench.probe_arrives(&sock, wan), "arrived after the delete");

    // Reboot: mapping lost, an ANNOUNCE to 224.0.0.1:5350 with the epoch
    // back at (about) 0.
    pcp_map(&sock, gw, node, nonce, PORT, LIFETIME_SECS);
    let before =
        wait_epoch_at_least_2(|| pcp_announce(&sock, gw, node).expect("PCP answers").epoch);
    let listener = bench.lan_socket("0.0.0.0:5350".parse().expect("addr"));
    bench.restart();
    let (bytes, from) = received(&listener, ANNOUNCE_WAIT, |_, from| from.ip() == gw)
        .expect("a PCP ANNOUNCE at start");
    let unsolicited = pcp::Response::decode(&bytes).expect("the ANNOUNCE decodes");
    eprintln!("at start from {from}: {unsolicited:?}");
    assert_eq!(unsolicited.opcode, pcp::Opcode::Announce);
    assert!(
        unsolicited.epoch < before,
        "announced epoch {} not below {before}",
        unsolicited.epoch
    );
    assert_eq!(bench.mappings(), vec![]);
    assert!(
        !bench.probe_arrives(&sock, wan),
        "mapping survived the restart"
    );

    // Flush.
    pcp_map(&sock, gw, node, nonce, PORT, LIFETIME_SECS);
    assert_eq!(bench.mappings(), the_mapping(&bench, PORT));
    bench.daemon().flush(&bench.lab).expect("flush");
    assert_eq!(bench.mappings(), vec![]);
    assert!(!bench.probe_arrives(&sock, wan), "forwards after the flush");
}

#[test]
fn upnp_router_answers_ssdp_maps_by_soap_and_forgets_on_restart_and_flush() {
    if !available() {
        return;
    }
    let mut bench = Bench::new(NatKind::Upnp).expect("upnp site");
    assert_eq!(bench.daemon().protocol(), PortMapProtocol::Upnp);
    let gw = bench.daemon().lan_ip();
    let node = bench.site.node_ip;
    let wan = SocketAddr::new(bench.site.public_ip, PORT);
    let sock = bench.lan_socket(SocketAddr::new(node, PORT));

    // UPnP answers; NAT-PMP and PCP do not.
    assert_eq!(
        natpmp_ask(&sock, gw, natpmp::Request::ExternalAddress),
        None
    );
    assert_eq!(pcp_announce(&sock, gw, node), None);
    let asked = Instant::now();
    let answer = ssdp_search(&sock).expect("an SSDP answer");
    eprintln!("SSDP answered in {:?}", asked.elapsed());
    let location = header(&answer, "LOCATION").expect("LOCATION").to_string();
    assert!(location.starts_with(&format!("http://{gw}:")), "{location}");
    let control = control_path(&bench, &location);
    eprintln!("control {control:?}");

    assert!(
        !bench.probe_arrives(&sock, wan),
        "arrived before any mapping"
    );
    let asked = Instant::now();
    let added = upnp_add(&bench, &control, PORT);
    eprintln!("AddPortMapping answered in {:?}", asked.elapsed());
    assert!(added.starts_with("HTTP/1.1 200"), "AddPortMapping: {added}");
    assert!(
        bench.probe_arrives(&sock, wan),
        "mapped port does not forward"
    );
    assert_eq!(bench.mappings(), the_mapping(&bench, PORT));

    let deleted = upnp_delete(&bench, &control, PORT);
    assert!(
        deleted.starts_with("HTTP/1.1 200"),
        "DeletePortMapping: {deleted}"
    );
    assert_eq!(bench.mappings(), vec![]);
    assert!(!bench.probe_arrives(&sock, wan), "arrived after the delete");

    // Reboot: mapping lost, SSDP NOTIFYs at start (ssdp:byebye and
    // ssdp:alive) with a new BOOTID.UPNP.ORG.
    let bootid = header(&answer, "BOOTID.UPNP.ORG")
        .expect("BOOTID in the M-SEARCH answer")
        .to_string();
    let added = upnp_add(&bench, &control, PORT);
    assert!(added.starts_with("HTTP/1.1 200"), "AddPortMapping: {added}");
    let notify = bench
        .lab
        .udp_socket(&bench.site.node_ns, "0.0.0.0:1900".parse().expect("addr"))
        .expect("SSDP listener");
    notify
        .join_multicast_v4(&SSDP_GROUP, &Ipv4Addr::UNSPECIFIED)
        .expect("join SSDP group");
    bench.restart();
    let seen = std::cell::RefCell::new(Vec::new());
    let alive = received(&notify, ANNOUNCE_WAIT, |b, from| {
        if from.ip() != gw || !b.starts_with(b"NOTIFY") {
            return false;
        }
        let text = String::from_utf8_lossy(b).to_string();
        let nts = header(&text, "NTS").unwrap_or("").to_string();
        let boot = header(&text, "BOOTID.UPNP.ORG").unwrap_or("").to_string();
        seen.borrow_mut().push((nts.clone(), boot));
        nts == "ssdp:alive"
    });
    let seen = seen.into_inner();
    eprintln!(
        "at start, up to the first ssdp:alive: {} NOTIFYs {:?}",
        seen.len(),
        seen.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
    );
    assert!(alive.is_some(), "no ssdp:alive at start: {seen:?}");
    let (_, new_bootid) = seen.last().expect("a NOTIFY").clone();
    eprintln!("BOOTID {bootid} -> {new_bootid}");
    assert_ne!(
        new_bootid, bootid,
        "BOOTID.UPNP.ORG unchanged by the restart"
    );
    assert_eq!(bench.mappings(), vec![]);
    assert!(
        !bench.probe_arrives(&sock, wan),
        "mapping survived the restart"
    );

    // Flush.
    let added = upnp_add(&bench, &control, PORT);
    assert!(added.starts_with("HTTP/1.1 200"), "AddPortMapping: {added}");
    assert_eq!(bench.mappings(), the_mapping(&bench, PORT));
    bench.daemon().flush(&bench.lab).expect("flush");
    assert_eq!(bench.mappings(), vec![]);
    assert!(!bench.probe_arrives(&sock, wan), "forwards after the flush");
}

#[test]
fn pcp_opens_an_ipv6_pinhole_through_the_lab_ipv6_firewall() {
    if !available() {
        return;
    }
    let mut bench = Bench::new(NatKind::Pcp).expect("pcp site");
    let Bench { site, net, lab } = &mut bench;
    let node6 = site.enable_ipv6(lab, net).expect("IPv6 on the pcp site");
    let gw6 = IpAddr::V6(bench.daemon().lan_ip6().expect("miniupnpd listens on IPv6"));
    let node = IpAddr::V6(node6);
    let sock = bench.lan_socket(SocketAddr::new(node, PORT));
    let to = SocketAddr::new(node, PORT);

    // The firewall drops unsolicited inbound IPv6.
    assert!(
        !bench.probe_arrives(&sock, to),
        "unsolicited IPv6 arrived without a pinhole"
    );
    let nonce = new_nonce();
    let r = pcp_map(&sock, gw6, node, nonce, PORT, LIFETIME_SECS);
    eprintln!("PCP MAP from {node}: {r:?}");
    assert_eq!(
        r.result,
        pcp::ResultCode::Success,
        "miniupnpd refused the IPv6 pinhole; its log:\n{}",
        bench.daemon().log()
    );
    let m = r.map.expect("MAP data");
    assert_eq!(
        m.external, to,
        "a pinhole keeps the node's own address and port"
    );
    assert!(
        bench.probe_arrives(&sock, to),
        "the pinhole does not let IPv6 in"
    );
    assert_eq!(
        bench.mappings(),
        vec![RouterMapping {
            protocol: Protocol::Udp,
            external_port: PORT,
            internal: to,
        }]
    );
    let del = pcp_map(&sock, gw6, node, nonce, PORT, 0);
    assert_eq!(del.result, pcp::ResultCode::Success);
    assert_eq!(bench.mappings(), vec![]);
    assert!(
        !bench.probe_arrives(&sock, to),
        "arrived after the pinhole's delete"
    );
}

#[test]
fn portmap_sites_and_test_net_sites_reach_each_other() {
    if !available() {
        return;
    }
    // An eim-eif site attached before the first 11.250.0.0/24 router (it
    // gets its on-link route afterwards) and a public host attached after.
    let mut lab = Lab::new().expect("lab");
    let mut net = Internet::build(&mut lab).expect("internet");
    let eif = Site::build(&mut lab, &mut net, NatKind::EimEif, 1, 0).expect("eim-eif site");
    let pcp_site = Site::build(&mut lab, &mut net, NatKind::Pcp, 2, 0).expect("pcp site");
    let public = Site::build(&mut lab, &mut net, NatKind::Public, 3, 0).expect("public site");

    let pcp_sock = lab
        .udp_socket(&pcp_site.node_ns, SocketAddr::new(pcp_site.node_ip, PORT))
        .expect("pcp node socket");
    for other in [&eif, &public] {
        let sock = lab
            .udp_socket(&other.node_ns, SocketAddr::new(other.node_ip, PORT))
            .expect("socket");
        // Out from behind the pcp router (SNAT to 11.250.0.102) to a
        // TEST-NET address, which accepts it unsolicited ...
        pcp_sock
            .send_to(b"out", SocketAddr::new(other.public_ip, PORT))
            .expect("send");
        let (_, from) = received(&sock, ARRIVE_WAIT, |b, _| b == b"out")
            .unwrap_or_else(|| panic!("{}: nothing from the pcp site", other.kind.name()));
        assert_eq!(
            from,
            SocketAddr::new(pcp_site.public_ip, PORT),
            "eim: port kept"
        );
        // ... and the answer comes back through the pcp router's filter.
        sock.send_to(b"back", from).expect("send back");
        assert!(
            received(&pcp_sock, ARRIVE_WAIT, |b, _| b == b"back").is_some(),
            "{}: no answer back to the pcp site",
            other.kind.name()
        );
    }
}

#[test]
fn miniupnpd_is_stopped_when_a_test_panics() {
    if !available() {
        return;
    }
    let seen = std::sync::Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let mut lab = Lab::new().expect("lab");
        let mut net = Internet::build(&mut lab).expect("internet");
        let site = Site::build(&mut lab, &mut net, NatKind::Natpmp, 1, 0).expect("site");
        let daemon = site.miniupnpd.as_ref().expect("miniupnpd");
        let dir = std::env::temp_dir().join(format!("{}-miniupnpd", daemon.router_ns()));
        *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some((daemon.pid(), dir));
        panic!("a failing test");
    });
    assert!(outcome.is_err());
    let (pid, dir) = seen
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .expect("the site was built");
    let pid = pid.expect("miniupnpd ran");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "miniupnpd {pid} still runs after the panic"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}
