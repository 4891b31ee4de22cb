//! The node's TOML config file.
//!
//! ```toml
//! listen = "0.0.0.0:4433"       # UDP address for QUIC + control packets
//! api_listen = "127.0.0.1:0"    # control API (loopback only)
//! data_dir = "/var/lib/reach"   # identity key and API token
//! bootstrap = ["198.51.100.7:4433"]  # nodes to join the DHT through
//! dht_mode = "server"           # or "client": use the DHT, don't serve it
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
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Config::load(Path::new("/nonexistent/reach.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/reach.toml"));
    }
}
