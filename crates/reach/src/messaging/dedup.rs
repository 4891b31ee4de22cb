//! Recognising a message that arrives twice.
//!
//! `Node::send` sends a message again over another connection when the
//! first connection died before the peer acknowledged it (a direct path
//! that failed, its traffic moved back to the relay). The peer may have
//! received it anyway, only the acknowledgement was lost: every message
//! carries a random 64-bit id, and the receiver delivers each id once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use reach_proto::PeerId;

/// Message ids remembered per peer: four times as many as can be in flight
/// on one connection, so resends arriving among new messages still find
/// their originals' ids.
pub const IDS_PER_PEER: usize = 4 * crate::transport::MAX_CONCURRENT_UNI_STREAMS as usize;
/// Peers whose ids are remembered; the one heard from least recently is
/// forgotten first. 256 × 4,096 ids bound the memory to about 24 MiB.
pub const MAX_PEERS: usize = 256;

#[derive(Default)]
struct PeerIds {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

/// The ids of recently received messages, per sender.
#[derive(Default)]
pub(crate) struct SeenMessages {
    inner: Mutex<(HashMap<PeerId, PeerIds>, VecDeque<PeerId>)>,
}

impl SeenMessages {
    /// Whether message `id` from `peer` is new (and remembers it).
    pub fn first_time(&self, peer: PeerId, id: u64) -> bool {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (peers, recency) = &mut *guard;
        if peers.contains_key(&peer) {
            // Most recently heard from: to the back.
            if let Some(pos) = recency.iter().position(|p| *p == peer) {
                recency.remove(pos);
            }
        } else if peers.len() >= MAX_PEERS
            && let Some(old) = recency.pop_front()
        {
            peers.remove(&old);
        }
        recency.push_back(peer);
        let ids = peers.entry(peer).or_default();
        if !ids.set.insert(id) {
            return false;
        }
        ids.order.push_back(id);
        if ids.order.len() > IDS_PER_PEER
            && let Some(old) = ids.order.pop_front()
        {
            ids.set.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::Keypair;

    #[test]
    fn an_id_is_delivered_once_per_peer() {
        let seen = SeenMessages::default();
        let (a, b) = (Keypair::generate().peer_id(), Keypair::generate().peer_id());
        assert!(seen.first_time(a, 1));
        assert!(!seen.first_time(a, 1));
        assert!(seen.first_time(b, 1), "ids are per sender");
        assert!(seen.first_time(a, 2));
    }

    #[test]
    fn memory_is_bounded() {
        let seen = SeenMessages::default();
        let a = Keypair::generate().peer_id();
        for id in 0..(IDS_PER_PEER as u64 + 10) {
            assert!(seen.first_time(a, id));
        }
        // The oldest ids were forgotten, the newest are still known.
        assert!(seen.first_time(a, 0));
        assert!(!seen.first_time(a, IDS_PER_PEER as u64 + 9));
        for _ in 0..MAX_PEERS + 5 {
            seen.first_time(Keypair::generate().peer_id(), 1);
            // A peer heard from all along is never the one forgotten.
            assert!(!seen.first_time(a, IDS_PER_PEER as u64 + 9));
        }
        assert!(seen.inner.lock().unwrap().0.len() <= MAX_PEERS);
    }
}
