//! Network namespaces and what runs in them.

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Programs the lab needs, with the Debian package that provides each.
pub const REQUIRED_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("tc", "iproute2"),
    ("turnserver", "coturn"),
    ("turnutils_stunclient", "coturn"),
];

/// Why the lab cannot run or a step failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "the NAT lab needs root (network namespaces, nftables); run as root or skip the lab tests"
    )]
    NotRoot,
    #[error(
        "the NAT lab needs `{tool}` (Debian package {package}); install it: apt-get install {package}"
    )]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error(
        "this kernel has no tc netem (CONFIG_NET_SCH_NETEM is not set), so the lab cannot add delay; run with a delay of 0"
    )]
    NoNetem,
    #[error("lab command failed: {command}: {output}")]
    Command { command: String, output: String },
    #[error("lab I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("lab node: {0}")]
    Node(#[from] reach::Error),
    #[error("lab: {0}")]
    Other(String),
}

impl LabError {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            LabError::NotRoot => "lab_not_root",
            LabError::MissingTool { .. } => "lab_missing_tool",
            LabError::NoNetem => "lab_no_netem",
            LabError::Command { .. } => "lab_command",
            LabError::Io(_) => "lab_io",
            LabError::Node(_) => "lab_node",
            LabError::Other(_) => "lab_other",
        }
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(tool).is_file())
}

/// Checks that the lab can run here: root and every required tool.
pub fn check_prerequisites() -> Result<(), LabError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    for (tool, package) in REQUIRED_TOOLS {
        if !which(tool) {
            return Err(LabError::MissingTool { tool, package });
        }
    }
    Ok(())
}

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A lab run: the namespaces and processes it created. Dropping it tears
/// everything down.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    links: u32,
}

impl Lab {
    /// Starts a run with a fresh prefix (unique per process and run).
    pub fn new() -> Result<Lab, LabError> {
        check_prerequisites()?;
        let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() ^ (n << 16)) & 0xfffff;
        Ok(Lab {
            prefix: format!("rl{id:05x}"),
            namespaces: Vec::new(),
            children: Vec::new(),
            links: 0,
        })
    }

    /// The namespace name for `role` in this run.
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// Runs a command, failing with its output if it fails.
    pub fn run(&self, args: &[&str]) -> Result<String, LabError> {
        let out = Command::new(args[0]).args(&args[1..]).output()?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: args.join(" "),
                output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Runs a command inside namespace `ns`.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<String, LabError> {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        self.run(&full)
    }

    /// Creates namespace `role` (loopback up) and returns its name.
    pub fn add_ns(&mut self, role: &str) -> Result<String, LabError> {
        let ns = self.ns(role);
        self.run(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        self.run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Joins `a` and `b` with a veth pair named `a_if` / `b_if` inside them;
    /// `a_addr` / `b_addr` are CIDR addresses or empty (e.g. a bridge port).
    pub fn veth(
        &mut self,
        a: &str,
        a_if: &str,
        a_addr: &str,
        b: &str,
        b_if: &str,
        b_addr: &str,
    ) -> Result<(), LabError> {
        self.links += 1;
        let ta = format!("{}{}a", self.prefix, self.links);
        let tb = format!("{}{}b", self.prefix, self.links);
        self.run(&[
            "ip", "link", "add", &ta, "type", "veth", "peer", "name", &tb,
        ])?;
        for (tmp, ns, name, addr) in [(&ta, a, a_if, a_addr), (&tb, b, b_if, b_addr)] {
            self.run(&["ip", "link", "set", tmp, "netns", ns])?;
            self.run(&["ip", "-n", ns, "link", "set", tmp, "name", name])?;
            if !addr.is_empty() {
                self.run(&["ip", "-n", ns, "addr", "add", addr, "dev", name])?;
            }
            self.run(&["ip", "-n", ns, "link", "set", name, "up"])?;
        }
        Ok(())
    }

    /// Loads an nftables ruleset into namespace `ns`.
    pub fn nft(&self, ns: &str, ruleset: &str) -> Result<(), LabError> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(ruleset.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("nft -f - in {ns}:\n{ruleset}"),
                output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Adds `delay_ms` of one-way delay on `dev` in `ns` (tc netem).
    pub fn netem(&self, ns: &str, dev: &str, delay_ms: u32) -> Result<(), LabError> {
        if delay_ms == 0 {
            return Ok(());
        }
        let delay = format!("{delay_ms}ms");
        match self.run(&[
            "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay",
            &delay,
        ]) {
            Ok(_) => Ok(()),
            Err(LabError::Command { output, .. }) if output.contains("qdisc kind is unknown") => {
                Err(LabError::NoNetem)
            }
            Err(e) => Err(e),
        }
    }

    /// Starts a long-running program in `ns`; it is killed at teardown.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> Result<(), LabError> {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.children.push(child);
        Ok(())
    }

    /// Binds a UDP socket inside namespace `ns`. The socket stays in that
    /// namespace whatever thread uses it later, so a reach node in this
    /// process can live "behind" a lab router.
    pub fn udp_socket(&self, ns: &str, addr: SocketAddr) -> Result<UdpSocket, LabError> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || -> std::io::Result<UdpSocket> {
            enter(&path)?;
            UdpSocket::bind(addr)
        })
        .join()
        .map_err(|_| LabError::Other("socket thread panicked".into()))?
        .map_err(LabError::Io)
    }

    /// Binds a TCP listener inside namespace `ns` (see [`Lab::udp_socket`]).
    pub fn tcp_listener(
        &self,
        ns: &str,
        addr: SocketAddr,
    ) -> Result<std::net::TcpListener, LabError> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || -> std::io::Result<std::net::TcpListener> {
            enter(&path)?;
            std::net::TcpListener::bind(addr)
        })
        .join()
        .map_err(|_| LabError::Other("socket thread panicked".into()))?
        .map_err(LabError::Io)
    }

    /// A connector that opens TCP connections from inside namespace `ns`
    /// (each on a fresh thread that enters the namespace and exits after).
    pub fn tcp_connector(&self, ns: &str) -> reach::tcp::Connector {
        let path = format!("/var/run/netns/{ns}");
        std::sync::Arc::new(move |to: SocketAddr| {
            let path = path.clone();
            std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
                enter(&path)?;
                std::net::TcpStream::connect_timeout(&to, TCP_CONNECT_TIMEOUT)
            })
            .join()
            .map_err(|_| std::io::Error::other("socket thread panicked"))?
        })
    }

    /// Opens UDP sockets inside namespace `ns` (for a node's hole punching:
    /// see `NodeBuilder::udp_binder`).
    pub fn udp_binder(&self, ns: &str) -> reach::punch::UdpBinder {
        let path = format!("/var/run/netns/{ns}");
        std::sync::Arc::new(move |addr: SocketAddr, count: usize| {
            let path = path.clone();
            std::thread::spawn(move || {
                enter(&path)?;
                reach::punch::bind_here(addr, count)
            })
            .join()
            .map_err(|_| std::io::Error::other("socket thread panicked"))?
        })
    }

    /// Tears everything down now (also done on drop).
    pub fn teardown(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// For the lab's tests: whether the lab can run here. When it cannot, the
/// reason is printed and the test should pass without running, unless
/// `REACH_LAB_REQUIRED=1` (CI), where this panics with the reason.
pub fn lab_available_for_tests() -> bool {
    match check_prerequisites() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("REACH_LAB_REQUIRED").as_deref() == Ok("1") {
                panic!("the NAT lab is required here but cannot run: {e}");
            }
            eprintln!("skipping the NAT lab: {e}");
            false
        }
    }
}

/// How long a lab TCP connect may take.
const TCP_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Moves the calling thread into the network namespace at `path`. Only ever
/// called on a fresh, short-lived thread that ends right after its one
/// socket call.
fn enter(path: &str) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: setns on a namespace fd affects only the calling thread,
    // which is a fresh thread that exits right after creating its socket.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
