//! NAT awareness on loopback (no NAT: 127.0.0.0/8 gives distinct IPs). The
//! real NATs are exercised by the NAT lab (crates/reach-lab).

use std::net::SocketAddr;
use std::time::Duration;

use reach::Node;
use reach_proto::nat::{Filtering, Mapping};

const DEADLINE: Duration = Duration::from_secs(30);

async fn node_at(ip: &str) -> Node {
    let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
    Node::builder().bind(addr).spawn().await.unwrap()
}

#[tokio::test]
async fn stun_between_reach_nodes_reports_the_source_address() {
    let server = node_at("127.0.0.2").await;
    let client = node_at("127.0.0.1").await;
    let mapped = tokio::time::timeout(DEADLINE, client.stun(server.local_addr()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mapped, client.local_addr());
    assert_eq!(server.stats().core.stun_answered, 1);
    // A node with the STUN server turned off does not answer.
    let quiet = Node::builder()
        .bind("127.0.0.3:0".parse().unwrap())
        .stun_server(false)
        .spawn()
        .await
        .unwrap();
    let err = client.stun(quiet.local_addr()).await.unwrap_err();
    assert_eq!(err.kind(), "timeout");
}

#[tokio::test]
async fn an_unfiltered_host_classifies_as_no_nat_with_endpoint_independent_filtering() {
    let a = node_at("127.0.0.2").await;
    let b = node_at("127.0.0.3").await;
    let c = node_at("127.0.0.4").await;
    // The helper needs a peer at a third IP for the other-host test.
    a.connect(c.peer_id(), [c.local_addr()]).await.unwrap();
    let client = node_at("127.0.0.1").await;
    let r = tokio::time::timeout(
        DEADLINE,
        client.nat_report_with(&[a.local_addr(), b.local_addr()]),
    )
    .await
    .unwrap();
    assert_eq!(r.mapping, Mapping::EndpointIndependent);
    assert_eq!(r.translated, Some(false));
    assert_eq!(r.port_preserving, Some(true));
    assert_eq!(r.filtering, Filtering::EndpointIndependent);
    assert_eq!(r.hairpin, None);
    // Both helpers reported the same external address: confirmed.
    assert_eq!(r.external[0].addr, client.local_addr());
    assert!(r.external[0].confirmed);
}

#[tokio::test]
async fn too_few_helpers_is_an_explained_unknown() {
    let a = node_at("127.0.0.2").await;
    let client = node_at("127.0.0.1").await;
    let r = client.nat_report_with(&[a.local_addr()]).await;
    assert_eq!(r.mapping, Mapping::Unknown);
    assert!(r.note.unwrap().contains("two different IPs"));
}
