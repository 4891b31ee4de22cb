//! `reach`: run a reach node, talk to a running one, or try reach locally.

use std::process::ExitCode;

use clap::Parser;

mod bench;
mod chaos;
mod cli;
mod commands;
mod config;
mod daemon;
mod dashboard;
mod demo;
mod eventlog;
mod topics;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if matches!(args.command, cli::Command::Node(_)) {
        without_thread_cache();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("REACH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(args.log_level()));
    // Colour codes only for a terminal: a log file or a pipe gets plain
    // text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's tunable that sets how many freed chunks each thread keeps per
/// size class for reuse (its thread cache, 7 by default).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TCACHE_TUNABLE: &str = "glibc.malloc.tcache_count";

/// Restarts this process (same pid, arguments and descriptors, through
/// `exec`) with glibc's per-thread cache of freed chunks turned off, unless
/// the environment already sets it. Only `reach node`, a long-running
/// daemon meant for strangers' traffic, does this.
///
/// Why: after a burst of connections (a handshake flood, an identity
/// churn) the node frees nearly all its memory and `malloc_trim` hands the
/// free pages back, but each thread's cache still holds up to 7 freed
/// chunks of each of 64 sizes. Glibc counts them as in use, they sit
/// wherever the burst had allocated them, and each pins its page. Measured
/// with `reach bench flood` (20,000 handshakes and 20,000 churned
/// identities; walking the target's heaps after the run): 330 to 440 such
/// chunks per worker arena, in sevens of one size, and the target's
/// anonymous memory up by 2.6 MiB after the flood with the cache, 0.25 MiB
/// without. With the cache off those chunks go back to the heap and are
/// trimmed. The cache is a speed-up for allocation-heavy loops; the
/// benchmark's handshake rate did not change measurably without it
/// (1,470 vs 1,570 dials/s, within run-to-run noise). The tunable can
/// only be set before the process starts, hence the `exec`; if it fails
/// the node runs with the cache, as before.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn without_thread_cache() {
    use std::os::unix::process::CommandExt;
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains(TCACHE_TUNABLE) {
        return;
    }
    let tunables = if current.is_empty() {
        format!("{TCACHE_TUNABLE}=0")
    } else {
        format!("{current}:{TCACHE_TUNABLE}=0")
    };
    let mut args = std::env::args_os();
    let Some(argv0) = args.next() else { return };
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .exec();
    eprintln!("warning: could not restart without the allocator's thread cache: {err}");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn without_thread_cache() {}
