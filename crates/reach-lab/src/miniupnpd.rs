//! miniupnpd on a lab router: the real port-mapping daemon home routers run
//! (Debian's `miniupnpd-nftables` 2.3.1), answering exactly one of UPnP-IGD,
//! NAT-PMP or PCP on the router's LAN side.
//!
//! The router's nftables layout is [`crate::nat::MINIUPNPD_CHAINS`]: a
//! table `inet miniupnpd` whose chains miniupnpd fills (DNAT in
//! `prerouting_miniupnpd`, accept rules and IPv6 pinholes in `miniupnpd`).
//! What miniupnpd does (measured here; docs/nat-lab.md has the details):
//! it leaves its rules in place on SIGTERM and writes them to its lease
//! file, from which the next start reloads them, so [`MiniUpnpd::restart`]
//! (a router reboot) flushes both; at start it sends a PCP ANNOUNCE
//! (epoch 0) to 224.0.0.1:5350 and SSDP NOTIFYs, but no NAT-PMP
//! external-address announcement; its epoch is seconds since its start.

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reach_proto::nat::portmap::Protocol;

use crate::netns::{Lab, LabError};

/// The port-mapping protocol a lab router answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortMapProtocol {
    /// UPnP-IGD (SSDP discovery, SOAP control), `enable_upnp=yes`.
    Upnp,
    /// NAT-PMP (RFC 6886): UDP 5351, version 0.
    Natpmp,
    /// PCP (RFC 6887): UDP 5351, version 2.
    Pcp,
}

impl PortMapProtocol {
    /// Stable lower-case name, as the lab kinds are named.
    pub fn name(&self) -> &'static str {
        match self {
            PortMapProtocol::Upnp => "upnp",
            PortMapProtocol::Natpmp => "natpmp",
            PortMapProtocol::Pcp => "pcp",
        }
    }
}

/// One mapping that forwards right now, read from miniupnpd's nftables
/// chains: an IPv4 DNAT rule, or an IPv6 pinhole (no translation: the
/// external port is the internal one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouterMapping {
    pub protocol: Protocol,
    /// The port on the router's WAN address (IPv4) or the pinhole's port.
    pub external_port: u16,
    /// Where packets to it go.
    pub internal: SocketAddr,
}

/// The nftables table miniupnpd manages on a lab router.
pub const TABLE: &str = "miniupnpd";
/// miniupnpd's filter chain (accept rules, IPv6 pinholes).
pub const FORWARD_CHAIN: &str = "miniupnpd";
/// miniupnpd's DNAT chain.
pub const NAT_CHAIN: &str = "prerouting_miniupnpd";
/// miniupnpd's SNAT chain (unused by plain mappings; flushed with the rest).
pub const NAT_POSTROUTING_CHAIN: &str = "postrouting_miniupnpd";

/// UDP port of NAT-PMP and PCP servers (RFC 6886, RFC 6887).
pub const PORTMAP_SERVER_PORT: u16 = 5351;
/// UDP port of SSDP.
pub const SSDP_PORT: u16 = 1900;
/// miniupnpd's HTTP (UPnP description and SOAP control) port. Fixed, not
/// miniupnpd's random default, so that `start` can tell when it listens.
/// Clients still find it by SSDP (the LOCATION header).
pub const UPNP_HTTP_PORT: u16 = 5000;

/// How long miniupnpd may take to listen after being started (it does so in
/// a few ms here; a loaded 2-core CI machine gets a wide margin).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long miniupnpd gets to exit after SIGTERM before it is killed (it
/// exits in a few ms: it only writes its lease file).
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often `start` / `stop` look again.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// The settings a lab miniupnpd starts with. Changes apply at the next
/// `start` / `restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MiniUpnpdConfig {
    /// `min_lifetime`: the shortest lease granted (PCP and NAT-PMP; a
    /// request for less gets this). miniupnpd's default is 120 s; the lab's
    /// tests ask for leases of a few seconds to see renewals, and 2 s is
    /// reach's own `lifecycle::MIN_LIFETIME`.
    pub min_lifetime_secs: u32,
    /// `max_lifetime`: the longest lease granted. One hour: reach's default
    /// lease (`lifecycle::DEFAULT_LIFETIME`), so a default request is
    /// granted as asked; lower it to force short leases on any client.
    pub max_lifetime_secs: u32,
    /// `notify_interval`: seconds between SSDP NOTIFY rounds (miniupnpd's
    /// default, 30 s; it also sends a round at start).
    pub notify_interval_secs: u32,
    /// `ext_ip`: the external address miniupnpd reports instead of its WAN
    /// interface's: a router that lies (or sits behind another NAT).
    /// `None`: the truth.
    pub ext_ip: Option<Ipv4Addr>,
}

impl Default for MiniUpnpdConfig {
    fn default() -> Self {
        MiniUpnpdConfig {
            min_lifetime_secs: 2,
            max_lifetime_secs: 3600,
            notify_interval_secs: 30,
            ext_ip: None,
        }
    }
}

/// miniupnpd in a lab router namespace. Its config, lease files, pid file
/// and log live in a directory of the system temp dir named after the
/// router namespace (unique per lab run), removed on drop. Dropping it
/// stops miniupnpd (SIGTERM, then SIGKILL after [`STOP_GRACE`]), also when
/// a test panics; a [`crate::nat::Site`] that owns one is dropped before
/// its [`Lab`] when declared after it.
pub struct MiniUpnpd {
    router_ns: String,
    protocol: PortMapProtocol,
    lan_ip: Ipv4Addr,
    lan_ip6: Option<Ipv6Addr>,
    /// Settings used at the next start.
    pub config: MiniUpnpdConfig,
    dir: PathBuf,
    child: Option<Child>,
}

/// Checks that miniupnpd is installed.
pub fn check_miniupnpd() -> Result<(), LabError> {
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin"]
        .iter()
        .any(|d| Path::new(d).join("miniupnpd").is_file());
    if found {
        Ok(())
    } else {
        Err(LabError::MissingTool {
            tool: "miniupnpd",
            package: "miniupnpd-nftables",
        })
    }
}

impl MiniUpnpd {
    /// A stopped miniupnpd for router namespace `router_ns`, whose LAN
    /// interface `lan` has `lan_ip` (WAN interface `wan`).
    pub fn new(
        router_ns: &str,
        protocol: PortMapProtocol,
        lan_ip: IpAddr,
    ) -> Result<MiniUpnpd, LabError> {
        check_miniupnpd()?;
        let IpAddr::V4(lan_ip) = lan_ip else {
            return Err(LabError::Other(
                "miniupnpd needs the router's IPv4 LAN address".into(),
            ));
        };
        let dir = std::env::temp_dir().join(format!("{router_ns}-miniupnpd"));
        std::fs::create_dir_all(&dir)?;
        Ok(MiniUpnpd {
            router_ns: router_ns.to_string(),
            protocol,
            lan_ip,
            lan_ip6: None,
            config: MiniUpnpdConfig::default(),
            dir,
            child: None,
        })
    }

    /// The protocol this router answers.
    pub fn protocol(&self) -> PortMapProtocol {
        self.protocol
    }

    /// The router's LAN address (where clients send their requests).
    pub fn lan_ip(&self) -> IpAddr {
        IpAddr::V4(self.lan_ip)
    }

    /// The router's LAN IPv6 address, if miniupnpd listens on IPv6.
    pub fn lan_ip6(&self) -> Option<Ipv6Addr> {
        self.lan_ip6
    }

    /// Makes miniupnpd listen on `lan_ip6` too (`ipv6_listening_ip`), from
    /// the next start; `None` runs it IPv4-only (`ipv6_disable=yes`).
    pub fn set_lan_ip6(&mut self, lan_ip6: Option<Ipv6Addr>) {
        self.lan_ip6 = lan_ip6;
    }

    /// The router namespace.
    pub fn router_ns(&self) -> &str {
        &self.router_ns
    }

    /// miniupnpd's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything miniupnpd logged (`-d`: debug level, to stderr) since the
    /// site was built, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn conf_path(&self) -> PathBuf {
        self.dir.join("miniupnpd.conf")
    }
    fn log_path(&self) -> PathBuf {
        self.dir.join("miniupnpd.log")
    }
    fn lease_paths(&self) -> [PathBuf; 2] {
        [self.dir.join("leases"), self.dir.join("leases6")]
    }

    /// The config file's text.
    pub fn config_text(&self) -> String {
        let (upnp, natpmp) = match self.protocol {
            PortMapProtocol::Upnp => ("yes", "no"),
            // enable_natpmp answers PCP too; the router's nftables drop the
            // other version (nat.rs: only_version).
            PortMapProtocol::Natpmp | PortMapProtocol::Pcp => ("no", "yes"),
        };
        let [lease, lease6] = self.lease_paths();
        let ipv6 = match self.lan_ip6 {
            Some(ip6) => format!("ipv6_listening_ip={ip6}\next_ifname6=wan\n"),
            None => "ipv6_disable=yes\n".to_string(),
        };
        let ext_ip = match self.config.ext_ip {
            Some(ip) => format!("ext_ip={ip}\n"),
            None => String::new(),
        };
        let [a, b, c, _] = self.lan_ip.octets();
        let lan_subnet = format!("{a}.{b}.{c}.0/24");
        let cfg = self.config;
        format!(
            "# reach lab: miniupnpd on router {ns} ({proto} only)
ext_ifname=wan
{ext_ip}listening_ip=lan
{ipv6}http_port={UPNP_HTTP_PORT}
enable_upnp={upnp}
enable_natpmp={natpmp}
upnp_table_name={TABLE}
upnp_nat_table_name={TABLE}
upnp_forward_chain={FORWARD_CHAIN}
upnp_nat_chain={NAT_CHAIN}
upnp_nat_postrouting_chain={NAT_POSTROUTING_CHAIN}
lease_file={lease}
lease_file6={lease6}
min_lifetime={min}
max_lifetime={max}
notify_interval={notify}
secure_mode=yes
system_uptime=no
uuid=fc4ec57e-b051-11db-88f8-0060085db3f6
allow 1024-65535 {lan_subnet} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
",
            ns = self.router_ns,
            proto = self.protocol.name(),
            lease = lease.display(),
            lease6 = lease6.display(),
            min = cfg.min_lifetime_secs,
            max = cfg.max_lifetime_secs,
            notify = cfg.notify_interval_secs,
        )
    }

    /// Starts miniupnpd and returns once it listens (its UDP 5351 socket,
    /// or for UPnP its SSDP and HTTP sockets), at most [`START_TIMEOUT`].
    /// Already running: nothing to do.
    pub fn start(&mut self, _lab: &Lab) -> Result<(), LabError> {
        if self.child.is_some() {
            return Ok(());
        }
        std::fs::write(self.conf_path(), self.config_text())?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let pid_file = self.dir.join("miniupnpd.pid");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router_ns, "miniupnpd", "-d", "-f"])
            .arg(self.conf_path())
            .arg("-P")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.listening(pid) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                return Err(LabError::Other(format!(
                    "miniupnpd in {} exited at start ({status}): {}",
                    self.router_ns,
                    tail(&self.log())
                )));
            }
            if Instant::now() >= deadline {
                self.stop_now();
                return Err(LabError::Other(format!(
                    "miniupnpd in {} did not listen within {START_TIMEOUT:?}: {}",
                    self.router_ns,
                    tail(&self.log())
                )));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// Whether process `pid` is miniupnpd (not still `ip netns exec`) and
    /// has the sockets of its protocol. /proc/<pid>/net shows the sockets of
    /// the process's own network namespace.
    fn listening(&self, pid: u32) -> bool {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "miniupnpd" {
            return false;
        }
        let has = |file: &str, port: u16, state: &str| -> bool {
            ["", "6"].iter().any(|v6| {
                let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}{v6}"))
                    .unwrap_or_default();
                bound(&text, port, state)
            })
        };
        match self.protocol {
            PortMapProtocol::Upnp => {
                has("udp", SSDP_PORT, "07") && has("tcp", UPNP_HTTP_PORT, "0A")
            }
            PortMapProtocol::Natpmp | PortMapProtocol::Pcp => has("udp", PORTMAP_SERVER_PORT, "07"),
        }
    }

    /// Stops miniupnpd: SIGTERM, at most [`STOP_GRACE`] to exit, then
    /// SIGKILL. Its rules stay (as miniupnpd leaves them) and so does its
    /// lease file.
    pub fn stop(&mut self, _lab: &Lab) -> Result<(), LabError> {
        self.stop_now();
        Ok(())
    }

    fn stop_now(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on our own child's pid, which we have not
            // reaped yet (so it cannot have been reused).
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(POLL_EVERY),
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A router reboot: miniupnpd killed (SIGKILL), every mapping forgotten (its
    /// chains flushed, its lease files removed), started again: its epoch
    /// restarts from 0 and it sends its start announcements.
    pub fn restart(&mut self, lab: &Lab) -> Result<(), LabError> {
        // A reboot is no clean shutdown: SIGKILL. (SIGTERM can also wait
        // out miniupnpd's select timeout, seconds, when it lands just
        // before the select.)
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.flush(lab)?;
        for lease in self.lease_paths() {
            match std::fs::remove_file(&lease) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.start(lab)
    }

    /// The router's table flushed under a running miniupnpd: its chains
    /// emptied, so nothing forwards any more (miniupnpd reads its chains
    /// back, so it forgets those mappings too).
    pub fn flush(&self, lab: &Lab) -> Result<(), LabError> {
        for chain in [FORWARD_CHAIN, NAT_CHAIN, NAT_POSTROUTING_CHAIN] {
            lab.exec(
                &self.router_ns,
                &["nft", "flush", "chain", "inet", TABLE, chain],
            )?;
        }
        Ok(())
    }

    /// The mappings that forward right now, read from miniupnpd's chains:
    /// its IPv4 DNAT rules and its IPv6 pinholes.
    pub fn mappings(&self, lab: &Lab) -> Result<Vec<RouterMapping>, LabError> {
        let list = |chain: &str| {
            lab.exec(
                &self.router_ns,
                &["nft", "list", "chain", "inet", TABLE, chain],
            )
        };
        let mut out = parse_dnat_rules(&list(NAT_CHAIN)?);
        out.extend(parse_pinholes(&list(FORWARD_CHAIN)?));
        Ok(out)
    }
}

impl Drop for MiniUpnpd {
    fn drop(&mut self) {
        self.stop_now();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a /proc/net/{udp,tcp}[6] table has a socket bound to local
/// `port` in `state` (hex, as the kernel prints it: 07 unconnected UDP,
/// 0A listening TCP).
fn bound(table: &str, port: u16, state: &str) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(st)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return false;
        };
        local.ends_with(&want) && st == state
    })
}

/// The last lines of a log, for an error message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// The value after token `key` in a rule.
fn after<'a>(tokens: &[&'a str], key: &str) -> Option<&'a str> {
    tokens
        .iter()
        .position(|t| *t == key)
        .and_then(|i| tokens.get(i + 1).copied())
}

/// The transport protocol of a miniupnpd rule: a raw match on the IP
/// header's protocol byte (`@nh,72,8` IPv4, `@nh,48,8` IPv6 next header),
/// or an `l4proto` / `udp` / `tcp` keyword.
fn rule_protocol(tokens: &[&str]) -> Option<Protocol> {
    let raw = after(tokens, "@nh,72,8").or_else(|| after(tokens, "@nh,48,8"));
    if let Some(hex) = raw {
        let n = u8::from_str_radix(hex.trim_start_matches("0x"), 16).ok()?;
        return Protocol::from_iana_number(n);
    }
    if tokens.contains(&"udp") {
        Some(Protocol::Udp)
    } else if tokens.contains(&"tcp") {
        Some(Protocol::Tcp)
    } else {
        None
    }
}

/// miniupnpd's IPv4 DNAT rules, as `nft list chain` prints them, e.g.
/// `iif "wan" @nh,72,8 0x11 th dport 40000 dnat ip to 10.1.0.2:40000`.
fn parse_dnat_rules(listing: &str) -> Vec<RouterMapping> {
    listing
        .lines()
        .filter(|l| l.contains(" dnat "))
        .filter_map(|line| {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            let protocol = rule_protocol(&tokens)?;
            let external_port = after(&tokens, "dport")?.parse().ok()?;
            let internal: SocketAddr = after(&tokens, "to")?.parse().ok()?;
            Some(RouterMapping {
                protocol,
                external_port,
                internal,
            })
        })
        .collect()
}

/// miniupnpd's IPv6 pinholes in its filter chain, e.g.
/// `iif "wan" th dport 41001 @nh,192,128 0x20010db8…02 @nh,48,8 0x11 accept`
/// (`@nh,192,128`: the destination address). Its IPv4 accept rules (which
/// go with a DNAT rule) match `@nh,128,32` and are not pinholes.
fn parse_pinholes(listing: &str) -> Vec<RouterMapping> {
    listing
        .lines()
        .filter_map(|line| {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            let hex = after(&tokens, "@nh,192,128")?.trim_start_matches("0x");
            let addr = u128::from_str_radix(hex, 16).ok()?;
            let protocol = rule_protocol(&tokens)?;
            let port = after(&tokens, "dport")?.parse().ok()?;
            Some(RouterMapping {
                protocol,
                external_port: port,
                internal: SocketAddr::new(IpAddr::V6(Ipv6Addr::from(addr)), port),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dnat_rules_and_pinholes_as_nft_prints_them() {
        let dnat = "table inet miniupnpd {
	chain prerouting_miniupnpd {
		iif \"wan\" @nh,72,8 0x11 th dport 40000 dnat ip to 10.1.0.2:40000
		iif \"wan\" @nh,72,8 0x6 th dport 40001 dnat ip to 10.1.0.2:40002
	}
}";
        assert_eq!(
            parse_dnat_rules(dnat),
            vec![
                RouterMapping {
                    protocol: Protocol::Udp,
                    external_port: 40000,
                    internal: "10.1.0.2:40000".parse().unwrap(),
                },
                RouterMapping {
                    protocol: Protocol::Tcp,
                    external_port: 40001,
                    internal: "10.1.0.2:40002".parse().unwrap(),
                },
            ]
        );
        let filter = "table inet miniupnpd {
	chain miniupnpd {
		iif \"wan\" th dport 40000 @nh,128,32 0xa010002 @nh,72,8 0x11 accept
		iif \"wan\" th dport 41001 @nh,192,128 0x20010db8000100000000000000000002 @nh,48,8 0x11 accept
	}
}";
        assert_eq!(
            parse_pinholes(filter),
            vec![RouterMapping {
                protocol: Protocol::Udp,
                external_port: 41001,
                internal: "[2001:db8:1::2]:41001".parse().unwrap(),
            }]
        );
        assert!(parse_dnat_rules("table inet miniupnpd {\n}").is_empty());
    }

    #[test]
    fn finds_bound_sockets_in_proc_tables() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 0100010A:14E7 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 0";
        assert!(bound(udp, 5351, "07"));
        assert!(!bound(udp, 1900, "07"));
        assert!(!bound(udp, 5351, "0A"));
    }
}
