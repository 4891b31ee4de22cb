//! The live dashboard: one self-contained page (`GET /dashboard`, HTML with
//! inline CSS and JS, no outside resources) fed once a second over
//! server-sent events (`GET /dashboard/events`, one JSON snapshot each).
//!
//! Login without the API token in a URL: `reach dashboard` asks for a
//! one-time code (`POST /v1/dashboard/code`, token required) and prints
//! `http://<api addr>/dashboard/login?code=<code>`. That route, the only
//! one open without credentials, trades a valid code (random, single use,
//! [`LOGIN_CODE_TTL`]) for an HttpOnly, SameSite=Strict session cookie
//! (random, held in memory, at most [`MAX_SESSIONS`]) and redirects to
//! `/dashboard`. `/dashboard` and `/dashboard/events` accept that cookie or
//! the bearer token; nothing else accepts the cookie.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::node::Node;

/// How long a login code stays valid. The user runs `reach dashboard` and
/// opens the printed URL at once; a minute covers that, while a code that
/// leaked through shell history or a screen share is soon worthless.
pub const LOGIN_CODE_TTL: Duration = Duration::from_secs(60);
/// Login codes waiting to be used. Each `reach dashboard` makes one;
/// past this many the oldest is dropped, so repeated calls hold bounded
/// memory.
pub const MAX_LOGIN_CODES: usize = 16;
/// Dashboard sessions held. A person has a browser tab or two; past this
/// many the oldest session is dropped (its tab gets a 401 and needs a new
/// `reach dashboard`).
pub const MAX_SESSIONS: usize = 16;
/// How long a session lasts after login: a working day, after which the
/// cookie stops working even if the node keeps running.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Time between two snapshots on `/dashboard/events`: "live" for a person
/// watching, and each snapshot costs only in-memory reads.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);
/// Event streams open at once. Each holds one of the API's
/// [`MAX_API_CONNECTIONS`](super::MAX_API_CONNECTIONS) for as long as the
/// page is open; this keeps dashboards from taking the CLI's room. Past
/// it, a new stream is refused with a JSON 503 (`busy`).
pub const MAX_EVENT_STREAMS: usize = 8;
/// How long one event stream lasts before the server ends it and the
/// browser reconnects (after [`RECONNECT_DELAY`]): every reconnect passes
/// the session check again, so a session that expired or was dropped stops
/// getting data within this time. (It also lets a headless browser's
/// virtual clock, which stands still while a fetch is open, move on.)
pub const EVENT_STREAM_LIFETIME: Duration = Duration::from_secs(5);
/// How long the browser waits before reconnecting an ended stream (sent
/// as the stream's `retry`): one snapshot interval, so the page misses at
/// most one update.
pub const RECONNECT_DELAY: Duration = SNAPSHOT_INTERVAL;
/// Most contacts of the routing table a snapshot lists (the table's size
/// and bucket counts are always whole): the page stays readable and a
/// snapshot small however large the table grows.
pub const MAX_ROUTING_ENTRIES: usize = 64;
/// Bytes of randomness in a login code and in a session id.
const SECRET_BYTES: usize = 32;

/// The page, served as is.
const PAGE: &str = include_str!("dashboard.html");

/// Login codes and sessions of one API server.
#[derive(Clone)]
pub(crate) struct Sessions {
    inner: Arc<Mutex<Inner>>,
    /// Places for streams, [`MAX_EVENT_STREAMS`].
    streams: super::slots::StreamSlots,
    /// The session cookie's name: it carries the API's port, since
    /// browsers share cookies between ports of one host, and two nodes on
    /// one machine must not overwrite each other's session.
    cookie: String,
}

#[derive(Default)]
struct Inner {
    /// Codes not yet used, with when each was made, oldest first.
    codes: VecDeque<(String, Instant)>,
    /// Session ids, with when each was made, oldest first.
    sessions: VecDeque<(String, Instant)>,
}

/// Answer of `POST /v1/dashboard/code`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginCode {
    /// The one-time code for `/dashboard/login?code=`.
    pub code: String,
    /// Seconds the code stays valid.
    pub expires_in_s: u64,
}

impl Sessions {
    pub(crate) fn new(api_addr: SocketAddr) -> Self {
        Sessions {
            inner: Arc::default(),
            streams: super::slots::StreamSlots::new(MAX_EVENT_STREAMS),
            cookie: format!("reach_dashboard_{}", api_addr.port()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Only plain bookkeeping happens under the lock; a poisoned one is
        // still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh login code, valid for [`LOGIN_CODE_TTL`].
    pub(crate) fn issue_code(&self) -> crate::error::Result<LoginCode> {
        let code = random_hex()?;
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .codes
            .retain(|(_, made)| now.duration_since(*made) < LOGIN_CODE_TTL);
        while inner.codes.len() >= MAX_LOGIN_CODES {
            inner.codes.pop_front();
        }
        inner.codes.push_back((code.clone(), now));
        Ok(LoginCode {
            code,
            expires_in_s: LOGIN_CODE_TTL.as_secs(),
        })
    }

    /// Uses up `code`: a new session id if it was valid, else `None`.
    fn redeem(&self, code: &str) -> crate::error::Result<Option<String>> {
        let now = Instant::now();
        let mut inner = self.lock();
        let found = inner
            .codes
            .iter()
            .position(|(c, _)| super::server::constant_time_eq(c.as_bytes(), code.as_bytes()));
        let Some(i) = found else {
            return Ok(None);
        };
        let Some((_, made)) = inner.codes.remove(i) else {
            return Ok(None);
        };
        if now.duration_since(made) >= LOGIN_CODE_TTL {
            return Ok(None);
        }
        let session = random_hex()?;
        inner
            .sessions
            .retain(|(_, made)| now.duration_since(*made) < SESSION_TTL);
        while inner.sessions.len() >= MAX_SESSIONS {
            inner.sessions.pop_front();
        }
        inner.sessions.push_back((session.clone(), now));
        Ok(Some(session))
    }

    /// Whether `headers` carry a live session cookie of this server.
    fn has_session(&self, headers: &HeaderMap) -> bool {
        let now = Instant::now();
        let inner = self.lock();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .filter(|(k, _)| *k == self.cookie)
            .any(|(_, v)| {
                inner.sessions.iter().any(|(s, made)| {
                    now.duration_since(*made) < SESSION_TTL
                        && super::server::constant_time_eq(s.as_bytes(), v.as_bytes())
                })
            })
    }
}

/// Whether the token middleware lets `req` through without the bearer
/// token: a GET without a body of the login route always (it checks its
/// code itself), of the page and its event stream with a live session
/// cookie. Nothing else: the token is still checked before the server
/// reads any request body.
pub(crate) fn admits(sessions: &Sessions, req: &axum::extract::Request) -> bool {
    let h = req.headers();
    let bodyless = req.method() == axum::http::Method::GET
        && !h.contains_key(header::TRANSFER_ENCODING)
        && h.get(header::CONTENT_LENGTH).is_none_or(|n| n == "0");
    if !bodyless {
        return false;
    }
    match req.uri().path() {
        "/dashboard/login" => true,
        "/dashboard" | "/dashboard/events" => sessions.has_session(req.headers()),
        _ => false,
    }
}

fn random_hex() -> crate::error::Result<String> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| crate::error::Error::Config(format!("random: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Headers every dashboard answer carries: never cached, never sent on as
/// a referrer, and (for the page) no resource from anywhere else.
fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /dashboard`: the page.
pub(crate) fn page() -> Response {
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE,
    )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    no_store(resp)
}

/// A plain 401 page saying `what` and how to log in.
fn unauthorized_page(what: &str) -> Response {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>reach dashboard: 401</title>\
         <h1>401: {what}</h1>\
         <p>Run <code>reach dashboard</code> for a login URL; its code works once, within {} seconds.</p>\n",
        LOGIN_CODE_TTL.as_secs()
    );
    no_store(
        (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

/// The token middleware's answer to `GET /dashboard` without a session or
/// the token: a page a person can read, not JSON.
pub(crate) fn login_needed() -> Response {
    unauthorized_page("not logged in, or the session is over")
}

/// `GET /dashboard/login?code=`: a session cookie and a redirect to the
/// page for a valid code, a plain 401 page for anything else.
pub(crate) fn login(sessions: &Sessions, query: Option<&str>) -> Response {
    let code = query.and_then(|q| super::recv::query_param(q, "code"));
    let session = match code.map(|c| sessions.redeem(c)) {
        Some(Ok(Some(s))) => s,
        Some(Err(e)) => {
            return no_store(
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("login failed: {e}\n"),
                )
                    .into_response(),
            );
        }
        _ => return unauthorized_page("login code unknown, used or expired"),
    };
    let cookie = format!(
        "{}={session}; HttpOnly; SameSite=Strict; Path=/dashboard; Max-Age={}",
        sessions.cookie,
        SESSION_TTL.as_secs()
    );
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
    if let Ok(v) = cookie.parse() {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    no_store(resp)
}

/// One `/dashboard/events` snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub peer_id: crate::PeerId,
    pub build: super::daemon::BuildInfo,
    pub local_addrs: Vec<SocketAddr>,
    pub post_quantum: String,
    /// External addresses as peers reported them.
    pub external: Vec<reach_proto::nat::observed::ScoredAddr>,
    pub port_mapping: crate::portmap::PortMapStatus,
    pub relay: crate::relay::RelayStatus,
    pub connections: Vec<super::daemon::PeerEntry>,
    pub routing: RoutingSummary,
    /// Topics: this node's home, its subscriptions, the topics it serves
    /// as a home and its federation links.
    pub topics: crate::topics::TopicsStatus,
    pub stats: crate::node::NodeStats,
}

/// The routing table in a snapshot: whole counts, the first
/// [`MAX_ROUTING_ENTRIES`] contacts.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingSummary {
    pub mode: String,
    pub size: usize,
    /// `[bucket, contacts]` for each bucket that has any.
    pub buckets: Vec<(usize, usize)>,
    pub network_size_estimate: Option<f64>,
    pub entries: Vec<crate::dht::RoutingEntry>,
}

/// What the node shows now; only cheap in-memory reads (no NAT probing).
pub fn snapshot(node: &Node, started: Instant) -> Snapshot {
    let routing = node.routing_snapshot();
    Snapshot {
        peer_id: node.peer_id(),
        build: super::daemon::build_info(started),
        local_addrs: node.local_addrs(),
        post_quantum: node.post_quantum().to_string(),
        external: node.external_addrs(),
        port_mapping: node.port_mapping(),
        relay: node.relay_status(),
        connections: super::daemon::peer_entries(node),
        routing: RoutingSummary {
            mode: serde_json::to_value(routing.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            size: routing.size,
            buckets: routing
                .bucket_sizes
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (i, *n))
                .collect(),
            network_size_estimate: routing.network_size_estimate,
            entries: routing
                .entries
                .into_iter()
                .take(MAX_ROUTING_ENTRIES)
                .collect(),
        },
        topics: node.topics_status(),
        stats: node.stats(),
    }
}

/// `GET /dashboard/events`: a snapshot at once, then one per
/// [`SNAPSHOT_INTERVAL`], until the client goes away or
/// [`EVENT_STREAM_LIFETIME`] is over.
pub(crate) fn events(sessions: &Sessions, node: Node, started: Instant) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let Some(slot) = sessions.streams.admit() else {
        let body = super::ApiErrorBody {
            error: super::ApiErrorDetail {
                kind: "busy".into(),
                message: format!("{MAX_EVENT_STREAMS} dashboard streams are open already"),
            },
        };
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    };
    let mut interval = tokio::time::interval(SNAPSHOT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = tokio::time::Instant::now() + EVENT_STREAM_LIFETIME;
    let stream = futures::stream::unfold(
        (interval, node, slot),
        move |(mut interval, node, slot)| async move {
            let tick = interval.tick().await;
            if tick >= end {
                return None;
            }
            let json = serde_json::to_string(&snapshot(&node, started)).unwrap_or_default();
            let event = Event::default()
                .event("snapshot")
                .retry(RECONNECT_DELAY)
                .data(json);
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (interval, node, slot),
            ))
        },
    );
    no_store(
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> Sessions {
        Sessions::new("127.0.0.1:4000".parse().unwrap())
    }

    fn with_cookie(cookie: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, cookie.parse().unwrap());
        h
    }

    #[test]
    fn a_code_works_once_and_gives_a_session_the_cookie_carries() {
        let s = sessions();
        let code = s.issue_code().unwrap().code;
        let session = s.redeem(&code).unwrap().expect("a fresh code is valid");
        assert_eq!(s.redeem(&code).unwrap(), None, "a used code is not");
        assert!(s.has_session(&with_cookie(&format!(
            "other=1; reach_dashboard_4000={session}"
        ))));
        assert!(!s.has_session(&with_cookie(&format!("reach_dashboard_4001={session}"))));
        assert!(!s.has_session(&with_cookie("reach_dashboard_4000=00")));
        assert!(!s.has_session(&HeaderMap::new()));
    }

    #[test]
    fn only_bodyless_gets_of_the_dashboard_routes_pass_without_the_token() {
        let s = sessions();
        let session = s.redeem(&s.issue_code().unwrap().code).unwrap().unwrap();
        let req = |method: &str, path: &str, cookie: bool, len: Option<&str>| {
            let mut b = axum::extract::Request::builder().method(method).uri(path);
            if cookie {
                b = b.header(header::COOKIE, format!("reach_dashboard_4000={session}"));
            }
            if let Some(len) = len {
                b = b.header(header::CONTENT_LENGTH, len);
            }
            b.body(axum::body::Body::empty()).unwrap()
        };
        assert!(admits(
            &s,
            &req("GET", "/dashboard/login?code=x", false, None)
        ));
        assert!(admits(&s, &req("GET", "/dashboard", true, None)));
        assert!(admits(
            &s,
            &req("GET", "/dashboard/events", true, Some("0"))
        ));
        assert!(!admits(&s, &req("GET", "/dashboard", false, None)));
        assert!(!admits(&s, &req("GET", "/dashboard/events", false, None)));
        assert!(!admits(
            &s,
            &req("GET", "/dashboard/login", false, Some("10"))
        ));
        assert!(!admits(&s, &req("POST", "/dashboard/login", false, None)));
        assert!(!admits(&s, &req("GET", "/v1/status", true, None)));
        assert!(!admits(&s, &req("POST", "/v1/dashboard/code", true, None)));
    }

    #[test]
    fn an_expired_code_is_refused() {
        let s = sessions();
        let code = s.issue_code().unwrap().code;
        s.lock().codes[0].1 = Instant::now() - LOGIN_CODE_TTL;
        assert_eq!(s.redeem(&code).unwrap(), None);
        assert_eq!(s.redeem("").unwrap(), None);
    }

    #[test]
    fn codes_and_sessions_are_bounded_oldest_dropped_first() {
        let s = sessions();
        let first = s.issue_code().unwrap().code;
        for _ in 0..MAX_LOGIN_CODES {
            s.issue_code().unwrap();
        }
        assert_eq!(s.lock().codes.len(), MAX_LOGIN_CODES);
        assert_eq!(s.redeem(&first).unwrap(), None);
        let mut ids = Vec::new();
        for _ in 0..=MAX_SESSIONS {
            let code = s.issue_code().unwrap().code;
            ids.push(s.redeem(&code).unwrap().unwrap());
        }
        assert_eq!(s.lock().sessions.len(), MAX_SESSIONS);
        let cookie = |id: &str| with_cookie(&format!("reach_dashboard_4000={id}"));
        assert!(!s.has_session(&cookie(&ids[0])));
        assert!(s.has_session(&cookie(ids.last().unwrap())));
    }
}
