//! The client against real miniupnpd (Debian's miniupnpd-nftables 2.3.1)
//! in three network namespaces this test makes and removes: "internet"
//! (11.250.0.1), a router (WAN 11.250.0.2, LAN 10.78.0.1) running
//! miniupnpd, and a client (10.78.0.2). Skipped (with a message) unless
//! root with `ip`, `nft` and miniupnpd installed; `REACH_LAB_REQUIRED=1`
//! makes a missing prerequisite a failure. Nothing is sent from the root
//! namespace: every socket is made inside the lab's namespaces.

use std::fs::File;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use super::*;

const MINIUPNPD: &str = "/usr/sbin/miniupnpd";
/// Time miniupnpd gets to start and answer the first discovery.
const FIRST_DISCOVERY: Duration = Duration::from_secs(5);
/// Time a datagram through the new mapping gets to arrive.
const FORWARD_WAIT: Duration = Duration::from_secs(2);

const WAN_GW: Ipv4Addr = Ipv4Addr::new(11, 250, 0, 2);
const LAN_GW: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);

/// The namespaces and the miniupnpd process, removed on drop (also when
/// the test fails).
struct Lab {
    names: Vec<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
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
    } else if run(&["ip", "-V"]).is_err() || run(&["nft", "--version"]).is_err() {
        Some("no ip or nft")
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
        let steps: Vec<Vec<&str>> = vec![
            vec![
                "ip", "link", "add", "wan", "netns", &r, "type", "veth", "peer", "name", "iwan",
                "netns", &i,
            ],
            vec![
                "ip", "link", "add", "lan", "netns", &r, "type", "veth", "peer", "name", "clan",
                "netns", &c,
            ],
            vec![
                "ip",
                "-n",
                &i,
                "addr",
                "add",
                "11.250.0.1/24",
                "dev",
                "iwan",
            ],
            vec!["ip", "-n", &r, "addr", "add", "11.250.0.2/24", "dev", "wan"],
            vec!["ip", "-n", &r, "addr", "add", "10.78.0.1/24", "dev", "lan"],
            vec!["ip", "-n", &c, "addr", "add", "10.78.0.2/24", "dev", "clan"],
            vec!["ip", "-n", &i, "link", "set", "iwan", "up"],
            vec!["ip", "-n", &r, "link", "set", "wan", "up"],
            vec!["ip", "-n", &r, "link", "set", "lan", "up"],
            vec!["ip", "-n", &c, "link", "set", "clan", "up"],
            vec!["ip", "-n", &r, "link", "set", "lo", "up"],
            vec![
                "ip",
                "-n",
                &c,
                "route",
                "add",
                "default",
                "via",
                "10.78.0.1",
            ],
            vec![
                "ip",
                "-n",
                &r,
                "route",
                "add",
                "default",
                "via",
                "11.250.0.1",
            ],
            vec![
                "ip",
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        ];
        for step in &steps {
            run(step)?;
        }
        let rules = lab.dir.path().join("rules.nft");
        std::fs::write(
            &rules,
            "table inet filter {\n chain miniupnpd { }\n\
             chain prerouting_miniupnpd { type nat hook prerouting priority dstnat; policy accept; }\n\
             chain postrouting_miniupnpd { type nat hook postrouting priority srcnat; policy accept; }\n\
             chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }\n}\n",
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
        let conf = lab.dir.path().join("miniupnpd.conf");
        std::fs::write(
            &conf,
            "ext_ifname=wan\nlistening_ip=lan\n\
                   enable_upnp=yes\nenable_natpmp=no\nsecure_mode=yes\n\
                   upnp_table_name=filter\nupnp_nat_table_name=filter\n\
                   upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n\
                   upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
                   uuid=3d3cec3a-8cf0-11e0-98ee-001a6b2c0a78\n\
                   allow 1024-65535 10.0.0.0/8 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
        )
        .map_err(|e| e.to_string())?;
        let pid = lab.dir.path().join("miniupnpd.pid");
        let log = File::create(lab.dir.path().join("miniupnpd.log")).map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &r, MINIUPNPD, "-d", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(&pid)
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        lab.child = Some(child);
        Ok(lab)
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
        udp: Arc::new(move |addr, count| in_ns(&u, move || crate::punch::bind_here(addr, count))),
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
    let lab = Lab::new().expect("lab set up");
    let net = net_in(&lab.ns(2));
    let gw = IpAddr::V4(LAN_GW);

    let igd = discover(&net, CLIENT.into(), gw, FIRST_DISCOVERY)
        .await
        .expect("miniupnpd discovered");
    assert_eq!(igd.version(), 2, "miniupnpd 2.3.1 offers WANIPConnection:2");
    assert_eq!(igd.gateway(), gw);
    assert!(igd.boot_id().is_some());
    assert!(igd.has_ipv6_firewall());
    // Warm: discovery as the capability will see it (SSDP + description).
    let started = std::time::Instant::now();
    let again = discover(&net, CLIENT.into(), gw, FIRST_DISCOVERY)
        .await
        .expect("rediscovered");
    let discovery_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(again.boot_id(), igd.boot_id(), "no restart in between");
    println!("{{\"upnp_discovery_ms\": {discovery_ms:.1}}}");

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

    igd.delete_port_mapping(&net, Protocol::Udp, 40000)
        .await
        .expect("deleted");
    assert!(
        !igd.mapping_exists(&net, Protocol::Udp, 40000)
            .await
            .unwrap()
    );
    assert!(!lab.nat_chain().contains("dport"), "{}", lab.nat_chain());
    // Deleting what is gone is not an error.
    igd.delete_port_mapping(&net, Protocol::Udp, 40000)
        .await
        .expect("deleted twice");

    // IPv6 pinhole: this miniupnpd runs without an IPv6 HTTP address, so it
    // refuses; record what it says.
    let v6 = SocketAddr::new("fd00::2".parse().unwrap(), 40000);
    match igd.add_pinhole(&net, Protocol::Udp, v6, 60).await {
        Ok(id) => {
            println!("pinhole {id} opened");
            igd.delete_pinhole(&net, id).await.expect("pinhole closed");
        }
        Err(e) => {
            assert_eq!(e.kind(), "upnp_soap", "{e}");
            println!("AddPinhole: {e}");
        }
    }
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
