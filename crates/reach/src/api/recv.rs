//! Receiving through the control API: `GET /v1/recv`, a server-sent-events
//! stream of what the node received (messages, binary-safe as base64) and
//! its connection events, one JSON object per SSE `data:` line.
//!
//! The daemon's event loop (the one that prints to stdout) hands each event
//! to [`RecvHub::publish`], which appends it to a bounded ring and returns at
//! once: it never waits for a client. Every client reads the ring at its own
//! cursor. A client too slow to keep up loses the oldest events and is told
//! how many (`{"kind":"missed","count":N}`); the node never slows down.
//!
//! Kept without a client: the ring is a small backlog (the newest
//! [`RECV_BACKLOG_EVENTS`] events, at most [`RECV_BACKLOG_BYTES`] of JSON).
//! Every event carries a `seq` (counting from 1 since the node started);
//! `GET /v1/recv?since=S` starts with the events after `S` still in the
//! backlog (`since=0`: the whole backlog), without it the stream starts with
//! the next event. A restart of the node empties the backlog.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::events::Event;

/// Events the backlog keeps. Enough for a client that reconnects after a
/// few seconds on a busy node (connection events are small), small enough
/// to bound the bookkeeping.
pub const RECV_BACKLOG_EVENTS: usize = 1024;
/// Bytes of event JSON the backlog keeps: four of the largest messages
/// ([`crate::MAX_MESSAGE_LEN`], base64 is 4/3 of it), like the messaging
/// layer's own queue. The newest event is always kept, whatever its size.
pub const RECV_BACKLOG_BYTES: usize = 4 * crate::MAX_MESSAGE_LEN * 4 / 3;
/// `GET /v1/recv` streams open at once. Each holds a control API
/// connection for as long as it lasts; the cap keeps them from taking all
/// of [`super::MAX_API_CONNECTIONS`]. Past it, a new stream is refused
/// with a JSON 503 `busy`. A client that went away gives its place back
/// when the server next writes to it (an event, or the SSE keep-alive
/// comment every 15 s).
pub const MAX_RECV_CLIENTS: usize = 32;

/// One event of the `/v1/recv` stream, as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RecvEvent {
    /// A whole message: `data_b64` is its bytes in standard base64 (with
    /// padding), `len` their number.
    Message {
        seq: u64,
        from: String,
        data_b64: String,
        len: usize,
    },
    /// `peer` connected over `path` (`direct`, `relayed`, `tcp`).
    Connected {
        seq: u64,
        peer: String,
        path: String,
        direction: String,
    },
    /// `peer` has no connection any more.
    Disconnected { seq: u64, peer: String },
    /// Traffic to `peer` moved to `path`.
    PathChanged {
        seq: u64,
        peer: String,
        path: String,
    },
    /// This client missed `count` events: it was slower than the node, or
    /// asked with `since` for events no longer in the backlog.
    Missed { count: u64 },
}

/// The path kind as one word: `direct`, `relayed` or `tcp`.
pub fn path_word(path: &crate::PathKind) -> &'static str {
    match path {
        crate::PathKind::Direct => "direct",
        crate::PathKind::Relayed { .. } => "relayed",
        crate::PathKind::TcpLink => "tcp",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

impl RecvEvent {
    /// The stream's form of `event`, numbered `seq`; `None` for events the
    /// stream does not carry (streams).
    pub fn from_event(event: &Event, seq: u64) -> Option<RecvEvent> {
        let dir = |d: &crate::Direction| match d {
            crate::Direction::Inbound => "inbound",
            crate::Direction::Outbound => "outbound",
        };
        Some(match event {
            Event::Message { from, data } => RecvEvent::Message {
                seq,
                from: from.to_string(),
                data_b64: base64_encode(data),
                len: data.len(),
            },
            // A durable message reaches API clients as a message: the
            // daemon marks it done once it is in this stream's backlog.
            Event::Durable(m) => RecvEvent::Message {
                seq,
                from: m.from.to_string(),
                data_b64: base64_encode(&m.data),
                len: m.data.len(),
            },
            Event::Connected {
                peer,
                path,
                direction,
            } => RecvEvent::Connected {
                seq,
                peer: peer.to_string(),
                path: path_word(path).into(),
                direction: dir(direction).into(),
            },
            Event::Disconnected { peer } => RecvEvent::Disconnected {
                seq,
                peer: peer.to_string(),
            },
            Event::PathChanged { peer, path } => RecvEvent::PathChanged {
                seq,
                peer: peer.to_string(),
                path: path_word(path).into(),
            },
            _ => return None,
        })
    }
}

struct Ring {
    /// Sequence number of the next event published (the first is 1).
    next_seq: u64,
    /// (seq, JSON) of the kept events, oldest first.
    events: VecDeque<(u64, Arc<str>)>,
    bytes: usize,
}

/// The bounded backlog `GET /v1/recv` clients read from. Cheap to clone.
#[derive(Clone)]
pub struct RecvHub {
    ring: Arc<Mutex<Ring>>,
    /// The seq of the newest event; clients wait on it.
    newest: Arc<tokio::sync::watch::Sender<u64>>,
    clients: super::slots::StreamSlots,
}

impl Default for RecvHub {
    fn default() -> Self {
        RecvHub {
            ring: Arc::new(Mutex::new(Ring {
                next_seq: 1,
                events: VecDeque::new(),
                bytes: 0,
            })),
            newest: Arc::new(tokio::sync::watch::Sender::new(0)),
            clients: super::slots::StreamSlots::new(MAX_RECV_CLIENTS),
        }
    }
}

/// What a client got from [`RecvHub::read_from`].
pub(crate) enum Read {
    /// Events `cursor` missed (dropped from the backlog), then the events
    /// from there on.
    Events {
        missed: u64,
        events: Vec<Arc<str>>,
        next: u64,
    },
    /// Nothing new yet.
    Nothing,
}

impl RecvHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Plain bookkeeping under the lock: a poisoned one is consistent.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `event` to the backlog (dropping the oldest past the
    /// bounds) and wakes the clients. Never waits for them.
    pub fn publish(&self, event: &Event) {
        let mut ring = self.lock();
        let seq = ring.next_seq;
        let Some(e) = RecvEvent::from_event(event, seq) else {
            return;
        };
        let Ok(json) = serde_json::to_string(&e) else {
            return;
        };
        ring.next_seq += 1;
        ring.bytes += json.len();
        ring.events.push_back((seq, json.into()));
        while ring.events.len() > 1
            && (ring.events.len() > RECV_BACKLOG_EVENTS || ring.bytes > RECV_BACKLOG_BYTES)
        {
            if let Some((_, old)) = ring.events.pop_front() {
                ring.bytes -= old.len();
            }
        }
        drop(ring);
        self.newest.send_replace(seq);
    }

    /// The seq the next published event will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// The events from seq `cursor` on, at most `max_bytes` of them
    /// (at least one).
    pub(crate) fn read_from(&self, cursor: u64, max_bytes: usize) -> Read {
        let ring = self.lock();
        let oldest = ring
            .events
            .front()
            .map(|(s, _)| *s)
            .unwrap_or(ring.next_seq);
        let start = cursor.max(oldest);
        let missed = start - cursor;
        let mut events = Vec::new();
        let mut bytes = 0;
        let mut next = start;
        let skip = (start - oldest) as usize;
        for (seq, json) in ring.events.iter().skip(skip) {
            if !events.is_empty() && bytes + json.len() > max_bytes {
                break;
            }
            bytes += json.len();
            events.push(json.clone());
            next = seq + 1;
        }
        if missed == 0 && events.is_empty() {
            return Read::Nothing;
        }
        Read::Events {
            missed,
            events,
            next,
        }
    }

    /// A receiver woken on every publish.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// Takes one of the [`MAX_RECV_CLIENTS`] stream places, if free.
    pub(crate) fn admit(&self) -> Option<super::slots::StreamSlot> {
        self.clients.admit()
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    let sextet = |n: u32, shift: u32| B64[((n >> shift) & 63) as usize];
    let mut whole = data.chunks_exact(3);
    for c in &mut whole {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), sextet(n, 6), sextet(n, 0)]);
    }
    match *whole.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), b'=', b'=']);
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.extend_from_slice(&[sextet(n, 18), sextet(n, 12), sextet(n, 6), b'=']);
        }
        _ => {}
    }
    // Only characters of the base64 alphabet were pushed.
    String::from_utf8(out).unwrap_or_default()
}

/// Decodes standard base64 with padding; `None` if `text` is not that.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.len() / 4;
    for (i, q) in text.chunks(4).enumerate() {
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// Events one wake-up of a stream takes from the backlog at most (bytes
/// of JSON; at least one event): bounds what a stream holds outside the
/// backlog.
const STREAM_BATCH_BYTES: usize = 1024 * 1024;

/// The value of `name` in a URL query string (`a=1&b=2`), undecoded: the
/// values used here (numbers, peer ids) need no percent-decoding.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `GET /v1/recv` answer: refusals as JSON, else the event stream.
pub(crate) fn sse(hub: &RecvHub, query: Option<&str>) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let error = |status: StatusCode, kind: &str, message: String| {
        let body = super::ApiErrorBody {
            error: super::ApiErrorDetail {
                kind: kind.into(),
                message,
            },
        };
        (status, axum::Json(body)).into_response()
    };
    let start = match query.and_then(|q| query_param(q, "since")) {
        None => hub.next_seq(),
        Some(s) => match s.parse::<u64>() {
            Ok(s) => s.saturating_add(1).min(hub.next_seq()),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("since must be an event seq (a number), not {s:?}"),
                );
            }
        },
    };
    let Some(slot) = hub.admit() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{MAX_RECV_CLIENTS} event streams are open already; try again"),
        );
    };
    struct Cursor {
        hub: RecvHub,
        next: u64,
        wake: tokio::sync::watch::Receiver<u64>,
        pending: VecDeque<SseEvent>,
        _slot: super::slots::StreamSlot,
    }
    let cursor = Cursor {
        hub: hub.clone(),
        next: start,
        wake: hub.subscribe(),
        pending: VecDeque::new(),
        _slot: slot,
    };
    let stream = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(ev) = c.pending.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(ev), c));
            }
            // Marked seen before reading, so a publish after the read
            // wakes the wait below.
            c.wake.borrow_and_update();
            match c.hub.read_from(c.next, STREAM_BATCH_BYTES) {
                Read::Events {
                    missed,
                    events,
                    next,
                } => {
                    if missed > 0 {
                        let json = serde_json::to_string(&RecvEvent::Missed { count: missed })
                            .unwrap_or_default();
                        c.pending.push_back(SseEvent::default().data(json));
                    }
                    c.pending
                        .extend(events.iter().map(|e| SseEvent::default().data(&**e)));
                    c.next = next;
                }
                Read::Nothing => {
                    if c.wake.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(n: usize) -> Event {
        Event::Message {
            from: crate::Keypair::generate().peer_id(),
            data: Bytes::from(vec![7u8; n]),
        }
    }

    #[test]
    fn base64_round_trips_every_length_and_refuses_garbage() {
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
        for n in 0..300usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 131 + 7) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data);
        }
        assert!(base64_decode("Zm9").is_none());
        assert!(base64_decode("Zm=v").is_none());
        assert!(base64_decode("Zm9v\n").is_none());
        assert!(base64_decode("Zg==Zg==").is_none());
    }

    #[test]
    fn a_slow_reader_is_told_how_many_it_missed_and_the_newest_is_kept() {
        let hub = RecvHub::default();
        for _ in 0..RECV_BACKLOG_EVENTS + 10 {
            hub.publish(&message(1));
        }
        match hub.read_from(1, usize::MAX) {
            Read::Events {
                missed,
                events,
                next,
            } => {
                assert_eq!(missed, 10);
                assert_eq!(events.len(), RECV_BACKLOG_EVENTS);
                assert_eq!(next, RECV_BACKLOG_EVENTS as u64 + 11);
            }
            Read::Nothing => panic!("events expected"),
        }
        assert!(matches!(
            hub.read_from(hub.next_seq(), usize::MAX),
            Read::Nothing
        ));
        // Big messages: the byte bound drops old ones, the newest stays.
        let hub = RecvHub::default();
        for _ in 0..6 {
            hub.publish(&message(crate::MAX_MESSAGE_LEN));
        }
        match hub.read_from(1, 0) {
            Read::Events { missed, events, .. } => {
                assert!(missed >= 2, "missed {missed}");
                assert_eq!(events.len(), 1, "max_bytes 0 still yields one");
            }
            Read::Nothing => panic!("events expected"),
        }
    }
}
