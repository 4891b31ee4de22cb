//! The 256-bit keyspace.
//!
//! A node sits at `Key::for_peer(peer_id)` = BLAKE3(peer id): hashing spreads
//! nodes uniformly even if keys were chosen adversarially in some pattern,
//! and gives records of other kinds (topics, mailboxes) keys in the same
//! space.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::PeerId;

/// Bits in a key.
pub const KEY_BITS: usize = 256;

/// A position in the keyspace.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key(pub [u8; 32]);

/// XOR distance between two keys, compared as a big-endian integer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Distance(pub [u8; 32]);

/// Domain separators, so a topic name can never collide with a peer's key.
const PEER_DOMAIN: &[u8] = b"reach-dht-peer-v1:";
const TOPIC_DOMAIN: &[u8] = b"topic:";
const MAILBOX_DOMAIN: &[u8] = b"reach-mailbox-v1:";

impl Key {
    /// The key of a node and of its endpoint record.
    pub fn for_peer(peer: &PeerId) -> Key {
        let mut h = blake3::Hasher::new();
        h.update(PEER_DOMAIN);
        h.update(peer.as_bytes());
        Key(*h.finalize().as_bytes())
    }

    /// The key of a topic's membership records: hash("topic:" + name).
    pub fn for_topic(name: &str) -> Key {
        let mut h = blake3::Hasher::new();
        h.update(TOPIC_DOMAIN);
        h.update(name.as_bytes());
        Key(*h.finalize().as_bytes())
    }

    /// The key of `recipient`'s mailbox records in mailbox epoch `epoch`
    /// (see [`crate::mailbox`]): it changes every epoch, so a storer that
    /// does not already know the recipient's id cannot tell that the
    /// mailboxes of two epochs belong to the same recipient.
    pub fn for_mailbox(recipient: &PeerId, epoch: u64) -> Key {
        let mut h = blake3::Hasher::new();
        h.update(MAILBOX_DOMAIN);
        h.update(recipient.as_bytes());
        h.update(&epoch.to_le_bytes());
        Key(*h.finalize().as_bytes())
    }

    /// The XOR distance to `other`: Kademlia's metric.
    pub fn distance(&self, other: &Key) -> Distance {
        let mut d = [0u8; 32];
        for (i, b) in d.iter_mut().enumerate() {
            *b = self.0[i] ^ other.0[i];
        }
        Distance(d)
    }

    /// Number of leading bits `self` and `other` share (256 if equal).
    pub fn common_prefix_len(&self, other: &Key) -> usize {
        self.distance(other).leading_zeros()
    }

    /// A key sharing exactly `cpl` leading bits with `self` (the next bit
    /// differs), the rest taken from `random`. Used to refresh bucket `cpl`.
    pub fn random_in_bucket(&self, cpl: usize, random: [u8; 32]) -> Key {
        let cpl = cpl.min(KEY_BITS - 1);
        let mut out = random;
        for bit in 0..=cpl {
            let byte = bit / 8;
            let mask = 0x80u8 >> (bit % 8);
            let mine = self.0[byte] & mask;
            let want = if bit == cpl { mine ^ mask } else { mine };
            out[byte] = (out[byte] & !mask) | want;
        }
        Key(out)
    }
}

impl Distance {
    /// Leading zero bits: the length of the prefix the two keys share.
    pub fn leading_zeros(&self) -> usize {
        let mut n = 0;
        for b in self.0 {
            if b == 0 {
                n += 8;
            } else {
                n += b.leading_zeros() as usize;
                break;
            }
        }
        n
    }

    /// The distance as a fraction of the whole keyspace (0..1), for size
    /// estimates and statistics.
    pub fn as_fraction(&self) -> f64 {
        let mut f = 0.0;
        let mut scale = 1.0 / 256.0;
        for b in self.0.iter().take(8) {
            f += f64::from(*b) * scale;
            scale /= 256.0;
        }
        f
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn distance_is_xor_and_symmetric() {
        let a = Key([1; 32]);
        let b = Key([3; 32]);
        assert_eq!(a.distance(&b), Distance([2; 32]));
        assert_eq!(a.distance(&b), b.distance(&a));
        assert_eq!(a.distance(&a), Distance([0; 32]));
        assert_eq!(a.common_prefix_len(&a), 256);
        assert_eq!(Key([0; 32]).common_prefix_len(&Key([0x40; 32])), 1);
    }

    #[test]
    fn topic_and_peer_keys_differ() {
        let kp = crate::Keypair::from_secret_bytes([1; 32]);
        assert_ne!(Key::for_peer(&kp.peer_id()), Key::for_topic("x"));
        assert_eq!(Key::for_topic("x"), Key::for_topic("x"));
    }

    proptest! {
        #[test]
        fn random_in_bucket_has_the_asked_prefix(me in any::<[u8; 32]>(), r in any::<[u8; 32]>(), cpl in 0usize..256) {
            let k = Key(me).random_in_bucket(cpl, r);
            prop_assert_eq!(Key(me).common_prefix_len(&k), cpl);
        }
    }
}
