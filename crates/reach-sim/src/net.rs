//! The simulated network: per-link one-way latency with jitter, and loss.

use std::time::Duration;

use crate::rng::Rng;

/// How packets travel between simulated nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    /// Mean one-way latency.
    pub latency: Duration,
    /// Jitter as a fraction of the latency: each packet's delay is uniform in
    /// `latency * (1 ± jitter)`.
    pub jitter: f64,
    /// Probability that a packet is lost.
    pub loss: f64,
}

impl LinkModel {
    /// When a packet sent now arrives, or `None` if it is lost.
    pub fn delay(&self, rng: &mut Rng) -> Option<Duration> {
        if rng.chance(self.loss) {
            return None;
        }
        let factor = 1.0 + self.jitter * (2.0 * rng.unit() - 1.0);
        Some(self.latency.mul_f64(factor.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_jitter_and_loss_is_roughly_right() {
        let link = LinkModel {
            latency: Duration::from_millis(50),
            jitter: 0.1,
            loss: 0.2,
        };
        let mut rng = Rng::new(3);
        let mut lost = 0;
        for _ in 0..10_000 {
            match link.delay(&mut rng) {
                Some(d) => {
                    assert!(d >= Duration::from_millis(45) && d <= Duration::from_millis(55))
                }
                None => lost += 1,
            }
        }
        assert!((1_800..2_200).contains(&lost), "lost {lost}");
    }
}
