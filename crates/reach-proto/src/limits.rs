//! Rate limiters, sans-IO: the caller passes `now` (time since any fixed
//! epoch), so the runtime drives them with tokio's clock and tests with
//! virtual time.
//!
//! Two shapes, because the two uses want different things:
//! - [`FixedWindow`]: at most `n` events per one-second window. Coarse but
//!   cheap; bounds what a node sends in answer to unsolicited packets (NAT
//!   probe replies, STUN answers, punch introductions).
//! - [`TokenBucket`]: a continuous refill at `rate` per second with a burst
//!   allowance. Smooth; used where the limit is a data path (relay bytes and
//!   packets per client), so traffic at a steady rate under the cap is never
//!   dropped at a window edge.

use std::time::Duration;

/// The window of a [`FixedWindow`]: limits are stated per second.
pub const WINDOW: Duration = Duration::from_secs(1);

/// At most `per_window` events in each [`WINDOW`]; a window opens at the
/// first event after the previous one closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedWindow {
    per_window: u32,
    window_start: Option<Duration>,
    used: u32,
}

impl FixedWindow {
    /// A limiter that allows `per_sec` events per second.
    pub fn new(per_sec: u32) -> Self {
        FixedWindow {
            per_window: per_sec,
            window_start: None,
            used: 0,
        }
    }

    /// Counts one event at `now` and says whether it is within the budget.
    /// A refused event does not use budget.
    pub fn allow(&mut self, now: Duration) -> bool {
        let fresh = self
            .window_start
            .is_none_or(|s| now.saturating_sub(s) >= WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.per_window {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// A token bucket refilled continuously at `rate` tokens per second, holding
/// at most `rate × burst` tokens. It starts full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    rate: u64,
    capacity: f64,
    tokens: f64,
    at: Duration,
}

impl TokenBucket {
    /// A full bucket at `now` allowing `rate` per second on average and
    /// `burst` worth of `rate` at once.
    pub fn new(rate: u64, burst: Duration, now: Duration) -> Self {
        let capacity = rate as f64 * burst.as_secs_f64();
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            at: now,
        }
    }

    /// Takes `n` tokens at `now` if the bucket holds them; on refusal
    /// nothing is taken (the refill up to `now` still counts). A `now`
    /// earlier than the last call refills nothing.
    pub fn take(&mut self, n: u64, now: Duration) -> bool {
        let dt = now.saturating_sub(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.capacity);
        self.at = self.at.max(now);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// How long from `now` until the bucket holds `n` tokens: zero if it
    /// does, `Duration::MAX` if it never will (`n` over its capacity, or a
    /// zero rate). Takes nothing.
    pub fn wait(&self, n: u64, now: Duration) -> Duration {
        let dt = now.saturating_sub(self.at).as_secs_f64();
        let tokens = (self.tokens + dt * self.rate as f64).min(self.capacity);
        let need = n as f64;
        if tokens >= need {
            Duration::ZERO
        } else if self.rate == 0 || need > self.capacity {
            Duration::MAX
        } else {
            Duration::from_secs_f64((need - tokens) / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn fixed_window_caps_each_window_and_reopens_after_it() {
        let mut l = FixedWindow::new(3);
        let t0 = MS(5_000);
        assert!((0..3).all(|_| l.allow(t0)));
        assert!(!l.allow(t0 + MS(999)), "a fourth event in the window");
        // The window opened at the first event, so it closes 1 s later.
        assert!(l.allow(t0 + MS(1_000)));
        assert!(l.allow(t0 + MS(1_500)));
        assert!(l.allow(t0 + MS(1_999)));
        assert!(!l.allow(t0 + MS(1_999)));
    }

    #[test]
    fn fixed_window_zero_allows_nothing() {
        let mut l = FixedWindow::new(0);
        assert!(!l.allow(Duration::ZERO));
        assert!(!l.allow(MS(10_000)));
    }

    #[test]
    fn token_bucket_bursts_then_refills_at_its_rate() {
        let mut b = TokenBucket::new(1_000, Duration::from_secs(1), Duration::ZERO);
        // A full second's worth at once…
        assert!(b.take(1_000, Duration::ZERO));
        assert!(!b.take(1, Duration::ZERO));
        // …then 100 ms refill 100 tokens, not 101.
        assert!(!b.take(101, MS(100)));
        assert!(b.take(100, MS(100)));
        // Refill stops at the burst capacity however long the pause.
        assert!(!b.take(1_001, MS(60_000)));
        assert!(b.take(1_000, MS(60_000)));
    }

    #[test]
    fn token_bucket_says_how_long_until_a_refused_take_would_pass() {
        let mut b = TokenBucket::new(100, Duration::from_secs(1), MS(0));
        while b.take(1, MS(0)) {}
        // Empty: one token comes every 10 ms.
        assert_eq!(b.wait(1, MS(0)), MS(10));
        assert_eq!(b.wait(1, MS(4)), MS(6));
        assert_eq!(b.wait(1, MS(10)), Duration::ZERO);
        assert!(b.take(1, MS(10)));
        assert!(!b.take(1, MS(10)));
        assert_eq!(b.wait(3, MS(10)), MS(30));
        assert_eq!(b.wait(101, MS(10)), Duration::MAX);
        let none = TokenBucket::new(0, Duration::from_secs(1), MS(0));
        assert_eq!(none.wait(1, MS(0)), Duration::MAX);
    }

    #[test]
    fn token_bucket_passes_a_steady_rate_under_the_cap() {
        let mut b = TokenBucket::new(100, Duration::from_secs(1), Duration::ZERO);
        // 99 events/s for 10 s: none refused.
        let step = Duration::from_secs(1) / 99;
        let mut t = Duration::ZERO;
        for _ in 0..990 {
            assert!(b.take(1, t), "refused at {t:?}");
            t += step;
        }
    }

    #[test]
    fn token_bucket_ignores_time_going_backwards() {
        let mut b = TokenBucket::new(10, Duration::from_secs(1), MS(1_000));
        assert!(b.take(10, MS(1_000)));
        assert!(!b.take(1, MS(500)));
        // The earlier `now` did not rewind the clock: no double refill.
        assert!(b.take(5, MS(1_500)));
        assert!(!b.take(1, MS(1_500)));
    }
}
