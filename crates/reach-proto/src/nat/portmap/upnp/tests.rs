//! Tests of the UPnP-IGD codec. The `testdata/upnp/*.bin` files are real
//! answers of Debian's miniupnpd 2.3.1 (IGDv2, secure_mode) in lab
//! namespaces, captured byte for byte (see docs/port-mapping.md).

use super::*;

macro_rules! vector {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/upnp/",
            $name
        ))
    };
}

fn http(bytes: &[u8]) -> HttpResponse {
    HttpResponse::decode(bytes).expect("a real answer decodes")
}

fn location() -> Url {
    Url::parse("http://10.78.0.1:45827/rootDesc.xml").unwrap()
}

#[test]
fn msearch_is_what_uda_specifies() {
    let m = String::from_utf8(encode_msearch(ST_IGD_V2)).unwrap();
    assert_eq!(
        m,
        "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n\
         ST: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\n\r\n"
    );
    // A router decoding it sees a request, not an answer.
    assert_eq!(
        SsdpMessage::decode(m.as_bytes()),
        Err(DecodeError::UpnpUnexpected("SSDP request"))
    );
}

#[test]
fn miniupnpd_search_responses_decode() {
    for (bytes, st) in [
        (&vector!("ssdp_2.bin")[..], ST_IGD_V2),
        (&vector!("ssdp_1.bin")[..], ST_IGD_V1),
    ] {
        let m = SsdpMessage::decode(bytes).unwrap();
        assert_eq!(m.kind, SsdpKind::SearchResponse);
        assert_eq!(m.target, st);
        assert_eq!(
            m.location.as_deref(),
            Some("http://10.78.0.1:45827/rootDesc.xml")
        );
        assert_eq!(m.boot_id, Some(1795724904));
        assert_eq!(m.max_age, Some(120));
        assert_eq!(
            m.usn,
            Some(format!("uuid:3d3cec3a-8cf0-11e0-98ee-001a6b2c0a78::{st}"))
        );
    }
}

#[test]
fn miniupnpd_search_response_over_ipv6_points_to_an_ipv6_literal() {
    let m = SsdpMessage::decode(vector!("ssdp_v6.bin")).unwrap();
    let url = Url::parse(m.location.as_deref().unwrap()).unwrap();
    assert_eq!(url.ip, "fd00:78::1".parse::<IpAddr>().unwrap());
    assert_eq!(url.path, "/rootDesc.xml");
    assert_eq!(m.boot_id, Some(1795725620));
}

#[test]
fn notify_alive_and_byebye_decode_with_any_header_case() {
    let alive = b"NOTIFY * HTTP/1.1\r\nhost: 239.255.255.250:1900\r\ncache-control: max-age=60, no-cache\r\n\
        location: http://192.168.1.1:5000/desc.xml\r\nnt: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
        Nts: SSDP:ALIVE\r\nUsn: uuid:x::y\r\nBootId.UPnP.org: 7\r\n\r\n";
    let m = SsdpMessage::decode(alive).unwrap();
    assert_eq!(m.kind, SsdpKind::Alive);
    assert_eq!(m.boot_id, Some(7));
    assert_eq!(m.max_age, Some(60));
    assert_eq!(m.target, ST_IGD_V1);
    let bye = b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nNT: upnp:rootdevice\r\nNTS: ssdp:byebye\r\nUSN: uuid:x\r\n\r\n";
    let m = SsdpMessage::decode(bye).unwrap();
    assert_eq!(m.kind, SsdpKind::ByeBye);
    assert_eq!(m.location, None);
    assert_eq!(m.boot_id, None);
}

#[test]
fn bad_ssdp_is_a_typed_error() {
    let no_location = b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n";
    assert_eq!(
        SsdpMessage::decode(no_location).unwrap_err().kind(),
        "portmap_upnp_missing"
    );
    let bad_boot =
        b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\nBOOTID.UPNP.ORG: -1\r\n\r\n";
    assert_eq!(
        SsdpMessage::decode(bad_boot).unwrap_err().kind(),
        "portmap_upnp_bad_value"
    );
    assert_eq!(
        SsdpMessage::decode(&vec![b'a'; MAX_SSDP_LEN + 1])
            .unwrap_err()
            .kind(),
        "portmap_upnp_too_long"
    );
    let mut many = b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://1.2.3.4/\r\n".to_vec();
    for _ in 0..MAX_HEADERS {
        many.extend_from_slice(b"X: y\r\n");
    }
    assert_eq!(
        SsdpMessage::decode(&many),
        Err(DecodeError::UpnpLimit("header count"))
    );
    assert_eq!(
        SsdpMessage::decode(b"HTTP/1.1 404 Not Found\r\n\r\n")
            .unwrap_err()
            .kind(),
        "portmap_upnp_unexpected"
    );
    assert!(SsdpMessage::decode(b"").is_err());
    assert!(SsdpMessage::decode(b"\r\n\r\n").is_err());
}

#[test]
fn urls_are_ip_literals_only() {
    let u = Url::parse("http://10.78.0.1:45827/rootDesc.xml").unwrap();
    assert_eq!(u.ip, "10.78.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(u.port, 45827);
    assert_eq!(u.path, "/rootDesc.xml");
    assert_eq!(u.to_string(), "http://10.78.0.1:45827/rootDesc.xml");
    let v6 = Url::parse("http://[fd00::1]:5000/d.xml").unwrap();
    assert_eq!(v6.host_header(), "[fd00::1]:5000");
    assert_eq!(Url::parse("HTTP://1.2.3.4").unwrap().port, 80);
    assert_eq!(Url::parse("HTTP://1.2.3.4").unwrap().path, "/");
    assert_eq!(
        Url::parse("http://router.lan:5000/d.xml"),
        Err(DecodeError::UpnpHostname)
    );
    for bad in [
        "https://1.2.3.4/",
        "http://1.2.3.4:0/",
        "http://1.2.3.4:99999/",
        "http://1.2.3.4:+80/",
        "http://user@1.2.3.4/",
        "http://[fe80::1%25eth0]/",
        "http://1.2.3.4/a b",
        "http://1.2.3.4/a\r\nX: y",
        "ftp://1.2.3.4/",
    ] {
        assert_eq!(
            Url::parse(bad).unwrap_err().kind(),
            "portmap_upnp_bad_url",
            "{bad}"
        );
    }
}

#[test]
fn control_urls_resolve_against_the_base() {
    let base = Url::parse("http://10.0.0.1:5000/dev/root.xml").unwrap();
    assert_eq!(
        base.join("/ctl/IPConn").unwrap().to_string(),
        "http://10.0.0.1:5000/ctl/IPConn"
    );
    assert_eq!(
        base.join("ctl/IPConn").unwrap().to_string(),
        "http://10.0.0.1:5000/dev/ctl/IPConn"
    );
    assert_eq!(
        base.join("http://10.0.0.1:6000/x").unwrap().to_string(),
        "http://10.0.0.1:6000/x"
    );
    let bare = Url::parse("http://10.0.0.1:5000").unwrap();
    assert_eq!(bare.join("x").unwrap().path, "/x");
    // Found by fuzzing: a joined URL longer than the bound must be refused,
    // not yield a URL that does not parse back.
    let long = "a".repeat(MAX_URL_LEN - 10);
    assert_eq!(base.join(&long), Err(DecodeError::UpnpLimit("URL length")));
    // The bound holds for the canonical form (":80" added).
    let path = "b".repeat(MAX_URL_LEN - "http://1.2.3.4/".len());
    let exact = format!("http://1.2.3.4/{path}");
    assert_eq!(
        Url::parse(&exact),
        Err(DecodeError::UpnpLimit("URL length"))
    );
}

#[test]
fn requests_are_well_formed_http() {
    let u = location();
    assert_eq!(
        String::from_utf8(encode_get(&u)).unwrap(),
        "GET /rootDesc.xml HTTP/1.1\r\nHost: 10.78.0.1:45827\r\nConnection: close\r\n\r\n"
    );
    let ctl = u.join("/ctl/IPConn").unwrap();
    let post = encode_soap_post(
        &ctl,
        WAN_IP_CONNECTION_2,
        &SoapAction::delete_port_mapping(Protocol::Udp, 40000),
    );
    let post = String::from_utf8(post).unwrap();
    let (head, body) = post.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("POST /ctl/IPConn HTTP/1.1\r\nHost: 10.78.0.1:45827\r\n"));
    assert!(head.contains("Content-Type: text/xml; charset=\"utf-8\"\r\n"));
    assert!(head.contains(
        "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:2#DeletePortMapping\"\r\n"
    ));
    assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    assert!(body.contains(
        "<u:DeletePortMapping xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:2\">\
         <NewRemoteHost></NewRemoteHost><NewExternalPort>40000</NewExternalPort>\
         <NewProtocol>UDP</NewProtocol></u:DeletePortMapping>"
    ));
    // Our own envelope parses with our own scanner.
    assert!(Xml::parse(body.as_bytes()).is_ok());
}

#[test]
fn descriptions_are_escaped_in_the_envelope() {
    let m = PortMappingRequest {
        protocol: Protocol::Tcp,
        external_port: 1,
        internal_port: 2,
        internal_client: Ipv4Addr::new(10, 0, 0, 2),
        lease_secs: 3,
        description: "a<b>&\"c'</NewEnabled>".into(),
    };
    let env = SoapAction::add_port_mapping(&m).envelope(WAN_IP_CONNECTION_1);
    let doc = Xml::parse(env.as_bytes()).unwrap();
    let d = doc.named("NewPortMappingDescription").next().unwrap();
    assert_eq!(doc.elements[d].text, m.description);
    assert_eq!(doc.named("NewEnabled").count(), 1);
}

#[test]
fn miniupnpd_description_picks_wanipconnection2_and_the_ipv6_firewall() {
    let resp = http(vector!("desc.bin"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), 3090);
    let d = Description::parse(&resp.body, &location()).unwrap();
    assert_eq!(d.service, ServiceKind::WanIp2);
    assert_eq!(d.service.version(), 2);
    assert_eq!(
        d.control_url.to_string(),
        "http://10.78.0.1:45827/ctl/IPConn"
    );
    assert_eq!(
        d.ipv6_firewall_url.map(|u| u.to_string()).as_deref(),
        Some("http://10.78.0.1:45827/ctl/IP6FCtl")
    );
}

/// An IGDv1 description as vendor routers write it: URLBase, relative
/// control URL, comments, a PPP and an IP service (IP preferred).
#[test]
fn v1_description_with_urlbase_and_ppp() {
    let xml = br#"<?xml version="1.0" encoding="utf-8"?>
<!-- vendor -->
<root xmlns="urn:schemas-upnp-org:device-1-0">
 <URLBase>http://192.168.1.1:1780/igd/</URLBase>
 <device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
  <deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
   <deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
    <serviceList>
     <service><serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType>
      <controlURL>ppp?x=1&amp;y=2</controlURL></service>
     <service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
      <controlURL><![CDATA[ipc]]></controlURL></service>
    </serviceList></device></deviceList></device></deviceList></device></root>"#;
    let loc = Url::parse("http://192.168.1.1:1780/root.xml").unwrap();
    let d = Description::parse(xml, &loc).unwrap();
    assert_eq!(d.service, ServiceKind::WanIp1);
    assert_eq!(d.control_url.to_string(), "http://192.168.1.1:1780/igd/ipc");
    assert_eq!(d.ipv6_firewall_url, None);
    // Only the PPP one: it is taken, its entity decoded.
    let ppp_only = String::from_utf8_lossy(xml).replace("WANIPConnection:1", "Other:1");
    let d = Description::parse(ppp_only.as_bytes(), &loc).unwrap();
    assert_eq!(d.service, ServiceKind::WanPpp1);
    assert_eq!(d.control_url.path, "/igd/ppp?x=1&y=2");
}

#[test]
fn description_refusals_are_typed() {
    let loc = location();
    // A service outside a WANConnectionDevice is not taken.
    let stray = b"<root><device><deviceType>x</deviceType><serviceList><service>\
        <serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>\
        <controlURL>/c</controlURL></service></serviceList></device></root>";
    assert_eq!(
        Description::parse(stray, &loc),
        Err(DecodeError::UpnpMissing("WAN connection service"))
    );
    let entity = b"<!DOCTYPE root [<!ENTITY a \"aaaa\">]><root>&a;</root>";
    assert_eq!(
        Description::parse(entity, &loc),
        Err(DecodeError::UpnpXml("DOCTYPE"))
    );
    assert_eq!(
        Description::parse(b"<root>&a;</root>", &loc),
        Err(DecodeError::UpnpXml("undeclared entity"))
    );
    let deep = "<a>".repeat(MAX_XML_DEPTH + 1) + &"</a>".repeat(MAX_XML_DEPTH + 1);
    assert_eq!(
        Description::parse(deep.as_bytes(), &loc),
        Err(DecodeError::UpnpLimit("XML depth"))
    );
    let wide = format!("<root>{}</root>", "<a/>".repeat(MAX_XML_ELEMENTS));
    assert_eq!(
        Description::parse(wide.as_bytes(), &loc),
        Err(DecodeError::UpnpLimit("XML element count"))
    );
    for bad in [
        &b"<root>"[..],
        b"<root></other>",
        b"<root/><root/>",
        b"text",
        b"<root><a></root>",
    ] {
        assert_eq!(
            Description::parse(bad, &loc).unwrap_err().kind(),
            "portmap_upnp_xml"
        );
    }
    let hostname = b"<root><URLBase>http://router.lan/</URLBase></root>";
    assert_eq!(
        Description::parse(hostname, &loc),
        Err(DecodeError::UpnpHostname)
    );
}

#[test]
fn http_bodies_by_length_chunks_or_close() {
    let r = HttpResponse::decode(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
    assert_eq!(r.body, b"abc");
    let r = HttpResponse::decode(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
    assert_eq!(r.body, b"all of it");
    let r = HttpResponse::decode(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.body, b"Wikipedia");
    assert_eq!(
        HttpResponse::decode(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap_err()
            .kind(),
        "portmap_truncated"
    );
    assert_eq!(
        HttpResponse::decode(b"HTTP/1.1 200 OK\r\nContent-Length: 3")
            .unwrap_err()
            .kind(),
        "portmap_truncated"
    );
    assert_eq!(
        HttpResponse::decode(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\nab"
        )
        .unwrap_err()
        .kind(),
        "portmap_truncated"
    );
    assert_eq!(
        HttpResponse::decode(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .unwrap_err()
            .kind(),
        "portmap_upnp_malformed"
    );
    assert_eq!(
        HttpResponse::decode(&vec![b'a'; MAX_HTTP_RESPONSE + 1])
            .unwrap_err()
            .kind(),
        "portmap_upnp_too_long"
    );
    assert_eq!(
        HttpResponse::decode(b"HTTP/1.1 2000 OK\r\n\r\n")
            .unwrap_err()
            .kind(),
        "portmap_upnp_malformed"
    );
}

#[test]
fn miniupnpd_soap_answers_decode() {
    let r = http(vector!("getext.bin"));
    assert_eq!(
        decode_external_ip(r.status, &r.body),
        Ok("11.250.0.2".parse().unwrap())
    );
    let r = http(vector!("add.bin"));
    assert_eq!(decode_empty("AddPortMapping", r.status, &r.body), Ok(()));
    let r = http(vector!("getentry.bin"));
    assert_eq!(
        decode_mapping_entry(r.status, &r.body),
        Ok(Some(MappingEntry {
            internal_client: "10.78.0.2".parse().unwrap(),
            internal_port: 40000,
            enabled: true,
            description: "reach".into(),
            lease_secs: 3600,
        }))
    );
    let r = http(vector!("delete.bin"));
    assert_eq!(decode_empty("DeletePortMapping", r.status, &r.body), Ok(()));
    let r = http(vector!("getentry_absent.bin"));
    assert_eq!(r.status, 500);
    assert_eq!(decode_mapping_entry(r.status, &r.body), Ok(None));
}

#[test]
fn miniupnpd_faults_decode_to_upnp_errors() {
    for (bytes, action, code, description) in [
        (
            &vector!("add_other_client.bin")[..],
            "AddPortMapping",
            ERR_CONFLICT,
            "ConflictInMappingEntry",
        ),
        (
            &vector!("add_denied.bin")[..],
            "AddPortMapping",
            ERR_NOT_AUTHORIZED,
            "Action not authorized",
        ),
        (
            &vector!("addany.bin")[..],
            "AddAnyPortMapping",
            ERR_NOT_AUTHORIZED,
            "Action not authorized",
        ),
        (
            &vector!("pinhole.bin")[..],
            "AddPinhole",
            ERR_NOT_AUTHORIZED,
            "Action not authorized",
        ),
    ] {
        let r = http(bytes);
        assert_eq!(r.status, 500);
        assert_eq!(
            decode_soap(action, r.status, &r.body),
            Err(SoapError::Fault(UpnpFault {
                code,
                description: description.into()
            }))
        );
    }
}

#[test]
fn miniupnpd_pinhole_answer_decodes() {
    // miniupnpd with an IPv6 LAN address (ipv6_listening_ip), asked over IPv6.
    let r = http(vector!("pinhole6.bin"));
    assert_eq!(decode_pinhole_id(r.status, &r.body), Ok(1));
}

#[test]
fn igdv2_and_pinhole_answers_decode() {
    let env = |action: &str, inner: &str| {
        format!(
            "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body>\
             <u:{action}Response xmlns:u=\"x\">{inner}</u:{action}Response></s:Body></s:Envelope>"
        )
    };
    let body = env(
        "AddAnyPortMapping",
        "<NewReservedPort>40001</NewReservedPort>",
    );
    assert_eq!(decode_reserved_port(200, body.as_bytes()), Ok(40001));
    let body = env("AddPinhole", "<UniqueID>3</UniqueID>");
    assert_eq!(decode_pinhole_id(200, body.as_bytes()), Ok(3));
    let body = env("AddPinhole", "<UniqueID>x</UniqueID>");
    assert_eq!(
        decode_pinhole_id(200, body.as_bytes()),
        Err(SoapError::Decode(DecodeError::UpnpBadValue("UniqueID")))
    );
    let body = env(
        "GetExternalIPAddress",
        "<NewExternalIPAddress></NewExternalIPAddress>",
    );
    assert_eq!(
        decode_external_ip(200, body.as_bytes()),
        Err(SoapError::Decode(DecodeError::UpnpBadValue(
            "NewExternalIPAddress"
        )))
    );
    // The wrong action's answer is not taken for ours.
    let body = env("DeletePortMapping", "");
    assert_eq!(
        decode_empty("AddPortMapping", 200, body.as_bytes()),
        Err(SoapError::Decode(DecodeError::UpnpMissing(
            "action response"
        )))
    );
    // A success envelope with an error status is not a success.
    let body = env("AddPortMapping", "");
    assert!(decode_empty("AddPortMapping", 500, body.as_bytes()).is_err());
    // Pinhole requests carry IANA protocol numbers.
    let a = SoapAction::add_pinhole(Protocol::Udp, "fd00::2".parse().unwrap(), 40000, 3600);
    assert!(
        a.envelope(WAN_IPV6_FIREWALL_1)
            .contains("<Protocol>17</Protocol>")
    );
    assert!(
        SoapAction::update_pinhole(3, 60)
            .envelope(WAN_IPV6_FIREWALL_1)
            .contains("<UniqueID>3</UniqueID>")
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = SsdpMessage::decode(&bytes);
            let _ = HttpResponse::decode(&bytes);
            let _ = Description::parse(&bytes, &location());
            let _ = decode_mapping_entry(200, &bytes);
            let _ = decode_soap("AddPortMapping", 500, &bytes);
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = Url::parse(s);
                let _ = location().join(s);
            }
        }

        #[test]
        fn xmlish_text_never_panics(s in "[<>/a-z:!\\[\\]&;#x0-9 ?\"'=-]{0,200}") {
            let _ = Description::parse(s.as_bytes(), &location());
            let _ = decode_soap("A", 200, s.as_bytes());
        }

        #[test]
        fn urls_round_trip(a in any::<[u8; 4]>(), port in 1u16.., path in "(/[A-Za-z0-9._~%-]{0,12}){1,4}") {
            let u = Url { ip: IpAddr::from(a), port, path };
            prop_assert_eq!(Url::parse(&u.to_string()), Ok(u));
        }

        #[test]
        fn v6_urls_round_trip(a in any::<[u8; 16]>(), port in 1u16..) {
            let u = Url { ip: IpAddr::from(a), port, path: "/x".into() };
            prop_assert_eq!(Url::parse(&u.to_string()), Ok(u));
        }

        #[test]
        fn descriptions_round_trip_through_the_envelope(desc in "\\PC{0,40}", port in any::<u16>()) {
            let m = PortMappingRequest {
                protocol: Protocol::Udp,
                external_port: port,
                internal_port: port,
                internal_client: Ipv4Addr::new(10, 0, 0, 2),
                lease_secs: 60,
                description: desc,
            };
            let env = SoapAction::add_port_mapping(&m).envelope(WAN_IP_CONNECTION_2);
            let doc = Xml::parse(env.as_bytes()).unwrap();
            let d = doc.named("NewPortMappingDescription").next().unwrap();
            prop_assert_eq!(&doc.elements[d].text, &m.description);
        }

        #[test]
        fn chunked_bodies_round_trip(body in proptest::collection::vec(any::<u8>(), 0..600), split in 1usize..100) {
            let mut msg = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for c in body.chunks(split) {
                msg.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                msg.extend_from_slice(c);
                msg.extend_from_slice(b"\r\n");
            }
            msg.extend_from_slice(b"0\r\n\r\n");
            prop_assert_eq!(HttpResponse::decode(&msg).map(|r| r.body), Ok(body));
        }
    }
}
