//! A small client of the control API, used by the CLI.
//!
//! It speaks just enough HTTP/1.1 for one request per connection to a
//! loopback address: no redirects, no TLS, no keep-alive.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ApiErrorBody, Discovery, discovery_path, token_path};

/// Longest a request may take, including sends that dial a peer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response accepted.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Why a control API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no running node found for data dir {dir}: {reason} (start one with `reach node --data-dir {dir}`)"
    )]
    NotRunning { dir: PathBuf, reason: String },
    #[error("cannot reach the node's control API at {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("{kind}: {message}")]
    Api {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("malformed response from the control API: {0}")]
    BadResponse(String),
}

impl ClientError {
    /// Stable machine-readable name of this error kind.
    pub fn kind(&self) -> &str {
        match self {
            ClientError::NotRunning { .. } => "not_running",
            ClientError::Unreachable { .. } => "unreachable",
            ClientError::Api { kind, .. } => kind,
            ClientError::BadResponse(_) => "bad_response",
        }
    }
}

/// A client bound to one node's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    token: String,
}

impl ApiClient {
    /// Finds the node serving `data_dir` from its discovery and token files.
    pub fn from_data_dir(dir: &Path) -> Result<Self, ClientError> {
        let not_running = |reason: String| ClientError::NotRunning {
            dir: dir.to_path_buf(),
            reason,
        };
        let disc = std::fs::read(discovery_path(dir))
            .map_err(|e| not_running(format!("{}: {e}", discovery_path(dir).display())))?;
        let disc: Discovery = serde_json::from_slice(&disc)
            .map_err(|e| not_running(format!("{}: {e}", discovery_path(dir).display())))?;
        let token = std::fs::read_to_string(token_path(dir))
            .map_err(|e| not_running(format!("{}: {e}", token_path(dir).display())))?;
        Ok(ApiClient::new(disc.addr, token.trim().to_string()))
    }

    /// A client for the API at `addr` using `token`.
    pub fn new(addr: SocketAddr, token: String) -> Self {
        ApiClient { addr, token }
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.request("GET", path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::BadResponse(e.to_string()))?;
        self.request("POST", path, Some(body)).await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let fut = raw_request(self.addr, Some(&self.token), method, path, body);
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| ClientError::Unreachable {
                addr: self.addr,
                reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
            })??;
        if status != 200 {
            return Err(match serde_json::from_slice::<ApiErrorBody>(&body) {
                Ok(e) => ClientError::Api {
                    status,
                    kind: e.error.kind,
                    message: e.error.message,
                },
                Err(_) => ClientError::BadResponse(format!("HTTP {status}")),
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadResponse(e.to_string()))
    }
}

/// Sends one HTTP/1.1 request and returns (status, body). `token` may be
/// `None` (tests use this to check that such requests are refused).
pub async fn raw_request(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>), ClientError> {
    let unreachable = |e: std::io::Error| ClientError::Unreachable {
        addr,
        reason: e.to_string(),
    };
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(unreachable)?;
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(unreachable)?;
    stream.write_all(&body).await.map_err(unreachable)?;
    let mut resp = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE as u64)
        .read_to_end(&mut resp)
        .await
        .map_err(unreachable)?;
    parse_response(&resp)
}

fn parse_response(resp: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let bad = |m: &str| ClientError::BadResponse(m.to_string());
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&resp[..split]).map_err(|_| bad("headers are not UTF-8"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let raw = &resp[split + 4..];
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    Ok((status, body))
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, ClientError> {
    let bad = || ClientError::BadResponse("bad chunked encoding".into());
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = std::str::from_utf8(&raw[..line_end]).map_err(|_| bad())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size.checked_add(2).ok_or_else(bad)? {
            return Err(bad());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_chunk_size_is_an_error_not_a_panic() {
        let huge = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffff\r\nab";
        assert!(parse_response(huge).is_err());
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
        let chunked = b"HTTP/1.1 401 Unauthorized\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (s, b) = parse_response(chunked).unwrap();
        assert_eq!((s, b.as_slice()), (401, &b"abcde"[..]));
        assert!(parse_response(b"garbage").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nff\r\nab")
                .is_err()
        );
    }
}
