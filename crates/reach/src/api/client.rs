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

    /// The address of the API this client talks to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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

impl ApiClient {
    /// `POST path` with `body` as raw bytes (`application/octet-stream`),
    /// e.g. a binary message to `/v1/send?peer=<id>`.
    pub async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let fut = raw_request_typed(
            self.addr,
            Some(&self.token),
            "POST",
            path,
            "application/octet-stream",
            body,
        );
        let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| ClientError::Unreachable {
                addr: self.addr,
                reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
            })??;
        decode_answer(status, &body)
    }

    /// Opens the server-sent-events stream at `path` (`/v1/recv`); refusals
    /// come back as errors. The connection opens within
    /// [`REQUEST_TIMEOUT`]; the stream itself has no deadline.
    pub async fn open_events(&self, path: &str) -> Result<EventStream, ClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, EventStream::open(self, path))
            .await
            .map_err(|_| ClientError::Unreachable {
                addr: self.addr,
                reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
            })?
    }
}

/// A 200 answer's JSON as `T`, any other answer as its typed error.
fn decode_answer<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, ClientError> {
    if status != 200 {
        return Err(match serde_json::from_slice::<ApiErrorBody>(body) {
            Ok(e) => ClientError::Api {
                status,
                kind: e.error.kind,
                message: e.error.message,
            },
            Err(_) => ClientError::BadResponse(format!("HTTP {status}")),
        });
    }
    serde_json::from_slice(body).map_err(|e| ClientError::BadResponse(e.to_string()))
}

/// [`raw_request`] with a body of `content_type`.
pub async fn raw_request_typed(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), ClientError> {
    let unreachable = |e: std::io::Error| ClientError::Unreachable {
        addr,
        reason: e.to_string(),
    };
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(unreachable)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
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

/// Largest event (its `data`) an [`EventStream`] accepts: a message of
/// [`crate::MAX_MESSAGE_LEN`] as base64 (4/3 of it) plus its JSON fields.
pub const MAX_EVENT_BYTES: usize = crate::MAX_MESSAGE_LEN / 3 * 4 + 64 * 1024;
/// Largest response head an [`EventStream`] reads.
const MAX_STREAM_HEAD: usize = 16 * 1024;

/// A server-sent-events stream from the control API (`GET /v1/recv`).
pub struct EventStream {
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    /// Bytes read and not yet decoded from the transfer encoding.
    raw: Vec<u8>,
    chunked: bool,
    /// Bytes left of the current chunk; `None` between chunks.
    chunk_left: Option<usize>,
    /// Decoded body not yet split into lines.
    body: Vec<u8>,
    /// Bytes at the start of `body` known to hold no newline.
    scanned: usize,
    /// The `data` lines of the event being read.
    data: Option<String>,
    ended: bool,
}

impl EventStream {
    async fn open(client: &ApiClient, path: &str) -> Result<EventStream, ClientError> {
        let addr = client.addr;
        let unreachable = |e: std::io::Error| ClientError::Unreachable {
            addr,
            reason: e.to_string(),
        };
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(unreachable)?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/event-stream\r\nAuthorization: Bearer {}\r\n\r\n",
            client.token
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(unreachable)?;
        let mut raw = Vec::new();
        let split = loop {
            if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            if raw.len() > MAX_STREAM_HEAD {
                return Err(ClientError::BadResponse("response head too large".into()));
            }
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.map_err(unreachable)?;
            if n == 0 {
                return Err(ClientError::BadResponse("closed before the head".into()));
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let ok = head.split_whitespace().nth(1) == Some("200");
        if !ok {
            // A refusal: a small JSON body; read it whole.
            (&mut stream)
                .take(MAX_RESPONSE as u64)
                .read_to_end(&mut raw)
                .await
                .map_err(unreachable)?;
            let (status, body) = parse_response(&raw)?;
            return Err(decode_answer::<serde_json::Value>(status, &body)
                .err()
                .unwrap_or_else(|| ClientError::BadResponse(format!("HTTP {status}"))));
        }
        let chunked = head
            .lines()
            .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        let raw = raw.split_off(split + 4);
        Ok(EventStream {
            stream,
            addr,
            raw,
            chunked,
            chunk_left: None,
            body: Vec::new(),
            scanned: 0,
            data: None,
            ended: false,
        })
    }

    /// The next event's data (one JSON object for `/v1/recv`); `None` once
    /// the server closed the stream (the node stopped).
    pub async fn next(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            while let Some(nl) = self.body[self.scanned..].iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.body.drain(..=self.scanned + nl).collect();
                self.scanned = 0;
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    if let Some(data) = self.data.take() {
                        return Ok(Some(data));
                    }
                    continue;
                }
                if let Some(value) = line.strip_prefix(b"data:") {
                    let value = value.strip_prefix(b" ").unwrap_or(value);
                    let value = std::str::from_utf8(value)
                        .map_err(|_| ClientError::BadResponse("event data not UTF-8".into()))?;
                    let data = self.data.get_or_insert_with(String::new);
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                    if data.len() > MAX_EVENT_BYTES {
                        return Err(ClientError::BadResponse("event too large".into()));
                    }
                }
                // Comments (keep-alives), `id:`, `event:` are skipped.
            }
            // No newline in what is here: the next search starts after it
            // (a line of megabytes arrives in many reads).
            self.scanned = self.body.len();
            if self.body.len() > MAX_EVENT_BYTES {
                return Err(ClientError::BadResponse("event line too large".into()));
            }
            if self.ended {
                return Ok(None);
            }
            if !self.decode()? {
                let mut buf = vec![0u8; 64 * 1024];
                let n = self
                    .stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| ClientError::Unreachable {
                        addr: self.addr,
                        reason: e.to_string(),
                    })?;
                if n == 0 {
                    self.ended = true;
                    continue;
                }
                self.raw.extend_from_slice(&buf[..n]);
            }
        }
    }

    /// Moves what it can of `raw` into `body`, undoing the chunked
    /// encoding; whether it made progress.
    fn decode(&mut self) -> Result<bool, ClientError> {
        if !self.chunked {
            let moved = !self.raw.is_empty();
            self.body.append(&mut self.raw);
            return Ok(moved);
        }
        let bad = || ClientError::BadResponse("bad chunked encoding".into());
        let mut progress = false;
        loop {
            match self.chunk_left {
                Some(0) => {
                    if self.raw.len() < 2 {
                        return Ok(progress);
                    }
                    if &self.raw[..2] != b"\r\n" {
                        return Err(bad());
                    }
                    self.raw.drain(..2);
                    self.chunk_left = None;
                    progress = true;
                }
                Some(left) => {
                    if self.raw.is_empty() {
                        return Ok(progress);
                    }
                    let n = left.min(self.raw.len());
                    self.body.extend(self.raw.drain(..n));
                    self.chunk_left = Some(left - n);
                    progress = true;
                }
                None => {
                    let Some(end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                        if self.raw.len() > 64 {
                            return Err(bad());
                        }
                        return Ok(progress);
                    };
                    let text = std::str::from_utf8(&self.raw[..end]).map_err(|_| bad())?;
                    let size =
                        usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                            .map_err(|_| bad())?;
                    self.raw.drain(..end + 2);
                    progress = true;
                    if size == 0 {
                        self.ended = true;
                        return Ok(true);
                    }
                    self.chunk_left = Some(size);
                }
            }
        }
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
