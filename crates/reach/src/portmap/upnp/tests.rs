//! The client against real miniupnpd (Debian's miniupnpd-nftables 2.3.1)
//! in three network namespaces this test makes and removes: "internet"
//! (11.250.0.1, fd00:250::1), a router (WAN 11.250.0.2 / fd00:250::2, LAN
//! 10.78.0.1 / fd00:78::1) running miniupnpd with IPv6, and a client
//! (10.78.0.2 / fd00:78::2). Skipped (with a message) unless
//! root with `ip`, `nft`, `curl` (the other LAN host's requests) and
//! miniupnpd installed; `REACH_LAB_REQUIRED=1`
//! makes a missing prerequisite a failure. Nothing is sent from the root
//! namespace: every socket is made inside the lab's namespaces.
//!
//! The paths miniupnpd never takes (error 725, a LOCATION or control URL
//! off the gateway, an HTTP error) are checked against a scripted gateway
//! on loopback.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use super::*;
use reach_proto::nat::portmap::upnp::{PortMappingRequest, SoapAction};

const MINIUPNPD: &str = "/usr/sbin/miniupnpd";
/// Time miniupnpd gets to start and answer the first discovery.
const FIRST_DISCOVERY: Duration = Duration::from_secs(5);
/// Discoveries timed after the first.
const DISCOVERY_SAMPLES: usize = 9;
/// Time a datagram through the new mapping gets to arrive.
const FORWARD_WAIT: Duration = Duration::from_secs(2);

const WAN_GW: Ipv4Addr = Ipv4Addr::new(11, 250, 0, 2);
const LAN_GW: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// A second LAN host (an extra address of the client namespace).
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 3);

/// The namespaces and the miniupnpd process, removed on drop (also when
/// the test fails).
struct Lab {
    names: Vec<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("miniupnpd.log"));
            eprintln!("miniupnpd's log:\n{}", log.unwrap_or_default());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.names.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn available() -> bool {
    let missing = if unsafe { libc::geteuid() } != 0 {
        Some("not root")
    } else if !std::path::Path::new(MINIUPNPD).exists() {
        Some("no miniupnpd")
    } else if run(&["ip", "-V"]).is_err()
        || run(&["nft", "--version"]).is_err()
        || run(&["curl", "--version"]).is_err()
    {
        Some("no ip, nft or curl")
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) => {
            if std::env::var("REACH_LAB_REQUIRED").as_deref() == Ok("1") {
                panic!("the UPnP lab test is required here but cannot run: {why}");
            }
            eprintln!("skipping the miniupnpd test: {why}");
            false
        }
    }
}

impl Lab {
    fn new() -> Result<Lab, String> {
        let tag = std::process::id();
        let mut lab = Lab {
            names: Vec::new(),
            child: None,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
        };
        for role in ["i", "r", "c"] {
            let ns = format!("rup{role}{tag}");
            run(&["ip", "netns", "add", &ns])?;
            lab.names.push(ns);
        }
        let (i, r, c) = (lab.ns(0), lab.ns(1), lab.ns(2));
        let steps = [
            format!("ip link add wan netns {r} type veth peer name iwan netns {i}"),
            format!("ip link add lan netns {r} type veth peer name clan netns {c}"),
            format!("ip -n {i} addr add 11.250.0.1/24 dev iwan"),
            format!("ip -n {r} addr add 11.250.0.2/24 dev wan"),
            format!("ip -n {r} addr add 10.78.0.1/24 dev lan"),
            format!("ip -n {c} addr add 10.78.0.2/24 dev clan"),
            format!("ip -n {c} addr add 10.78.0.3/24 dev clan"),
            format!("ip -n {i} link set iwan up"),
            format!("ip -n {r} link set wan up"),
            format!("ip -n {r} link set lan up"),
            format!("ip -n {c} link set clan up"),
            format!("ip -n {r} link set lo up"),
            format!("ip -n {c} route add default via 10.78.0.1"),
            format!("ip -n {r} route add default via 11.250.0.1"),
            format!("ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"),
            // IPv6, added once the links are up so that (without DAD) the
            // addresses are usable at once: a routed LAN behind a firewall
            // (pinholes, no NAT).
            format!("ip -n {i} addr add fd00:250::1/64 dev iwan nodad"),
            format!("ip -n {r} addr add fd00:250::2/64 dev wan nodad"),
            format!("ip -n {r} addr add fd00:78::1/64 dev lan nodad"),
            format!("ip -n {c} addr add fd00:78::2/64 dev clan nodad"),
            format!("ip -n {c} route add default via fd00:78::1"),
            format!("ip -n {i} route add fd00:78::/64 via fd00:250::2"),
            format!("ip netns exec {r} sysctl -qw net.ipv6.conf.all.forwarding=1"),
        ];
        for step in &steps {
            run(&step.split_whitespace().collect::<Vec<_>>())?;
        }
        let rules = lab.dir.path().join("rules.nft");
        std::fs::write(
            &rules,
            "table inet filter {\n chain miniupnpd { }\n\
             chain prerouting_miniupnpd { type nat hook prerouting priority dstnat; policy accept; }\n\
             chain postrouting_miniupnpd { type nat hook postrouting priority srcnat; policy accept; }\n\
             chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; \
             iif \"wan\" meta nfproto ipv6 ct state new drop; }\n}\n",
        )
        .map_err(|e| e.to_string())?;
        run(&[
            "ip",
            "netns",
            "exec",
            &r,
            "nft",
            "-f",
            &rules.to_string_lossy(),
        ])?;
        lab.start_miniupnpd(false)?;
        Ok(lab)
    }

    /// (Re)starts miniupnpd; with `ipv6`, also on the LAN's IPv6 address.
    /// miniupnpd 2.3.1 then serves HTTP on that address only, though its
    /// IPv4 SSDP answers still point to the IPv4 one, so the IPv4 and IPv6
    /// checks run against one configuration each.
    fn start_miniupnpd(&mut self, ipv6: bool) -> Result<(), String> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let conf = self.dir.path().join("miniupnpd.conf");
        let mut text = String::from(
            "ext_ifname=wan\nlistening_ip=lan\nenable_upnp=yes\nenable_natpmp=no\n\
             secure_mode=yes\nupnp_table_name=filter\nupnp_nat_table_name=filter\n\
             upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n\
             upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
             uuid=3d3cec3a-8cf0-11e0-98ee-001a6b2c0a78\n\
             allow 1024-65535 10.0.0.0/8 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
        );
        if ipv6 {
            text.push_str("ipv6_listening_ip=fd00:78::1\n");
        }
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        let pid = self.dir.path().join("miniupnpd.pid");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("miniupnpd.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(1), MINIUPNPD, "-d", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(&pid)
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        Ok(())
    }

    /// miniupnpd's filter chain (the accept rules of its mappings).
    fn filter_chain(&self) -> String {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.ns(1),
            "nft",
            "list",
            "chain",
            "inet",
            "filter",
            "miniupnpd",
        ])
        .unwrap_or_else(|e| e)
    }

    fn ns(&self, i: usize) -> String {
        self.names[i].clone()
    }

    /// The rules miniupnpd manages: its DNAT chain, as nft lists it.
    fn nat_chain(&self) -> String {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.ns(1),
            "nft",
            "list",
            "chain",
            "inet",
            "filter",
            "prerouting_miniupnpd",
        ])
        .unwrap_or_else(|e| e)
    }
}

/// Runs `f` on a fresh thread inside namespace `ns` (sockets made there
/// stay there).
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path)?;
        // SAFETY: setns affects only this fresh thread, which ends after f.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

fn net_in(ns: &str) -> UpnpNet {
    let (u, t) = (ns.to_string(), ns.to_string());
    UpnpNet {
        udp: Arc::new(move |addr, count| in_ns(&u, move || crate::socket::bind_here(addr, count))),
        tcp: Arc::new(move |to| {
            in_ns(&t, move || {
                std::net::TcpStream::connect_timeout(&to, HTTP_TIMEOUT)
            })
        }),
    }
}

#[tokio::test]
async fn against_miniupnpd_map_check_forward_delete() {
    if !available() {
        return;
    }
    let mut lab = Lab::new().expect("lab set up");
    let net = net_in(&lab.ns(2));
    let gw = IpAddr::V4(LAN_GW);

    let igd = discover(&net, CLIENT.into(), gw, FIRST_DISCOVERY)
        .await
        .expect("miniupnpd discovered");
    assert_eq!(igd.version(), 2, "miniupnpd 2.3.1 offers WANIPConnection:2");
    assert_eq!(igd.gateway(), gw);
    assert!(igd.boot_id().is_some());
    assert!(igd.has_ipv6_firewall());
    // Discovery as the capability will see it (SSDP + description), a few
    // times: miniupnpd delays each answer randomly within MX.
    let mut ms = Vec::new();
    for _ in 0..DISCOVERY_SAMPLES {
        let started = std::time::Instant::now();
        let again = discover(&net, CLIENT.into(), gw, FIRST_DISCOVERY)
            .await
            .expect("rediscovered");
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(again.boot_id(), igd.boot_id(), "no restart in between");
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "{{\"upnp_discovery_ms\": {{\"min\": {:.1}, \"median\": {:.1}, \"max\": {:.1}, \"samples\": {}}}}}",
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        ms.len()
    );

    // Answers from any other address than the gateway are ignored: asking
    // for a gateway that does not exist finds nothing, though miniupnpd
    // answers the multicast search.
    let none = discover(
        &net,
        CLIENT.into(),
        "10.78.0.3".parse().unwrap(),
        SSDP_RESEND * 3,
    )
    .await;
    assert_eq!(none.unwrap_err().kind(), "upnp_no_gateway");

    assert_eq!(
        igd.external_ip(&net).await.expect("external address"),
        IpAddr::V4(WAN_GW)
    );

    let internal = SocketAddr::new(CLIENT.into(), 40000);
    let mapped = igd
        .add_port_mapping(&net, Protocol::Udp, internal, 3600, "reach test")
        .await
        .expect("mapped");
    assert_eq!(
        mapped,
        Mapped {
            external_port: 40000,
            lease_secs: 3600
        }
    );
    let entry = igd
        .mapping(&net, Protocol::Udp, 40000)
        .await
        .expect("entry read")
        .expect("entry present");
    assert_eq!(entry.internal_client, IpAddr::V4(CLIENT));
    assert_eq!(entry.internal_port, 40000);
    assert!(
        igd.mapping_exists(&net, Protocol::Udp, 40000)
            .await
            .unwrap()
    );
    assert!(
        !igd.mapping_exists(&net, Protocol::Tcp, 40000)
            .await
            .unwrap()
    );
    assert!(lab.nat_chain().contains("40000"), "{}", lab.nat_chain());

    // The mapping forwards: a datagram from "the internet" to the router's
    // WAN address reaches the client.
    let client = in_ns(&lab.ns(2), move || UdpSocket::bind(internal)).unwrap();
    client.set_read_timeout(Some(FORWARD_WAIT)).unwrap();
    let outside = in_ns(&lab.ns(0), || UdpSocket::bind("11.250.0.1:0")).unwrap();
    outside.send_to(b"hello", (WAN_GW, 40000)).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = client.recv_from(&mut buf).expect("forwarded datagram");
    assert_eq!(&buf[..n], b"hello");
    assert_eq!(from.ip(), IpAddr::from([11, 250, 0, 1]));

    // A mapping for another client is refused (secure_mode): a typed fault.
    let other = SocketAddr::new(IpAddr::from([10, 78, 0, 9]), 40002);
    let refused = igd
        .add_port_mapping(&net, Protocol::Tcp, other, 60, "not mine")
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), "upnp_soap");
    println!("mapping for another client: {refused}");

    // IGDv2 conflict: another LAN host (10.78.0.3, mapping for itself, as
    // secure_mode requires) holds TCP 40010, so ours gets 718 and then
    // AddAnyPortMapping grants another port.
    let theirs = PortMappingRequest {
        protocol: Protocol::Tcp,
        external_port: 40010,
        internal_port: 40010,
        internal_client: OTHER,
        lease_secs: 3600,
        description: "other host".into(),
    };
    let envelope = SoapAction::add_port_mapping(&theirs).envelope(codec::WAN_IP_CONNECTION_2);
    let answer = run(&[
        "ip",
        "netns",
        "exec",
        &lab.ns(2),
        "curl",
        "-s",
        "--max-time",
        "3",
        "--interface",
        "10.78.0.3",
        "-H",
        "Content-Type: text/xml; charset=\"utf-8\"",
        "-H",
        "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping\"",
        "--data-binary",
        &envelope,
        &igd.control_url.to_string(),
    ])
    .expect("the other host's mapping");
    assert!(answer.contains("AddPortMappingResponse"), "{answer}");
    let ours = SocketAddr::new(CLIENT.into(), 40010);
    let moved = igd
        .add_port_mapping(&net, Protocol::Tcp, ours, 600, "reach test")
        .await
        .expect("mapped elsewhere");
    assert_ne!(moved.external_port, 40010);
    assert_eq!(moved.lease_secs, 600);
    let entry = igd
        .mapping(&net, Protocol::Tcp, moved.external_port)
        .await
        .unwrap()
        .expect("the granted port is ours");
    assert_eq!(
        (entry.internal_client, entry.internal_port),
        (ours.ip(), 40010)
    );
    println!("conflict on 40010: granted {}", moved.external_port);
    igd.delete_port_mapping(&net, Protocol::Tcp, moved.external_port)
        .await
        .expect("deleted");
    let theirs_gone =
        SoapAction::delete_port_mapping(Protocol::Tcp, 40010).envelope(codec::WAN_IP_CONNECTION_2);
    run(&[
        "ip",
        "netns",
        "exec",
        &lab.ns(2),
        "curl",
        "-s",
        "--max-time",
        "3",
        "--interface",
        "10.78.0.3",
        "-H",
        "Content-Type: text/xml; charset=\"utf-8\"",
        "-H",
        "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:2#DeletePortMapping\"",
        "--data-binary",
        &theirs_gone,
        &igd.control_url.to_string(),
    ])
    .expect("the other host's mapping deleted");

    igd.delete_port_mapping(&net, Protocol::Udp, 40000)
        .await
        .expect("deleted");
    assert!(
        !igd.mapping_exists(&net, Protocol::Udp, 40000)
            .await
            .unwrap()
    );
    assert!(!lab.nat_chain().contains("dport"), "{}", lab.nat_chain());
    assert!(
        !lab.filter_chain().contains("dport"),
        "{}",
        lab.filter_chain()
    );
    // Deleting what is gone is not an error.
    igd.delete_port_mapping(&net, Protocol::Udp, 40000)
        .await
        .expect("deleted twice");

    // Over IPv4 the router refuses a pinhole: the asker is not the client
    // (and this configuration has no IPv6).
    let v6 = SocketAddr::new("fd00:78::2".parse().unwrap(), 40020);
    let refused = igd
        .add_pinhole(&net, Protocol::Udp, v6, 60)
        .await
        .unwrap_err();
    assert_eq!(
        refused.soap_code(),
        Some(codec::ERR_NOT_AUTHORIZED),
        "{refused}"
    );

    // A restart is seen as a new BOOTID.
    lab.start_miniupnpd(true)
        .expect("miniupnpd restarted with IPv6");
    let restarted = discover(&net, CLIENT.into(), gw, SSDP_RESEND * 3)
        .await
        .map(|i| i.boot_id());
    // Its description is now served on IPv6 only (see start_miniupnpd), so
    // the IPv4 discovery may fail to fetch it; the BOOTID check needs the
    // SSDP answer only, which IPv6 discovery below also gives.
    println!("IPv4 discovery of the IPv6-enabled miniupnpd: {restarted:?}");

    // IPv6: discovered over IPv6 (miniupnpd's secure mode only opens a
    // pinhole for the address asking), a pinhole opened, a datagram from
    // outside let through the firewall that drops new inbound IPv6, closed.
    let gw6: IpAddr = "fd00:78::1".parse().unwrap();
    let client6: IpAddr = "fd00:78::2".parse().unwrap();
    let igd6 = discover(&net, client6, gw6, FIRST_DISCOVERY)
        .await
        .expect("discovered over IPv6");
    assert!(igd6.has_ipv6_firewall());
    assert_ne!(igd6.boot_id(), igd.boot_id(), "the restart shows");
    let v6 = SocketAddr::new(client6, 40020);
    let id = igd6
        .add_pinhole(&net, Protocol::Udp, v6, 600)
        .await
        .expect("pinhole opened");
    assert!(
        lab.filter_chain().contains("40020"),
        "{}",
        lab.filter_chain()
    );
    let client = in_ns(&lab.ns(2), move || UdpSocket::bind(v6)).unwrap();
    client.set_read_timeout(Some(FORWARD_WAIT)).unwrap();
    let outside = in_ns(&lab.ns(0), || UdpSocket::bind("[fd00:250::1]:0")).unwrap();
    outside.send_to(b"hello6", v6).unwrap();
    let (n, from) = client
        .recv_from(&mut buf)
        .expect("datagram through the pinhole");
    assert_eq!(&buf[..n], b"hello6");
    assert_eq!(from.ip(), "fd00:250::1".parse::<IpAddr>().unwrap());
    igd6.update_pinhole(&net, id, 1200)
        .await
        .expect("pinhole renewed");
    igd6.delete_pinhole(&net, id).await.expect("pinhole closed");
    assert!(
        !lab.filter_chain().contains("dport"),
        "{}",
        lab.filter_chain()
    );
}

#[test]
fn notify_of_an_igd_gives_location_and_boot_id() {
    let alive = b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nCACHE-CONTROL: max-age=120\r\n\
        LOCATION: http://10.78.0.1:45827/rootDesc.xml\r\n\
        NT: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\nNTS: ssdp:alive\r\n\
        USN: uuid:x::urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\nBOOTID.UPNP.ORG: 9\r\n\r\n";
    let (url, boot) = decode_notify(alive).expect("an IGD's alive");
    assert_eq!(url.to_string(), "http://10.78.0.1:45827/rootDesc.xml");
    assert_eq!(boot, Some(9));
    let other = String::from_utf8_lossy(alive).replace("InternetGatewayDevice", "MediaServer");
    assert_eq!(decode_notify(other.as_bytes()), None);
    let bye = String::from_utf8_lossy(alive).replace("ssdp:alive", "ssdp:byebye");
    assert_eq!(decode_notify(bye.as_bytes()), None);
    let named = String::from_utf8_lossy(alive).replace("10.78.0.1", "router.lan");
    assert_eq!(decode_notify(named.as_bytes()), None);
}

/// A gateway on loopback that answers each HTTP connection with the next
/// canned response and keeps the requests it got.
struct Scripted {
    addr: SocketAddr,
    requests: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Scripted {
    fn start(answers: Vec<String>) -> Scripted {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for answer in answers {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                s.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the head and the Content-Length body.
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got).into_owned());
                let _ = s.write_all(answer.as_bytes());
            }
        });
        Scripted { addr, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn http_answer(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// An IGDv1 description whose control URL is `control`.
fn v1_description(control: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?><root><device><deviceList><device><deviceList><device>\
         <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType><serviceList>\
         <service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>\
         <controlURL>{control}</controlURL></service></serviceList></device></deviceList>\
         </device></deviceList></device></root>"
    )
}

fn fault(code: u16, description: &str) -> String {
    format!(
        "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body><s:Fault>\
         <faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>\
         <UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{code}</errorCode>\
         <errorDescription>{description}</errorDescription></UPnPError></detail></s:Fault>\
         </s:Body></s:Envelope>"
    )
}

fn loopback_net() -> UpnpNet {
    UpnpNet::here()
}

fn search_answer(location: &str) -> SsdpMessage {
    SsdpMessage {
        kind: SsdpKind::SearchResponse,
        location: Some(location.into()),
        target: codec::ST_IGD_V1.into(),
        usn: None,
        boot_id: Some(3),
        max_age: Some(120),
    }
}

#[tokio::test]
async fn a_location_or_control_url_off_the_gateway_is_refused() {
    let net = loopback_net();
    let gw: IpAddr = "127.0.0.1".parse().unwrap();
    let elsewhere = search_answer("http://127.0.0.2:5000/rootDesc.xml");
    let e = describe(&net, gw, &elsewhere).await.unwrap_err();
    assert_eq!(e.kind(), "upnp_foreign_address", "{e}");

    let server = Scripted::start(vec![http_answer(
        "200 OK",
        &v1_description("http://127.0.0.3:5000/ctl"),
    )]);
    let answer = search_answer(&format!("http://{}/rootDesc.xml", server.addr));
    let e = describe(&net, gw, &answer).await.unwrap_err();
    assert_eq!(e.kind(), "upnp_foreign_address", "{e}");
    assert_eq!(
        server.requests().len(),
        1,
        "only the description was fetched"
    );

    let server = Scripted::start(vec![http_answer("404 Not Found", "")]);
    let answer = search_answer(&format!("http://{}/rootDesc.xml", server.addr));
    let e = describe(&net, gw, &answer).await.unwrap_err();
    assert_eq!(e.kind(), "upnp_http", "{e}");
}

#[tokio::test]
async fn only_permanent_leases_are_asked_again_with_lease_zero() {
    let net = loopback_net();
    let gw: IpAddr = "127.0.0.1".parse().unwrap();
    let ok = "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body>\
              <u:AddPortMappingResponse xmlns:u=\"x\"/></s:Body></s:Envelope>";
    let server = Scripted::start(vec![
        http_answer("200 OK", &v1_description("/ctl")),
        http_answer(
            "500 Internal Server Error",
            &fault(
                codec::ERR_ONLY_PERMANENT_LEASES,
                "OnlyPermanentLeasesSupported",
            ),
        ),
        http_answer("200 OK", ok),
        http_answer(
            "500 Internal Server Error",
            &fault(codec::ERR_CONFLICT, "ConflictInMappingEntry"),
        ),
    ]);
    let answer = search_answer(&format!("http://{}/rootDesc.xml", server.addr));
    let igd = describe(&net, gw, &answer).await.expect("described");
    assert_eq!(igd.version(), 1);
    assert_eq!(igd.boot_id(), Some(3));
    assert!(!igd.has_ipv6_firewall());
    let internal: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    // Lease 0 asked: 1 is sent (0 would be "permanent").
    let mapped = igd
        .add_port_mapping(&net, Protocol::Udp, internal, 0, "t")
        .await
        .expect("mapped permanently");
    assert_eq!(
        mapped,
        Mapped {
            external_port: 40000,
            lease_secs: 0
        }
    );
    let requests = server.requests();
    assert!(
        requests[1].contains("<NewLeaseDuration>1</NewLeaseDuration>"),
        "{}",
        requests[1]
    );
    assert!(
        requests[2].contains("<NewLeaseDuration>0</NewLeaseDuration>"),
        "{}",
        requests[2]
    );
    assert!(
        requests[2].contains(
            "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping\""
        )
    );
    // IGDv1 has no AddAnyPortMapping: a conflict is the caller's to handle.
    let e = igd
        .add_port_mapping(&net, Protocol::Udp, internal, 60, "t")
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.soap_code()),
        ("upnp_soap", Some(codec::ERR_CONFLICT))
    );
    // Wrong families are refused before anything is sent.
    let v6: SocketAddr = "[::1]:40000".parse().unwrap();
    let e = igd
        .add_port_mapping(&net, Protocol::Udp, v6, 60, "t")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "upnp_address_family");
    let e = igd
        .add_pinhole(&net, Protocol::Udp, v6, 60)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "upnp_no_ipv6_firewall");
    assert_eq!(server.requests().len(), 4);
}
