//! The overlay machine driven by a small virtual-time network: frames take a
//! per-link latency, may be lost, and links may die.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::topics::presence::{beat_bytes, changes_digest, members_digest, state_bytes};
use crate::topics::{GAP_GIVE_UP, HEARTBEAT, HOME_STALE};

const MS: fn(u64) -> Duration = Duration::from_millis;

fn topic() -> TopicId {
    TopicId::from_name("room").unwrap()
}

fn key(i: u64) -> Keypair {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i + 1).to_le_bytes());
    Keypair::from_secret_bytes(seed)
}

/// `signer`'s heartbeat on [`topic`], signed by `signer`.
fn beat_of(signer: &Keypair, incarnation: u64, version: u64, beat: u64) -> TopicFrame {
    let home = signer.peer_id();
    let signature = signer
        .sign(&beat_bytes(&topic(), &home, incarnation, version, beat))
        .to_vec();
    TopicFrame::Heartbeat {
        topic: topic(),
        home,
        incarnation,
        version,
        beat,
        signature,
    }
}

/// `signer`'s signature of its members `after` at `version`, reached by
/// `changes`: (members digest, changes digest, signature).
fn seal_of(
    signer: &Keypair,
    incarnation: u64,
    version: u64,
    after: &[PeerId],
    changes: &[(PeerId, bool)],
) -> ([u8; 32], [u8; 32], Vec<u8>) {
    let set: BTreeSet<PeerId> = after.iter().copied().collect();
    let (md, cd) = (members_digest(&set), changes_digest(changes));
    let sig = signer.sign(&state_bytes(
        &topic(),
        &signer.peer_id(),
        incarnation,
        version,
        &md,
        &cd,
    ));
    (md, cd, sig.to_vec())
}

/// A one-page snapshot of `signer`'s `members` at `version` (reached by a
/// delta of no changes), as `signer` sealed it.
fn page_of(signer: &Keypair, incarnation: u64, version: u64, members: &[PeerId]) -> TopicFrame {
    let (_, changes_digest, signature) = seal_of(signer, incarnation, version, members, &[]);
    TopicFrame::SnapshotPage {
        topic: topic(),
        home: signer.peer_id(),
        incarnation,
        version,
        page: 0,
        last: true,
        members: members.to_vec(),
        changes_digest,
        signature,
    }
}

enum Ev {
    Frame {
        from: usize,
        to: usize,
        frame: TopicFrame,
    },
    Wake(usize),
}

/// A network of homes, all serving [`topic`].
struct Net {
    now: Duration,
    seq: u64,
    q: BTreeMap<(Duration, u64), Ev>,
    nodes: Vec<Overlay>,
    ids: Vec<PeerId>,
    index: HashMap<PeerId, usize>,
    links: BTreeMap<(usize, usize), Duration>,
    loss: f64,
    rng: u64,
    /// Per home: (origin, seq) in delivery order.
    delivered: Vec<Vec<(PeerId, u64)>>,
    /// Per home: presence changes seen.
    presence: Vec<Vec<(PeerId, PeerId, bool, Duration)>>,
    /// Message frames received per home.
    payload_in: Vec<u64>,
    wake_at: Vec<Option<Duration>>,
    /// (from, to) pairs a payload frame crossed, per message id.
    crossings: HashMap<(PeerId, u64), Vec<(usize, usize)>>,
    /// Every message and "I have" frame from one home to another is lost
    /// until a time.
    drop_until: Option<(usize, usize, Duration)>,
    /// Frames lost to `drop_until`.
    dropped: u64,
    /// Every presence heartbeat from one home to another is lost until a
    /// time (the link stays up and carries the rest).
    drop_beats_until: Option<(usize, usize, Duration)>,
    /// "I have" frames sent, by all homes.
    ihaves_sent: u64,
}

impl Net {
    fn new(n: usize, edges: &[(usize, usize, u64)], loss: f64, seed: u64) -> Net {
        let keys: Vec<Keypair> = (0..n).map(|i| key(1000 + i as u64)).collect();
        let ids: Vec<PeerId> = keys.iter().map(Keypair::peer_id).collect();
        let mut net = Net {
            now: Duration::ZERO,
            seq: 0,
            q: BTreeMap::new(),
            nodes: keys
                .into_iter()
                .map(|k| Overlay::new(k, 1, OverlayConfig::default()))
                .collect(),
            index: ids.iter().enumerate().map(|(i, p)| (*p, i)).collect(),
            ids,
            links: BTreeMap::new(),
            loss,
            rng: seed | 1,
            delivered: vec![Vec::new(); n],
            presence: vec![Vec::new(); n],
            payload_in: vec![0; n],
            wake_at: vec![None; n],
            crossings: HashMap::new(),
            drop_until: None,
            dropped: 0,
            drop_beats_until: None,
            ihaves_sent: 0,
        };
        for i in 0..n {
            net.nodes[i].subscribe(topic(), Duration::ZERO).unwrap();
        }
        for &(a, b, ms) in edges {
            net.connect(a, b, MS(ms));
        }
        net
    }

    fn connect(&mut self, a: usize, b: usize, latency: Duration) {
        self.links.insert((a, b), latency);
        self.links.insert((b, a), latency);
        self.nodes[a].link_up(self.ids[b], &[topic()]).unwrap();
        self.nodes[b].link_up(self.ids[a], &[topic()]).unwrap();
        self.flush(a);
        self.flush(b);
    }

    fn cut(&mut self, a: usize, b: usize) {
        self.links.remove(&(a, b));
        self.links.remove(&(b, a));
        self.nodes[a].link_down(self.ids[b]);
        self.nodes[b].link_down(self.ids[a]);
        self.flush(a);
        self.flush(b);
    }

    fn lost(&mut self) -> bool {
        if self.loss == 0.0 {
            return false;
        }
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        ((self.rng >> 11) as f64 / (1u64 << 53) as f64) < self.loss
    }

    fn schedule(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.q.insert((at, self.seq), ev);
    }

    fn flush(&mut self, i: usize) {
        while let Some(o) = self.nodes[i].poll_output() {
            match o {
                OverlayOutput::Send { to, frame } => {
                    let j = self.index[&to];
                    let Some(lat) = self.links.get(&(i, j)).copied() else {
                        continue;
                    };
                    if let TopicFrame::Message(m) = &frame {
                        self.crossings
                            .entry((m.origin, m.seq))
                            .or_default()
                            .push((i, j));
                    }
                    if matches!(frame, TopicFrame::IHave { .. }) {
                        self.ihaves_sent += 1;
                    }
                    let overlay =
                        matches!(frame, TopicFrame::Message(_) | TopicFrame::IHave { .. });
                    let dropped = self
                        .drop_until
                        .is_some_and(|(a, b, until)| (a, b) == (i, j) && self.now < until);
                    let dropped = dropped && overlay
                        || matches!(frame, TopicFrame::Heartbeat { .. })
                            && self
                                .drop_beats_until
                                .is_some_and(|(a, b, until)| (a, b) == (i, j) && self.now < until);
                    if dropped {
                        self.dropped += 1;
                    }
                    if !dropped && !self.lost() {
                        self.schedule(
                            self.now + lat,
                            Ev::Frame {
                                from: i,
                                to: j,
                                frame,
                            },
                        );
                    }
                }
                OverlayOutput::Deliver { msg, .. } => {
                    self.delivered[i].push((msg.origin, msg.seq));
                }
                OverlayOutput::PresenceChanged {
                    member,
                    home,
                    joined,
                    ..
                } => self.presence[i].push((member, home, joined, self.now)),
            }
        }
        if let Some(t) = self.nodes[i].next_timeout() {
            let t = t.max(self.now);
            if self.wake_at[i].is_none_or(|w| t < w) {
                self.wake_at[i] = Some(t);
                self.schedule(t, Ev::Wake(i));
            }
        }
    }

    fn run_until(&mut self, end: Duration) {
        while let Some(entry) = self.q.first_entry() {
            if entry.key().0 > end {
                break;
            }
            let ((at, _), ev) = entry.remove_entry();
            self.now = at;
            match ev {
                Ev::Frame { from, to, frame } => {
                    if !self.links.contains_key(&(from, to)) {
                        continue;
                    }
                    if frame.is_payload() {
                        self.payload_in[to] += 1;
                    }
                    let bytes = frame.encode();
                    let frame = TopicFrame::decode(&bytes).expect("own frames decode");
                    self.nodes[to].handle_frame(self.ids[from], frame, at);
                    self.flush(to);
                }
                Ev::Wake(i) => {
                    if self.wake_at[i] == Some(at) {
                        self.wake_at[i] = None;
                    }
                    if self.nodes[i].next_timeout().is_some_and(|t| t <= at) {
                        self.nodes[i].handle_timeout(at);
                    }
                    self.flush(i);
                }
            }
        }
        self.now = end;
    }

    fn publish(&mut self, home: usize, publisher: &Keypair, data: &[u8]) -> MessageId {
        let id = self.nodes[home]
            .publish(topic(), data.to_vec(), publisher, self.now)
            .unwrap();
        self.flush(home);
        id
    }

    fn connected_without(&self, n: usize, skip: (usize, usize)) -> bool {
        let mut seen = vec![false; n];
        let mut todo = VecDeque::from([0usize]);
        seen[0] = true;
        while let Some(a) = todo.pop_front() {
            for &(x, y) in self.links.keys() {
                if x == a && (x, y) != skip && (y, x) != skip && !seen[y] {
                    seen[y] = true;
                    todo.push_back(y);
                }
            }
        }
        seen.iter().all(|s| *s)
    }
}

/// Asserts every home delivered every message of `published` exactly once
/// and in order per origin.
/// The last message of a stream, its copy and every announcement of it
/// lost for a while (a link that loses all it carries, then recovers):
/// the doubling tail digests still bring it, and then stop.
#[test]
fn a_last_message_lost_with_its_first_digests_still_arrives_by_a_later_digest() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let p = key(1);
    net.publish(0, &p, b"only");
    // Lost: the copy and the digests of the first 5 s (ticks 1, 2 and 4).
    let blackout = MS(5_500);
    net.drop_until = Some((0, 1, blackout));
    net.publish(0, &p, b"last");
    net.run_until(blackout);
    assert!(
        net.dropped >= 4,
        "the copy and three digests: {}",
        net.dropped
    );
    assert_eq!(net.delivered[1].len(), 1, "the last message not yet there");
    // The digest of tick 8 announces it; a pull brings it.
    net.run_until(MS(8_000) + DIGEST_INTERVAL + GRAFT_TIMEOUT);
    assert_exactly_once_in_order(&net, &BTreeMap::from([(p.peer_id(), 2)]));
    // The tails end 2^(DIGEST_TAIL_ROUNDS-1) ticks after the last
    // delivery (home 1's at about 9 s): nothing is announced any more.
    let tail_end = MS(9_500) + DIGEST_INTERVAL * (1 << (DIGEST_TAIL_ROUNDS - 1));
    net.run_until(tail_end);
    let before = net.ihaves_sent;
    net.run_until(tail_end + Duration::from_secs(120));
    assert_eq!(net.ihaves_sent, before, "no digests after the tail");
}

fn assert_exactly_once_in_order(net: &Net, published: &BTreeMap<PeerId, u64>) {
    for (h, got) in net.delivered.iter().enumerate() {
        let mut per: BTreeMap<PeerId, Vec<u64>> = BTreeMap::new();
        for (o, s) in got {
            per.entry(*o).or_default().push(*s);
        }
        for (o, n) in published {
            let want: Vec<u64> = (1..=*n).collect();
            assert_eq!(per.get(o), Some(&want), "home {h}, origin {o}");
        }
        assert_eq!(per.len(), published.len(), "home {h}: unknown origins");
    }
}

#[test]
fn a_triangle_prunes_to_a_tree_and_then_sends_each_message_once() {
    let mut net = Net::new(3, &[(0, 1, 10), (1, 2, 10), (0, 2, 30)], 0.0, 1);
    let p = key(1);
    net.publish(0, &p, b"first");
    net.run_until(MS(2_000));
    // Home 2 got the first message on both links: the later copy pruned one.
    assert_eq!(net.payload_in[2], 2);
    let before: u64 = net.payload_in.iter().sum();
    for i in 0..10 {
        net.publish(0, &p, format!("m{i}").as_bytes());
        net.run_until(net.now + MS(200));
    }
    net.run_until(net.now + MS(3_000));
    let after: u64 = net.payload_in.iter().sum();
    assert_eq!(after - before, 20, "10 messages × 2 other homes, no copies");
    assert_exactly_once_in_order(&net, &BTreeMap::from([(p.peer_id(), 11)]));
    let (eager, lazy) = net.nodes[2].links_of(&topic(), &p.peer_id());
    assert_eq!((eager.len(), lazy.len()), (1, 1));
}

#[test]
fn a_message_lost_on_the_tree_is_pulled_through_a_lazy_link() {
    // Line 0-1-2 plus lazy 0-2 after pruning.
    let mut net = Net::new(3, &[(0, 1, 10), (1, 2, 10), (0, 2, 30)], 0.0, 1);
    let p = key(1);
    net.publish(0, &p, b"warm");
    net.run_until(MS(2_000));
    // Cut the tree link 1-2 silently: frames on it vanish, nobody is told.
    let lat = net.links.remove(&(1, 2)).unwrap();
    net.links.remove(&(2, 1));
    let t0 = net.now;
    net.publish(0, &p, b"second");
    // The "I have" from home 0 (after IHAVE_DELAY, 30 ms away), the graft
    // timeout, the GRAFT and its answer: 30 ms each way.
    net.run_until(t0 + IHAVE_DELAY + MS(30) + GRAFT_TIMEOUT + MS(61));
    assert_eq!(net.delivered[2].len(), 2, "pulled by then");
    net.run_until(t0 + MS(5_000));
    net.links.insert((1, 2), lat);
    net.links.insert((2, 1), lat);
    assert_exactly_once_in_order(&net, &BTreeMap::from([(p.peer_id(), 2)]));
    assert_eq!(net.nodes[2].stats().grafts_sent, 1);
}

#[test]
fn link_death_loses_nothing_and_the_tree_heals() {
    // A ring of 6 with two chords: still connected after the two cuts.
    let mut edges: Vec<(usize, usize, u64)> = (0..6).map(|i| (i, (i + 1) % 6, 10)).collect();
    edges.extend([(0, 3, 25), (1, 4, 25)]);
    let mut net = Net::new(6, &edges, 0.0, 2);
    let p = key(1);
    for i in 0..5 {
        net.publish(0, &p, format!("{i}").as_bytes());
        net.run_until(net.now + MS(100));
    }
    net.cut(0, 1);
    for i in 0..5 {
        net.publish(0, &p, format!("{i}").as_bytes());
        net.run_until(net.now + MS(100));
    }
    net.cut(3, 4);
    for i in 0..5 {
        net.publish(0, &p, format!("{i}").as_bytes());
        net.run_until(net.now + MS(100));
    }
    net.run_until(net.now + MS(5_000));
    assert_exactly_once_in_order(&net, &BTreeMap::from([(p.peer_id(), 15)]));
}

#[test]
fn a_publisher_refused_for_rate_is_told_when_it_would_be_taken_again() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let t = topic();
    let member = key(7);
    let now = Duration::ZERO;
    let home = &mut net.nodes[0];
    assert_eq!(home.publish_backoff(&t, &member.peer_id(), now), MS(0));
    while home.publish(t, b"x".to_vec(), &member, now).is_ok() {}
    // Its bucket refills one message every 1/DEFAULT_PUBLISHER_RATE s.
    let gap = MS(1_000 / DEFAULT_PUBLISHER_RATE);
    assert_eq!(home.publish_backoff(&t, &member.peer_id(), now), gap);
    assert_eq!(
        home.publish(t, b"x".to_vec(), &member, now + gap - MS(1)),
        Err(PublishError::PublisherRateLimited)
    );
    // (A millisecond's margin: the buckets count in floating point.)
    assert!(
        home.publish(t, b"x".to_vec(), &member, now + gap + MS(1))
            .is_ok()
    );
    // The topic's bucket counts too: with it empty, another publisher
    // waits for the topic's refill.
    for i in 0..DEFAULT_TOPIC_RATE {
        let _ = home.publish(t, b"x".to_vec(), &key(100 + i % 10), now + gap);
    }
    let topic_gap = MS(1_000 / DEFAULT_TOPIC_RATE);
    let wait = home.publish_backoff(&t, &key(99).peer_id(), now + gap);
    assert!(wait > MS(0) && wait <= topic_gap, "{wait:?}");
    // Unknown topic: no wait; never more than the cap.
    let other = TopicId::from_name("elsewhere").unwrap();
    assert_eq!(home.publish_backoff(&other, &member.peer_id(), now), MS(0));
    let config = OverlayConfig {
        topic_rate: 1,
        publisher_rate: 1,
        ..Default::default()
    };
    let mut slow = Overlay::new(key(1), 1, config);
    slow.subscribe(t, now).unwrap();
    while slow.publish(t, b"x".to_vec(), &member, now).is_ok() {}
    assert_eq!(
        slow.publish_backoff(&t, &member.peer_id(), now),
        crate::topics::MAX_PUBLISH_BACKOFF
    );
}

#[test]
fn rate_limits_size_and_signatures_are_refused_with_typed_errors() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let t = topic();
    let member = key(7);
    let now = Duration::ZERO;
    // Per publisher: DEFAULT_PUBLISHER_RATE at once, then refused.
    for _ in 0..DEFAULT_PUBLISHER_RATE {
        net.nodes[0]
            .publish(t, b"x".to_vec(), &member, now)
            .unwrap();
    }
    let e = net.nodes[0]
        .publish(t, b"x".to_vec(), &member, now)
        .unwrap_err();
    assert_eq!(e, PublishError::PublisherRateLimited);
    // Per topic: other publishers fill the topic's 500.
    let mut refused = None;
    for i in 0..10 {
        for _ in 0..DEFAULT_PUBLISHER_RATE {
            if let Err(e) = net.nodes[0].publish(t, b"x".to_vec(), &key(100 + i), now) {
                refused = Some(e);
            }
        }
    }
    assert_eq!(refused.map(|e| e.kind()), Some("topic_rate_limited"));
    let s = net.nodes[0].stats();
    assert_eq!(s.refused_publisher_rate, 1);
    assert_eq!(
        s.refused_topic_rate,
        10 * DEFAULT_PUBLISHER_RATE + DEFAULT_PUBLISHER_RATE - DEFAULT_TOPIC_RATE
    );
    // A second later the topic accepts again.
    assert!(
        net.nodes[0]
            .publish(t, b"x".to_vec(), &key(50), now + MS(1_000))
            .is_ok()
    );
    assert_eq!(
        net.nodes[0]
            .publish(t, vec![0; MAX_DATA_LEN + 1], &key(51), now)
            .unwrap_err()
            .kind(),
        "message_too_big"
    );
    let other = TopicId::from_name("elsewhere").unwrap();
    assert_eq!(
        net.nodes[0].publish(other, vec![], &key(51), now),
        Err(PublishError::NotSubscribed)
    );
    // A member's message with a forged signature.
    let mut m = TopicMessage::sign(&key(60), t, 1, b"hi".to_vec()).unwrap();
    m.data[0] ^= 1;
    assert_eq!(
        net.nodes[1].publish_from_member(m, now).unwrap_err().kind(),
        "message_bad_signature"
    );
    // A member's good message, and its retransmission: accepted once.
    let m = TopicMessage::sign(&key(60), t, 1, b"hi".to_vec()).unwrap();
    assert!(net.nodes[1].publish_from_member(m.clone(), now).is_ok());
    assert!(net.nodes[1].publish_from_member(m, now).is_ok());
    net.flush(1);
    net.run_until(MS(1_000));
    let from_60: Vec<_> = net.delivered[0]
        .iter()
        .filter(|(o, _)| *o == key(60).peer_id())
        .collect();
    assert_eq!(from_60.len(), 1);
}

#[test]
fn a_forged_message_from_a_home_is_dropped_and_counted() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let mut m = TopicMessage::sign(&key(9), topic(), 1, b"real".to_vec()).unwrap();
    m.data = b"fake".to_vec();
    let from = net.ids[0];
    net.nodes[1].handle_frame(from, TopicFrame::Message(m), Duration::ZERO);
    net.flush(1);
    assert_eq!(net.nodes[1].stats().bad_messages, 1);
    assert!(net.delivered[1].is_empty());
    // A frame from a home not linked for the topic is ignored.
    let stranger = key(99).peer_id();
    net.nodes[1].handle_frame(
        stranger,
        TopicFrame::Prune {
            topic: topic(),
            origin: stranger,
        },
        Duration::ZERO,
    );
    assert_eq!(net.nodes[1].stats().ignored_frames, 1);
}

#[test]
fn a_bad_signature_taken_unchecked_from_its_authenticated_publisher_goes_no_further() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let t = topic();
    let now = Duration::ZERO;
    let publisher = key(61);
    let mut bad = TopicMessage::sign(&publisher, t, 1, b"hi".to_vec()).unwrap();
    bad.data[0] ^= 1;
    // What the authenticated path still checks: size, seq, signature form.
    let mut zero = bad.clone();
    zero.seq = 0;
    assert_eq!(
        net.nodes[0]
            .publish_from_authenticated_member(zero, now)
            .unwrap_err()
            .kind(),
        "message_zero_seq"
    );
    let mut short = bad.clone();
    short.signature.truncate(10);
    assert_eq!(
        net.nodes[0]
            .publish_from_authenticated_member(short, now)
            .unwrap_err()
            .kind(),
        "message_bad_signature"
    );
    // Its own home takes it (the connection proved who sent it) ...
    assert!(
        net.nodes[0]
            .publish_from_authenticated_member(bad, now)
            .is_ok()
    );
    net.flush(0);
    assert_eq!(net.delivered[0], [(publisher.peer_id(), 1)]);
    // ... and the next home checks the signature and drops it: no home can
    // pass a message off as another's.
    net.run_until(MS(1_000));
    assert!(net.delivered[1].is_empty());
    assert_eq!(net.nodes[1].stats().bad_messages, 1);
    // A good one the same way reaches both: the other home once it gave
    // up on the bad one (its gap), at worst.
    let good = TopicMessage::sign(&publisher, t, 2, b"ok".to_vec()).unwrap();
    assert!(
        net.nodes[0]
            .publish_from_authenticated_member(good, MS(1_000))
            .is_ok()
    );
    net.flush(0);
    net.run_until(MS(2_000) + GAP_GIVE_UP);
    assert_eq!(net.delivered[0].last(), Some(&(publisher.peer_id(), 2)));
    assert!(net.delivered[1].contains(&(publisher.peer_id(), 2)));
}

#[test]
fn a_gap_the_sender_no_longer_has_is_passed_over_at_once() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let t = topic();
    let p = key(3);
    // Seq 1 and 3 reach home 1 "from" home 0, which never had seq 2.
    for seq in [1, 3] {
        let m = TopicMessage::sign(&p, t, seq, vec![seq as u8]).unwrap();
        net.nodes[1].handle_frame(net.ids[0], TopicFrame::Message(m), net.now);
        net.flush(1);
    }
    net.run_until(GRAFT_TIMEOUT - MS(1));
    assert_eq!(net.delivered[1], vec![(p.peer_id(), 1)]);
    // Home 1 pulls 2 from home 0, which answers "not cached".
    net.run_until(GRAFT_TIMEOUT + MS(30));
    assert_eq!(net.delivered[1], vec![(p.peer_id(), 1), (p.peer_id(), 3)]);
    assert_eq!(net.nodes[1].stats().gaps_skipped, 1);
    assert_eq!(net.nodes[1].stats().not_cached, 1);
}

#[test]
fn a_gap_nobody_answers_for_is_passed_over_after_the_give_up_time() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let t = topic();
    let p = key(3);
    // The link goes silent: pulls are never answered.
    net.links.clear();
    for seq in [1, 3] {
        let m = TopicMessage::sign(&p, t, seq, vec![seq as u8]).unwrap();
        net.nodes[1].handle_frame(net.ids[0], TopicFrame::Message(m), net.now);
        net.flush(1);
    }
    net.run_until(GAP_GIVE_UP - MS(100));
    assert_eq!(net.delivered[1], vec![(p.peer_id(), 1)]);
    net.run_until(GAP_GIVE_UP + MS(500));
    assert_eq!(net.delivered[1], vec![(p.peer_id(), 1), (p.peer_id(), 3)]);
    assert_eq!(net.nodes[1].stats().gaps_skipped, 1);
}

#[test]
fn presence_converges_and_a_silent_home_vanishes_after_the_stale_time() {
    // A line of 4 homes, 2 members each.
    let edges = [(0, 1, 20), (1, 2, 20), (2, 3, 20)];
    let mut net = Net::new(4, &edges, 0.0, 1);
    let t = topic();
    let members: Vec<Vec<PeerId>> = (0..4)
        .map(|h| (0..2).map(|m| key(500 + h * 10 + m).peer_id()).collect())
        .collect();
    for (h, ms) in members.iter().enumerate() {
        for m in ms {
            net.nodes[h].member_joined(t, *m, Duration::ZERO).unwrap();
        }
        net.flush(h);
    }
    net.run_until(MS(2_000));
    for h in 0..4 {
        assert_eq!(net.nodes[h].members(&t).len(), 8, "home {h}");
    }
    // A join at home 0 is seen at home 3 within 2 s.
    let late = key(777).peer_id();
    let t0 = net.now;
    net.nodes[0].member_joined(t, late, t0).unwrap();
    net.flush(0);
    net.run_until(t0 + MS(2_000));
    let seen = net.presence[3]
        .iter()
        .find(|(m, _, joined, _)| *m == late && *joined)
        .map(|e| e.3 - t0)
        .unwrap();
    assert!(seen <= MS(500), "{seen:?}");
    // A leave too.
    net.nodes[0].member_left(t, late, net.now).unwrap();
    net.flush(0);
    net.run_until(net.now + MS(1_000));
    assert!(!net.nodes[3].members(&t).iter().any(|(m, _)| *m == late));
    // Home 3 goes silent (its link cut without anyone being told).
    net.links.remove(&(2, 3));
    net.links.remove(&(3, 2));
    let cut = net.now;
    net.run_until(cut + HOME_STALE - HEARTBEAT);
    assert_eq!(net.nodes[0].members(&t).len(), 8);
    net.run_until(cut + HOME_STALE + HEARTBEAT + MS(1_000));
    let left: Vec<_> = net.nodes[0].members(&t);
    assert_eq!(left.len(), 6);
    assert!(left.iter().all(|(_, home)| *home != net.ids[3]));
}

/// A home's presence tree broken without a link dying: in a triangle, home
/// 2 hears home 0 directly (the path through 1 is pruned for 0), then that
/// link silently stops carrying 0's heartbeats. After PRESENCE_REGRAFT of
/// silence home 2 asks every link for 0's frames again, and hears 0 through
/// 1: 0's member is never dropped. (Without the re-graft it was, at
/// HOME_STALE.)
#[test]
fn a_home_whose_heartbeats_stop_on_its_tree_link_is_heard_again_by_another_path() {
    use crate::topics::PRESENCE_REGRAFT;
    let mut net = Net::new(3, &[(0, 2, 10), (0, 1, 10), (1, 2, 10)], 0.0, 1);
    let t = topic();
    let member = key(900).peer_id();
    net.nodes[0]
        .member_joined(t, member, Duration::ZERO)
        .unwrap();
    net.flush(0);
    net.run_until(HEARTBEAT * 3);
    let (tree, lazy) = net.nodes[2].links_of(&t, &net.ids[0]);
    assert_eq!(tree, [net.ids[0]], "2 hears 0 directly");
    assert_eq!(lazy, [net.ids[1]], "the path through 1 is pruned for 0");
    let stop = net.now;
    net.drop_beats_until = Some((0, 2, stop + Duration::from_secs(120)));
    net.run_until(stop + HOME_STALE * 4);
    assert!(
        net.presence[2]
            .iter()
            .all(|(m, _, joined, _)| *m != member || *joined),
        "home 2 dropped 0's member: {:?}",
        net.presence[2]
    );
    assert_eq!(net.nodes[2].members(&t), [(member, net.ids[0])]);
    let (tree, _) = net.nodes[2].links_of(&t, &net.ids[0]);
    assert!(tree.contains(&net.ids[1]), "0's frames now come through 1");
    assert!(PRESENCE_REGRAFT + HEARTBEAT < HOME_STALE);
}

#[test]
fn a_home_joining_later_pulls_the_presence_snapshot_in_pages() {
    let mut net = Net::new(2, &[], 0.0, 1);
    let t = topic();
    let many = crate::topics::MAX_PRESENCE_PAGE + 10;
    for m in 0..many {
        net.nodes[0]
            .member_joined(t, key(10_000 + m as u64).peer_id(), Duration::ZERO)
            .unwrap();
    }
    net.flush(0);
    net.run_until(MS(10_000));
    assert_eq!(net.nodes[1].members(&t).len(), 0);
    net.connect(0, 1, MS(10));
    net.run_until(net.now + HEARTBEAT + MS(1_000));
    assert_eq!(net.nodes[1].members(&t).len(), many);
    assert_eq!(
        net.nodes[1].presence_view(&t, &net.ids[0]),
        net.nodes[0].presence_view(&t, &net.ids[0])
    );
}

/// A random connected graph: a random tree plus `extra` random edges.
fn graph(n: usize, extra: usize, seeds: &[u64]) -> Vec<(usize, usize, u64)> {
    let mut edges = BTreeSet::new();
    let mut out = Vec::new();
    let mut s = seeds.iter().cycle();
    let mut next = || *s.next().unwrap_or(&7);
    for i in 1..n {
        let j = (next() as usize) % i;
        edges.insert((j, i));
        out.push((j, i, 5 + next() % 40));
    }
    for _ in 0..extra {
        let a = (next() as usize) % n;
        let b = (next() as usize) % n;
        let (a, b) = (a.min(b), a.max(b));
        if a != b && edges.insert((a, b)) {
            out.push((a, b, 5 + next() % 40));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random overlays with cycles, random publishers, random link deaths
    /// that keep the graph connected, random frame loss: every home
    /// delivers every message exactly once and in order per publisher.
    #[test]
    fn exactly_once_in_order_under_loss_and_link_deaths(
        n in 3usize..30,
        extra in 0usize..30,
        seeds in proptest::collection::vec(any::<u64>(), 8..64),
        publishers in 1usize..5,
        messages in 1usize..60,
        deaths in 0usize..4,
        loss in prop_oneof![Just(0.0), 0.0f64..0.1],
    ) {
        let edges = graph(n, extra, &seeds);
        let mut net = Net::new(n, &edges, loss, seeds[0]);
        let pubs: Vec<(usize, Keypair)> = (0..publishers)
            .map(|i| ((seeds[i % seeds.len()] as usize) % n, key(i as u64)))
            .collect();
        let mut published: BTreeMap<PeerId, u64> = BTreeMap::new();
        let death_every = messages / (deaths + 1) + 1;
        for m in 0..messages {
            let (home, kp) = &pubs[(seeds[m % seeds.len()] as usize + m) % pubs.len()];
            net.publish(*home, kp, format!("m{m}").as_bytes());
            *published.entry(kp.peer_id()).or_default() += 1;
            net.run_until(net.now + MS(seeds[m % seeds.len()] % 50));
            if m % death_every == death_every - 1 {
                // Kill a random link whose loss keeps the graph connected.
                let links: Vec<(usize, usize)> =
                    net.links.keys().copied().filter(|(a, b)| a < b).collect();
                let start = (seeds[(m + 1) % seeds.len()] as usize) % links.len().max(1);
                for k in 0..links.len() {
                    let l = links[(start + k) % links.len()];
                    if net.connected_without(n, l) {
                        net.cut(l.0, l.1);
                        break;
                    }
                }
            }
        }
        net.run_until(net.now + Duration::from_secs(20));
        assert_exactly_once_in_order(&net, &published);
    }

    /// Without loss, once the tree has formed, no message crosses a link
    /// twice and each home receives each message's payload once.
    #[test]
    fn steady_state_sends_each_message_once_per_home(
        n in 3usize..30,
        extra in 0usize..30,
        seeds in proptest::collection::vec(any::<u64>(), 8..64),
    ) {
        let edges = graph(n, extra, &seeds);
        let mut net = Net::new(n, &edges, 0.0, 1);
        let pubs: Vec<(usize, Keypair)> =
            (0..3).map(|i| ((seeds[i] as usize) % n, key(i as u64))).collect();
        // Tree formation: a few messages from each publisher, spaced out.
        for round in 0..3 {
            for (home, kp) in &pubs {
                net.publish(*home, kp, format!("warm{round}").as_bytes());
                net.run_until(net.now + MS(1_500));
            }
        }
        net.run_until(net.now + Duration::from_secs(3));
        let before: u64 = net.payload_in.iter().sum();
        net.crossings.clear();
        let measured = 20;
        for m in 0..measured {
            let (home, kp) = &pubs[m % pubs.len()];
            net.publish(*home, kp, format!("m{m}").as_bytes());
            net.run_until(net.now + MS(300));
        }
        net.run_until(net.now + Duration::from_secs(3));
        let after: u64 = net.payload_in.iter().sum();
        prop_assert_eq!(after - before, (measured * (n - 1)) as u64);
        for (id, hops) in &net.crossings {
            let set: BTreeSet<(usize, usize)> =
                hops.iter().map(|(a, b)| ((*a).min(*b), (*a).max(*b))).collect();
            prop_assert_eq!(set.len(), hops.len(), "message {:?} crossed a link twice", id);
        }
    }
}

#[test]
fn a_first_copy_over_a_link_pruned_for_its_origin_makes_it_a_tree_link_again() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let p = key(4);
    let a = net.ids[0];
    // Home 1 had pruned the link for p (a crossed prune, say).
    net.nodes[1].handle_frame(
        a,
        TopicFrame::Prune {
            topic: topic(),
            origin: p.peer_id(),
        },
        Duration::ZERO,
    );
    assert_eq!(net.nodes[1].links_of(&topic(), &p.peer_id()).1, vec![a]);
    // Yet home 0 sends p's next message first: home 1 takes the link back
    // into p's tree and tells home 0.
    let m = TopicMessage::sign(&p, topic(), 1, b"x".to_vec()).unwrap();
    net.nodes[1].handle_frame(a, TopicFrame::Message(m), Duration::ZERO);
    let mut told = false;
    while let Some(o) = net.nodes[1].poll_output() {
        if let OverlayOutput::Send {
            to,
            frame: TopicFrame::Eager { origin, .. },
        } = o
        {
            told = to == a && origin == p.peer_id();
        }
    }
    assert!(told);
    assert_eq!(net.nodes[1].links_of(&topic(), &p.peer_id()).0, vec![a]);
}

#[test]
fn a_snapshot_pull_moves_to_the_neighbour_the_home_is_now_heard_through() {
    let t = topic();
    let (a, b, home_key) = (key(2).peer_id(), key(3).peer_id(), key(4));
    let home = home_key.peer_id();
    let mut o = Overlay::new(key(1), 1, OverlayConfig::default());
    o.subscribe(t, Duration::ZERO).unwrap();
    o.link_up(a, &[t]).unwrap();
    o.link_up(b, &[t]).unwrap();
    let requests = |o: &mut Overlay| -> Vec<PeerId> {
        std::iter::from_fn(|| o.poll_output())
            .filter_map(|out| match out {
                OverlayOutput::Send {
                    to,
                    frame: TopicFrame::SnapshotRequest { .. },
                } => Some(to),
                _ => None,
            })
            .collect()
    };
    let beat = |n: u64| beat_of(&home_key, 1, 3, n);
    // Home `home` is at version 3, heard through `a`: pull from `a`.
    let t0 = MS(100);
    o.handle_frame(a, beat(1), t0);
    assert_eq!(requests(&mut o), vec![a]);
    // `a` dies before answering; the home is now heard through `b`.
    o.link_down(a);
    o.handle_frame(b, beat(2), t0 + MS(500));
    assert_eq!(requests(&mut o), vec![], "one pull at a time");
    o.handle_timeout(t0 + crate::topics::SNAPSHOT_RETRY);
    assert_eq!(requests(&mut o), vec![b]);
    // `b` answers: the view is complete.
    o.handle_frame(
        b,
        page_of(&home_key, 1, 3, &[key(5).peer_id(), key(6).peer_id()]),
        t0 + MS(1_100),
    );
    assert_eq!(o.presence_view(&t, &home), Some((1, 3, 2)));
    assert_eq!(o.members(&t).len(), 2);
}

#[test]
fn a_home_behind_answers_a_snapshot_request_once_it_has_caught_up() {
    let t = topic();
    let (up, down, home_key) = (key(2).peer_id(), key(3).peer_id(), key(4));
    let home = home_key.peer_id();
    let mut o = Overlay::new(key(1), 1, OverlayConfig::default());
    o.subscribe(t, Duration::ZERO).unwrap();
    o.link_up(up, &[t]).unwrap();
    o.link_up(down, &[t]).unwrap();
    let pages = |o: &mut Overlay| -> Vec<(PeerId, u64, usize)> {
        std::iter::from_fn(|| o.poll_output())
            .filter_map(|out| match out {
                OverlayOutput::Send {
                    to,
                    frame:
                        TopicFrame::SnapshotPage {
                            version, members, ..
                        },
                } => Some((to, version, members.len())),
                _ => None,
            })
            .collect()
    };
    // A heartbeat says `home` is at version 2; we have nothing: pulling.
    o.handle_frame(up, beat_of(&home_key, 1, 2, 1), MS(10));
    // `down` asks us meanwhile: no stale answer.
    o.handle_frame(
        down,
        TopicFrame::SnapshotRequest {
            topic: t,
            home,
            page: 0,
        },
        MS(20),
    );
    assert_eq!(pages(&mut o), vec![]);
    // Our pull completes: `down` gets the fresh page at once.
    o.handle_frame(up, page_of(&home_key, 1, 2, &[key(5).peer_id()]), MS(30));
    assert_eq!(pages(&mut o), vec![(down, 2, 1)]);
}

#[test]
fn limits_on_topics_links_are_typed_and_a_flooded_topic_leaves_others_alone() {
    let me = key(1);
    let mut o = Overlay::new(me.clone(), 1, OverlayConfig::default());
    let now = Duration::ZERO;
    let topics: Vec<TopicId> = (0..crate::topics::MAX_TOPICS_PER_NODE)
        .map(|i| TopicId::from_name(&format!("t{i}")).unwrap())
        .collect();
    for t in &topics {
        o.subscribe(*t, now).unwrap();
    }
    let one_more = TopicId::from_name("one more").unwrap();
    assert_eq!(
        o.subscribe(one_more, now).unwrap_err().kind(),
        "too_many_topics"
    );
    let (a, b) = (topics[0], topics[1]);
    for i in 0..MAX_LINKS_PER_TOPIC {
        o.link_up(key(100 + i as u64).peer_id(), &[a]).unwrap();
    }
    assert_eq!(
        o.link_up(key(99).peer_id(), &[a, b]),
        Err(TopicError::TooManyLinks)
    );
    // The link was still added for the topic with room.
    assert_eq!(o.links_of(&b, &me.peer_id()).0, vec![key(99).peer_id()]);
    // Flood topic a past its rate: b is unaffected.
    let mut refused = 0;
    for i in 0..(2 * DEFAULT_TOPIC_RATE) {
        if o.publish(a, vec![1], &key(1_000 + i / 50), now).is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, DEFAULT_TOPIC_RATE);
    assert!(o.publish(b, vec![1], &key(5), now).is_ok());
}

#[test]
fn the_sender_of_seq_n_is_asked_only_for_seqs_below_n() {
    // Found by the property test: a home that had 5 buffered from `q`
    // and then got 3 from `p` counted `p` as a holder of 4; `p` answered
    // "not cached" (it had not got 4 yet) and 4 was skipped.
    let t = topic();
    let (p, q) = (key(2).peer_id(), key(3).peer_id());
    let origin = key(9);
    let mut o = Overlay::new(key(1), 1, OverlayConfig::default());
    o.subscribe(t, Duration::ZERO).unwrap();
    o.link_up(p, &[t]).unwrap();
    o.link_up(q, &[t]).unwrap();
    let msg = |seq: u64| {
        TopicFrame::Message(TopicMessage::sign(&origin, t, seq, vec![seq as u8]).unwrap())
    };
    o.handle_frame(p, msg(1), MS(0));
    o.handle_frame(q, msg(5), MS(1));
    o.handle_frame(p, msg(3), MS(2));
    o.link_down(q);
    let id4 = ShortId::from(MessageId {
        origin: origin.peer_id(),
        seq: 4,
    });
    o.handle_frame(
        p,
        TopicFrame::NotCached {
            topic: t,
            ids: vec![id4],
        },
        MS(3),
    );
    o.handle_frame(p, msg(2), MS(4));
    o.handle_frame(p, msg(4), MS(5));
    let got: Vec<u64> = std::iter::from_fn(|| o.poll_output())
        .filter_map(|out| match out {
            OverlayOutput::Deliver { msg, .. } => Some(msg.seq),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
    assert_eq!(o.stats().gaps_skipped, 0);
}

#[test]
fn a_home_cut_off_for_longer_than_its_buffer_catches_up_in_order() {
    let mut net = Net::new(2, &[(0, 1, 10)], 0.0, 1);
    let p = key(1);
    net.publish(0, &p, b"1");
    net.run_until(MS(500));
    net.cut(0, 1);
    // 300 messages while cut off: more than MAX_AHEAD_PER_ORIGIN.
    for i in 0..300 {
        net.publish(0, &p, format!("{i}").as_bytes());
        net.run_until(net.now + MS(20));
    }
    net.connect(0, 1, MS(10));
    for i in 0..5 {
        net.publish(0, &p, format!("after {i}").as_bytes());
        net.run_until(net.now + MS(20));
    }
    net.run_until(net.now + Duration::from_secs(10));
    let seqs: Vec<u64> = net.delivered[1].iter().map(|(_, s)| *s).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, once");
    assert_eq!(seqs.last(), Some(&306));
    // Everything the jumped window could still pull was pulled.
    let skipped = net.nodes[1].stats().gaps_skipped;
    assert_eq!(seqs.len() as u64 + skipped, 306);
    assert!(
        seqs.len() as u64 > MAX_AHEAD_PER_ORIGIN_FOR_TEST,
        "{}",
        seqs.len()
    );
}

const MAX_AHEAD_PER_ORIGIN_FOR_TEST: u64 = crate::topics::MAX_AHEAD_PER_ORIGIN;

/// Sends of presence frames naming `home` in `node`'s output (drained).
fn presence_sends_about(o: &mut Overlay, home: PeerId) -> usize {
    std::iter::from_fn(|| o.poll_output())
        .filter(|out| {
            matches!(out, OverlayOutput::Send { frame: TopicFrame::PresenceDelta { home: h, .. }
                | TopicFrame::Heartbeat { home: h, .. }, .. } if *h == home)
        })
        .count()
}

/// A line 0 – 1 – 2 where home 1 turns hostile: it sends home 2 deltas and
/// heartbeats in home 0's name (signed with its own key, or home 0's
/// signature on other changes). Home 2 refuses and counts each, changes
/// no view, passes none on; home 0's own changes still arrive.
#[test]
fn forged_deltas_and_heartbeats_in_another_homes_name_change_no_view_and_are_counted() {
    let mut net = Net::new(3, &[(0, 1, 10), (1, 2, 10)], 0.0, 1);
    let t = topic();
    let (h0, h1) = (key(1000), key(1001));
    let member = key(900).peer_id();
    net.nodes[0]
        .member_joined(t, member, Duration::ZERO)
        .unwrap();
    net.flush(0);
    net.run_until(HEARTBEAT * 2);
    let view = net.nodes[2].presence_view(&t, &net.ids[0]);
    assert_eq!(view, Some((1, 1, 1)));
    assert_eq!(net.nodes[2].members(&t), [(member, net.ids[0])]);
    let ghost = key(901).peer_id();
    let (from, home) = (net.ids[1], net.ids[0]);
    let delta = |changes: Vec<(PeerId, bool)>, seal: ([u8; 32], [u8; 32], Vec<u8>)| {
        TopicFrame::PresenceDelta {
            topic: t,
            home,
            incarnation: 1,
            version: 2,
            changes,
            members_digest: None,
            signature: seal.2,
        }
    };
    let forgeries = [
        // A join and a leave, signed by home 1 in home 0's name.
        delta(
            vec![(ghost, true)],
            seal_of(&h1, 1, 2, &[member, ghost], &[(ghost, true)]),
        ),
        delta(
            vec![(member, false)],
            seal_of(&h1, 1, 2, &[], &[(member, false)]),
        ),
        // Home 0's real signature of a join, with the changes swapped.
        delta(
            vec![(member, false)],
            seal_of(&h0, 1, 2, &[member, ghost], &[(ghost, true)]),
        ),
        // A big delta (carrying the list's digest, checked even by a home
        // that cannot apply it), versions ahead, signed by home 1.
        {
            let changes: Vec<(PeerId, bool)> =
                (0..40).map(|i| (key(3_000 + i).peer_id(), true)).collect();
            let (md, _, signature) = seal_of(&h1, 1, 7, &[member], &changes);
            TopicFrame::PresenceDelta {
                topic: t,
                home,
                incarnation: 1,
                version: 7,
                changes,
                members_digest: Some(md),
                signature,
            }
        },
        // A higher incarnation and beat (would hide home 0's heartbeats)
        // and version (would set every home pulling), signed by home 1.
        {
            let mut f = beat_of(&h1, 7, 9, 1_000);
            if let TopicFrame::Heartbeat { home: h, .. } = &mut f {
                *h = home;
            }
            f
        },
        // Home 0's real heartbeat, its version raised on the way.
        {
            let mut f = beat_of(&h0, 1, 1, 1_000);
            if let TopicFrame::Heartbeat { version, .. } = &mut f {
                *version = 5;
            }
            f
        },
    ];
    let n = forgeries.len() as u64;
    for f in forgeries {
        net.nodes[2].handle_frame(from, f, net.now);
        assert_eq!(presence_sends_about(&mut net.nodes[2], home), 0);
    }
    assert_eq!(net.nodes[2].stats().bad_presence, n);
    assert_eq!(net.nodes[2].presence_view(&t, &home), view);
    assert_eq!(net.nodes[2].members(&t), [(member, home)]);
    // The forged beat 1,000 of incarnation 7 hid nothing: home 0 is still
    // heard, and its own next change arrives.
    net.run_until(net.now + HOME_STALE * 2);
    assert_eq!(net.nodes[2].members(&t), [(member, home)]);
    net.nodes[0].member_joined(t, ghost, net.now).unwrap();
    net.flush(0);
    net.run_until(net.now + MS(1_000));
    assert_eq!(net.nodes[2].members(&t).len(), 2);
    assert_eq!(net.nodes[2].stats().bad_presence, n);
    assert_eq!(net.nodes[1].stats().bad_presence, 0);
}

/// Home 0 falls silent; home 1 keeps sending home 2 heartbeats in its
/// name. They are refused: home 0's members are dropped at HOME_STALE.
#[test]
fn forged_heartbeats_do_not_keep_a_dead_home_alive() {
    let mut net = Net::new(3, &[(0, 1, 10), (1, 2, 10)], 0.0, 1);
    let t = topic();
    let h1 = key(1001);
    let member = key(900).peer_id();
    net.nodes[0]
        .member_joined(t, member, Duration::ZERO)
        .unwrap();
    net.flush(0);
    net.run_until(HEARTBEAT * 2);
    assert_eq!(net.nodes[2].members(&t).len(), 1);
    // Home 0's link dies silently.
    net.links.remove(&(0, 1));
    net.links.remove(&(1, 0));
    let cut = net.now;
    let mut sent = 0;
    for beat in 100..112 {
        net.run_until(net.now + MS(2_000));
        let mut f = beat_of(&h1, 1, 1, beat);
        if let TopicFrame::Heartbeat { home, .. } = &mut f {
            *home = net.ids[0];
        }
        net.nodes[2].handle_frame(net.ids[1], f, net.now);
        net.flush(2);
        sent += 1;
    }
    assert!(net.now > cut + HOME_STALE + HEARTBEAT);
    assert_eq!(net.nodes[2].members(&t), []);
    assert_eq!(net.nodes[2].stats().bad_presence, sent);
}

/// Unsigned heartbeats (the ones between signed ones) cannot be checked:
/// forged, they keep a dead home listed at most SIGNED_STALE after its
/// last signed word, and claim no version.
#[test]
fn forged_unsigned_heartbeats_keep_a_dead_home_no_longer_than_the_signed_stale_time() {
    use crate::topics::presence::SIGNED_STALE;
    let mut net = Net::new(3, &[(0, 1, 10), (1, 2, 10)], 0.0, 1);
    let t = topic();
    let member = key(900).peer_id();
    net.nodes[0]
        .member_joined(t, member, Duration::ZERO)
        .unwrap();
    net.flush(0);
    net.run_until(HEARTBEAT * 2);
    let view = net.nodes[2].presence_view(&t, &net.ids[0]);
    assert_eq!(view, Some((1, 1, 1)));
    // Home 0 dies silently; home 1 keeps sending unsigned heartbeats in
    // its name, the first one claiming a higher version.
    net.links.remove(&(0, 1));
    net.links.remove(&(1, 0));
    let cut = net.now;
    let dead = net.ids[0];
    let unsigned = |version: u64, beat: u64| TopicFrame::Heartbeat {
        topic: t,
        home: dead,
        incarnation: 1,
        version,
        beat,
        signature: Vec::new(),
    };
    let claim = unsigned(9, 50);
    net.nodes[2].handle_frame(net.ids[1], claim, net.now);
    net.flush(2);
    net.run_until(net.now + MS(100));
    assert_eq!(net.nodes[2].presence_view(&t, &net.ids[0]), view);
    let mut beat = 3;
    let mut gone_at = None;
    while net.now < cut + SIGNED_STALE + HEARTBEAT * 2 {
        net.run_until(net.now + MS(2_000));
        beat += 1;
        let f = unsigned(1, beat);
        net.nodes[2].handle_frame(net.ids[1], f, net.now);
        net.flush(2);
        if gone_at.is_none() && net.nodes[2].members(&t).is_empty() {
            gone_at = Some(net.now);
        }
    }
    let gone_at = gone_at.expect("the dead home's member was dropped");
    assert!(gone_at <= cut + SIGNED_STALE + MS(2_000), "{gone_at:?}");
    assert_eq!(net.nodes[2].members(&t), []);
}

/// A snapshot is served by a neighbour, not by its home: pages whose list
/// is not the one the home sealed (a member added, or one left out) are
/// refused and counted, and the next try, answered honestly, is taken.
#[test]
fn a_forged_snapshot_is_refused_and_an_honest_one_from_a_neighbour_taken() {
    let t = topic();
    let (a, home_key) = (key(2).peer_id(), key(4));
    let home = home_key.peer_id();
    let mut o = Overlay::new(key(1), 1, OverlayConfig::default());
    o.subscribe(t, Duration::ZERO).unwrap();
    o.link_up(a, &[t]).unwrap();
    let (m1, m2, ghost) = (key(5).peer_id(), key(6).peer_id(), key(7).peer_id());
    let honest = page_of(&home_key, 1, 3, &[m1, m2]);
    let with = |members: Vec<PeerId>| {
        let mut f = honest.clone();
        if let TopicFrame::SnapshotPage { members: m, .. } = &mut f {
            *m = members;
        }
        f
    };
    // Home `home` is at version 3: we pull from `a`.
    o.handle_frame(a, beat_of(&home_key, 1, 3, 1), MS(100));
    while o.poll_output().is_some() {}
    let mut at = MS(110);
    for forged in [with(vec![m1, m2, ghost]), with(vec![m1])] {
        o.handle_frame(a, forged, at);
        assert_eq!(o.presence_view(&t, &home), Some((0, 0, 0)));
        assert_eq!(o.members(&t), []);
        // Asked again a retry period later.
        at += crate::topics::SNAPSHOT_RETRY;
        o.handle_timeout(at);
        let asked = std::iter::from_fn(|| o.poll_output()).any(|out| {
            matches!(out, OverlayOutput::Send { to, frame: TopicFrame::SnapshotRequest { .. } } if to == a)
        });
        assert!(asked, "pulls again after a forged snapshot");
    }
    assert_eq!(o.stats().bad_presence, 2);
    // The retry is answered honestly (a serves home's sealed list).
    o.handle_frame(a, honest, at + MS(10));
    assert_eq!(o.presence_view(&t, &home), Some((1, 3, 2)));
    assert_eq!(o.members(&t).len(), 2);
    assert_eq!(o.stats().bad_presence, 2);
}

/// A home that links later, to a neighbour of the home only, gets the
/// home's list from the neighbour, checked against the home's seal.
#[test]
fn a_snapshot_served_by_a_neighbour_verifies_and_converges() {
    let mut net = Net::new(3, &[(0, 1, 10)], 0.0, 1);
    let t = topic();
    let many = crate::topics::MAX_PRESENCE_PAGE + 10;
    for m in 0..many {
        net.nodes[0]
            .member_joined(t, key(10_000 + m as u64).peer_id(), Duration::ZERO)
            .unwrap();
    }
    net.flush(0);
    net.run_until(MS(10_000));
    // A join and a leave after the first version, so the neighbour's
    // view was built by deltas on top of the snapshot.
    net.nodes[0]
        .member_left(t, key(10_000).peer_id(), net.now)
        .unwrap();
    net.nodes[0]
        .member_joined(t, key(20_000).peer_id(), net.now)
        .unwrap();
    net.flush(0);
    net.run_until(net.now + MS(2_000));
    assert_eq!(net.nodes[1].members(&t).len(), many);
    net.connect(1, 2, MS(10));
    net.run_until(net.now + HEARTBEAT + MS(1_000));
    assert_eq!(net.nodes[2].members(&t).len(), many);
    assert_eq!(
        net.nodes[2].presence_view(&t, &net.ids[0]),
        net.nodes[0].presence_view(&t, &net.ids[0])
    );
    for n in &net.nodes {
        assert_eq!(n.stats().bad_presence, 0);
    }
}
