//! The live dashboard in a real headless browser: two `reach node`
//! daemons on loopback, connected; `reach dashboard` prints a one-time
//! login URL; Debian's chromium opens it and the dumped DOM shows what the
//! page's event stream filled in. Without chromium the test says why and
//! passes, unless CI=true or REACH_LAB_REQUIRED=1, where it fails.
//!
//! `REACH_DASHBOARD_SCREENSHOT=<absolute path>` keeps the screenshot the
//! test takes there (docs/dashboard.png was made this way).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{DEADLINE, Proc, ok, reach};

/// The browser's virtual time budget. Virtual time stands still while the
/// event stream is open (the server ends each after
/// `EVENT_STREAM_LIFETIME`, 5 s), so the DOM is dumped after the first
/// stream has delivered its snapshots and ended: about 5 s of real time.
const VIRTUAL_TIME_BUDGET_MS: u32 = 500;

/// A `reach node` on loopback with its data dir, peer id and address.
struct Node {
    /// The daemon (killed when the node is dropped).
    _proc: Proc,
    dir: tempfile::TempDir,
    id: String,
    addr: String,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let proc = Proc::spawn(&[
            "node",
            "--data-dir",
            &d,
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--no-port-mapping",
        ]);
        proc.wait_line("control API");
        let status: serde_json::Value =
            serde_json::from_str(&ok(&reach(&["status", "--json", "--data-dir", &d]))).unwrap();
        Node {
            _proc: proc,
            id: status["peer_id"].as_str().unwrap().to_string(),
            addr: status["local_addr"].as_str().unwrap().to_string(),
            dir,
        }
    }

    fn dir(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    fn api(&self) -> SocketAddr {
        let disc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.dir.path().join("api.json")).unwrap())
                .unwrap();
        disc["addr"].as_str().unwrap().parse().unwrap()
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("api-token"))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// Whether chromium is installed; when not, says why, and fails where it
/// is required (CI).
fn chromium_available() -> bool {
    let found = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        let required = std::env::var("CI").as_deref() == Ok("true")
            || std::env::var("REACH_LAB_REQUIRED").as_deref() == Ok("1");
        assert!(
            !required,
            "chromium is required here (CI) but `chromium --version` failed: apt-get install -y chromium"
        );
        eprintln!("skipping the dashboard browser test: no chromium (apt-get install -y chromium)");
    }
    found
}

/// Runs headless chromium on `url` with `extra` (`--dump-dom`, or
/// `--screenshot=…`, and when to take it) in a fresh profile; its stdout.
/// Killed at the deadline. Fails if the page wrote anything to the
/// console: an uncaught JS error, a refused resource, a CSP violation.
fn chromium(url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.path().display()),
            // The page's console messages go to stderr as `…:CONSOLE…`.
            "--enable-logging=stderr",
            "--v=0",
        ])
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chromium");
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut out = String::new();
            let _ = r.read_to_string(&mut out);
            out
        })
    };
    let reader = read_all(Box::new(child.stdout.take().unwrap()));
    let errors = read_all(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium failed: {status}");
            break;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let console: Vec<_> = errors
        .join()
        .unwrap()
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    assert!(console.is_empty(), "the page logged: {console:#?}");
    reader.join().unwrap()
}

/// The text of the element with `id` in `dom` (up to the next tag).
fn element<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let len = rest[start..].find('<').unwrap();
    &rest[start..start + len]
}

/// One plain HTTP/1.1 GET to the API; the whole answer, head and body.
fn get(api: SocketAddr, path: &str, headers: &str) -> String {
    let mut s = TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The node's reachability state (`unknown`, `public`, …) from its API.
fn reach_state(node: &Node) -> String {
    let status: serde_json::Value =
        serde_json::from_str(&ok(&reach(&["status", "--json", "--data-dir", node.dir()]))).unwrap();
    status["relay"]["reachability"]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `reach dashboard` for `node`: its login URL, checked for shape.
fn login_url(node: &Node) -> String {
    let out = ok(&reach(&["dashboard", "--data-dir", node.dir()]));
    let url = out.trim().to_string();
    let prefix = format!("http://{}/dashboard/login?code=", node.api());
    assert!(url.starts_with(&prefix), "{url}");
    assert!(!url.contains(&node.token()), "the API token is in the URL");
    url
}

#[test]
fn the_dashboard_shows_live_node_state_in_a_real_browser_and_a_code_works_once() {
    if !chromium_available() {
        return;
    }
    let a = Node::start();
    let b = Node::start();
    ok(&reach(&[
        "connect",
        &b.id,
        "--addr",
        &b.addr,
        "--data-dir",
        a.dir(),
    ]));

    // A subscription held open while the page renders: the topics panel
    // shows it (A is public on loopback: its own home).
    let sub = Proc::spawn(&["sub", "dash room", "--json", "--data-dir", a.dir()]);
    sub.wait_for("A joining its topic", |l| {
        l.contains("\"joined\"") && l.contains(&a.id)
    });

    let url = login_url(&a);
    let before = reach_state(&a);
    let dom = chromium(
        &url,
        &[
            "--dump-dom",
            &format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}"),
        ],
    );
    // The page as served holds none of these: the event stream's
    // snapshots put them there.
    assert_eq!(element(&dom, "peer-id"), a.id, "{dom}");
    assert_eq!(element(&dom, "conn"), "live", "{dom}");
    assert_eq!(element(&dom, "conn-count"), "1", "{dom}");
    let connections = &dom[dom.find("id=\"connections\"").unwrap()..];
    assert!(connections.contains(&b.id), "{dom}");
    assert!(connections.contains(&b.addr), "{dom}");
    assert!(connections.contains("direct"), "{dom}");
    // Reachability as the node's own API says it, before or after.
    let reachability = element(&dom, "reachability");
    assert!(
        [&before, &reach_state(&a)]
            .iter()
            .any(|s| reachability.starts_with(s.as_str())),
        "{reachability} is neither {before} nor the state now"
    );
    assert_eq!(element(&dom, "portmap"), "off", "{dom}");
    let subscribed = &dom[dom.find("id=\"topics-subscribed\"").unwrap()..];
    let subscribed = &subscribed[..subscribed.find("</tbody>").unwrap()];
    assert!(subscribed.contains("<td>dash room</td>"), "{subscribed}");
    assert!(subscribed.contains("this node"), "{subscribed}");
    let served = &dom[dom.find("id=\"topics-served\"").unwrap()..];
    assert!(served.contains("<td>dash room</td>"), "{dom}");
    assert_eq!(element(&dom, "relay-mode"), "auto / auto", "{dom}");
    assert!(element(&dom, "local-addrs").contains(&a.addr), "{dom}");
    assert!(
        element(&dom, "version").contains(env!("CARGO_PKG_VERSION")),
        "{dom}"
    );

    // The code is spent: a second use gets the plain 401 page.
    let path = &url[url.find("/dashboard/login").unwrap()..];
    let again = get(a.api(), path, "");
    assert!(again.starts_with("HTTP/1.1 401"), "{again}");
    assert!(again.contains("used or expired"), "{again}");

    // A screenshot the same way, with a fresh code.
    let shot_dir = tempfile::tempdir().unwrap();
    let shot = match std::env::var("REACH_DASHBOARD_SCREENSHOT") {
        Ok(p) => std::path::absolute(Path::new(&p)).unwrap(),
        Err(_) => shot_dir.path().join("dashboard.png"),
    };
    let _ = std::fs::remove_file(&shot);
    chromium(
        &login_url(&a),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
            // A screenshot waits for virtual time the open stream holds
            // still; this takes it after the page loaded and got its first
            // snapshot (sent at once) instead.
            "--timeout=3000",
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
}

#[test]
fn a_session_cookie_opens_the_dashboard_and_nothing_else() {
    let a = Node::start();
    let api = a.api();
    // Without credentials nothing dashboard-side opens but the login.
    let page = get(api, "/dashboard", "");
    assert!(page.starts_with("HTTP/1.1 401"), "{page}");
    assert!(page.contains("Run <code>reach dashboard</code>"), "{page}");
    assert!(get(api, "/dashboard/events", "").starts_with("HTTP/1.1 401"));
    assert!(get(api, "/dashboard/login?code=00", "").starts_with("HTTP/1.1 401"));

    let url = login_url(&a);
    let login = get(api, &url[url.find("/dashboard/login").unwrap()..], "");
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    assert!(login.contains("\r\nlocation: /dashboard\r\n"), "{login}");
    let set_cookie = login
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie: {login}"));
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    let cookie = format!(
        "Cookie: {}\r\n",
        set_cookie.split(';').next().unwrap().trim()
    );

    let page = get(api, "/dashboard", &cookie);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("new EventSource(\"/dashboard/events\")"));
    let events = get(api, "/dashboard/events", &cookie);
    assert!(events.starts_with("HTTP/1.1 200"), "{events}");
    assert!(events.contains("event: snapshot"), "{events}");
    assert!(events.contains(&a.id), "{events}");
    // The cookie is not the token: the rest of the API refuses it.
    for path in ["/v1/status", "/debug/routing", "/v1/ticket"] {
        let r = get(api, path, &cookie);
        assert!(r.starts_with("HTTP/1.1 401"), "{path}: {r}");
    }
    // The bearer token opens the page too.
    let bearer = format!("Authorization: Bearer {}\r\n", a.token());
    assert!(get(api, "/dashboard", &bearer).starts_with("HTTP/1.1 200"));

    // At most MAX_EVENT_STREAMS streams at once; the next is refused.
    let max = reach::api::dashboard::MAX_EVENT_STREAMS;
    let open: Vec<TcpStream> = (0..max)
        .map(|_| {
            let mut s = TcpStream::connect(api).unwrap();
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            write!(
                s,
                "GET /dashboard/events HTTP/1.1\r\nHost: {api}\r\n{cookie}\r\n"
            )
            .unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).unwrap();
            assert_eq!(&head, b"HTTP/1.1 200");
            s
        })
        .collect();
    let refused = get(api, "/dashboard/events", &cookie);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("\"busy\""), "{refused}");
    drop(open);
}
