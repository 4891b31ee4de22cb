//! Command-line syntax (clap).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use reach::PeerId;

/// reach: reach any peer by its public key.
///
/// Every node has an Ed25519 identity; its public key (52 characters of
/// base32) is its address. Connections are QUIC, mutually authenticated by
/// those keys.
#[derive(Debug, Parser)]
#[command(name = "reach", version, about, long_about)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). REACH_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn log_level(&self) -> &'static str {
        match self.verbose {
            // A daemon's lifecycle (joined, reachability, relay, port
            // mapping) at the default level; commands that run many nodes
            // in this process (demo, lab, bench) only warn.
            0 if matches!(self.command, Command::Node(_)) => "warn,reach=info,reach_cli=info",
            0 => "warn,reach_cli=info",
            1 => "info,reach=debug,reach_cli=debug",
            _ => "debug,reach=trace,reach_cli=trace",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node in the foreground, serving the local control API.
    ///
    /// Received messages are printed to stdout as
    /// `message from <peer>: <text>`, control characters escaped (`\n`,
    /// `\u{1b}`, …) so a message is always one line; `--json` prints one
    /// JSON object per message instead. Programs get the same messages and
    /// events from the control API's `GET /v1/recv` (see `reach recv`).
    /// Stop with Ctrl-C.
    Node(NodeArgs),
    /// Print this node's peer id (creating the identity if needed).
    Id {
        /// Print a ticket instead: one string with the peer id and the
        /// addresses the running node can be reached at (its relay among
        /// them), which `send` accepts wherever it accepts a peer id.
        #[arg(long)]
        ticket: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Show a running node's peer id, addresses and connected peers.
    Status {
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send a message through a running node: text, a file's bytes
    /// (`--file F`) or stdin (`-`), binary-safe up to reach's message limit
    /// (16 MiB).
    Send {
        /// The recipient's peer id, or a ticket (`reach id --ticket`).
        peer: PeerRef,
        /// The message text; `-` reads the message's bytes from stdin.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        message: Option<String>,
        /// Send this file's bytes as the message.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Send durably: the node commits the message to its outbox on disk
        /// (prints its id once it is there) and delivers it when the peer is
        /// reachable, surviving restarts. `critical`: until delivered (or
        /// --ttl); `moderate`: --attempts tries (default 3). Up to 1 MiB.
        #[arg(long, value_name = "CLASS", value_parser = ["critical", "moderate"])]
        durable: Option<String>,
        /// Attempts of a `--durable moderate` message.
        #[arg(long, value_name = "N", requires = "durable")]
        attempts: Option<u32>,
        /// Give a durable message up after this many seconds.
        #[arg(long, value_name = "SECS", requires = "durable")]
        ttl: Option<u64>,
        /// An address to reach the peer at (repeatable), for this send only:
        /// remembered only if the peer answered there. Not needed: without
        /// it the peer is found through the DHT by its id.
        #[arg(long = "addr", value_name = "IP:PORT")]
        addrs: Vec<SocketAddr>,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Look up a peer's published addresses in the DHT, through a running
    /// node.
    Lookup {
        /// The peer id to resolve.
        peer: PeerId,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Classify the NAT in front of a running node (like a netcheck):
    /// external addresses, mapping, filtering, hairpin, and its port
    /// mapping (protocol, external address, lease, renewals). Uses the node's
    /// connected peers as helpers (two at different IPs are needed).
    Nat {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Print what a running node receives: by default the next message,
    /// as `message from <peer>: <text>` (control characters escaped);
    /// `--follow` streams messages and connection events until Ctrl-C.
    Recv(crate::daemon::RecvArgs),
    /// List a running node's durable messages still waiting for their
    /// receivers (`reach send --durable`): id, peer, attempts, age, next try.
    Outbox {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// List a running node's connected peers: id, address, path (direct or
    /// relayed or tcp), RTT.
    Peers {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Print a one-time login URL for the running node's live dashboard
    /// (identity, NAT, connections, relay, DHT, counters; served by its
    /// control API on loopback). The code in the URL works once, within
    /// 60 s; the API token never appears in it.
    Dashboard {
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Round trips to a peer through a running node (the peer's daemon
    /// echoes them); prints each RTT and the path.
    Ping {
        /// The peer to ping: its peer id, or a ticket.
        peer: PeerRef,
        /// Round trips (1 to 20).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=reach::api::daemon::MAX_PING_COUNT as i64))]
        count: u32,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Connect a running node to a peer (found through the DHT, or at
    /// `--addr`).
    Connect {
        /// The peer to connect to: its peer id, or a ticket.
        peer: PeerRef,
        /// An address to reach the peer at (repeatable).
        #[arg(long = "addr", value_name = "IP:PORT")]
        addrs: Vec<SocketAddr>,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// The NAT lab (root only): real kernel NATs in network namespaces.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Show reach at work. As root with the NAT lab's tools: a small lab of
    /// real kernel NATs where nodes dial each other by key directly through
    /// a port mapping, through a relay then punched to direct, and from a
    /// UDP-blocked network. Otherwise (or with --loopback): a network of
    /// nodes on loopback that join a DHT, dial each other by public key
    /// alone, exchange messages and streams. Prints a summary.
    Demo(DemoArgs),
    /// Benchmarks that print JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Chaos runs with real `reach node` processes on loopback that print
    /// JSON and fail unless every check holds.
    #[command(subcommand)]
    Chaos(ChaosCommand),
    /// Print the node's event log (`<data dir>/events.jsonl`: connections,
    /// paths, relays, NAT, punches, start/stop), read from the data dir
    /// whether or not the node runs.
    Events {
        /// Keep printing new events as they are written (follows rotation).
        #[arg(long)]
        follow: bool,
        /// Print the log's JSON lines as they are instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// Publish a message on a topic through a running node: text, a
    /// file's bytes (`--file F`) or stdin (`-`), up to 64 KiB.
    Pub(crate::topics::PubArgs),
    /// Subscribe to a topic through a running node: print its messages and
    /// presence changes until Ctrl-C (or `--count` messages).
    Sub(crate::topics::SubArgs),
    /// List a topic's members known to a running node, with their homes.
    Members(crate::topics::MembersArgs),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Connect-to-first-echoed-byte of fresh dialers on loopback: raw quinn
    /// (server auth only; mutual auth) against reach (pq off; hybrid
    /// post-quantum), interleaved, with the ratios and the negotiated groups.
    Connect {
        /// Fresh dialers per variant.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        dialers: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Direct versus relayed, in one run on loopback: bulk throughput over
    /// one stream, ping round trip, and the relay's forwarding rate on one
    /// core (the relay runs on its own single-threaded runtime). Hole
    /// punching is off; fails unless the relay forwarded every relayed bulk
    /// byte and each path stayed as measured.
    Relay {
        /// MiB per bulk transfer.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=4096))]
        mib: u64,
        /// Bulk transfers per path (alternating direct and relayed; the
        /// median is reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        /// Pings per path.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        pings: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A handshake flood and an identity churn from one host against a
    /// `reach node` process on loopback, while an honest peer at another
    /// address keeps sending: accepted/refused, the target's RSS before,
    /// at peak and after, the honest messages' delivery and latency.
    /// Fails unless the targets are met (peak RSS ≤ 256 MiB, final RSS
    /// within 20% of before, every honest message delivered, p99 ≤ 1 s).
    Flood {
        /// Fresh-identity handshakes, held open while the flood runs.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        handshakes: u64,
        /// Fresh identities that connect and close at once.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
        churn: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The durable outbox's store on this disk: enqueue-to-durable latency
    /// one at a time (target p99 ≤ 5 ms), throughput of many concurrent
    /// enqueuers with group commit (target ≥ 10,000 msgs/s), and the
    /// store-side drain rate; checks the file holds what was enqueued.
    /// Then two real nodes on loopback: the drain of a backlog to a peer
    /// that returns (target ≥ 5,000 msgs/s) and the time from "peer
    /// reachable" to the first resend received (target ≤ 1 RTT + 100 ms).
    Outbox {
        /// Messages enqueued one at a time.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        single: u32,
        /// Messages enqueued concurrently (then drained).
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=60_000))]
        messages: u32,
        /// Concurrent enqueuers.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        concurrency: u32,
        /// Payload bytes per message.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
        size: u64,
        /// Directory for the outbox file (default: a fresh one in the system
        /// temp dir, removed afterwards). fsync cost depends on its disk.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Backlog of the end-to-end drain: two nodes on loopback, the
        /// messages committed while the receiver is down, then it returns
        /// (target ≥ 5,000 msgs/s).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=16_384))]
        backlog: u32,
        /// Trials of "peer reachable" to first resend received (target ≤ 1
        /// RTT + 100 ms at p99).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        resend_trials: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Topics on loopback: one home forwarding 100-byte messages from
    /// several publishing members to a subscriber (target ≥ 100,000
    /// msgs/s), the latency one federation hop adds (target p99 ≤ 1 ms),
    /// and a quiet topic's p99 while another topic of the same home is
    /// flooded at over 10× its rate limit (target within +10%). Exits
    /// non-zero while a target is missed.
    Topics {
        /// Messages each of the 8 publishers sends in the end-to-end
        /// forwarding run (each of the saturation run's sends 10× this).
        #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        messages: u64,
        /// Messages timed one at a time in the hop and flood runs.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        latency_messages: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The flooders of `reach bench topics`, a process of their own:
    /// members of one home flooding a topic while told to on stdin.
    #[command(hide = true)]
    TopicsFlooder {
        /// The home's peer id.
        #[arg(long)]
        home_id: reach::PeerId,
        /// The home's address.
        #[arg(long)]
        home_addr: std::net::SocketAddr,
        /// The topic to flood.
        #[arg(long)]
        topic: String,
        /// Flooding members.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
        members: u64,
        /// Publishes offered per second, all members together.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        rate: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Durable messages through kill -9: daemons A and B on loopback, A
    /// commits critical messages for B through its API while B is stopped
    /// and killed and A is killed at random, each restarted on its data
    /// dir. Checks B's output: nothing acknowledged lost, nothing handed
    /// over twice (beyond the contract's redelivery of what B printed just
    /// before it died), order kept; then moderate messages to a peer id that
    /// never exists are given up after exactly their attempts.
    Outbox {
        /// Critical messages A's API must acknowledge.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        messages: u32,
        /// SIGKILLs of A and B together, at least.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100_000))]
        kills: u32,
        /// Seed of the chaos schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Sends per second at most (0: as fast as A's API answers); a small
        /// run uses it to spread its sends over its kills.
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Moderate messages to a peer id that never exists.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        moderate_to_nowhere: u32,
        /// Attempts of those moderate messages.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
        attempts: u32,
        /// Bound in seconds on the end phase (the rest delivered, then the
        /// moderate check); the chaos itself is bounded by 4 times it.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
        deadline: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build every NAT kind (public, eim-eif, eim-adf, eim-apdf, edm, cgnat,
    /// firewall, same-nat) with nftables in network namespaces, put a reach
    /// node behind each, classify, and compare with what was configured and
    /// with coturn. Tears everything down afterwards, also on Ctrl-C.
    Nat {
        /// Only these kinds (comma-separated).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// One-way delay added on every router's WAN side (tc netem).
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Relay failover behind real NATs: a node behind a NAT holds a relay, a
    /// peer talks to it through it, the relay dies; prints how long until
    /// the node held a new relay, republished, and the peer got through
    /// again by PeerId (one JSON object).
    Failover,
    /// Hole punching behind real NATs: a peer reaches a node behind
    /// another NAT through its relay and keeps sending while the punch
    /// upgrades the connection to direct; then the direct path is cut and
    /// it keeps sending; then the path comes back and the connection must
    /// turn direct again by itself. Prints counts and times (one JSON
    /// object); fails unless every message arrived exactly once without a
    /// send error.
    Upgrade,
    /// Port mapping against real miniupnpd: for each of PCP, NAT-PMP and
    /// UPnP-IGD, a reach node behind a router that speaks only that
    /// protocol; prints ms from node start to mapping, whether a stranger
    /// then reaches it directly by PeerId (no relay), whether it renewed,
    /// ms to re-map after miniupnpd restarts and after its rules are
    /// flushed, and the mappings left after a clean shutdown (read from
    /// miniupnpd's nftables chains). Fails unless every target is met.
    Portmap {
        /// Only these kinds (comma-separated: upnp, natpmp, pcp).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Lease the node asks for, in seconds (short, so renewals show).
        #[arg(long, default_value_t = reach_lab::portmap::DEFAULT_LEASE_SECS)]
        lease_secs: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Connect every pair of NAT kinds (and udp-blocked, a network that
    /// lets only TCP out) by PeerId alone: two sites of every kind with a
    /// default-configured reach node each (nodes behind NATs
    /// acquire relays by themselves), three public bootstrap/relay nodes;
    /// per pair: runs, connected, direct, relayed, failed, connect time.
    /// Then, per run, a punch phase: a fresh dialer at A's place (outside
    /// the DHT, so nothing opened the NATs before) reaches B through B's
    /// relay and the punch must make the connection direct; per pair:
    /// upgraded, direct rate, strategy, median time to direct.
    /// Fails unless every run of every pair delivered its message.
    Matrix {
        /// Only these kinds (comma-separated).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Connect-and-deliver runs per pair (each dials afresh).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// One-way delay added on every router's WAN side (tc netem).
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the punch results as a Markdown grid of kinds (the
        /// README's NAT matrix) instead of a table.
        #[arg(long, conflicts_with = "json")]
        markdown: bool,
    },
    /// Topics across federated homes behind real NATs: four relays in a
    /// configured federation cycle, a member behind every NAT kind of the
    /// lab, homes found through the DHT; publishers (public, edm,
    /// udp-blocked) publish and every member must get every message once,
    /// in order; presence within 2 s; then a relay is killed mid-stream:
    /// its members re-home and get what followed, and it leaves every
    /// view within 15 s. Fails unless every check passed.
    Rooms {
        /// Messages per publisher in the steady phase.
        #[arg(long, default_value_t = 20)]
        messages: u32,
        /// Print one JSON object instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct DataDirArg {
    /// The node's data dir (identity key, control API token).
    /// Default: $REACH_DATA_DIR, else $XDG_DATA_HOME/reach, else ~/.local/share/reach.
    #[arg(long, value_name = "DIR", env = "REACH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// UDP address to listen on (QUIC and control packets share it).
    /// Default 0.0.0.0:4433; use [::]:4433 for dual-stack.
    #[arg(long, value_name = "IP:PORT")]
    pub listen: Option<SocketAddr>,
    /// Loopback TCP address of the control API. Default 127.0.0.1:0 (any port;
    /// clients find it through the data dir).
    #[arg(long, value_name = "IP:PORT")]
    pub api_listen: Option<SocketAddr>,
    /// A node to join the DHT through, as a bare IP:PORT (repeatable). Only
    /// needed on the first start: the data dir remembers peers.
    #[arg(long = "bootstrap", value_name = "IP:PORT")]
    pub bootstrap: Vec<SocketAddr>,
    /// Use the DHT without serving it (for nodes others cannot reach).
    #[arg(long)]
    pub client: bool,
    /// Relay for others: auto (once verified publicly reachable), on, off.
    #[arg(long, value_name = "MODE")]
    pub relay: Option<reach::RelayMode>,
    /// Hold a relay of our own: auto (once verified not reachable from
    /// outside), on, off.
    #[arg(long, value_name = "MODE")]
    pub acquire_relay: Option<reach::RelayMode>,
    /// Never try to upgrade relayed connections to direct ones by hole
    /// punching (and take no part in punches peers ask for).
    #[arg(long)]
    pub no_hole_punching: bool,
    /// Never ask the router to forward our port (PCP, NAT-PMP, UPnP-IGD;
    /// on by default, asking the default gateway if it is on a private
    /// network).
    #[arg(long)]
    pub no_port_mapping: bool,
    /// Post-quantum key exchange (X25519MLKEM768): prefer (default: use it
    /// with every peer that can), require (refuse peers that cannot), off.
    #[arg(long, value_name = "MODE")]
    pub pq: Option<reach::PostQuantum>,
    /// A TOML config file; command-line flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print each received message as one JSON object per line
    /// (`{"peer", "len", "text"}`, or `"hex"` instead of `"text"` when the
    /// message is not UTF-8) instead of `message from <peer>: <text>`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..=500))]
    pub nodes: u32,
    /// Messages each node sends (to different peers).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub messages: u32,
    /// Print one JSON object instead of the readable summary.
    #[arg(long)]
    pub json: bool,
    /// Run the loopback demo even where the NAT lab story could run (as
    /// root with the lab's tools).
    #[arg(long)]
    pub loopback: bool,
}

/// A peer as the user names it: its peer id, or a ticket that also says
/// where to reach it (`reach id --ticket`).
#[derive(Debug, Clone)]
pub enum PeerRef {
    Id(PeerId),
    Ticket(reach::Ticket),
}

impl PeerRef {
    /// The peer's id.
    pub fn peer(&self) -> PeerId {
        match self {
            PeerRef::Id(p) => *p,
            PeerRef::Ticket(t) => t.peer,
        }
    }

    /// The ticket's text, if the peer was named by one.
    pub fn ticket(&self) -> Option<String> {
        match self {
            PeerRef::Id(_) => None,
            PeerRef::Ticket(t) => Some(t.to_string()),
        }
    }
}

impl std::str::FromStr for PeerRef {
    type Err = String;

    fn from_str(s: &str) -> Result<PeerRef, String> {
        if reach::Ticket::looks_like(s) {
            return s
                .parse()
                .map(PeerRef::Ticket)
                .map_err(|e: reach::TicketError| e.to_string());
        }
        s.parse()
            .map(PeerRef::Id)
            .map_err(|e: reach::PeerIdError| e.to_string())
    }
}
