//! Asks a real router for port mappings with reach-proto's NAT-PMP and PCP
//! codecs, and prints what it answered: a check of the codecs against a
//! real implementation (e.g. miniupnpd in a lab namespace; see
//! docs/port-mapping.md). Sends only to the gateway given.
//!
//! ```text
//! portmap_probe <gateway-ip> <client-ip> <internal-port>
//! ```

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use reach_proto::nat::portmap::{Protocol, SERVER_PORT, natpmp, pcp};

/// How long to wait for each answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Lifetime asked for the test mappings.
const LIFETIME_SECS: u32 = 120;

fn ask(sock: &UdpSocket, to: SocketAddr, request: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(request, to).ok()?;
    let mut buf = [0u8; 1100];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    if from != to {
        return None;
    }
    Some(buf[..n].to_vec())
}

/// Prints one answer, decoded.
fn show(what: &str, answer: Option<Vec<u8>>, decode: &dyn Fn(&[u8]) -> String) {
    match answer {
        Some(bytes) => println!("{what}: {} ({} bytes)", decode(&bytes), bytes.len()),
        None => println!("{what}: no answer"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(gw), Some(client), Some(port)) = (
        args.get(1).and_then(|a| a.parse::<IpAddr>().ok()),
        args.get(2).and_then(|a| a.parse::<IpAddr>().ok()),
        args.get(3).and_then(|a| a.parse::<u16>().ok()),
    ) else {
        eprintln!("usage: portmap_probe <gateway-ip> <client-ip> <internal-port>");
        std::process::exit(2);
    };
    let gw = SocketAddr::new(gw, SERVER_PORT);
    let sock = match UdpSocket::bind(SocketAddr::new(client, 0)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bind {client}: {e}");
            std::process::exit(1);
        }
    };
    let _ = sock.set_read_timeout(Some(ANSWER_TIMEOUT));

    let natpmp_decode = |b: &[u8]| format!("{:?}", natpmp::Response::decode(b));
    let pcp_decode = |b: &[u8]| format!("{:?}", pcp::Response::decode(b));

    let ext = natpmp::Request::ExternalAddress.encode();
    show("natpmp external", ask(&sock, gw, &ext), &natpmp_decode);
    let map = natpmp::Request::Map(natpmp::MapRequest {
        protocol: Protocol::Udp,
        internal_port: port,
        suggested_external_port: port,
        lifetime_secs: LIFETIME_SECS,
    })
    .encode();
    show("natpmp map udp", ask(&sock, gw, &map), &natpmp_decode);
    let del = natpmp::Request::Map(natpmp::MapRequest::delete(Protocol::Udp, port)).encode();
    show("natpmp delete udp", ask(&sock, gw, &del), &natpmp_decode);

    let announce = pcp::Request::Announce { client }.encode();
    show("pcp announce", ask(&sock, gw, &announce), &pcp_decode);
    let nonce = [7u8; 12];
    let request = pcp::MapRequest::new(client, nonce, Protocol::Tcp, port, LIFETIME_SECS);
    show(
        "pcp map tcp",
        ask(&sock, gw, &pcp::Request::Map(request).encode()),
        &pcp_decode,
    );
    let delete = pcp::MapRequest {
        lifetime_secs: 0,
        ..request
    };
    show(
        "pcp delete tcp",
        ask(&sock, gw, &pcp::Request::Map(delete).encode()),
        &pcp_decode,
    );
}
