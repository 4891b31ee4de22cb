//! `reach node` under kill -9, corrupt peer caches and a second node on the
//! same data dir: real processes, real files, loopback only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reach::dht::peer_cache::{CORRUPT_SUFFIX, PEER_CACHE_FILE, PeerCache};

const REACH: &str = env!("CARGO_BIN_EXE_reach");
/// Every wait in these tests is bounded by this deadline.
const DEADLINE: Duration = Duration::from_secs(60);
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(10);
/// kill -9s in the crash test (the issue asks for 200).
const KILLS: usize = 200;
/// Latest kill after a node's start. The delay is this times u³, u uniform
/// in [0, 1): every moment of the first 1.5 s can be hit, most kills fall in
/// the first few hundred milliseconds where the node opens and writes its
/// files (and its first join saves the peer cache), and 200 kills fit in
/// about a minute and a half (mean delay 375 ms).
const KILL_DELAY_MAX: Duration = Duration::from_millis(1500);
/// The full rejoin (the bootstrap node live in the routing table, reached
/// from the peer cache alone) is checked every this many restarts, and on
/// the last; that the node starts with its identity is checked every time.
const REJOIN_EVERY: usize = 10;

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn seed() -> u64 {
    match std::env::var("REACH_CRASH_SEED") {
        Ok(s) => s.parse().expect("REACH_CRASH_SEED must be a number"),
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        }
    }
}

/// Polls `cond` until it yields a value, for at most DEADLINE.
fn until<T>(what: &str, cond: impl FnMut() -> Option<T>) -> T {
    until_or(what, cond, String::new)
}

/// [`until`], with `context` (a node's log, say) in the failure message.
fn until_or<T>(
    what: &str,
    mut cond: impl FnMut() -> Option<T>,
    context: impl FnOnce() -> String,
) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= end {
            panic!("{what}: not within {DEADLINE:?}\n{}", context());
        }
        std::thread::sleep(POLL);
    }
}

/// A `reach node` process; its log (stderr) goes to a file.
struct NodeProcess {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl NodeProcess {
    fn start(dir: &Path, log_dir: &Path, bootstrap: Option<&str>) -> Self {
        let log = log_dir.join("node.log");
        let mut cmd = Command::new(REACH);
        cmd.args(["node", "--data-dir", dir.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
            .env_remove("REACH_DATA_DIR")
            .env_remove("REACH_LOG")
            // The node's own log level, for a closer look at a failure.
            .envs(std::env::var("REACH_CRASH_LOG").map(|l| ("REACH_LOG", l)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        NodeProcess {
            child: cmd.spawn().expect("spawn reach node"),
            dir: dir.to_path_buf(),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until this process serves its control API; fails at once if it
    /// exits first.
    fn wait_api(&mut self) -> Api {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "reach node exited with {status} before serving:\n{}",
                    self.log()
                );
            }
            if let Some(api) = Api::of(&self.dir).filter(|a| a.pid == self.pid()) {
                return api;
            }
            assert!(
                Instant::now() < end,
                "reach node not serving within {DEADLINE:?}:\n{}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.pid().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "node did not stop after SIGTERM");
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A node's control API, found from its data dir.
struct Api {
    addr: String,
    token: String,
    pid: u32,
}

impl Api {
    fn of(dir: &Path) -> Option<Api> {
        let disc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("api.json")).ok()?).ok()?;
        Some(Api {
            addr: disc["addr"].as_str()?.to_string(),
            pid: disc["pid"].as_u64()? as u32,
            token: std::fs::read_to_string(dir.join("api-token"))
                .ok()?
                .trim()
                .to_string(),
        })
    }

    /// GET `path`; `None` if the node does not answer (yet).
    fn get(&self, path: &str) -> Option<serde_json::Value> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.addr, self.token
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        if !resp.starts_with("HTTP/1.1 200") {
            return None;
        }
        serde_json::from_str(resp.split_once("\r\n\r\n")?.1).ok()
    }

    fn peer_id(&self) -> Option<String> {
        Some(self.get("/v1/status")?["peer_id"].as_str()?.to_string())
    }

    /// Whether `peer` is in the routing table and answered in this run.
    fn has_live_contact(&self, peer: &str) -> bool {
        self.get("/debug/routing").is_some_and(|r| {
            r["entries"].as_array().is_some_and(|es| {
                es.iter()
                    .any(|e| e["peer"] == peer && e["health"] == "good")
            })
        })
    }
}

/// A bootstrap node for the whole test: (process, its address, its id).
fn bootstrap_node(root: &Path) -> (NodeProcess, String, String) {
    let dir = root.join("bootstrap");
    let mut node = NodeProcess::start(&dir, root, None);
    let api = node.wait_api();
    let status = until("bootstrap status", || api.get("/v1/status"));
    let addr = status["local_addr"].as_str().unwrap().to_string();
    let id = status["peer_id"].as_str().unwrap().to_string();
    (node, addr, id)
}

/// Starts a node through `bootstrap` and waits until it is in contact.
fn start_joined(dir: &Path, logs: &Path, bootstrap: &str, bootstrap_id: &str) -> NodeProcess {
    let mut node = NodeProcess::start(dir, logs, Some(bootstrap));
    let api = node.wait_api();
    until("joined through the bootstrap node", || {
        api.has_live_contact(bootstrap_id).then_some(())
    });
    // The join has ended, and with it the save of the peer cache that every
    // later start rejoins from (a kill before that leaves nothing to rejoin
    // from, which is not what this test is about).
    until("the join's end in the log", || {
        node.log()
            .contains("joined the DHT report=JoinReport { bootstrap_reached: 1")
            .then_some(())
    });
    node
}

fn cached_peers(dir: &Path) -> Vec<String> {
    let cache = PeerCache::open(dir).unwrap();
    let (contacts, _) = cache.load().unwrap();
    contacts.iter().map(|c| c.peer.to_string()).collect()
}

#[test]
fn kill_9_at_random_moments_then_restart_same_identity_and_rejoin_from_the_cache() {
    let seed = seed();
    println!("crash test seed {seed} (rerun with REACH_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let root = tempfile::tempdir().unwrap();
    let (_bootstrap, b_addr, b_id) = bootstrap_node(root.path());
    let logs = root.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let dir = root.path().join("node");

    // The first start is the only one told about the bootstrap node.
    let mut first = start_joined(&dir, &logs, &b_addr, &b_id);
    let id = first.wait_api().peer_id().unwrap();
    first.kill9();

    let started = Instant::now();
    let (mut before_api, mut after_api, mut rejoins) = (0, 0, 0);
    for i in 0..KILLS {
        // The restart after the previous kill: it starts, as itself.
        let t0 = Instant::now();
        let mut node = NodeProcess::start(&dir, &logs, None);
        let api = node.wait_api();
        let got = until("status of the restarted node", || api.peer_id());
        assert_eq!(got, id, "restart {i} came back as someone else");
        if i % REJOIN_EVERY == 0 || i == KILLS - 1 {
            until_or(
                "rejoin from the peer cache alone",
                || api.has_live_contact(&b_id).then_some(()),
                || {
                    format!(
                        "restart {i}; routing: {:?}\nlog:\n{}",
                        api.get("/debug/routing"),
                        node.log()
                    )
                },
            );
            rejoins += 1;
        }
        let delay = KILL_DELAY_MAX.mul_f64(rng.unit().powi(3));
        let elapsed = t0.elapsed();
        if delay > elapsed {
            std::thread::sleep(delay - elapsed);
            node.kill9();
            after_api += 1;
        } else {
            // Too late for this one: stop it, and kill a fresh start at
            // exactly `delay`, perhaps before it serves. The next restart
            // checks what it left.
            node.kill9();
            let t0 = Instant::now();
            let mut victim = NodeProcess::start(&dir, &logs, None);
            std::thread::sleep(delay.saturating_sub(t0.elapsed()));
            victim.kill9();
            before_api += 1;
        }
    }
    println!(
        "{KILLS} kill -9s ({before_api} at a random moment of a fresh start, {after_api} after it served) in {:.1} s, full rejoin checked {rejoins} times",
        started.elapsed().as_secs_f64()
    );
    // Files a kill could leave half-written are whole.
    let key = std::fs::read_to_string(dir.join("identity.key")).unwrap();
    assert!(key.starts_with("reach-ed25519-secret-v1:") && key.len() == 89);
    assert!(cached_peers(&dir).contains(&b_id));
}

/// Fresh data dirs killed during their very first start.
const FIRST_START_KILLS: usize = 30;
/// Latest kill of a first start: the identity key is written about 10 ms
/// after exec (debug build), so kills spread over this land before, during
/// and after it.
const FIRST_START_KILL_MAX: Duration = Duration::from_millis(25);

#[test]
fn kill_9_during_the_first_start_leaves_no_broken_identity() {
    let seed = seed();
    println!("first start seed {seed} (rerun with REACH_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let root = tempfile::tempdir().unwrap();
    let logs = root.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let mut with_key = 0;
    for i in 0..FIRST_START_KILLS {
        let dir = root.path().join(format!("node{i}"));
        let delay = FIRST_START_KILL_MAX.mul_f64(rng.unit());
        let t0 = Instant::now();
        let mut victim = NodeProcess::start(&dir, &logs, None);
        std::thread::sleep(delay.saturating_sub(t0.elapsed()));
        victim.kill9();
        // Absent or whole, never empty or cut short.
        let key = std::fs::read_to_string(dir.join("identity.key")).ok();
        if let Some(k) = &key {
            assert!(
                k.starts_with("reach-ed25519-secret-v1:") && k.len() == 89,
                "kill at {delay:?} left {k:?}"
            );
            with_key += 1;
        }
        // The restart starts, with the key the killed start left, if any.
        let mut node = NodeProcess::start(&dir, &logs, None);
        let api = node.wait_api();
        until("status after a killed first start", || api.peer_id());
        if let Some(k) = key {
            assert_eq!(
                std::fs::read_to_string(dir.join("identity.key")).unwrap(),
                k
            );
        }
        node.kill9();
    }
    println!("{FIRST_START_KILLS} first starts killed, {with_key} had written their key");
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next() as u8).collect()
}

fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(CORRUPT_SUFFIX))
        .collect()
}

#[test]
fn corrupt_peer_caches_are_set_aside_with_a_warning_and_rebuilt() {
    let seed = seed();
    println!("corrupt cache seed {seed} (rerun with REACH_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let root = tempfile::tempdir().unwrap();
    let (_bootstrap, b_addr, b_id) = bootstrap_node(root.path());
    let logs = root.path().join("logs");
    std::fs::create_dir(&logs).unwrap();

    // A good cache to truncate.
    let good = {
        let dir = root.path().join("good");
        start_joined(&dir, &logs, &b_addr, &b_id).terminate();
        std::fs::read(dir.join(PEER_CACHE_FILE)).unwrap()
    };
    assert!(good.len() > 1024, "a real cache is larger");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("truncated to its header", good[..512].to_vec()),
        ("random bytes", random_bytes(&mut rng, 64 * 1024)),
        ("random bytes, short", random_bytes(&mut rng, 100)),
    ];
    for (what, bytes) in cases {
        let dir = root.path().join(what.replace(' ', "-"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(PEER_CACHE_FILE), &bytes).unwrap();
        let node = start_joined(&dir, &logs, &b_addr, &b_id);
        let log = node.log();
        assert!(
            log.contains("WARN") && log.contains("peer cache is corrupt"),
            "{what}: no warning:\n{log}"
        );
        let aside = corrupt_files(&dir);
        assert_eq!(aside.len(), 1, "{what}: {aside:?}");
        assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes, "{what}");
        assert!(node.terminate().success(), "{what}");
        // The rebuilt cache holds the contacts of this run.
        assert!(cached_peers(&dir).contains(&b_id), "{what}");
    }
}

#[test]
fn a_second_node_on_a_locked_data_dir_refuses_and_leaves_the_first_reachable() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node");
    let logs = root.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let mut first = NodeProcess::start(&dir, &logs, None);
    let api = first.wait_api();
    let id = until("status", || api.peer_id());
    let disc = std::fs::read(dir.join("api.json")).unwrap();
    let token = std::fs::read(dir.join("api-token")).unwrap();

    let mut second = Command::new(REACH)
        .args(["node", "--data-dir", dir.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .env_remove("REACH_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = until("the second node exits", || second.try_wait().unwrap());
    let mut err = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(err.contains(&format!("pid {}", first.pid())), "{err}");
    assert!(err.contains("in use by another reach node"), "{err}");
    // The first node's files are untouched and it still answers.
    assert_eq!(std::fs::read(dir.join("api.json")).unwrap(), disc);
    assert_eq!(std::fs::read(dir.join("api-token")).unwrap(), token);
    assert_eq!(api.peer_id(), Some(id));
    let out = Command::new(REACH)
        .args(["status", "--data-dir", dir.to_str().unwrap()])
        .env_remove("REACH_DATA_DIR")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(first.terminate().success());
}
