//! The event log: `<data dir>/events.jsonl`, one JSON object per line.
//!
//! Every line is `{"v":1,"ts":"<RFC 3339 UTC, ms>","kind":"...", ...}`
//! with stable fields per kind (docs/events.md lists them). The writer is a
//! task fed by the node's event bus ([`crate::Node::subscribe`]), so nothing
//! on the data path waits for the disk: the bus never blocks its senders,
//! and its bounded per-subscriber queue ([`crate::node::bus::BUS_CAPACITY`])
//! is the writer's queue. When the writer falls behind, the oldest events
//! are skipped and counted, and one `{"kind":"dropped","count":N}` line says
//! so when it catches up; a line the disk refuses counts the same way.
//!
//! The file rotates by size: a line that would take it past
//! [`EventLogConfig::max_file_bytes`] first renames it to
//! `events.1.jsonl` (the older ones move to `events.2.jsonl`, … and the
//! oldest beyond [`EventLogConfig::keep_files`] is deleted).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use reach_proto::PeerId;
use serde_json::{Map, Value, json};

use crate::events::PathKind;
use crate::node::Direction;
use crate::node::bus::{NodeEvent, NodeEvents, Reachability};

/// The log's file name inside the data dir.
pub const EVENT_LOG_FILE: &str = "events.jsonl";
/// The schema version every line carries as `v`: raised only when a field
/// changes meaning or goes away (new kinds and new fields keep it).
pub const SCHEMA_VERSION: u32 = 1;
/// Default size a file reaches before it rotates: months of a quiet node's
/// events, minutes of a busy relay's churn, and small enough to open in an
/// editor.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// Default number of rotated files kept besides the current one: with the
/// default size, at most 32 MiB of log per data dir.
pub const DEFAULT_KEEP_FILES: usize = 3;

/// Whether and how a node with a data dir writes its event log (see
/// [`crate::NodeBuilder::event_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLogConfig {
    /// On by default for nodes with a data dir.
    pub enabled: bool,
    /// Size at which the current file is rotated (a single line longer than
    /// this still gets written, alone in its file).
    pub max_file_bytes: u64,
    /// Rotated files kept (`events.1.jsonl` newest); 0 deletes the current
    /// file at rotation.
    pub keep_files: usize,
}

impl Default for EventLogConfig {
    fn default() -> Self {
        EventLogConfig {
            enabled: true,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            keep_files: DEFAULT_KEEP_FILES,
        }
    }
}

/// The current log file of the data dir `dir`.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join(EVENT_LOG_FILE)
}

/// The `n`th rotated file (1: the newest) of the data dir `dir`.
pub fn rotated_path(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("events.{n}.jsonl"))
}

/// `t` as RFC 3339 in UTC with milliseconds: `2026-11-26T21:30:05.123Z`.
pub fn rfc3339_ms(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The line's kind and fields for a bus event (without `v` and `ts`).
fn fields(ev: &NodeEvent) -> (&'static str, Map<String, Value>) {
    fn path_fields(m: &mut Map<String, Value>, path: &PathKind) {
        let (name, relay) = match path {
            PathKind::Direct => ("direct", None),
            PathKind::Relayed { relay } => ("relayed", Some(relay)),
            PathKind::TcpLink => ("tcp_link", None),
        };
        m.insert("path".into(), name.into());
        if let Some(r) = relay {
            m.insert("relay".into(), r.to_string().into());
        }
    }
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.into(), v);
    };
    let kind = match ev {
        NodeEvent::PeerConnected {
            peer,
            path,
            direction,
        } => {
            put("peer", peer.to_string().into());
            put(
                "direction",
                match direction {
                    Direction::Outbound => "outbound",
                    Direction::Inbound => "inbound",
                }
                .into(),
            );
            path_fields(&mut m, path);
            "connection_up"
        }
        NodeEvent::PeerDisconnected { peer } => {
            put("peer", peer.to_string().into());
            "connection_down"
        }
        NodeEvent::PathChanged { peer, path } => {
            put("peer", peer.to_string().into());
            path_fields(&mut m, path);
            match path {
                PathKind::Relayed { .. } => "path_fell_back",
                PathKind::Direct | PathKind::TcpLink => "path_upgraded",
            }
        }
        NodeEvent::ExternalAddrConfirmed { addr } => {
            put("addr", addr.to_string().into());
            "external_addr_confirmed"
        }
        NodeEvent::ExternalAddrExpired { addr } => {
            put("addr", addr.to_string().into());
            "external_addr_expired"
        }
        NodeEvent::ReachabilityChanged { reachability } => {
            let (state, addr) = match reachability {
                Reachability::Unknown => ("unknown", None),
                Reachability::Public(a) => ("public", Some(a)),
                Reachability::Private => ("private", None),
            };
            put("reachability", state.into());
            if let Some(a) = addr {
                put("addr", a.to_string().into());
            }
            "reachability_changed"
        }
        NodeEvent::RelayAcquired { relay, addr } => {
            put("relay", relay.to_string().into());
            put("addr", addr.to_string().into());
            "relay_acquired"
        }
        NodeEvent::RelayLost { relay } => {
            put("relay", relay.to_string().into());
            "relay_lost"
        }
        NodeEvent::RecordPublished { seq, stored } => {
            put("seq", (*seq).into());
            put("stored", (*stored).into());
            "record_published"
        }
        NodeEvent::PortMapped { external } => {
            put("external", external.to_string().into());
            "port_mapped"
        }
        NodeEvent::PortUnmapped { external } => {
            put("external", external.to_string().into());
            "port_unmapped"
        }
        NodeEvent::PunchOutcome {
            peer,
            technique,
            direct,
            time_to_direct_ms,
            error_kind,
        } => {
            put("peer", peer.to_string().into());
            put("technique", (*technique).into());
            put("direct", (*direct).into());
            put("time_to_direct_ms", json!(time_to_direct_ms));
            put("error_kind", json!(error_kind));
            "punch"
        }
        NodeEvent::OutboxDelivered { id, peer } => {
            put("id", (*id).into());
            put("peer", peer.to_string().into());
            "outbox_delivered"
        }
        NodeEvent::OutboxAbandoned { id, peer, reason } => {
            put("id", (*id).into());
            put("peer", peer.to_string().into());
            put("reason", (*reason).into());
            "outbox_abandoned"
        }
        NodeEvent::TopicJoined { topic, home } => {
            put("topic", topic.as_str().into());
            put("home", home.to_string().into());
            "topic_joined"
        }
        NodeEvent::TopicLeft { topic } => {
            put("topic", topic.as_str().into());
            "topic_left"
        }
        NodeEvent::TopicLinkUp { peer } => {
            put("peer", peer.to_string().into());
            "topic_link_up"
        }
        NodeEvent::TopicLinkDown { peer } => {
            put("peer", peer.to_string().into());
            "topic_link_down"
        }
    };
    (kind, m)
}

/// One line: `v`, `ts`, `kind` first, then the kind's fields.
fn line(kind: &str, fields: Map<String, Value>, now: SystemTime) -> Vec<u8> {
    // serde_json's map is sorted, so the head is written by hand to keep
    // `v`, `ts`, `kind` first for a reader's eye.
    let mut out = format!(
        "{{\"v\":{SCHEMA_VERSION},\"ts\":\"{}\",\"kind\":{}",
        rfc3339_ms(now),
        Value::from(kind)
    );
    for (k, v) in fields {
        out.push(',');
        out.push_str(&Value::from(k).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push_str("}\n");
    out.into_bytes()
}

/// The open log file and its rotation.
struct LogFile {
    dir: PathBuf,
    config: EventLogConfig,
    file: File,
    size: u64,
}

impl LogFile {
    fn open(dir: &Path, config: EventLogConfig) -> io::Result<LogFile> {
        let file = open_append(&log_path(dir))?;
        let mut log = LogFile {
            dir: dir.to_path_buf(),
            config,
            size: file.metadata()?.len(),
            file,
        };
        // A line cut short by a crash must not swallow our first line: end it.
        if log.size > 0 {
            let mut last = [0u8];
            let mut f = File::open(log_path(dir))?;
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                log.file.write_all(b"\n")?;
                log.size += 1;
            }
        }
        Ok(log)
    }

    /// Appends one whole line, rotating first if it would not fit.
    fn write(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.config.max_file_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.config.keep_files;
        let current = log_path(&self.dir);
        if keep == 0 {
            fs::remove_file(&current)?;
        } else {
            for n in (1..keep).rev() {
                match fs::rename(rotated_path(&self.dir, n), rotated_path(&self.dir, n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            fs::rename(&current, rotated_path(&self.dir, 1))?;
        }
        self.file = open_append(&current)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// The writer task's state: the file, and what it could not write yet.
struct Writer {
    log: LogFile,
    /// Events skipped or refused and not reported in a `dropped` line yet.
    dropped: u64,
    /// Bus lag already counted into `dropped`.
    missed_seen: u64,
    /// Whether the last write failed (warn once per run of failures).
    failing: bool,
}

impl Writer {
    fn put(&mut self, kind: &str, fields: Map<String, Value>) {
        let l = line(kind, fields, SystemTime::now());
        match self.log.write(&l) {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, dir = %self.log.dir.display(), "cannot write the event log; counting events as dropped");
                }
                self.failing = true;
                self.dropped += 1;
            }
        }
    }

    /// Writes the pending `dropped` line (bus lag included) if any.
    fn report_drops(&mut self, events: &NodeEvents) {
        let missed = events.missed();
        self.dropped += missed - self.missed_seen;
        self.missed_seen = missed;
        if self.dropped > 0 {
            let count = self.dropped;
            self.dropped = 0;
            let mut m = Map::new();
            m.insert("count".into(), count.into());
            self.put("dropped", m);
            if self.failing {
                // Not written either: still owed.
                self.dropped += count - 1;
            }
        }
    }

    fn event(&mut self, ev: &NodeEvent, events: &NodeEvents) {
        self.report_drops(events);
        let (kind, m) = fields(ev);
        self.put(kind, m);
    }
}

/// Opens the log and starts the writer: it logs `start` now, every bus
/// event from `events` on, and `stop` when the node shuts down gracefully.
/// A log that cannot be opened is a warning, not a failed start.
pub(crate) fn start(
    core: &crate::node::core::Core,
    dir: &Path,
    config: EventLogConfig,
    peer_id: PeerId,
    addr: SocketAddr,
) {
    let log = match LogFile::open(dir, config) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "running without an event log");
            return;
        }
    };
    let mut events = core.bus.subscribe();
    let stopping = core.tasks.stopping();
    let mut w = Writer {
        log,
        dropped: 0,
        missed_seen: 0,
        failing: false,
    };
    let mut m = Map::new();
    m.insert("peer_id".into(), peer_id.to_string().into());
    m.insert("addr".into(), addr.to_string().into());
    m.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    w.put("start", m);
    // A flushing task: at shutdown it writes what is queued and `stop`.
    core.tasks.spawn_flushing(async move {
        loop {
            tokio::select! {
                biased;
                _ = stopping.cancelled() => break,
                ev = events.next() => match ev {
                    Some(ev) => w.event(&ev, &events),
                    None => break,
                },
            }
        }
        while let Some(ev) = events.try_next() {
            w.event(&ev, &events);
        }
        w.report_drops(&events);
        w.put("stop", Map::new());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc_with_ms() {
        assert_eq!(rfc3339_ms(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T23:59:59.987Z: a leap day, the last second of it.
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_987);
        assert_eq!(rfc3339_ms(t), "2024-02-29T23:59:59.987Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_800);
        assert_eq!(rfc3339_ms(t), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn lines_start_with_version_time_kind() {
        let relay = reach_proto::Keypair::generate().peer_id();
        let (kind, m) = fields(&NodeEvent::RelayLost { relay });
        let l = String::from_utf8(line(kind, m, UNIX_EPOCH)).unwrap();
        assert_eq!(
            l,
            format!(
                "{{\"v\":1,\"ts\":\"1970-01-01T00:00:00.000Z\",\"kind\":\"relay_lost\",\"relay\":\"{relay}\"}}\n"
            )
        );
    }

    #[test]
    fn rotation_keeps_n_files_and_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let config = EventLogConfig {
            enabled: true,
            max_file_bytes: 100,
            keep_files: 2,
        };
        let mut log = LogFile::open(dir.path(), config).unwrap();
        for i in 0..20 {
            log.write(format!("{{\"n\":\"{i:03}\",\"pad\":\"....\"}}\n").as_bytes())
                .unwrap();
        }
        let read = |p: PathBuf| fs::read_to_string(p).unwrap_or_default();
        let all = read(rotated_path(dir.path(), 2))
            + &read(rotated_path(dir.path(), 1))
            + &read(log_path(dir.path()));
        let ns: Vec<u32> = all
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["n"].as_str().unwrap().parse().unwrap()
            })
            .collect();
        // 25-byte lines, 4 per file: the newest 12 lines survive, in order.
        assert_eq!(ns, (8..20).collect::<Vec<_>>());
        assert!(!rotated_path(dir.path(), 3).exists());
        for p in [log_path(dir.path()), rotated_path(dir.path(), 1)] {
            assert!(fs::metadata(p).unwrap().len() <= 100);
        }
    }

    #[test]
    fn a_lagging_writer_counts_what_it_missed_in_one_dropped_line() {
        use crate::node::bus::{BUS_CAPACITY, Bus};
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::default();
        let mut events = bus.subscribe();
        let mut w = Writer {
            log: LogFile::open(dir.path(), EventLogConfig::default()).unwrap(),
            dropped: 0,
            missed_seen: 0,
            failing: false,
        };
        let relay = reach_proto::Keypair::generate().peer_id();
        // The writer sleeps while the bus overflows its queue by 10.
        for _ in 0..BUS_CAPACITY + 10 {
            bus.emit(NodeEvent::RelayLost { relay });
        }
        while let Some(ev) = events.try_next() {
            w.event(&ev, &events);
        }
        bus.emit(NodeEvent::RelayLost { relay });
        let ev = events.try_next().unwrap();
        w.event(&ev, &events);
        let text = fs::read_to_string(log_path(dir.path())).unwrap();
        let kinds: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].to_string())
            .collect();
        assert_eq!(kinds.len(), BUS_CAPACITY + 2);
        assert_eq!(
            kinds[0], "\"dropped\"",
            "the drop is told before the next line"
        );
        assert!(text.lines().next().unwrap().contains("\"count\":10"));
        assert!(kinds[1..].iter().all(|k| k == "\"relay_lost\""));
    }

    #[test]
    fn a_line_cut_by_a_crash_is_ended_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(log_path(dir.path()), "{\"v\":1,\"ts\":\"19").unwrap();
        let mut log = LogFile::open(dir.path(), EventLogConfig::default()).unwrap();
        log.write(b"{\"v\":1}\n").unwrap();
        let text = fs::read_to_string(log_path(dir.path())).unwrap();
        assert_eq!(text.lines().nth(1), Some("{\"v\":1}"));
    }
}
