//! The node's TOML config file.
//!
//! ```toml
//! listen = "0.0.0.0:4433"       # UDP address for QUIC + control packets
//! api_listen = "127.0.0.1:0"    # control API (loopback only)
//! data_dir = "/var/lib/reach"   # identity key and API token
//! bootstrap = ["198.51.100.7:4433"]  # nodes to join the DHT through
//! dht_mode = "server"           # or "client": use the DHT, don't serve it
//! relay = "auto"                # relay for others: "auto" (once verified
//!                               # publicly reachable), "on", "off"
//! acquire_relay = "auto"        # hold a relay: "auto" (once verified not
//!                               # reachable), "on", "off"
//! hole_punching = true          # upgrade relayed connections to direct
//! port_mapping = true           # ask the router to forward our port
//!                               # (PCP, NAT-PMP, UPnP-IGD)
//! event_log = true              # write <data dir>/events.jsonl (`reach events`)
//! port_mapping_gateway = "192.168.1.1"  # the router to ask (default: the
//!                               # routing table's, if on a private network)
//! pq = "prefer"                  # post-quantum key exchange (X25519MLKEM768):
//!                               # "prefer", "require" (refuse classical
//!                               # peers) or "off" (classical only)
//!
//! [relay_limits]                # the relay service's limits (defaults shown)
//! max_clients = 512
//! reservation_ttl_s = 600
//! bytes_per_sec = 8388608       # per client
//! packets_per_sec = 8192        # per client
//! idle_expiry_s = 120
//!
//! [connection_limits]           # inbound connection limits (defaults shown)
//! max_inbound = 1024            # at once, handshaking or established
//! max_per_ip = 32
//! max_per_prefix = 128          # per /24 (IPv4) or /48 (IPv6)
//! max_handshakes = 256          # in flight
//! silent_timeout_s = 10         # close inbound connections that carry nothing
//! max_idle_peers = 1024         # peer-table entries without a connection
//! limit_loopback = false        # apply per-IP/prefix limits to loopback too
//!
//! [store_limits]                # DHT records stored for others (defaults shown)
//! max_per_source = 4096         # per sending network (/24, /48)
//! max_per_source_per_key = 64   # per sending network at one key
//!
//! [topic_limits]                # as a topic home, for its members' messages
//! rate_per_topic = 500          # messages a second per topic
//! rate_per_publisher = 100      # messages a second per publisher per topic
//! link_idle_grace_s = 30        # close a federation link sharing no topic this long
//!
//! [topic_federation]            # as a topic home, beyond what the DHT finds
//! peers = ["<peer id>"]         # homes to stay linked with (redialed 5 s → 300 s)
//! trusted = ["<peer id>"]       # homes trusted with the private topics
//! private_topics = ["ops"]      # never in the DHT, only on links to trusted homes
//! ```
//!
//! Every key is optional. Unknown keys are an error, so a typo never silently
//! falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Largest config file read: a config is a few lines; a huge file is a mistake.
const MAX_CONFIG_LEN: u64 = 1024 * 1024;

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub api_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub bootstrap: Vec<SocketAddr>,
    pub dht_mode: Option<reach::DhtMode>,
    pub relay: Option<reach::RelayMode>,
    pub acquire_relay: Option<reach::RelayMode>,
    pub hole_punching: Option<bool>,
    pub port_mapping: Option<bool>,
    pub port_mapping_gateway: Option<std::net::IpAddr>,
    pub pq: Option<reach::PostQuantum>,
    pub relay_limits: Option<RelayLimitsConfig>,
    pub connection_limits: Option<ConnectionLimitsConfig>,
    pub store_limits: Option<StoreLimitsConfig>,
    pub topic_limits: Option<TopicLimitsConfig>,
    pub topic_federation: Option<TopicFederationConfig>,
    /// Whether the node writes `<data dir>/events.jsonl` (default true).
    pub event_log: Option<bool>,
}

/// `[store_limits]`: the store-fairness limits, every key optional,
/// defaults from `reach::StoreLimits`.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreLimitsConfig {
    pub max_per_source: Option<usize>,
    pub max_per_source_per_key: Option<usize>,
}

impl StoreLimitsConfig {
    pub fn to_limits(&self) -> reach::StoreLimits {
        let d = reach::StoreLimits::default();
        reach::StoreLimits {
            max_per_source: self.max_per_source.unwrap_or(d.max_per_source),
            max_per_source_per_key: self
                .max_per_source_per_key
                .unwrap_or(d.max_per_source_per_key),
            ..d
        }
    }
}

/// `[topic_limits]`: a topic home's rate limits, every key optional,
/// defaults from `reach::TopicLimits` (the node refuses 0).
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TopicLimitsConfig {
    pub rate_per_topic: Option<u64>,
    pub rate_per_publisher: Option<u64>,
    pub link_idle_grace_s: Option<u64>,
}

impl TopicLimitsConfig {
    pub fn to_limits(&self) -> reach::TopicLimits {
        let d = reach::TopicLimits::default();
        reach::TopicLimits {
            topic_rate: self.rate_per_topic.unwrap_or(d.topic_rate),
            publisher_rate: self.rate_per_publisher.unwrap_or(d.publisher_rate),
            link_idle_grace: self
                .link_idle_grace_s
                .map_or(d.link_idle_grace, std::time::Duration::from_secs),
        }
    }
}

/// `[topic_federation]`: configured federation of a topic home, every key
/// optional (empty lists). Peer ids are checked as the file is read; the
/// node checks the topic names and the number of homes.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TopicFederationConfig {
    #[serde(default)]
    pub peers: Vec<reach::PeerId>,
    #[serde(default)]
    pub trusted: Vec<reach::PeerId>,
    #[serde(default)]
    pub private_topics: Vec<String>,
}

impl TopicFederationConfig {
    pub fn to_federation(&self) -> reach::TopicFederation {
        reach::TopicFederation {
            peers: self.peers.clone(),
            trusted: self.trusted.clone(),
            private_topics: self.private_topics.clone(),
        }
    }
}

/// `[connection_limits]`: every key optional, defaults from
/// `reach::ConnectionLimits`.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimitsConfig {
    pub max_inbound: Option<usize>,
    pub max_per_ip: Option<usize>,
    pub max_per_prefix: Option<usize>,
    pub max_handshakes: Option<usize>,
    pub silent_timeout_s: Option<u64>,
    pub max_idle_peers: Option<usize>,
    pub limit_loopback: Option<bool>,
}

impl ConnectionLimitsConfig {
    pub fn to_limits(&self) -> reach::ConnectionLimits {
        let d = reach::ConnectionLimits::default();
        reach::ConnectionLimits {
            max_inbound: self.max_inbound.unwrap_or(d.max_inbound),
            max_per_ip: self.max_per_ip.unwrap_or(d.max_per_ip),
            max_per_prefix: self.max_per_prefix.unwrap_or(d.max_per_prefix),
            max_handshakes: self.max_handshakes.unwrap_or(d.max_handshakes),
            silent_timeout: self
                .silent_timeout_s
                .map_or(d.silent_timeout, std::time::Duration::from_secs),
            max_idle_peers: self.max_idle_peers.unwrap_or(d.max_idle_peers),
            limit_loopback: self.limit_loopback.unwrap_or(d.limit_loopback),
        }
    }
}

/// `[relay_limits]`: every key optional, defaults from `reach::RelayLimits`.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RelayLimitsConfig {
    pub max_clients: Option<usize>,
    pub reservation_ttl_s: Option<u64>,
    pub bytes_per_sec: Option<u64>,
    pub packets_per_sec: Option<u64>,
    pub idle_expiry_s: Option<u64>,
}

impl RelayLimitsConfig {
    pub fn to_limits(&self) -> reach::RelayLimits {
        let d = reach::RelayLimits::default();
        let secs = std::time::Duration::from_secs;
        reach::RelayLimits {
            max_clients: self.max_clients.unwrap_or(d.max_clients),
            reservation_ttl: self.reservation_ttl_s.map_or(d.reservation_ttl, secs),
            bytes_per_sec: self.bytes_per_sec.unwrap_or(d.bytes_per_sec),
            packets_per_sec: self.packets_per_sec.unwrap_or(d.packets_per_sec),
            idle_expiry: self.idle_expiry_s.map_or(d.idle_expiry, secs),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        anyhow::ensure!(
            meta.len() <= MAX_CONFIG_LEN,
            "config file {} is {} bytes; the limit is {MAX_CONFIG_LEN}",
            path.display(),
            meta.len()
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_keys() {
        let c = Config::parse(
            "listen = \"127.0.0.1:5000\"\napi_listen = \"127.0.0.1:5001\"\ndata_dir = \"/tmp/x\"\nbootstrap = [\"127.0.0.1:9\"]\ndht_mode = \"client\"\n",
        )
        .unwrap();
        assert_eq!(c.bootstrap, vec!["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(c.dht_mode, Some(reach::DhtMode::Client));
        assert_eq!(c.listen, Some("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(c.api_listen, Some("127.0.0.1:5001".parse().unwrap()));
        assert_eq!(c.data_dir, Some(PathBuf::from("/tmp/x")));
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let err = Config::parse("lisen = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        assert!(Config::parse("listen = \"not an address\"").is_err());
        assert!(Config::parse("listen = 5").is_err());
        assert!(Config::parse("dht_mode = \"sometimes\"").is_err());
        assert!(Config::parse("relay = \"maybe\"").is_err());
        assert!(Config::parse("[relay_limits]\nmax_client = 3").is_err());
    }

    #[test]
    fn relay_settings_parse_and_default() {
        let c = Config::parse(
            "relay = \"off\"\nacquire_relay = \"on\"\nhole_punching = false\nport_mapping = false\nport_mapping_gateway = \"10.0.0.1\"\npq = \"require\"\n[relay_limits]\nmax_clients = 3\nidle_expiry_s = 9\n",
        )
        .unwrap();
        assert_eq!(c.relay, Some(reach::RelayMode::Off));
        assert_eq!(c.acquire_relay, Some(reach::RelayMode::On));
        assert_eq!(c.hole_punching, Some(false));
        assert_eq!(c.port_mapping, Some(false));
        assert_eq!(c.port_mapping_gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(c.pq, Some(reach::PostQuantum::Require));
        let l = c.relay_limits.unwrap().to_limits();
        assert_eq!(l.max_clients, 3);
        assert_eq!(l.idle_expiry, std::time::Duration::from_secs(9));
        assert_eq!(l.bytes_per_sec, reach::RelayLimits::default().bytes_per_sec);
    }

    #[test]
    fn connection_limits_parse_and_default() {
        let c = Config::parse(
            "[connection_limits]\nmax_per_ip = 4\nsilent_timeout_s = 3\nlimit_loopback = true\n",
        )
        .unwrap();
        let l = c.connection_limits.unwrap().to_limits();
        assert_eq!(l.max_per_ip, 4);
        assert_eq!(l.silent_timeout, std::time::Duration::from_secs(3));
        assert!(l.limit_loopback);
        let d = reach::ConnectionLimits::default();
        assert_eq!(l.max_inbound, d.max_inbound);
        assert_eq!(l.max_idle_peers, d.max_idle_peers);
        assert!(Config::parse("[connection_limits]\nmax_per_pi = 3").is_err());
    }

    #[test]
    fn topic_limits_parse_and_default() {
        let c = Config::parse("[topic_limits]\nrate_per_topic = 2000\n").unwrap();
        let l = c.topic_limits.unwrap().to_limits();
        assert_eq!(l.topic_rate, 2000);
        assert_eq!(
            l.publisher_rate,
            reach::TopicLimits::default().publisher_rate
        );
        assert_eq!(
            l.link_idle_grace,
            reach::TopicLimits::default().link_idle_grace
        );
        let c = Config::parse("[topic_limits]\nlink_idle_grace_s = 120\n").unwrap();
        let l = c.topic_limits.unwrap().to_limits();
        assert_eq!(l.link_idle_grace, std::time::Duration::from_secs(120));
        assert!(Config::parse("[topic_limits]\nlink_idle_grace = 3").is_err());
        assert!(Config::parse("[topic_limits]\nrate = 3").is_err());
        assert!(Config::parse("[topic_limits]\nrate_per_topic = -1").is_err());
    }

    #[test]
    fn topic_federation_parses_peer_ids_and_refuses_a_bad_one_naming_it() {
        let a = reach::Keypair::generate().peer_id();
        let b = reach::Keypair::generate().peer_id();
        let c = Config::parse(&format!(
            "[topic_federation]\npeers = [\"{a}\", \"{b}\"]\ntrusted = [\"{a}\"]\nprivate_topics = [\"ops\"]\n"
        ))
        .unwrap();
        let f = c.topic_federation.unwrap().to_federation();
        assert_eq!(f.peers, vec![a, b]);
        assert_eq!(f.trusted, vec![a]);
        assert_eq!(f.private_topics, vec!["ops".to_string()]);
        let empty = Config::parse("[topic_federation]\n").unwrap();
        assert_eq!(
            empty.topic_federation.unwrap().to_federation(),
            Default::default()
        );
        let err = Config::parse("[topic_federation]\npeers = [\"not-a-peer\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("peers"), "{err:#}");
        assert!(Config::parse("[topic_federation]\npeer = []\n").is_err());
    }

    #[test]
    fn store_limits_parse_and_default() {
        let c = Config::parse("[store_limits]\nmax_per_source = 100\n").unwrap();
        let l = c.store_limits.unwrap().to_limits();
        assert_eq!(l.max_per_source, 100);
        let d = reach::StoreLimits::default();
        assert_eq!(l.max_per_source_per_key, d.max_per_source_per_key);
        assert_eq!(l.max_records, d.max_records);
        assert!(Config::parse("[store_limits]\nmax_per_sauce = 3").is_err());
        assert!(Config::parse("[store_limits]\nmax_records = 3").is_err());
        assert!(Config::parse("[store_limits]\nmax_per_source_per_key = -1").is_err());
        assert!(Config::parse("[connection_limits]\nmax_per_ip = -1").is_err());
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Config::load(Path::new("/nonexistent/reach.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/reach.toml"));
    }
}
