//! Network-size estimation.
//!
//! In a network of N nodes spread uniformly over the keyspace, the i-th
//! closest node to any point lies at a distance of about i / N (as a fraction
//! of the keyspace). Fitting N by least squares over the k closest known
//! distances gives N ≈ Σ i² / Σ i·dᵢ.

use super::Key;

/// Estimates the network size from the keys of the nodes closest to
/// `around` (sorted or not). Returns `None` with fewer than 2 samples.
pub fn network_size(around: &Key, closest: &[Key]) -> Option<f64> {
    if closest.len() < 2 {
        return None;
    }
    let mut d: Vec<f64> = closest
        .iter()
        .map(|k| k.distance(around).as_fraction())
        .collect();
    d.sort_by(f64::total_cmp);
    let (mut num, mut den) = (0.0, 0.0);
    for (i, di) in d.iter().enumerate() {
        let i = (i + 1) as f64;
        num += i * i;
        den += i * di;
    }
    (den > 0.0).then(|| num / den)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_within_a_factor_of_two() {
        // Deterministic pseudo-random keys.
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut keys = Vec::new();
        for _ in 0..5000 {
            let mut k = [0u8; 32];
            for chunk in k.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            keys.push(Key(k));
        }
        let me = keys[0];
        let mut others: Vec<Key> = keys[1..].to_vec();
        others.sort_by_key(|k| k.distance(&me));
        let est = network_size(&me, &others[..20]).unwrap();
        assert!((2500.0..10_000.0).contains(&est), "estimate {est}");
        assert_eq!(network_size(&me, &others[..1]), None);
    }
}
