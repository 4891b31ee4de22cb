//! Small helpers several capabilities share.

use reach_proto::limits::FixedWindow;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// A random u64 from the operating system (ids, nonces, seeds).
pub(crate) fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Config(format!("random: {e}")))?;
    Ok(u64::from_le_bytes(b))
}

/// A fixed-window rate limiter (per second) on tokio's clock. Coarse, but
/// enough to bound what a node sends in answer to unsolicited packets. The
/// policy is [`reach_proto::limits::FixedWindow`]; this only turns tokio
/// instants into the `Duration`s it takes.
pub(crate) struct RateLimiter {
    window: FixedWindow,
    /// The first `now` seen: the limiter's time counts from here.
    epoch: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(per_sec: u32) -> Self {
        RateLimiter {
            window: FixedWindow::new(per_sec),
            epoch: None,
        }
    }

    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        let epoch = *self.epoch.get_or_insert(now);
        self.window.allow(now.saturating_duration_since(epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limiter_caps_each_window() {
        let mut l = RateLimiter::new(3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow(t0)));
        assert!(!l.allow(t0 + Duration::from_millis(999)));
        assert!(l.allow(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn random_u64_varies() {
        let a = random_u64().unwrap();
        let b = random_u64().unwrap();
        assert_ne!(a, b, "two draws of 64 random bits collide with p = 2^-64");
    }
}
