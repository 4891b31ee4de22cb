//! `reach-sim`: run simulated reach scenarios and print one JSON object.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use reach_sim::net::LinkModel;
use reach_sim::scenarios::lookup::{self, LookupParams};
use reach_sim::scenarios::mailbox::{self, MailboxParams};
use reach_sim::scenarios::probe::{ProbeParams, run_with_wall};
use reach_sim::scenarios::topics::{self, TopicsParams};
use serde::Serialize;

/// Largest --latency-ms accepted (one minute).
const MAX_LATENCY_MS: f64 = 60_000.0;

/// Deterministic discrete-event simulations of reach-proto. The same seed
/// gives the same numbers (wall_s and peak_rss_mib aside).
#[derive(Debug, Parser)]
#[command(name = "reach-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Observed-address probes between random node pairs.
    Probe {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 10_000)]
        probes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Mean one-way latency in milliseconds.
        #[arg(long, default_value_t = 50.0)]
        latency_ms: f64,
        /// Per-packet loss probability (0..1).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Print JSON (the only output format; accepted for symmetry).
        #[arg(long)]
        json: bool,
    },
    /// Iterative Kademlia lookups over a network built by real joins.
    Lookup {
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        #[arg(long, default_value_t = 1_000)]
        lookups: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Mean one-way latency in milliseconds.
        #[arg(long, default_value_t = 50.0)]
        latency_ms: f64,
        /// Per-packet loss probability (0..1).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Fraction of nodes that leave, and of fresh nodes that join, while
        /// the lookups run (0..=1).
        #[arg(long, default_value_t = 0.0)]
        churn: f64,
        /// Virtual seconds over which lookups and churn are spread.
        #[arg(long, default_value_t = lookup::DEFAULT_WINDOW.as_secs_f64())]
        window_s: f64,
        /// Print JSON (the only output format; accepted for symmetry).
        #[arg(long)]
        json: bool,
    },
    /// The topic overlay: homes running reach-proto's overlay machine,
    /// messages from member publishers, presence, churn and loss.
    Topics {
        #[arg(long, default_value_t = 100)]
        homes: usize,
        /// Members in all (spread evenly over the homes).
        #[arg(long, default_value_t = 10_000)]
        members: usize,
        #[arg(long, default_value_t = 1_000)]
        messages: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Fraction of homes that crash, and of fresh homes that join,
        /// while messages flow (0..=1).
        #[arg(long, default_value_t = 0.0)]
        churn: f64,
        /// Per-frame loss probability (0..1).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Payload bytes per message.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Messages per second over the topic.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Print JSON (the only output format; accepted for symmetry).
        #[arg(long)]
        json: bool,
    },
    /// DHT mailboxes: senders deposit sealed messages for offline
    /// recipients and leave; recipients return up to 7 virtual days later,
    /// through churn and loss, and fetch their mailbox epochs.
    Mailbox {
        #[arg(long, default_value_t = 10_000)]
        nodes: usize,
        /// Messages, one per recipient (and per sender).
        #[arg(long, default_value_t = mailbox::DEFAULT_MESSAGES)]
        messages: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Fraction of nodes that leave, and of fresh nodes that join, over
        /// the 7 days (0..=1).
        #[arg(long, default_value_t = 0.0)]
        churn: f64,
        /// Per-packet loss probability (0..1).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Mean one-way latency in milliseconds.
        #[arg(long, default_value_t = 50.0)]
        latency_ms: f64,
        /// Payload bytes per message.
        #[arg(long, default_value_t = mailbox::DEFAULT_PAYLOAD)]
        payload: usize,
        /// Maintenance tick of joined nodes in virtual seconds (the runtime
        /// ticks every 30 s; coarser keeps 7 days affordable).
        #[arg(long, default_value_t = mailbox::DEFAULT_TICK.as_secs_f64())]
        tick_s: f64,
        /// Storers do not hand records to newcomers (the runtime does):
        /// measures what the hand-off is worth.
        #[arg(long)]
        no_handoff: bool,
        /// Print JSON (the only output format; accepted for symmetry).
        #[arg(long)]
        json: bool,
    },
}

fn print_json(out: &impl Serialize) -> ExitCode {
    match serde_json::to_string(out) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe {
            nodes,
            probes,
            seed,
            latency_ms,
            loss,
            json: _,
        } => {
            if nodes < 2 {
                eprintln!("error: --nodes must be at least 2");
                return ExitCode::FAILURE;
            }
            if !(0.0..1.0).contains(&loss) || !(0.0..=MAX_LATENCY_MS).contains(&latency_ms) {
                eprintln!("error: --loss must be in [0, 1) and --latency-ms in [0, 60000]");
                return ExitCode::FAILURE;
            }
            let out = run_with_wall(&ProbeParams {
                nodes,
                probes,
                seed,
                link: LinkModel {
                    latency: Duration::from_secs_f64(latency_ms / 1000.0),
                    jitter: 0.1,
                    loss,
                },
            });
            print_json(&out)
        }
        Command::Lookup {
            nodes,
            lookups,
            seed,
            latency_ms,
            loss,
            churn,
            window_s,
            json: _,
        } => {
            if !(2..=lookup::MAX_NODES).contains(&nodes) {
                eprintln!("error: --nodes must be in [2, {}]", lookup::MAX_NODES);
                return ExitCode::FAILURE;
            }
            if lookups > lookup::MAX_LOOKUPS {
                eprintln!("error: --lookups must be at most {}", lookup::MAX_LOOKUPS);
                return ExitCode::FAILURE;
            }
            if !(0.0..1.0).contains(&loss)
                || !(0.0..=MAX_LATENCY_MS).contains(&latency_ms)
                || !(0.0..=1.0).contains(&churn)
            {
                eprintln!(
                    "error: --loss must be in [0, 1), --churn in [0, 1] and --latency-ms in [0, {MAX_LATENCY_MS}]"
                );
                return ExitCode::FAILURE;
            }
            let max_window = lookup::MAX_WINDOW.as_secs_f64();
            if !(window_s > 0.0 && window_s <= max_window) {
                eprintln!("error: --window-s must be in (0, {max_window}]");
                return ExitCode::FAILURE;
            }
            let out = lookup::run_with_wall(&LookupParams {
                nodes,
                lookups,
                seed,
                link: lookup::link(Duration::from_secs_f64(latency_ms / 1000.0), loss),
                churn,
                window: Duration::from_secs_f64(window_s),
            });
            print_json(&out)
        }
        Command::Topics {
            homes,
            members,
            messages,
            seed,
            churn,
            loss,
            size,
            rate,
            json: _,
        } => {
            if !(2..=topics::MAX_HOMES).contains(&homes)
                || members > topics::MAX_MEMBERS
                || messages > topics::MAX_MESSAGES
            {
                eprintln!(
                    "error: --homes must be in [2, {}], --members at most {}, --messages at most {}",
                    topics::MAX_HOMES,
                    topics::MAX_MEMBERS,
                    topics::MAX_MESSAGES
                );
                return ExitCode::FAILURE;
            }
            let valid = (0.0..1.0).contains(&loss)
                && (0.0..=1.0).contains(&churn)
                && size <= reach_proto::topics::MAX_DATA_LEN
                && rate > 0.0
                && rate <= topics::MAX_RATE;
            if !valid {
                eprintln!(
                    "error: --loss must be in [0, 1), --churn in [0, 1], --size at most {} and --rate in (0, {}]",
                    reach_proto::topics::MAX_DATA_LEN,
                    topics::MAX_RATE
                );
                return ExitCode::FAILURE;
            }
            let out = topics::run_with_wall(&TopicsParams {
                homes,
                members,
                messages,
                seed,
                churn,
                loss,
                size,
                rate,
            });
            print_json(&out)
        }
        Command::Mailbox {
            nodes,
            messages,
            seed,
            churn,
            loss,
            latency_ms,
            payload,
            tick_s,
            no_handoff,
            json: _,
        } => {
            if !(2..=mailbox::MAX_NODES).contains(&nodes) || messages > mailbox::MAX_MESSAGES {
                eprintln!(
                    "error: --nodes must be in [2, {}] and --messages at most {}",
                    mailbox::MAX_NODES,
                    mailbox::MAX_MESSAGES
                );
                return ExitCode::FAILURE;
            }
            let max_tick = mailbox::MAX_TICK.as_secs_f64();
            let valid = (0.0..1.0).contains(&loss)
                && (0.0..=1.0).contains(&churn)
                && (0.0..=MAX_LATENCY_MS).contains(&latency_ms)
                && payload <= reach_proto::dht::record::MAX_MAILBOX_PAYLOAD
                && (1.0..=max_tick).contains(&tick_s);
            if !valid {
                eprintln!(
                    "error: --loss must be in [0, 1), --churn in [0, 1], --latency-ms in [0, {MAX_LATENCY_MS}], --payload at most {} and --tick-s in [1, {max_tick}]",
                    reach_proto::dht::record::MAX_MAILBOX_PAYLOAD
                );
                return ExitCode::FAILURE;
            }
            let out = mailbox::run_with_wall(&MailboxParams {
                nodes,
                messages,
                seed,
                link: lookup::link(Duration::from_secs_f64(latency_ms / 1000.0), loss),
                churn,
                payload,
                tick: Duration::from_secs_f64(tick_s),
                handoff: !no_handoff,
            });
            print_json(&out)
        }
    }
}
