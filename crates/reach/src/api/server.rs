//! Serving the control API.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{
    ApiErrorBody, ApiErrorDetail, ConnectRequest, Discovery, LookupRequest, LookupResponse,
    MAX_REQUEST_BODY, SendRequest, SendResponse, Status, discovery_path, stats_json, token_path,
};
use crate::error::{Error, Result};
use crate::keystore;
use crate::node::Node;

/// Bytes of randomness in a token.
const TOKEN_BYTES: usize = 32;

/// A running control API. Stops when [`ApiServer::stop`] is called or the
/// value is dropped.
pub struct ApiServer {
    addr: SocketAddr,
    discovery: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// The address the API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and removes the discovery file.
    pub async fn stop(mut self) {
        self.stop_now();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = std::fs::remove_file(&self.discovery);
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

    let state = AppState { node, token };
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats))
        .route("/v1/connect", post(connect))
        .route("/v1/send", post(send))
        .route("/v1/lookup", post(lookup))
        .route("/v1/nat", get(nat))
        .route("/v1/relay", get(relay))
        .route("/v1/punch", get(punch))
        .route("/debug/routing", get(debug_routing))
        .route("/debug/store", get(debug_store))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stop_rx.await;
        });
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "control API stopped with an error");
        }
    });
    tracing::info!(%addr, "control API listening");
    Ok(ApiServer {
        addr,
        discovery: discovery_file,
        stop: Some(stop_tx),
        task: Some(task),
    })
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => next.run(req).await,
        _ => api_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (see the api-token file in the node's data dir)",
        ),
    }
}

fn api_error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
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

async fn status(State(state): State<AppState>) -> Response {
    let node = &state.node;
    ok(Status {
        peer_id: node.peer_id(),
        local_addr: node.local_addr(),
        local_addrs: node.local_addrs(),
        connected_peers: node.connected_peers().into_iter().map(Into::into).collect(),
        post_quantum: node.post_quantum().to_string(),
        external: node.external_addrs(),
        relay: serde_json::to_value(node.relay_status()).unwrap_or_default(),
        punch: serde_json::to_value(node.punch_stats()).unwrap_or_default(),
        stats: stats_json(&node.stats()),
    })
}

async fn relay(State(state): State<AppState>) -> Response {
    ok(state.node.relay_status())
}

async fn punch(State(state): State<AppState>) -> Response {
    ok(state.node.punch_stats())
}

async fn stats(State(state): State<AppState>) -> Response {
    ok(stats_json(&state.node.stats()))
}

async fn connect(State(state): State<AppState>, body: Bytes) -> Response {
    let req: ConnectRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match state.node.connect(req.peer, req.addrs).await {
        Ok(()) => ok(serde_json::json!({ "connected": true })),
        Err(e) => node_error(e),
    }
}

async fn send(State(state): State<AppState>, body: Bytes) -> Response {
    let req: SendRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let bytes = req.message.len();
    if !req.addrs.is_empty()
        && let Err(e) = state.node.connect(req.peer, req.addrs).await
    {
        return node_error(e);
    }
    match state.node.send(req.peer, req.message.into_bytes()).await {
        Ok(()) => ok(SendResponse {
            delivered: true,
            bytes,
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
