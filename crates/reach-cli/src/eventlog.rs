//! `reach events [--follow] [--json]`: the node's event log, read straight
//! from the data dir (works while the daemon runs and after it stopped).
//!
//! Old files first (`events.N.jsonl` … `events.1.jsonl`), then
//! `events.jsonl`. A line that is not a JSON event (one cut short by a
//! crash) is skipped with a warning on stderr. `--follow` then keeps
//! reading new lines, and when the node rotates the file it finishes the
//! old one and goes on with the new one.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reach::eventlog::{log_path, rotated_path};
use serde_json::Value;

/// How often `--follow` looks for new lines: well under a second, so a
/// person watching sees events as they happen, and a few cheap reads a
/// second when nothing happens.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Rotated files looked for: far more than a node keeps (3 by default), a
/// bound on the scan all the same.
const MAX_ROTATED_FILES: usize = 1000;
/// Longest line kept while waiting for its end in `--follow`: the writer's
/// lines are a few hundred bytes; more is not a line of ours.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// Prints the log of `dir`; with `follow`, keeps printing until stopped.
pub fn run(dir: &Path, follow: bool, json: bool) -> Result<()> {
    let current = log_path(dir);
    if !follow && !current.exists() {
        bail!(
            "no event log at {}: a node started with this data dir writes one (`reach node`; \
             it is on unless `event_log = false`)",
            current.display()
        );
    }
    let mut out = Printer {
        json,
        stdout: io::stdout().lock(),
    };
    let mut older: Vec<PathBuf> = (1..=MAX_ROTATED_FILES)
        .map(|n| rotated_path(dir, n))
        .take_while(|p| p.exists())
        .collect();
    older.reverse();
    for p in older {
        // Rotated away between the listing and now: its lines moved on to
        // the next name, which is read next or was read already.
        let Ok(mut f) = File::open(&p) else { continue };
        let mut r = LineReader::new(&p);
        r.read_from(&mut f, &mut out)?;
        r.finish(&mut out)?;
    }
    if !follow {
        let mut f =
            File::open(&current).with_context(|| format!("opening {}", current.display()))?;
        let mut r = LineReader::new(&current);
        r.read_from(&mut f, &mut out)?;
        return r.finish(&mut out);
    }
    let mut open: Option<(File, u64, LineReader)> = None;
    loop {
        if open.is_none()
            && let Ok(f) = File::open(&current)
        {
            let ino = f.metadata()?.ino();
            open = Some((f, ino, LineReader::new(&current)));
        }
        if let Some((f, ino, r)) = &mut open {
            let got = r.read_from(f, &mut out)?;
            if got == 0 {
                // Nothing new: has the node rotated the file?
                let moved = std::fs::metadata(&current).map_or(true, |m| m.ino() != *ino);
                if moved {
                    // The old file is complete: finish it and go on with
                    // the new one.
                    r.read_from(f, &mut out)?;
                    r.finish(&mut out)?;
                    open = None;
                    continue;
                }
            }
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// Prints events as text or as their JSON lines.
struct Printer<W: Write> {
    json: bool,
    stdout: W,
}

impl<W: Write> Printer<W> {
    /// Prints one event; `Err` when stdout is gone (the reader quit).
    fn event(&mut self, raw: &str, v: &Value) -> io::Result<()> {
        if self.json {
            writeln!(self.stdout, "{raw}")
        } else {
            writeln!(self.stdout, "{}", text_line(v))
        }
    }
}

/// One readable line: time, kind, then `field=value` for the rest.
pub fn text_line(v: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => escape(s),
        other => other.to_string(),
    };
    let mut line = format!(
        "{} {:<24}",
        v.get("ts").map(s).unwrap_or_default(),
        v.get("kind").map(s).unwrap_or_default()
    );
    if let Some(m) = v.as_object() {
        for (k, val) in m {
            if matches!(k.as_str(), "v" | "ts" | "kind") || val.is_null() {
                continue;
            }
            line.push_str(&format!(" {}={}", escape(k), s(val)));
        }
    }
    line.trim_end().to_string()
}

/// Control characters escaped, so a tampered file cannot drive the
/// terminal or forge lines.
fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Splits what is read from one file into lines and prints the events.
struct LineReader {
    name: String,
    pending: Vec<u8>,
    line_no: u64,
}

impl LineReader {
    fn new(path: &Path) -> Self {
        LineReader {
            name: path.display().to_string(),
            pending: Vec::new(),
            line_no: 0,
        }
    }

    /// Reads `f` to its current end, printing every whole line; returns
    /// the bytes read.
    fn read_from<W: Write>(&mut self, f: &mut File, out: &mut Printer<W>) -> Result<usize> {
        let mut buf = Vec::new();
        let n = f
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {}", self.name))?;
        let mut rest = &buf[..];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            let line = std::mem::take(&mut self.pending);
            self.line(&line, out)?;
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() > MAX_LINE_BYTES {
            let line = std::mem::take(&mut self.pending);
            self.line(&line, out)?;
        }
        out.stdout.flush().ok();
        Ok(n)
    }

    /// The file is complete: a last line without its newline was cut short.
    fn finish<W: Write>(&mut self, out: &mut Printer<W>) -> Result<()> {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.line(&line, out)?;
        }
        out.stdout.flush().ok();
        Ok(())
    }

    fn line<W: Write>(&mut self, line: &[u8], out: &mut Printer<W>) -> Result<()> {
        self.line_no += 1;
        let parsed = std::str::from_utf8(line)
            .ok()
            .and_then(|s| Some((s, serde_json::from_str::<Value>(s).ok()?)))
            .filter(|(_, v)| v.get("kind").is_some_and(Value::is_string));
        match parsed {
            Some((raw, v)) => {
                if out.event(raw, &v).is_err() {
                    // stdout closed (`reach events | head`): done.
                    std::process::exit(0);
                }
            }
            None if line.is_empty() => {}
            None => eprintln!(
                "warning: {}:{}: skipped a line that is not a JSON event ({} bytes; cut short by a crash?)",
                self.name,
                self.line_no,
                line.len()
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_are_one_line_with_fields_and_no_control_characters() {
        let v: Value = serde_json::from_str(
            r#"{"v":1,"ts":"2026-11-26T21:30:05.123Z","kind":"relay_lost","relay":"ab\ncd","x":null,"n":3}"#,
        )
        .unwrap();
        let l = text_line(&v);
        assert_eq!(
            l,
            "2026-11-26T21:30:05.123Z relay_lost               n=3 relay=ab\\u{a}cd"
        );
    }
}
