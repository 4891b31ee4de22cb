//! `reach-sim`: run simulated reach scenarios and print one JSON object.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use reach_sim::net::LinkModel;
use reach_sim::scenarios::probe::{ProbeParams, run_with_wall};

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
            if !(0.0..1.0).contains(&loss) || !(0.0..=60_000.0).contains(&latency_ms) {
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
            match serde_json::to_string(&out) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
