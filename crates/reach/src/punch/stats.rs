//! Hole punching as `reach status` and `/v1/punch` show it: counters per
//! technique, fallbacks, time to direct, the latest outcome per peer.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use reach_proto::PeerId;
use reach_proto::punch::Technique;
use reach_proto::punch::upgrade::{Ended, Outcome};
use serde::{Deserialize, Serialize};

use super::{PunchRuntime, lock};

/// Per-peer outcomes remembered for `reach status`.
pub const MAX_OUTCOMES: usize = 256;
/// Time-to-direct samples kept for the median.
pub const TIME_SAMPLES: usize = 256;

/// Counters of one technique.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TechniqueStats {
    /// The technique's name (`Technique::name`; owned only when parsed
    /// from JSON).
    pub technique: Cow<'static, str>,
    /// Attempts this node took part in (as requester or target).
    pub attempts: u64,
    pub successes: u64,
    pub failures: u64,
}

/// How the last punch with one peer ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PunchOutcome {
    /// Increases with every outcome this node records.
    pub seq: u64,
    pub peer: PeerId,
    pub technique: Cow<'static, str>,
    pub direct: bool,
    pub attempts: u32,
    /// From the punch request to the first packet from the peer's direct
    /// address.
    pub time_to_direct_ms: Option<u64>,
    pub error_kind: Option<Cow<'static, str>>,
    pub error: Option<String>,
}

/// Hole punching as `reach status` and `/v1/punch` show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PunchStats {
    pub techniques: Vec<TechniqueStats>,
    /// Direct paths that died, their traffic moved back to the relay.
    pub fallbacks: u64,
    pub time_to_direct_ms_p50: Option<f64>,
    /// The latest outcome per peer, newest first.
    pub recent: Vec<PunchOutcome>,
}

#[derive(Default)]
pub(super) struct Counters {
    by_technique: HashMap<Technique, TechniqueStats>,
    fallbacks: u64,
    times: VecDeque<Duration>,
    outcomes: VecDeque<PunchOutcome>,
    seq: u64,
    /// Every time to direct (see [`crate::histogram`]).
    time_hist: crate::histogram::Histogram,
}

impl PunchRuntime {
    pub(super) fn count(&self, technique: Technique, f: impl FnOnce(&mut TechniqueStats)) {
        let mut c = lock(&self.counters);
        let e = c
            .by_technique
            .entry(technique)
            .or_insert_with(|| TechniqueStats {
                technique: technique.name().into(),
                ..Default::default()
            });
        f(e);
    }

    /// Records how an upgrade ended (the machine's [`Outcome`]).
    pub(super) fn record(&self, o: Outcome) {
        if o.ended == Ended::StayRelayed {
            self.count(Technique::StayRelayed, |s| s.attempts += 1);
        }
        let (direct, time, error) = match &o.ended {
            Ended::Direct(t) => (true, *t, None),
            Ended::StayRelayed => (false, None, None),
            Ended::Failed(e) => (false, None, Some(e)),
        };
        self.core
            .bus
            .emit(crate::node::bus::NodeEvent::PunchOutcome {
                peer: o.peer,
                technique: o.technique.name(),
                direct,
                time_to_direct_ms: time.map(|t| t.as_millis() as u64),
                error_kind: error.map(|e| e.kind()),
            });
        let mut c = lock(&self.counters);
        c.seq += 1;
        let outcome = PunchOutcome {
            seq: c.seq,
            peer: o.peer,
            technique: o.technique.name().into(),
            direct,
            attempts: o.attempts,
            time_to_direct_ms: time.map(|t| t.as_millis() as u64),
            error_kind: error.map(|e| e.kind().into()),
            error: error.map(|e| e.to_string()),
        };
        if let Some(t) = time {
            c.time_hist.observe(t);
            if c.times.len() >= TIME_SAMPLES {
                c.times.pop_front();
            }
            c.times.push_back(t);
        }
        c.outcomes.retain(|o| o.peer != outcome.peer);
        if c.outcomes.len() >= MAX_OUTCOMES {
            c.outcomes.pop_back();
        }
        c.outcomes.push_front(outcome);
    }

    /// A direct path died and its traffic went back to the relay.
    pub(crate) fn fell_back(&self) {
        lock(&self.counters).fallbacks += 1;
    }

    /// The time-to-direct histogram now.
    pub(crate) fn time_to_direct_seconds(&self) -> crate::histogram::HistogramSnapshot {
        lock(&self.counters).time_hist.snapshot()
    }

    /// What the punch stats look like now.
    pub(crate) fn stats(&self) -> PunchStats {
        let c = lock(&self.counters);
        let mut times: Vec<Duration> = c.times.iter().copied().collect();
        times.sort();
        PunchStats {
            techniques: Technique::ALL
                .iter()
                .map(|t| {
                    c.by_technique.get(t).cloned().unwrap_or(TechniqueStats {
                        technique: t.name().into(),
                        ..Default::default()
                    })
                })
                .collect(),
            fallbacks: c.fallbacks,
            time_to_direct_ms_p50: times.get(times.len() / 2).map(|t| t.as_secs_f64() * 1000.0),
            recent: c.outcomes.iter().cloned().collect(),
        }
    }
}
