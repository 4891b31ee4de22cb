//! What the CLI's integration tests share: running `reach` once, and
//! `reach` children (daemons, followers) whose stdout lines arrive on a
//! channel, waited on with a deadline, stopped with SIGTERM or killed on
//! drop. Each test file uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const REACH: &str = env!("CARGO_BIN_EXE_reach");
/// Every wait in these tests is bounded by this deadline.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `reach args` to the end (without the user's data dir from the
/// environment).
pub fn reach(args: &[&str]) -> Output {
    Command::new(REACH)
        .args(args)
        .env_remove("REACH_DATA_DIR")
        .output()
        .expect("run reach")
}

/// The stdout of a run that must have succeeded (its stderr otherwise).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A config file `name` in `dir`: loopback node and API ports (any free
/// one), then `extra` lines.
pub fn loopback_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let cfg = dir.join(name);
    std::fs::write(
        &cfg,
        format!("listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n{extra}"),
    )
    .unwrap();
    cfg
}

/// A `reach node` child on `dir` with config `cfg` and `extra` flags.
pub fn node(dir: &Path, cfg: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "node",
        "--data-dir",
        dir.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

/// `reach status --json` of the node on `dir` (null while it does not
/// answer).
pub fn status(dir: &Path) -> serde_json::Value {
    let out = reach(&["status", "--json", "--data-dir", dir.to_str().unwrap()]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The first JSON line a command printed (its stderr in the failure).
pub fn json_line(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "no JSON line; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

/// A child process whose stdout lines arrive on a channel; killed on drop.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// `reach args`, without the user's data dir from the environment.
    pub fn spawn(args: &[&str]) -> Proc {
        let mut cmd = Command::new(REACH);
        cmd.args(args).env_remove("REACH_DATA_DIR");
        Proc::command(cmd)
    }

    /// Runs `cmd` (stdout piped and read line by line, stderr dropped).
    pub fn command(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn reach");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// Waits for a stdout line `accept` says yes to (`what` names it in the
    /// failure).
    pub fn wait_for(&self, what: &str, accept: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if accept(&line) => return line,
                Ok(_) => continue,
                Err(e) => panic!("no line with {what} within {DEADLINE:?}: {e}"),
            }
        }
    }

    /// Waits for a stdout line containing `needle`.
    /// The first stdout line `accept` says yes to within `wait`, if any.
    pub fn wait_for_or_timeout(
        &self,
        wait: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let end = Instant::now() + wait;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) if accept(&l) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn wait_line(&self, needle: &str) -> String {
        self.wait_for(needle, |l| l.contains(needle))
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "the process did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
