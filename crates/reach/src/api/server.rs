//! Serving the control API.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};

use super::{
    ApiErrorBody, ApiErrorDetail, BODY_READ_TIMEOUT, ConnectRequest, Discovery,
    HEADER_READ_TIMEOUT, LookupRequest, LookupResponse, MAX_API_CONNECTIONS, MAX_REQUEST_BODY,
    MAX_REQUEST_HEAD, SendRequest, SendResponse, Status, discovery_path, token_path,
};
use crate::error::{Error, Result};
use crate::keystore;
use crate::node::Node;

/// Bytes of randomness in a token.
const TOKEN_BYTES: usize = 32;
/// Bytes of an oversized body read (and dropped) before the JSON 413 is
/// sent: a client still writing its body when the server closes would get
/// a reset instead of the answer. Past this much the connection is closed.
const MAX_BODY_DRAIN: usize = 64 * 1024 * 1024;
/// Pause after a failed `accept` (out of file descriptors, say) before the
/// next: retrying at once would spin on the same error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A running control API. Stops when [`ApiServer::stop`] is called or the
/// value is dropped.
pub struct ApiServer {
    addr: SocketAddr,
    discovery: PathBuf,
    /// What this server wrote to the discovery and token files: on stop it
    /// removes the discovery file only if both still hold these, so a
    /// server stopping late never removes a newer server's file.
    discovery_json: Vec<u8>,
    token_file: PathBuf,
    token: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// Where the daemon's event loop hands what the node received, for
    /// `GET /v1/recv` (see [`ApiServer::recv_hub`]).
    recv: super::recv::RecvHub,
    /// The ping echo ([`super::daemon::PING_PROTOCOL`]), stopped with the server.
    echo: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// The address the API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and removes the discovery file, unless another
    /// server has replaced it since.
    pub async fn stop(mut self) {
        self.stop_now();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    fn stop_now(&mut self) {
        if let Some(echo) = self.echo.take() {
            echo.abort();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
            if self.files_still_ours() {
                let _ = std::fs::remove_file(&self.discovery);
            }
        }
    }

    /// Whether the discovery and token files are still the ones this
    /// server wrote. Another server started on the same data dir (another
    /// node in this process, or one whose start overlapped this one's
    /// stop) rewrites both, with its own address and a fresh token; its
    /// discovery file must stay. (A server started between this check and
    /// the removal, microseconds, would still lose its file.)
    fn files_still_ours(&self) -> bool {
        let json = std::fs::read(&self.discovery);
        let token = std::fs::read(&self.token_file);
        matches!((json, token), (Ok(j), Ok(t)) if j == self.discovery_json && t == self.token.as_bytes())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

#[derive(Clone)]
struct AppState {
    node: Node,
    token: String,
    /// Received messages and events for `GET /v1/recv`.
    recv: super::recv::RecvHub,
    /// When this server started, for the uptime in `/v1/status`.
    started: std::time::Instant,
    /// Dashboard login codes and sessions.
    dashboard: super::dashboard::Sessions,
    /// Places for `GET /v1/topics/sub` streams.
    topic_streams: super::slots::StreamSlots,
}

/// Starts the control API for `node` on `listen` (must be a loopback
/// address), writing a fresh token and the discovery file into `data_dir`.
pub async fn serve(node: Node, data_dir: &Path, listen: SocketAddr) -> Result<ApiServer> {
    if !listen.ip().is_loopback() {
        return Err(Error::Config(format!(
            "the control API must listen on a loopback address, not {listen}"
        )));
    }
    keystore::ensure_private_dir(data_dir)?;
    let token = new_token()?;
    write_private(&token_path(data_dir), token.as_bytes())?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: listen,
        source,
    })?;
    let discovery = Discovery {
        addr,
        peer_id: node.peer_id(),
        pid: std::process::id(),
    };
    let discovery_file = discovery_path(data_dir);
    let json = serde_json::to_vec_pretty(&discovery).map_err(|e| Error::Config(e.to_string()))?;
    write_private(&discovery_file, &json)?;

    let token_file = token_path(data_dir);
    let echo = super::daemon::spawn_echo(&node);
    let state = AppState {
        node,
        token: token.clone(),
        recv: super::recv::RecvHub::default(),
        started: std::time::Instant::now(),
        dashboard: super::dashboard::Sessions::new(addr),
        topic_streams: super::slots::StreamSlots::new(super::topics::MAX_TOPIC_STREAMS),
    };
    let recv_hub = state.recv.clone();
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/connect", post(connect))
        .route("/v1/send", post(send))
        .route("/v1/outbox", get(outbox))
        .route("/v1/topics/publish", post(topic_publish))
        .route("/v1/topics/members", get(topic_members))
        .route("/v1/topics/sub", get(topic_sub))
        .route("/v1/lookup", post(lookup))
        .route("/v1/nat", get(nat))
        .route("/v1/relay", get(relay))
        .route("/v1/punch", get(punch))
        .route("/v1/ticket", get(ticket))
        .route("/debug/routing", get(debug_routing))
        .route("/debug/store", get(debug_store))
        .route("/v1/recv", get(recv_stream))
        .route("/v1/peers", get(peers))
        .route("/v1/ping", post(ping))
        .route("/metrics", get(metrics))
        .route("/v1/dashboard/code", post(dashboard_code))
        .route("/dashboard", get(dashboard_page))
        .route("/dashboard/events", get(dashboard_events))
        .route("/dashboard/login", get(dashboard_login))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Layers run outside in: the token is checked before any body is
        // read, so only the local user can make the server read one.
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(middleware::from_fn(read_body))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(accept_loop(listener, app, stop_rx));
    tracing::info!(%addr, "control API listening");
    Ok(ApiServer {
        addr,
        discovery: discovery_file,
        discovery_json: json,
        token_file,
        token,
        stop: Some(stop_tx),
        task: Some(task),
        recv: recv_hub,
        echo,
    })
}

/// Connections being served, oldest first (ids grow).
#[derive(Default)]
struct Conns {
    next_id: u64,
    open: BTreeMap<u64, Conn>,
}

struct Conn {
    /// Whether a whole request head arrived (set by the service when hyper
    /// hands it the request): such a connection is doing real work.
    head_seen: Arc<AtomicBool>,
    task: AbortHandle,
}

fn lock(conns: &Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    // Only plain bookkeeping happens under the lock; a poisoned one is
    // still consistent.
    conns.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes its connection from [`Conns`] when the connection's task ends,
/// however it ends (finished, failed, aborted).
struct ConnGuard {
    conns: Arc<Mutex<Conns>>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.conns).open.remove(&self.id);
    }
}

/// Accepts connections until `stop` fires, serving each on its own task
/// with hyper (HTTP/1.1, one request per connection, the head within
/// [`HEADER_READ_TIMEOUT`]) and at most [`MAX_API_CONNECTIONS`] at once.
/// On stop, every connection still open is closed.
async fn accept_loop(listener: TcpListener, app: Router, mut stop: oneshot::Receiver<()>) {
    let conns = Arc::new(Mutex::new(Conns::default()));
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control API: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        admit(&conns, stream, &app);
    }
    let open = std::mem::take(&mut lock(&conns).open);
    for conn in open.into_values() {
        conn.task.abort();
    }
}

/// Serves `stream`, first making room under [`MAX_API_CONNECTIONS`] by
/// closing the oldest connection that has not sent its request head; with
/// none such, refuses `stream` with a JSON 503.
fn admit(conns: &Arc<Mutex<Conns>>, stream: TcpStream, app: &Router) {
    let mut evicted = None;
    let mut guard = lock(conns);
    if guard.open.len() >= MAX_API_CONNECTIONS {
        let stalled = guard
            .open
            .iter()
            .find(|(_, c)| !c.head_seen.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        match stalled {
            Some(id) => evicted = guard.open.remove(&id),
            None => {
                drop(guard);
                refuse_busy(&stream);
                return;
            }
        }
    }
    let id = guard.next_id;
    guard.next_id += 1;
    let head_seen = Arc::new(AtomicBool::new(false));
    let on_end = ConnGuard {
        conns: conns.clone(),
        id,
    };
    // The task cannot remove its entry before it is inserted: that takes
    // the lock held here.
    let task = tokio::spawn(serve_connection(
        stream,
        app.clone(),
        head_seen.clone(),
        on_end,
    ));
    guard.open.insert(
        id,
        Conn {
            head_seen,
            task: task.abort_handle(),
        },
    );
    drop(guard);
    if let Some(conn) = evicted {
        tracing::debug!("control API: closing a connection that sent no request head");
        conn.task.abort();
    }
}

/// Answers a connection over the cap with a JSON 503 and closes it. The
/// answer is small enough for a fresh socket's send buffer, so one
/// non-blocking write suffices (if it does not, the client sees a close).
fn refuse_busy(stream: &TcpStream) {
    let body = serde_json::to_string(&ApiErrorBody {
        error: ApiErrorDetail {
            kind: "busy".into(),
            message: format!(
                "the control API is serving its maximum of {MAX_API_CONNECTIONS} requests; try again"
            ),
        },
    })
    .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

/// One connection: one request (no keep-alive), its head within
/// [`HEADER_READ_TIMEOUT`] or the connection is closed.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    head_seen: Arc<AtomicBool>,
    _on_end: ConnGuard,
) {
    use hyper::service::Service as _;
    let app = hyper_util::service::TowerToHyperService::new(app);
    let mut io = JsonRefusals {
        stream,
        head_seen: head_seen.clone(),
        replacement: None,
    };
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        head_seen.store(true, Ordering::Relaxed);
        app.call(req)
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(&mut io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "control API connection ended with an error");
    }
    if io.replacement.is_some() {
        // The client may still be writing the rest of its head: closing
        // with unread bytes would reset the connection and could destroy
        // the answer before the client reads it. Read on (bounded) until
        // the client closes, as `read_body` does for an oversized body.
        use tokio::io::AsyncWriteExt as _;
        let mut stream = io.stream;
        let _ = stream.shutdown().await;
        let mut rest = tokio::io::AsyncReadExt::take(&mut stream, MAX_BODY_DRAIN as u64);
        let mut sink = tokio::io::sink();
        let _ =
            tokio::time::timeout(HEADER_READ_TIMEOUT, tokio::io::copy(&mut rest, &mut sink)).await;
    }
}

/// A control API connection as hyper sees it. hyper answers a request
/// head it cannot parse (a garbage request line, a header over
/// [`MAX_REQUEST_HEAD`]) itself, with an empty 400/414/431, before any
/// service runs, and has no hook to change that answer. Until the service
/// has seen a request head, whatever hyper writes is such an answer
/// (a server writes nothing else before a request), so this writes the
/// JSON error every other refusal gets in its place.
struct JsonRefusals {
    stream: TcpStream,
    head_seen: Arc<AtomicBool>,
    /// The JSON answer written in place of hyper's, and how many of its
    /// bytes are written.
    replacement: Option<(Vec<u8>, usize)>,
}

/// The JSON answer replacing `hyper_answer`, hyper's own answer to a
/// request head it could not parse (only its status line is used).
fn json_refusal(hyper_answer: &[u8]) -> Vec<u8> {
    super::metrics::count_api_refusal();
    let status = hyper_answer
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_REQUEST);
    let (kind, message) = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            format!("request line and headers over the limit of {MAX_REQUEST_HEAD} bytes"),
        ),
        StatusCode::URI_TOO_LONG => ("uri_too_long", "request target too long".to_string()),
        _ => (
            "bad_request",
            "malformed HTTP/1.1 request line or header".to_string(),
        ),
    };
    let body = serde_json::to_string(&ApiErrorBody {
        error: ApiErrorDetail {
            kind: kind.into(),
            message,
        },
    })
    .unwrap_or_default();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

impl tokio::io::AsyncRead for JsonRefusals {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for JsonRefusals {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.head_seen.load(Ordering::Relaxed) {
            return std::pin::Pin::new(&mut this.stream).poll_write(cx, buf);
        }
        let (answer, written) = this
            .replacement
            .get_or_insert_with(|| (json_refusal(buf), 0));
        while *written < answer.len() {
            match std::pin::Pin::new(&mut this.stream).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => *written += n,
                other => return other,
            }
        }
        // hyper's own bytes (in this write or later ones) are dropped.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Reads the whole request body, at most [`MAX_REQUEST_BODY`] within
/// [`BODY_READ_TIMEOUT`], so handlers get it in one piece and every refusal
/// is a JSON error. An oversized body is read on (up to
/// [`MAX_BODY_DRAIN`]) and dropped, so the client, still writing, gets to
/// read the 413.
async fn read_body(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("request body over the limit of {MAX_REQUEST_BODY} bytes"),
        )
    };
    if declared.is_some_and(|n| n > MAX_BODY_DRAIN as u64) {
        return too_large();
    }
    let read = async {
        let mut data = body.into_data_stream();
        let mut buf = Vec::new();
        let mut seen = 0usize;
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| {
                api_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("reading the request body: {e}"),
                )
            })?;
            seen = seen.saturating_add(chunk.len());
            if seen > MAX_BODY_DRAIN {
                return Err(too_large());
            }
            if seen <= MAX_REQUEST_BODY {
                buf.extend_from_slice(&chunk);
            }
        }
        if seen > MAX_REQUEST_BODY {
            return Err(too_large());
        }
        Ok(buf)
    };
    let buf = match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(buf)) => buf,
        Ok(Err(refused)) => return refused,
        Err(_) => {
            return api_error(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("request body not received within {BODY_READ_TIMEOUT:?}"),
            );
        }
    };
    next.run(Request::from_parts(parts, Body::from(buf))).await
}

/// Raises this process's soft limit on open files to its hard limit, so
/// descriptors (control API connections, TCP links, the peer cache) run out
/// only where the system says, not at the common soft default of 1024.
/// Returns the (old, new) soft limit if it was raised; a failure leaves the
/// limit as it was. `reach node` calls this at start.
pub fn raise_fd_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
            && limit.rlim_cur < limit.rlim_max
            && libc::setrlimit(
                libc::RLIMIT_NOFILE,
                &libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                },
            ) == 0
    };
    if !raised {
        return None;
    }
    let (old, new) = (limit.rlim_cur, limit.rlim_max);
    tracing::debug!(old, new, "raised the open-files limit");
    Some((old, new))
}

fn new_token() -> Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| Error::Config(format!("random: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Replaces `path` with `contents`, readable only by the owner. Written to a
/// temporary file first and renamed, so a reader never sees half a file.
fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |source| Error::Io {
        context: "writing control API file",
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Compares in time independent of where the strings differ.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if super::dashboard::admits(&state.dashboard, &req) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => next.run(req).await,
        _ if req.uri().path() == "/dashboard" => super::dashboard::login_needed(),
        _ => api_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (see the api-token file in the node's data dir)",
        ),
    }
}

fn api_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    if status.is_client_error() {
        super::metrics::count_api_refusal();
    }
    let body = ApiErrorBody {
        error: ApiErrorDetail {
            kind: kind.to_string(),
            message: message.into(),
        },
    };
    (status, axum::Json(body)).into_response()
}

fn node_error(e: Error) -> Response {
    let status = match &e {
        Error::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Error::NoAddress(_) | Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
        Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    api_error(status, e.kind(), e.to_string())
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            e.to_string(),
        ))
    })
}

fn ok<T: Serialize>(value: T) -> Response {
    (StatusCode::OK, axum::Json(value)).into_response()
}

async fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> Response {
    api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

async fn status(State(state): State<AppState>) -> Response {
    let node = &state.node;
    ok(Status {
        peer_id: node.peer_id(),
        local_addr: node.local_addr(),
        local_addrs: node.local_addrs(),
        connected_peers: node.connected_peers().into_iter().map(Into::into).collect(),
        post_quantum: node.post_quantum().to_string(),
        external: node.external_addrs(),
        relay: node.relay_status(),
        punch: node.punch_stats(),
        stats: node.stats(),
        topics: node.topics_status(),
        build: Some(super::daemon::build_info(state.started)),
    })
}

async fn relay(State(state): State<AppState>) -> Response {
    ok(state.node.relay_status())
}

async fn punch(State(state): State<AppState>) -> Response {
    ok(state.node.punch_stats())
}

async fn stats(State(state): State<AppState>) -> Response {
    ok(state.node.stats())
}

async fn connect(State(state): State<AppState>, body: Bytes) -> Response {
    let req: ConnectRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if let Some(resp) = dial_ticket(&state.node, req.peer, req.ticket.as_deref()).await {
        return resp;
    }
    match state.node.connect(req.peer, req.addrs).await {
        Ok(()) => ok(serde_json::json!({ "connected": true })),
        Err(e) => node_error(e),
    }
}

/// Dials `peer` with `ticket` if one came; an error response if the ticket
/// is malformed, names another peer, or nothing in it worked.
async fn dial_ticket(node: &Node, peer: crate::PeerId, ticket: Option<&str>) -> Option<Response> {
    let ticket: crate::Ticket = match ticket?.parse() {
        Ok(t) => t,
        Err(e) => {
            let e: crate::TicketError = e;
            return Some(api_error(StatusCode::BAD_REQUEST, e.kind(), e.to_string()));
        }
    };
    if ticket.peer != peer {
        return Some(api_error(
            StatusCode::BAD_REQUEST,
            "ticket_peer_mismatch",
            format!("the ticket is for {}, not {peer}", ticket.peer),
        ));
    }
    node.connect_ticket(&ticket).await.err().map(node_error)
}

async fn send(
    State(state): State<AppState>,
    query: axum::extract::RawQuery,
    body: Bytes,
) -> Response {
    if let Some(query) = query.0 {
        return send_bytes(state, &query, body).await;
    }
    let req: SendRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let bytes = req.message.len();
    if let Some(resp) = dial_ticket(&state.node, req.peer, req.ticket.as_deref()).await {
        return resp;
    }
    if !req.addrs.is_empty()
        && let Err(e) = state.node.connect(req.peer, req.addrs).await
    {
        return node_error(e);
    }
    match state.node.send(req.peer, req.message.into_bytes()).await {
        Ok(()) => ok(SendResponse {
            delivered: true,
            bytes,
            durable_id: None,
        }),
        Err(e) => node_error(e),
    }
}

async fn lookup(State(state): State<AppState>, body: Bytes) -> Response {
    let req: LookupRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match state.node.lookup(req.peer).await {
        Ok(addrs) => ok(LookupResponse {
            peer: req.peer,
            addrs,
        }),
        Err(e) => node_error(e),
    }
}

async fn debug_routing(State(state): State<AppState>) -> Response {
    ok(state.node.routing_snapshot())
}

async fn debug_store(State(state): State<AppState>) -> Response {
    ok(state.node.store_snapshot())
}

async fn nat(State(state): State<AppState>) -> Response {
    ok(state.node.nat_report().await)
}

async fn ticket(State(state): State<AppState>) -> Response {
    ok(serde_json::json!({ "ticket": state.node.ticket().to_string() }))
}

impl ApiServer {
    /// The backlog `GET /v1/recv` streams from: the daemon's event loop
    /// hands every event it takes from the node to
    /// [`RecvHub::publish`](super::recv::RecvHub::publish).
    pub fn recv_hub(&self) -> super::recv::RecvHub {
        self.recv.clone()
    }
}

/// `GET /v1/recv[?since=S]`: received messages and events as server-sent
/// events; see [`super::recv`].
async fn recv_stream(State(state): State<AppState>, query: axum::extract::RawQuery) -> Response {
    super::recv::sse(&state.recv, query.0.as_deref())
}

/// `GET /v1/peers`: the connected peers with path kind and RTT.
async fn peers(State(state): State<AppState>) -> Response {
    ok(super::daemon::PeersResponse {
        peers: super::daemon::peer_entries(&state.node),
    })
}

/// `POST /v1/ping`: round trips over the ping echo protocol.
async fn ping(State(state): State<AppState>, body: Bytes) -> Response {
    let req: super::daemon::PingRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let count = req.count.unwrap_or(1);
    if !(1..=super::daemon::MAX_PING_COUNT).contains(&count) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("count must be 1 to {}", super::daemon::MAX_PING_COUNT),
        );
    }
    match super::daemon::ping(&state.node, req.peer, count).await {
        Ok(r) => ok(r),
        Err(e) => node_error(e),
    }
}

/// `POST /v1/send?peer=<id>`: the body is the message's bytes, as is
/// (any content type), up to [`crate::MAX_MESSAGE_LEN`].
async fn send_bytes(state: AppState, query: &str, body: Bytes) -> Response {
    let peer =
        match super::recv::query_param(query, "peer").map(|p| p.parse::<reach_proto::PeerId>()) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                return api_error(StatusCode::BAD_REQUEST, "bad_request", format!("peer: {e}"));
            }
            None => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "a binary send needs ?peer=<peer id>",
                );
            }
        };
    let bytes = body.len();
    if let Some(class) = super::recv::query_param(query, "durable") {
        let delivery = match durable_delivery(class, super::recv::query_param(query, "attempts")) {
            Ok(d) => d,
            Err(msg) => return api_error(StatusCode::BAD_REQUEST, "bad_request", msg),
        };
        let ttl = match super::recv::query_param(query, "ttl_s").map(|t| t.parse::<u64>()) {
            None => None,
            Some(Ok(s)) if s > 0 => Some(std::time::Duration::from_secs(s)),
            Some(_) => {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "ttl_s must be a whole number of seconds above 0",
                );
            }
        };
        return match state.node.send_durable(peer, body, delivery, ttl).await {
            Ok(id) => ok(SendResponse {
                delivered: false,
                bytes,
                durable_id: Some(id.0),
            }),
            Err(e) => node_error(e),
        };
    }
    match state.node.send(peer, body).await {
        Ok(()) => ok(SendResponse {
            delivered: true,
            bytes,
            durable_id: None,
        }),
        Err(e) => node_error(e),
    }
}

/// `?durable=critical|moderate[&attempts=N]` as a delivery class.
fn durable_delivery(class: &str, attempts: Option<&str>) -> Result<crate::Delivery, String> {
    let attempts = match attempts.map(|a| a.parse::<u32>()) {
        None => None,
        Some(Ok(n)) if n > 0 => Some(n),
        Some(_) => return Err("attempts must be a whole number above 0".into()),
    };
    match (class, attempts) {
        ("critical", None) => Ok(crate::Delivery::Critical),
        ("critical", Some(_)) => Err("attempts apply to moderate messages only".into()),
        ("moderate", n) => Ok(crate::Delivery::Moderate {
            attempts: n.unwrap_or(reach_proto::outbox::DEFAULT_MODERATE_ATTEMPTS),
        }),
        (other, _) => Err(format!(
            "durable must be critical or moderate, not {other:?}"
        )),
    }
}

/// `GET /v1/outbox`: the durable messages waiting for their receivers.
async fn outbox(State(state): State<AppState>) -> Response {
    ok(super::OutboxResponse {
        pending: state.node.outbox().into_iter().map(Into::into).collect(),
    })
}

/// The `topic` query parameter, percent-decoded.
fn topic_param(query: Option<&str>) -> Result<String, Box<Response>> {
    query
        .and_then(|q| super::recv::query_param(q, "topic"))
        .and_then(super::topics::decode_name)
        .ok_or_else(|| {
            Box::new(api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "needs ?topic=<percent-encoded name>",
            ))
        })
}

fn topic_error(e: Error) -> Response {
    match &e {
        Error::Topic(crate::topics::TopicRefusal::BadName(_))
        | Error::Topic(crate::topics::TopicRefusal::TooBig(_)) => {
            api_error(StatusCode::BAD_REQUEST, e.kind(), e.to_string())
        }
        Error::Topic(r) if r.kind().ends_with("rate_limited") => {
            api_error(StatusCode::TOO_MANY_REQUESTS, e.kind(), e.to_string())
        }
        _ => node_error(e),
    }
}

/// `POST /v1/topics/publish`: see [`super::topics`].
async fn topic_publish(State(state): State<AppState>, body: Bytes) -> Response {
    let req: super::topics::PublishRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let Some(data) = super::recv::base64_decode(&req.data_b64) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "data_b64 is not base64",
        );
    };
    match super::topics::publish(&state.node, &req.topic, data).await {
        Ok(r) => ok(r),
        Err(e) => topic_error(e),
    }
}

/// `GET /v1/topics/members?topic=T`.
async fn topic_members(State(state): State<AppState>, query: axum::extract::RawQuery) -> Response {
    let topic = match topic_param(query.0.as_deref()) {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    match state.node.members(&topic) {
        Ok(list) => ok(super::topics::MembersResponse {
            topic,
            members: list
                .into_iter()
                .map(|(member, home)| super::topics::MemberEntry { member, home })
                .collect(),
        }),
        Err(e) => topic_error(e),
    }
}

/// `GET /v1/topics/sub?topic=T`: server-sent events for as long as the
/// client stays.
async fn topic_sub(State(state): State<AppState>, query: axum::extract::RawQuery) -> Response {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let topic = match topic_param(query.0.as_deref()) {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    let Some(slot) = state.topic_streams.admit() else {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "{} topic streams are open already; try again",
                super::topics::MAX_TOPIC_STREAMS
            ),
        );
    };
    let sub = match state.node.subscribe_topic(&topic) {
        Ok(s) => s,
        Err(e) => return topic_error(e),
    };
    // The place goes with the stream: freed when the client has gone.
    let stream = futures::stream::unfold((sub, slot), |(mut sub, slot)| async move {
        let ev = sub.next().await?;
        let json =
            serde_json::to_string(&super::topics::TopicStreamEvent::from(ev)).unwrap_or_default();
        Some((
            Ok::<_, std::convert::Infallible>(SseEvent::default().data(json)),
            (sub, slot),
        ))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `GET /metrics`: Prometheus text format (see [`super::metrics`]).
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        super::metrics::render(&state.node),
    )
        .into_response()
}

/// `POST /v1/dashboard/code`: a one-time login code for the dashboard; see
/// [`super::dashboard`].
async fn dashboard_code(State(state): State<AppState>) -> Response {
    match state.dashboard.issue_code() {
        Ok(code) => ok(code),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e.kind(), e.to_string()),
    }
}

/// `GET /dashboard`: the live dashboard page.
async fn dashboard_page() -> Response {
    super::dashboard::page()
}

/// `GET /dashboard/events`: a snapshot per second as server-sent events.
async fn dashboard_events(State(state): State<AppState>) -> Response {
    super::dashboard::events(&state.dashboard, state.node.clone(), state.started)
}

/// `GET /dashboard/login?code=`: trades a login code for a session cookie.
async fn dashboard_login(
    State(state): State<AppState>,
    query: axum::extract::RawQuery,
) -> Response {
    super::dashboard::login(&state.dashboard, query.0.as_deref())
}
