//! The Kademlia routing table.
//!
//! Buckets are indexed by the common-prefix length (cpl) of a contact's key
//! with ours: bucket `i` holds contacts sharing exactly `i` leading bits.
//! Only buckets that ever held a contact are allocated, so a table costs
//! memory proportional to what it knows (about log2(N) buckets), which lets
//! the simulator run 100,000 of them.
//!
//! Admission rules:
//! - a contact enters only on direct evidence (it answered us, or it queried
//!   us in server mode), or from the persisted peer cache as `Unknown`;
//! - at most [`RoutingConfig::max_per_subnet`] contacts of one /24 (IPv4) or
//!   /48 (IPv6) per bucket, so one network cannot fill a bucket (loopback is
//!   exempt: it can only be this machine);
//! - a full bucket keeps its contacts (long-lived nodes are the most likely
//!   to stay), except that a `Bad` one is replaced at once and an `Unknown`
//!   one gives way to a contact that just proved itself; others wait in a
//!   small replacement cache and step in when an entry goes bad.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use super::{Contact, K, Key};
use crate::PeerId;

/// Contacts waiting per bucket to replace one that goes bad.
pub const REPLACEMENT_CACHE: usize = 8;
/// Default: contacts of one subnet per bucket.
pub const MAX_PER_SUBNET_PER_BUCKET: usize = 2;
/// Consecutive failed queries after which a contact is `Bad`.
pub const BAD_AFTER_FAILURES: u8 = 2;

/// What we know of a contact's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not contacted yet (e.g. loaded from the peer cache).
    Unknown,
    /// Answered or queried us recently.
    Good,
    /// Failed [`BAD_AFTER_FAILURES`] queries in a row.
    Bad,
}

/// A routing-table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Who and where.
    pub contact: Contact,
    /// Its position in the keyspace (cached: it decides its bucket).
    pub key: Key,
    /// Whether it answered lately.
    pub health: Health,
    /// When we last heard from it (driver's clock).
    pub last_seen: Duration,
    /// Failed queries since it last answered; it turns `Bad` after
    /// [`BAD_AFTER_FAILURES`].
    pub failures: u8,
}

/// Tunables of a routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Bucket size.
    pub k: usize,
    /// Contacts of one /24 or /48 per bucket; `usize::MAX` disables the limit.
    pub max_per_subnet: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            k: K,
            max_per_subnet: MAX_PER_SUBNET_PER_BUCKET,
        }
    }
}

/// What became of a contact offered to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A new contact took a free slot (or replaced a worse one).
    Inserted,
    /// A known contact: its address and last-seen time were refreshed.
    Updated,
    /// The bucket is full: kept in the replacement cache.
    Cached,
    /// Refused: our own id, or its subnet already has its share of the bucket.
    Refused,
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    entries: Vec<Entry>,
    replacements: Vec<Entry>,
    last_refreshed: Duration,
}

/// The routing table of one node.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    local_peer: PeerId,
    local: Key,
    cfg: RoutingConfig,
    buckets: Vec<Bucket>,
}

/// The subnet a contact counts against for diversity, or `None` if exempt.
fn subnet(addr: &SocketAddr) -> Option<[u8; 6]> {
    match addr.ip() {
        ip if ip.is_loopback() => None,
        IpAddr::V4(v4) => {
            let o = v4.octets();
            Some([4, o[0], o[1], o[2], 0, 0])
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                let o = v4.octets();
                return Some([4, o[0], o[1], o[2], 0, 0]);
            }
            let o = v6.octets();
            Some([6, o[0], o[1], o[2], o[3], o[4] ^ o[5]])
        }
    }
}

impl RoutingTable {
    /// An empty table for the node `local_peer`.
    pub fn new(local_peer: PeerId, cfg: RoutingConfig) -> Self {
        RoutingTable {
            local: Key::for_peer(&local_peer),
            local_peer,
            cfg,
            buckets: Vec::new(),
        }
    }

    /// Our own position in the keyspace (bucket indices count from it).
    pub fn local_key(&self) -> Key {
        self.local
    }

    fn bucket_index(&self, key: &Key) -> usize {
        self.local.common_prefix_len(key).min(255)
    }

    fn bucket_mut(&mut self, idx: usize) -> &mut Bucket {
        if self.buckets.len() <= idx {
            self.buckets.resize_with(idx + 1, Bucket::default);
        }
        &mut self.buckets[idx]
    }

    /// Records direct evidence that `contact` is alive: it answered a query
    /// or queried us in server mode.
    pub fn on_seen(&mut self, contact: Contact, now: Duration) -> InsertOutcome {
        self.offer(contact, Health::Good, now)
    }

    /// Adds a contact of unknown liveness (from the persisted peer cache).
    pub fn add_unknown(&mut self, contact: Contact, now: Duration) -> InsertOutcome {
        self.offer(contact, Health::Unknown, now)
    }

    fn offer(&mut self, contact: Contact, health: Health, now: Duration) -> InsertOutcome {
        if contact.peer == self.local_peer {
            return InsertOutcome::Refused;
        }
        let key = contact.key();
        let idx = self.bucket_index(&key);
        let cfg = self.cfg;
        let bucket = self.bucket_mut(idx);
        if let Some(e) = bucket
            .entries
            .iter_mut()
            .find(|e| e.contact.peer == contact.peer)
        {
            e.contact.addr = contact.addr;
            if health == Health::Good {
                e.health = Health::Good;
                e.failures = 0;
                e.last_seen = now;
            }
            return InsertOutcome::Updated;
        }
        let fresh = Entry {
            contact,
            key,
            health,
            last_seen: now,
            failures: 0,
        };
        if let Some(net) = subnet(&contact.addr) {
            let same = bucket
                .entries
                .iter()
                .filter(|e| subnet(&e.contact.addr) == Some(net))
                .count();
            if same >= cfg.max_per_subnet {
                return InsertOutcome::Refused;
            }
        }
        if bucket.entries.len() < cfg.k {
            // Grow 4, 8, 16, …, but never past k: a full bucket then costs
            // k entries, not the next power of two (32 for k = 20), which is
            // a third of a table's memory in a 100,000-node simulation.
            let len = bucket.entries.len();
            if len == bucket.entries.capacity() {
                let want = (len * 2).max(4).min(cfg.k);
                bucket.entries.reserve_exact(want - len);
            }
            bucket.entries.push(fresh);
            return InsertOutcome::Inserted;
        }
        let victim = bucket
            .entries
            .iter()
            .position(|e| e.health == Health::Bad)
            .or_else(|| {
                (health == Health::Good)
                    .then(|| {
                        bucket
                            .entries
                            .iter()
                            .position(|e| e.health == Health::Unknown)
                    })
                    .flatten()
            });
        if let Some(v) = victim {
            bucket.entries[v] = fresh;
            return InsertOutcome::Inserted;
        }
        bucket
            .replacements
            .retain(|e| e.contact.peer != contact.peer);
        if bucket.replacements.len() >= REPLACEMENT_CACHE {
            bucket.replacements.remove(0);
        }
        bucket.replacements.push(fresh);
        InsertOutcome::Cached
    }

    /// Records a failed query to `peer`. After [`BAD_AFTER_FAILURES`] in a
    /// row it is `Bad`, and the freshest replacement (if any) takes its place.
    pub fn on_failure(&mut self, peer: &PeerId) {
        let idx = self.bucket_index(&Key::for_peer(peer));
        let Some(bucket) = self.buckets.get_mut(idx) else {
            return;
        };
        let Some(pos) = bucket.entries.iter().position(|e| e.contact.peer == *peer) else {
            bucket.replacements.retain(|e| e.contact.peer != *peer);
            return;
        };
        let e = &mut bucket.entries[pos];
        e.failures = e.failures.saturating_add(1);
        if e.failures >= BAD_AFTER_FAILURES {
            e.health = Health::Bad;
            if let Some(r) = bucket.replacements.pop() {
                bucket.entries[pos] = r;
            }
        }
    }

    /// Removes `peer` entirely.
    pub fn remove(&mut self, peer: &PeerId) {
        let idx = self.bucket_index(&Key::for_peer(peer));
        if let Some(b) = self.buckets.get_mut(idx) {
            b.entries.retain(|e| e.contact.peer != *peer);
            b.replacements.retain(|e| e.contact.peer != *peer);
        }
    }

    /// The `n` contacts closest to `key` that are not `Bad`.
    ///
    /// Reads only the buckets that can hold them. With `t` the common-prefix
    /// length of `key` and our key, every contact of bucket `t` or deeper is
    /// closer to `key` than any contact of bucket `t - 1`, which in turn is
    /// closer than any of bucket `t - 2`, and so on (XOR distance: a contact
    /// of bucket `i < t` differs from `key` first at bit `i`; one of bucket
    /// `i > t` first at bit `t`; one of bucket `t` only after bit `t`). So
    /// buckets `t..` are taken whole, then `t-1, t-2, …` until `n` are in
    /// hand, and only those are ranked. Same result as ranking the whole
    /// table, at a fraction of the cost when `key` is near us: this is what
    /// every FindNode answer runs, and the simulator runs millions of them.
    pub fn closest(&self, key: &Key, n: usize) -> Vec<Contact> {
        if n == 0 {
            return Vec::new();
        }
        let t = self.bucket_index(key).min(self.buckets.len());
        let mut picked: Vec<(super::Distance, &Entry)> = Vec::new();
        fn take<'a>(picked: &mut Vec<(super::Distance, &'a Entry)>, b: &'a Bucket, key: &Key) {
            picked.extend(
                b.entries
                    .iter()
                    .filter(|e| e.health != Health::Bad)
                    .map(|e| (e.key.distance(key), e)),
            );
        }
        for b in &self.buckets[t..] {
            take(&mut picked, b, key);
        }
        for b in self.buckets[..t].iter().rev() {
            if picked.len() >= n {
                break;
            }
            take(&mut picked, b, key);
        }
        if picked.len() > n {
            picked.select_nth_unstable_by(n, |a, b| a.0.cmp(&b.0));
            picked.truncate(n);
        }
        picked.sort_unstable_by_key(|a| a.0);
        picked.into_iter().map(|(_, e)| e.contact).collect()
    }

    /// Every entry, bucket by bucket.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.buckets.iter().flat_map(|b| b.entries.iter())
    }

    /// Contacts in the table, healthy or not.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|b| b.entries.len()).sum()
    }

    /// Contacts that are not `Bad`: the ones lookups can start from.
    pub fn live_len(&self) -> usize {
        self.iter().filter(|e| e.health != Health::Bad).count()
    }

    /// Contacts that answered (or queried us) in this run: a join that
    /// leaves none has reached nobody, whatever the table remembers.
    pub fn answered_len(&self) -> usize {
        self.iter().filter(|e| e.health == Health::Good).count()
    }

    /// The `n` contacts heard from most recently, `Bad` ones included: whom a
    /// node that reaches nobody dials directly to get back in (lookups skip
    /// `Bad` contacts, so without this a node whose cached contacts all
    /// failed once would never ask them again).
    pub fn rejoin_candidates(&self, n: usize) -> Vec<Contact> {
        let mut all: Vec<&Entry> = self.iter().collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.last_seen));
        all.into_iter().take(n).map(|e| e.contact).collect()
    }

    /// Whether the table holds no contact.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `peer` is in the table (not the replacement cache).
    pub fn contains(&self, peer: &PeerId) -> bool {
        let idx = self.bucket_index(&Key::for_peer(peer));
        self.buckets
            .get(idx)
            .is_some_and(|b| b.entries.iter().any(|e| e.contact.peer == *peer))
    }

    /// Number of allocated buckets (highest cpl seen + 1).
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Entries per bucket, for status pages.
    pub fn bucket_sizes(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.entries.len()).collect()
    }

    /// Notes that a lookup for `key` ran now, which refreshes its bucket.
    pub fn mark_refreshed(&mut self, key: &Key, now: Duration) {
        let idx = self.bucket_index(key);
        if idx < self.buckets.len() {
            self.buckets[idx].last_refreshed = now;
        }
    }

    /// Buckets (by cpl) with no lookup for `interval`, up to the deepest
    /// allocated bucket plus one (the region around ourselves, where new
    /// nodes appear).
    pub fn buckets_to_refresh(&self, now: Duration, interval: Duration) -> Vec<usize> {
        let deepest = self.buckets.len().min(255);
        (0..=deepest)
            .filter(|&i| {
                self.buckets
                    .get(i)
                    .is_none_or(|b| now.saturating_sub(b.last_refreshed) >= interval)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;

    fn peer(i: u64) -> PeerId {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&i.to_le_bytes());
        Keypair::from_secret_bytes(seed).peer_id()
    }

    fn addr(i: u64) -> SocketAddr {
        // Distinct /24 per contact unless the test says otherwise.
        SocketAddr::from(([198, 51, (i % 250) as u8, (i / 250) as u8], 4433))
    }

    fn table() -> RoutingTable {
        RoutingTable::new(peer(u64::MAX), RoutingConfig::default())
    }

    #[test]
    fn rejoin_candidates_are_the_most_recently_seen_bad_ones_included() {
        let mut t = table();
        for i in 0..10 {
            t.add_unknown(Contact::new(peer(i), addr(i)), Duration::from_secs(i));
        }
        assert_eq!(t.answered_len(), 0);
        // Every contact fails twice: all Bad, none for a lookup to start from.
        let all: Vec<PeerId> = t.iter().map(|e| e.contact.peer).collect();
        for p in &all {
            t.on_failure(p);
            t.on_failure(p);
        }
        assert_eq!(t.live_len(), 0);
        let got: Vec<PeerId> = t.rejoin_candidates(3).iter().map(|c| c.peer).collect();
        assert_eq!(got, vec![peer(9), peer(8), peer(7)]);
        t.on_seen(Contact::new(peer(2), addr(2)), Duration::from_secs(60));
        assert_eq!(t.answered_len(), 1);
        assert_eq!(t.rejoin_candidates(1)[0].peer, peer(2));
    }

    #[test]
    fn closest_matches_brute_force() {
        let mut t = table();
        for i in 0..2000 {
            t.on_seen(Contact::new(peer(i), addr(i)), Duration::ZERO);
        }
        let target = Key::for_peer(&peer(99_999));
        let got = t.closest(&target, K);
        let mut all: Vec<Contact> = t.iter().map(|e| e.contact).collect();
        all.sort_by_key(|c| c.key().distance(&target));
        all.truncate(K);
        assert_eq!(got, all);
    }

    #[test]
    fn closest_matches_brute_force_near_and_far_with_bad_entries() {
        let mut t = table();
        for i in 0..3000 {
            t.on_seen(Contact::new(peer(i), addr(i)), Duration::ZERO);
        }
        // Some entries go bad and must be skipped.
        let bad: Vec<PeerId> = t.iter().step_by(7).map(|e| e.contact.peer).collect();
        for p in &bad {
            t.on_failure(p);
            t.on_failure(p);
        }
        let me = t.local_key();
        let mut keys = vec![me, Key([0; 32]), Key([0xff; 32])];
        for cpl in [0, 1, 3, 6, 9, 12, 20, 255] {
            keys.push(me.random_in_bucket(cpl, [cpl as u8; 32]));
        }
        for key in keys {
            for n in [0, 1, 5, K, 50, 10_000] {
                let mut all: Vec<Contact> = t
                    .iter()
                    .filter(|e| e.health != Health::Bad)
                    .map(|e| e.contact)
                    .collect();
                all.sort_by_key(|c| c.key().distance(&key));
                all.truncate(n);
                assert_eq!(t.closest(&key, n), all, "key {key:?}, n {n}");
            }
        }
    }

    #[test]
    fn buckets_hold_at_most_k_and_never_self() {
        let mut t = table();
        assert_eq!(
            t.on_seen(Contact::new(peer(u64::MAX), addr(1)), Duration::ZERO),
            InsertOutcome::Refused
        );
        for i in 0..5000 {
            t.on_seen(Contact::new(peer(i), addr(i)), Duration::ZERO);
        }
        assert!(t.bucket_sizes().iter().all(|&n| n <= K));
        // Bucket 0 (half the keyspace) is certainly full.
        assert_eq!(t.bucket_sizes()[0], K);
    }

    #[test]
    fn one_subnet_cannot_fill_a_bucket() {
        let mut t = table();
        let mut accepted = 0;
        for i in 0..500u64 {
            let a = SocketAddr::from(([203, 0, 113, (i % 250) as u8], 1000 + i as u16));
            if t.on_seen(Contact::new(peer(i), a), Duration::ZERO) == InsertOutcome::Inserted {
                accepted += 1;
            }
        }
        // At most MAX_PER_SUBNET_PER_BUCKET per bucket, and only a few
        // buckets are reachable by chance.
        assert!(
            t.bucket_sizes()
                .iter()
                .all(|&n| n <= MAX_PER_SUBNET_PER_BUCKET)
        );
        assert!(accepted <= MAX_PER_SUBNET_PER_BUCKET * t.bucket_count());
        // Loopback is exempt.
        let mut t = table();
        for i in 0..100u64 {
            let a = SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
            t.on_seen(Contact::new(peer(i), a), Duration::ZERO);
        }
        assert!(t.bucket_sizes()[0] > MAX_PER_SUBNET_PER_BUCKET);
    }

    #[test]
    fn failures_make_a_contact_bad_and_a_replacement_steps_in() {
        let mut t = table();
        // Fill bucket 0 and overflow into its replacement cache.
        let mut in_b0 = Vec::new();
        let mut i = 0;
        while in_b0.len() < K + 3 {
            let p = peer(i);
            if t.local_key().common_prefix_len(&Key::for_peer(&p)) == 0 {
                in_b0.push(p);
                t.on_seen(Contact::new(p, addr(i)), Duration::ZERO);
            }
            i += 1;
        }
        let victim = in_b0[0];
        assert!(t.contains(&victim));
        t.on_failure(&victim);
        assert!(t.contains(&victim), "one failure is not enough");
        t.on_failure(&victim);
        assert!(!t.contains(&victim), "replaced by a cached contact");
        assert_eq!(t.bucket_sizes()[0], K);
        assert!(
            t.contains(&in_b0[K + 2]),
            "the freshest replacement stepped in"
        );
    }

    #[test]
    fn proven_contacts_displace_unknown_ones_in_full_buckets() {
        let mut t = table();
        let mut i = 0;
        let mut n = 0;
        while n < K {
            let p = peer(i);
            if t.local_key().common_prefix_len(&Key::for_peer(&p)) == 0 {
                t.add_unknown(Contact::new(p, addr(i)), Duration::ZERO);
                n += 1;
            }
            i += 1;
        }
        loop {
            let p = peer(i);
            if t.local_key().common_prefix_len(&Key::for_peer(&p)) == 0 {
                assert_eq!(
                    t.on_seen(Contact::new(p, addr(i)), Duration::ZERO),
                    InsertOutcome::Inserted
                );
                assert!(t.contains(&p));
                break;
            }
            i += 1;
        }
    }

    #[test]
    fn stale_buckets_are_offered_for_refresh() {
        let mut t = table();
        for i in 0..100 {
            t.on_seen(Contact::new(peer(i), addr(i)), Duration::ZERO);
        }
        let hour = Duration::from_secs(3600);
        let all = t.buckets_to_refresh(hour, hour);
        assert_eq!(all.len(), t.bucket_count() + 1);
        let k0 = t.local_key().random_in_bucket(0, [9; 32]);
        t.mark_refreshed(&k0, hour);
        assert!(!t.buckets_to_refresh(hour, hour).contains(&0));
    }
}
