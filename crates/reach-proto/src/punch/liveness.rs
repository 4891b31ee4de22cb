//! Watching a direct path that replaced a relayed one.
//!
//! QUIC would notice a dead path only after its idle timeout (a minute);
//! meanwhile every send would hang. A direct connection that has a relayed
//! standby is watched instead: every [`LIVENESS_TICK`] the driver reads the
//! connection's receive counter and feeds it in. When nothing has arrived
//! for [`PING_AFTER`], the verdict is [`Verdict::Ping`] (the driver sends
//! something ack-eliciting, so the peer answers); when nothing has arrived
//! for [`DIRECT_PATH_DEAD`], [`Verdict::Dead`]: the relayed standby takes
//! over.

use std::time::Duration;

/// How often the watch looks at the connection's receive counter.
pub const LIVENESS_TICK: Duration = Duration::from_millis(250);
/// Silence after which the watch elicits an answer.
pub const PING_AFTER: Duration = Duration::from_secs(1);
/// Silence after which the direct path counts as dead: two seconds of
/// pings (one per tick after the first second) unanswered, far above any
/// RTT of a direct path that beat its relay. An idle watched connection
/// thus costs about one small packet per second each way.
pub const DIRECT_PATH_DEAD: Duration = Duration::from_secs(3);

/// What the driver does after a look at the receive counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The path is fine (something arrived lately).
    Nothing,
    /// Quiet for [`PING_AFTER`]: elicit an answer.
    Ping,
    /// Quiet for [`DIRECT_PATH_DEAD`]: the path is dead (and stays so:
    /// the watch is over).
    Dead,
}

/// The watch of one direct connection.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// The receive counter last seen, and when it last changed.
    rx: u64,
    heard: Duration,
    /// When the counter was last looked at.
    looked: Duration,
    dead: bool,
}

impl Liveness {
    /// Starts watching at `now`, the connection's receive counter being
    /// `rx`.
    pub fn new(rx: u64, now: Duration) -> Self {
        Liveness {
            rx,
            heard: now,
            looked: now,
            dead: false,
        }
    }

    /// The receive counter reads `rx` at `now`.
    pub fn on_rx(&mut self, rx: u64, now: Duration) -> Verdict {
        self.looked = now;
        if self.dead {
            return Verdict::Dead;
        }
        if rx != self.rx {
            self.rx = rx;
            self.heard = now;
            return Verdict::Nothing;
        }
        let quiet = now.saturating_sub(self.heard);
        if quiet >= DIRECT_PATH_DEAD {
            self.dead = true;
            Verdict::Dead
        } else if quiet >= PING_AFTER {
            Verdict::Ping
        } else {
            Verdict::Nothing
        }
    }

    /// When to look at the counter next ([`LIVENESS_TICK`] after the last
    /// look); `None` once the path is dead.
    pub fn next_timeout(&self) -> Option<Duration> {
        (!self.dead).then_some(self.looked + LIVENESS_TICK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looks every tick from `from` to `to` (inclusive) with the counter
    /// unchanged at `rx`; the verdicts.
    fn quiet(w: &mut Liveness, rx: u64, to: Duration) -> Vec<(Duration, Verdict)> {
        let mut out = Vec::new();
        while let Some(t) = w.next_timeout().filter(|t| *t <= to) {
            out.push((t, w.on_rx(rx, t)));
        }
        out
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn silence_pings_after_a_second_and_kills_the_path_after_three() {
        let mut w = Liveness::new(10, MS(0));
        let v = quiet(&mut w, 10, MS(5000));
        let first_ping = v.iter().find(|(_, v)| *v == Verdict::Ping).unwrap().0;
        assert_eq!(first_ping, PING_AFTER);
        assert!(
            v.iter()
                .filter(|(t, _)| *t < PING_AFTER)
                .all(|(_, v)| *v == Verdict::Nothing)
        );
        // Pings every tick until dead; then the watch is over.
        let (dead_at, last) = *v.last().unwrap();
        assert_eq!((dead_at, last), (DIRECT_PATH_DEAD, Verdict::Dead));
        let pings = v.iter().filter(|(_, v)| *v == Verdict::Ping).count() as u32;
        assert_eq!(
            pings,
            ((DIRECT_PATH_DEAD - PING_AFTER).as_millis() / LIVENESS_TICK.as_millis()) as u32
        );
        assert_eq!(w.next_timeout(), None);
        assert_eq!(w.on_rx(11, MS(6000)), Verdict::Dead, "dead stays dead");
    }

    #[test]
    fn a_received_packet_resets_the_silence() {
        let mut w = Liveness::new(0, MS(0));
        let v = quiet(&mut w, 0, MS(2500));
        assert_eq!(v.last().unwrap().1, Verdict::Ping);
        // The peer answers at 2.75 s: fine again…
        assert_eq!(w.on_rx(1, MS(2750)), Verdict::Nothing);
        // …and silence counts from there: no ping before 3.75 s, no death
        // before 5.75 s.
        let v = quiet(&mut w, 1, MS(5700));
        for (t, verdict) in &v {
            let expect = if *t >= MS(3750) {
                Verdict::Ping
            } else {
                Verdict::Nothing
            };
            assert_eq!(*verdict, expect, "at {t:?}");
        }
        assert_eq!(w.on_rx(1, MS(5750)), Verdict::Dead);
    }

    #[test]
    fn a_busy_path_is_never_pinged() {
        let mut w = Liveness::new(0, MS(0));
        for i in 1..100u64 {
            let t = w.next_timeout().unwrap();
            assert_eq!(w.on_rx(i, t), Verdict::Nothing);
        }
    }
}
