//! Small helpers several capabilities share.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// A random u64 from the operating system (ids, nonces, seeds).
pub(crate) fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Config(format!("random: {e}")))?;
    Ok(u64::from_le_bytes(b))
}

/// A fixed-window rate limiter (per second). Coarse, but enough to bound
/// what a node sends in answer to unsolicited packets.
pub(crate) struct RateLimiter {
    per_sec: u32,
    window_start: Option<Instant>,
    used: u32,
}

impl RateLimiter {
    pub(crate) fn new(per_sec: u32) -> Self {
        RateLimiter {
            per_sec,
            window_start: None,
            used: 0,
        }
    }

    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        let fresh = self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1));
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.per_sec {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
