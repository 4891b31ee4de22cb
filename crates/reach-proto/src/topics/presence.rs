//! Presence: who the members of a topic are, per home.
//!
//! Only a member's own home announces it: each home keeps a version of its
//! local member list and floods *deltas* (joins and leaves gathered for
//! [`PRESENCE_BATCH_DELAY`], one version each): small ones over every link
//! of the topic (each crosses each link at most twice; a delta lost on a
//! tree link would otherwise leave a subtree behind until a snapshot), big
//! ones over the home's tree ([`SMALL_DELTA`]).
//! Heartbeats go over the home's tree (see the overlay's per-origin trees).
//! [`PRESENCE_CONFIRM`] after a delta, and every [`HEARTBEAT`], a home floods `(home, incarnation, version, beat)`:
//! a few dozen bytes whatever its member count, so presence costs each link
//! a bounded amount per home. A home whose version is ahead of what a
//! heartbeat or delta says pulls a snapshot of that home's members from the
//! neighbour that sent it, in pages of [`MAX_PRESENCE_PAGE`]. A home not
//! heard for [`HOME_STALE`] has its members dropped; one silent for
//! [`PRESENCE_REGRAFT`] first has its tree re-grafted from every link (see
//! [`PRESENCE_REGRAFT`]).
//!
//! `incarnation` is a value the driver picks per start of the home (e.g.
//! its start time): a restarted home counts its versions and beats from 0
//! again, and a higher incarnation tells the others to start over.
//!
//! **Signed by the home.** Only a member's own home announces it, and the
//! other homes check that it did: presence is signed end to end with the
//! home's node key (Ed25519, domain-separated from messages and from each
//! other), whichever homes relay it.
//!
//! - A delta's signature covers (topic, home, incarnation, version, digest
//!   of its changes, [`members_digest`] of the home's whole list after
//!   it): its *seal*. A home applies a delta only on top of the version
//!   before it, recomputing the list's digest, and checks the seal before
//!   the view changes or the delta goes on. A big delta (over
//!   [`SMALL_DELTA`] changes: over the home's tree only) also carries the
//!   digest, so a home that cannot apply it still checks it and passes it
//!   on; a small one it cannot apply (not the next version) changes
//!   nothing there and makes it pull (small deltas go over every link, so
//!   the others get it by other paths). The digest is left out of small
//!   deltas for the bytes (32 on every link of every change).
//! - Every home keeps, per home, the seal of the list it holds, so any
//!   neighbour can serve a snapshot: its pages carry the seal, and the
//!   receiver assembles them, recomputes the members' digest and checks
//!   the home's signature before the list replaces its view.
//! - Heartbeats: the first [`SIGNED_FIRST_BEATS`] of an incarnation and
//!   then one in [`SIGNED_BEAT_EVERY`] are signed (topic, home, incarnation, version,
//!   beat). Only signed heartbeats (and deltas) raise the version a home is
//!   known to be at, or move the signed-beat counter. The others are
//!   unsigned (signing every one doubled presence's bytes: see
//!   [`SIGNED_BEAT_EVERY`]): one naming the version we hold signed keeps
//!   the home alive, at most [`UNSIGNED_BEATS_AHEAD`] beats past its last
//!   signed one and at most [`SIGNED_STALE`] after its last signed word;
//!   one naming another version only makes us pull the list the home
//!   signed (from the neighbour that sent it, checked on arrival), as an
//!   unsigned heartbeat or a small delta of a home new to us does (an
//!   empty view, dropped at [`HOME_STALE`] unless the home's word comes).
//! - A frame whose signature does not verify is dropped, counted
//!   (`forged`, the overlay's `bad_presence`) and sent no further.
//!
//! What a hostile federated home can still do: drop or delay what it
//! relays (as with messages: the other paths and the re-graft route
//! around it); make homes pull snapshots (a pull at a time per home, the
//! answer checked); hide a live home's unsigned heartbeats behind forged
//! ones numbered ahead, until the home's next signed one; keep a dead
//! home's members listed with forged unsigned heartbeats for at most
//! [`SIGNED_STALE`] after the home's last signed word (instead of
//! [`HOME_STALE`]). What it cannot do: add or remove a member of another
//! home, move another home's version or incarnation, serve a snapshot the
//! home did not sign, or keep a dead home listed beyond [`SIGNED_STALE`].
//! A home's own members are its word alone: a hostile home can list
//! anyone as its own members (who is a member is the home's to say).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::message::PresenceDigest;
use super::{
    HEARTBEAT, HOME_STALE, MAX_LINKS_PER_TOPIC, MAX_MEMBERS_PER_TOPIC, MAX_PRESENCE_PAGE,
    PRESENCE_BATCH_DELAY, PRESENCE_CONFIRM, PRESENCE_REGRAFT, SNAPSHOT_RETRY, TopicFrame, TopicId,
};
use crate::{Keypair, PeerId};

/// Domain separators: a presence signature can never pass for a message's
/// (`reach-topic-message-v1`) or for another kind of presence statement.
const STATE_DOMAIN: &[u8] = b"reach-topic-presence-state-v1";
const BEAT_DOMAIN: &[u8] = b"reach-topic-presence-beat-v1";
const MEMBERS_DOMAIN: &[u8] = b"reach-topic-presence-members-v1";
const CHANGES_DOMAIN: &[u8] = b"reach-topic-presence-changes-v1";

/// The digest of a member list: BLAKE3 over the ids in ascending order
/// (each once: a set), so every home that holds the same list gets the
/// same digest whatever order it learnt it in.
pub fn members_digest(members: &BTreeSet<PeerId>) -> PresenceDigest {
    let mut h = blake3::Hasher::new();
    h.update(MEMBERS_DOMAIN);
    for m in members {
        h.update(m.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// The digest of a delta's changes, in their order.
pub fn changes_digest(changes: &[(PeerId, bool)]) -> PresenceDigest {
    let mut h = blake3::Hasher::new();
    h.update(CHANGES_DOMAIN);
    for (m, joined) in changes {
        h.update(m.as_bytes());
        h.update(&[u8::from(*joined)]);
    }
    *h.finalize().as_bytes()
}

/// What a home signs of its member list at one version: "at (incarnation,
/// version) of `home` on `topic` the members are those of digest
/// `members`, reached by the changes of digest `changes`".
pub fn state_bytes(
    topic: &TopicId,
    home: &PeerId,
    incarnation: u64,
    version: u64,
    members: &PresenceDigest,
    changes: &PresenceDigest,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(STATE_DOMAIN.len() + 32 * 4 + 16);
    b.extend_from_slice(STATE_DOMAIN);
    b.extend_from_slice(&topic.0);
    b.extend_from_slice(home.as_bytes());
    b.extend_from_slice(&incarnation.to_be_bytes());
    b.extend_from_slice(&version.to_be_bytes());
    b.extend_from_slice(members);
    b.extend_from_slice(changes);
    b
}

/// What a home signs of a heartbeat.
pub fn beat_bytes(
    topic: &TopicId,
    home: &PeerId,
    incarnation: u64,
    version: u64,
    beat: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(BEAT_DOMAIN.len() + 32 * 2 + 24);
    b.extend_from_slice(BEAT_DOMAIN);
    b.extend_from_slice(&topic.0);
    b.extend_from_slice(home.as_bytes());
    b.extend_from_slice(&incarnation.to_be_bytes());
    b.extend_from_slice(&version.to_be_bytes());
    b.extend_from_slice(&beat.to_be_bytes());
    b
}

/// Whether `signature` is `home`'s over `bytes`.
fn signed_by(home: &PeerId, bytes: &[u8], signature: &[u8]) -> bool {
    let Ok(sig) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    home.verify(bytes, &sig)
}

/// A home's signed statement of its member list at one version (see
/// [`state_bytes`]): what a view keeps so that it can serve the list as a
/// snapshot any receiver checks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seal {
    members: PresenceDigest,
    changes: PresenceDigest,
    signature: Vec<u8>,
}

impl Seal {
    fn sign(
        signer: &Keypair,
        topic: &TopicId,
        incarnation: u64,
        version: u64,
        members: &BTreeSet<PeerId>,
        changes: &[(PeerId, bool)],
    ) -> Seal {
        let members = members_digest(members);
        let changes = changes_digest(changes);
        let signature = signer
            .sign(&state_bytes(
                topic,
                &signer.peer_id(),
                incarnation,
                version,
                &members,
                &changes,
            ))
            .to_vec();
        Seal {
            members,
            changes,
            signature,
        }
    }
}

/// A delta of at most this many changes (the joins and leaves of one batch
/// period of a busy home) is flooded over every link, so a frame lost on a
/// tree link costs nothing; a bigger one (a home starting with many
/// members) goes over the home's tree, since every link would carry its
/// full size up to twice, and a lost piece is made good by a snapshot.
pub const SMALL_DELTA: usize = 32;
/// Homes per topic whose members a home tracks at most.
pub const MAX_HOMES_PER_TOPIC: usize = 4_096;
/// One heartbeat in this many is signed (the first of an incarnation,
/// then every this many). A signature is 64 bytes on a heartbeat of about
/// 70 that crosses every link of the topic's tree every [`HEARTBEAT`] for
/// every home: signing each doubled presence's cost and broke the
/// simulator's control budget (0.133 control bytes per payload byte,
/// target 0.1). Eight keeps the signed ones to one in 40 s.
pub const SIGNED_BEAT_EVERY: u64 = 8;
/// The first heartbeats of an incarnation are all signed: every other home
/// is learning of this one then, and a home forwards only heartbeats it
/// can check (signed, or unsigned of a list it holds signed), so unsigned
/// ones would reach one more ring of homes per heartbeat; signed ones
/// reach every home at once (in the simulator, setup was not complete in
/// 8 s with 30 homes when only the first was signed). Three cover the
/// setup of a home's members and its confirm heartbeat.
pub const SIGNED_FIRST_BEATS: u64 = 3;
/// Unsigned heartbeats are taken at most this far past the last signed
/// one of the home: one signed heartbeat may be lost, and a forged
/// unsigned one numbered ahead hides the home's own for no longer.
pub const UNSIGNED_BEATS_AHEAD: u64 = 2 * SIGNED_BEAT_EVERY;
/// A home whose own word (a signed heartbeat or delta) has not come for
/// this long has its members dropped whatever unsigned heartbeats say:
/// two signed periods (one signed heartbeat lost) and a heartbeat of
/// margin. This bounds how long a hostile home's forged unsigned
/// heartbeats can keep a dead home listed.
pub const SIGNED_STALE: Duration =
    Duration::from_secs(HEARTBEAT.as_secs() * (2 * SIGNED_BEAT_EVERY + 1));

/// What presence asks the overlay to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PresenceAction {
    /// Send over `origin`'s tree (the home whose presence it is) but to
    /// `except`.
    Flood {
        frame: TopicFrame,
        origin: PeerId,
        except: Option<PeerId>,
    },
    /// Send on every link but `except` if `all`, else over `origin`'s
    /// tree (deltas: see [`SMALL_DELTA`]).
    FloodDelta {
        frame: TopicFrame,
        origin: PeerId,
        all: bool,
        except: Option<PeerId>,
    },
    /// `from` sent a flood of `origin` already had: prune it from that
    /// tree.
    Duplicate { origin: PeerId, from: PeerId },
    /// `from` sent a new flood of `origin` first: it is on that tree.
    First { origin: PeerId, from: PeerId },
    /// Send to one neighbour.
    Send { to: PeerId, frame: TopicFrame },
    /// A member appeared or vanished (any home, this one included).
    Changed {
        member: PeerId,
        home: PeerId,
        joined: bool,
    },
    /// Ask every link to push `origin`'s frames to us again (an `Eager`
    /// frame each): its presence has been silent for
    /// [`PRESENCE_REGRAFT`].
    Regraft { origin: PeerId },
}

struct Pull {
    from: PeerId,
    /// The version and the (changes digest, signature) of the first page:
    /// every later page must say the same.
    version: Option<((u64, u64), PresenceDigest, Vec<u8>)>,
    next_page: u32,
    acc: Vec<PeerId>,
    due: Duration,
}

struct HomeView {
    /// (incarnation, version) of `members`.
    version: (u64, u64),
    /// Highest (incarnation, version) of a delta seen (flood dedup).
    delta_seen: (u64, u64),
    /// Highest (incarnation, version) announced by a delta or heartbeat.
    announced: (u64, u64),
    /// Highest (incarnation, beat) of a heartbeat taken (flood dedup).
    beat: (u64, u64),
    /// Highest (incarnation, beat) of a signed heartbeat taken.
    signed_beat: (u64, u64),
    last_heard: Duration,
    /// When the home's own word (a signed heartbeat or delta) last came:
    /// unsigned heartbeats keep a home no longer than [`SIGNED_STALE`]
    /// after it.
    last_signed: Duration,
    /// Whether its tree was re-grafted since `last_heard`.
    regrafted: bool,
    /// The neighbour the home's latest delta or heartbeat came from: where
    /// snapshot pulls go (a pull's neighbour may have died since).
    last_from: Option<PeerId>,
    /// Neighbours that asked for a snapshot while this view was behind.
    waiters: BTreeSet<PeerId>,
    members: BTreeSet<PeerId>,
    /// The home's seal of `members` at `version`; `None` while the view
    /// holds no list the home signed (never heard, or cut at
    /// [`MAX_MEMBERS_PER_TOPIC`]): such a view is never served.
    seal: Option<Seal>,
    pull: Option<Pull>,
}

/// Presence state of one topic at one home.
pub(crate) struct TopicPresence {
    me: PeerId,
    topic: TopicId,
    incarnation: u64,
    local: BTreeSet<PeerId>,
    version: u64,
    /// The local members at `version` (those of the last delta: `local`
    /// also holds the changes still pending), and their seal: what a
    /// snapshot of this home serves.
    sealed: BTreeSet<PeerId>,
    seal: Seal,
    pending: Vec<(PeerId, bool)>,
    batch_due: Option<Duration>,
    beat: u64,
    next_beat: Duration,
    homes: BTreeMap<PeerId, HomeView>,
    remote_members: usize,
    /// Presence entries refused at [`MAX_MEMBERS_PER_TOPIC`] or
    /// [`MAX_HOMES_PER_TOPIC`].
    pub(crate) dropped: u64,
    /// Deltas, heartbeats and snapshots refused because the home they name
    /// did not sign them (forged or altered on the way).
    pub(crate) forged: u64,
}

impl TopicPresence {
    /// The presence of `topic` at the home whose key is `signer`.
    pub(crate) fn new(signer: &Keypair, topic: TopicId, incarnation: u64, now: Duration) -> Self {
        // Version 0 (no members) is signed too: a heartbeat at version 0
        // of a new incarnation makes the others pull it.
        let sealed = BTreeSet::new();
        let seal = Seal::sign(signer, &topic, incarnation, 0, &sealed, &[]);
        TopicPresence {
            me: signer.peer_id(),
            topic,
            incarnation,
            local: BTreeSet::new(),
            version: 0,
            sealed,
            seal,
            pending: Vec::new(),
            batch_due: None,
            beat: 0,
            next_beat: now,
            homes: BTreeMap::new(),
            remote_members: 0,
            dropped: 0,
            forged: 0,
        }
    }

    pub(crate) fn local_members(&self) -> usize {
        self.local.len()
    }

    /// Every member known, with its home.
    pub(crate) fn members(&self) -> Vec<(PeerId, PeerId)> {
        let mut v: Vec<(PeerId, PeerId)> = self.local.iter().map(|m| (*m, self.me)).collect();
        for (h, view) in &self.homes {
            v.extend(view.members.iter().map(|m| (*m, *h)));
        }
        v
    }

    /// (incarnation, version, members) of `home` as this home knows it.
    pub(crate) fn view_of(&self, home: &PeerId) -> Option<(u64, u64, usize)> {
        if *home == self.me {
            return Some((self.incarnation, self.version, self.local.len()));
        }
        self.homes
            .get(home)
            .map(|v| (v.version.0, v.version.1, v.members.len()))
    }

    /// A local member joined (`true`) or left. False if nothing changed or
    /// the topic is full.
    pub(crate) fn local_change(
        &mut self,
        member: PeerId,
        joined: bool,
        now: Duration,
        acts: &mut Vec<PresenceAction>,
    ) -> bool {
        let changed = if joined {
            if self.local.len() + self.remote_members >= MAX_MEMBERS_PER_TOPIC {
                self.dropped += 1;
                return false;
            }
            self.local.insert(member)
        } else {
            self.local.remove(&member)
        };
        if changed {
            self.pending.push((member, joined));
            self.batch_due.get_or_insert(now + PRESENCE_BATCH_DELAY);
            acts.push(PresenceAction::Changed {
                member,
                home: self.me,
                joined,
            });
        }
        changed
    }

    pub(crate) fn next_timeout(&self) -> Option<Duration> {
        let pulls = self
            .homes
            .values()
            .filter_map(|v| v.pull.as_ref().map(|p| p.due));
        // The earliest moment a home falls silent for HOME_STALE: dropped
        // exactly then, not at the next periodic sweep.
        let stale = self
            .homes
            .values()
            .map(|v| (v.last_heard + HOME_STALE).min(v.last_signed + SIGNED_STALE))
            .min();
        let regraft = self
            .homes
            .values()
            .filter(|v| !v.regrafted)
            .map(|v| v.last_heard + PRESENCE_REGRAFT)
            .min();
        [Some(self.next_beat), stale, regraft, self.batch_due]
            .into_iter()
            .flatten()
            .chain(pulls)
            .min()
    }

    /// Runs the timers due at `now`; `signer` is this home's key (signs
    /// its deltas and heartbeats).
    pub(crate) fn on_timeout(
        &mut self,
        now: Duration,
        signer: &Keypair,
        acts: &mut Vec<PresenceAction>,
    ) {
        if self.batch_due.is_some_and(|t| t <= now) {
            self.batch_due = None;
            let pending = std::mem::take(&mut self.pending);
            for chunk in pending.chunks(MAX_PRESENCE_PAGE) {
                self.version += 1;
                for (m, joined) in chunk {
                    if *joined {
                        self.sealed.insert(*m);
                    } else {
                        self.sealed.remove(m);
                    }
                }
                self.seal = Seal::sign(
                    signer,
                    &self.topic,
                    self.incarnation,
                    self.version,
                    &self.sealed,
                    chunk,
                );
                acts.push(PresenceAction::FloodDelta {
                    origin: self.me,
                    all: chunk.len() <= SMALL_DELTA,
                    frame: TopicFrame::PresenceDelta {
                        topic: self.topic,
                        home: self.me,
                        incarnation: self.incarnation,
                        version: self.version,
                        changes: chunk.to_vec(),
                        members_digest: (chunk.len() > SMALL_DELTA).then_some(self.seal.members),
                        signature: self.seal.signature.clone(),
                    },
                    except: None,
                });
            }
            // A home that lost the delta learns of the gap from this early
            // heartbeat instead of the next regular one.
            self.next_beat = self.next_beat.min(now + PRESENCE_CONFIRM);
        }
        if self.next_beat <= now {
            self.beat += 1;
            self.next_beat = now + HEARTBEAT;
            let signed = self.beat <= SIGNED_FIRST_BEATS
                || (self.beat - 1).is_multiple_of(SIGNED_BEAT_EVERY);
            let signature = if signed {
                signer
                    .sign(&beat_bytes(
                        &self.topic,
                        &self.me,
                        self.incarnation,
                        self.version,
                        self.beat,
                    ))
                    .to_vec()
            } else {
                Vec::new()
            };
            acts.push(PresenceAction::Flood {
                frame: TopicFrame::Heartbeat {
                    topic: self.topic,
                    home: self.me,
                    incarnation: self.incarnation,
                    version: self.version,
                    beat: self.beat,
                    signature,
                },
                origin: self.me,
                except: None,
            });
        }
        for (home, v) in self.homes.iter_mut() {
            if !v.regrafted && v.last_heard + PRESENCE_REGRAFT <= now {
                v.regrafted = true;
                acts.push(PresenceAction::Regraft { origin: *home });
            }
        }
        {
            let stale: Vec<PeerId> = self
                .homes
                .iter()
                .filter(|(_, v)| {
                    v.last_heard + HOME_STALE <= now || v.last_signed + SIGNED_STALE <= now
                })
                .map(|(h, _)| *h)
                .collect();
            for h in stale {
                if let Some(v) = self.homes.remove(&h) {
                    self.remote_members -= v.members.len();
                    for m in v.members {
                        acts.push(PresenceAction::Changed {
                            member: m,
                            home: h,
                            joined: false,
                        });
                    }
                }
            }
        }
        let topic = self.topic;
        for (home, v) in self.homes.iter_mut() {
            if let Some(p) = v.pull.as_mut()
                && p.due <= now
            {
                p.from = v.last_from.unwrap_or(p.from);
                p.due = now + SNAPSHOT_RETRY;
                p.next_page = 0;
                p.version = None;
                p.acc.clear();
                acts.push(PresenceAction::Send {
                    to: p.from,
                    frame: TopicFrame::SnapshotRequest {
                        topic,
                        home: *home,
                        page: 0,
                    },
                });
            }
        }
    }

    fn view(&mut self, home: PeerId, now: Duration) -> Option<&mut HomeView> {
        if !self.homes.contains_key(&home) {
            if self.homes.len() >= MAX_HOMES_PER_TOPIC {
                self.dropped += 1;
                return None;
            }
            self.homes.insert(
                home,
                HomeView {
                    version: (0, 0),
                    delta_seen: (0, 0),
                    announced: (0, 0),
                    beat: (0, 0),
                    signed_beat: (0, 0),
                    last_heard: now,
                    last_signed: now,
                    regrafted: false,
                    last_from: None,
                    waiters: BTreeSet::new(),
                    members: BTreeSet::new(),
                    seal: None,
                    pull: None,
                },
            );
        }
        self.homes.get_mut(&home)
    }

    fn start_pull(
        topic: TopicId,
        home: PeerId,
        v: &mut HomeView,
        from: PeerId,
        now: Duration,
        acts: &mut Vec<PresenceAction>,
    ) {
        if v.pull.is_some() {
            return;
        }
        v.pull = Some(Pull {
            from,
            version: None,
            next_page: 0,
            acc: Vec::new(),
            due: now + SNAPSHOT_RETRY,
        });
        acts.push(PresenceAction::Send {
            to: from,
            frame: TopicFrame::SnapshotRequest {
                topic,
                home,
                page: 0,
            },
        });
    }

    /// Replaces `home`'s members by `new` at `version`, sealed by `seal`
    /// (checked by the caller).
    fn replace(
        &mut self,
        home: PeerId,
        version: (u64, u64),
        mut new: BTreeSet<PeerId>,
        seal: Seal,
        acts: &mut Vec<PresenceAction>,
    ) {
        let budget = MAX_MEMBERS_PER_TOPIC.saturating_sub(self.local.len() + self.remote_members);
        let Some(v) = self.homes.get_mut(&home) else {
            return;
        };
        let old_len = v.members.len();
        let mut seal = Some(seal);
        if new.len() > budget + old_len {
            let keep: BTreeSet<PeerId> = new.iter().take(budget + old_len).copied().collect();
            self.dropped += (new.len() - keep.len()) as u64;
            new = keep;
            // Not the list the home signed: kept, never served.
            seal = None;
        }
        for m in v.members.difference(&new) {
            acts.push(PresenceAction::Changed {
                member: *m,
                home,
                joined: false,
            });
        }
        for m in new.difference(&v.members) {
            acts.push(PresenceAction::Changed {
                member: *m,
                home,
                joined: true,
            });
        }
        self.remote_members = self.remote_members - old_len + new.len();
        v.members = new;
        v.seal = seal;
        v.version = version;
        v.announced = v.announced.max(version);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_delta(
        &mut self,
        from: PeerId,
        home: PeerId,
        incarnation: u64,
        version: u64,
        changes: Vec<(PeerId, bool)>,
        digest_sent: Option<PresenceDigest>,
        signature: Vec<u8>,
        now: Duration,
        acts: &mut Vec<PresenceAction>,
    ) {
        if home == self.me {
            return;
        }
        let topic = self.topic;
        let iv = (incarnation, version);
        let known = self.homes.get(&home);
        if known.is_some_and(|v| iv <= v.delta_seen) {
            return;
        }
        // The list after the delta, if we can make it: the changes on top
        // of the version before, which we hold signed by the home.
        let after = known.and_then(|v| {
            let next = v.version.1.checked_add(1).map(|n| (v.version.0, n));
            let whole = v.seal.is_some() || v.version.1 == 0;
            (v.pull.is_none() && whole && next == Some(iv)).then(|| {
                let mut after = v.members.clone();
                for (m, joined) in &changes {
                    if *joined {
                        after.insert(*m);
                    } else {
                        after.remove(m);
                    }
                }
                after
            })
        });
        let digest = match (&after, digest_sent) {
            (Some(after), _) => members_digest(after),
            (None, Some(d)) => d,
            (None, None) => {
                // A small delta we cannot check: it changes nothing and
                // goes no further here (it reaches the others by every
                // link); we pull the list the home signed (a home new to
                // us gets an empty view that lives no longer than
                // HOME_STALE unless the home's word comes, as for an
                // unsigned heartbeat).
                if let Some(v) = self.view(home, now) {
                    Self::start_pull(topic, home, v, from, now, acts);
                }
                return;
            }
        };
        // Checked before anything is kept or sent on: the home's signature
        // covers the changes and the whole list they make.
        let seal = Seal {
            members: digest,
            changes: changes_digest(&changes),
            signature,
        };
        let signed = state_bytes(
            &topic,
            &home,
            incarnation,
            version,
            &seal.members,
            &seal.changes,
        );
        if !signed_by(&home, &signed, &seal.signature)
            || digest_sent.is_some_and(|d| d != seal.members)
        {
            self.forged += 1;
            return;
        }
        let Some(v) = self.view(home, now) else {
            return;
        };
        v.delta_seen = iv;
        v.announced = v.announced.max(iv);
        v.last_heard = now;
        v.last_signed = now;
        v.regrafted = false;
        v.last_from = Some(from);
        let all = changes.len() <= SMALL_DELTA;
        let frame = TopicFrame::PresenceDelta {
            topic,
            home,
            incarnation,
            version,
            changes,
            members_digest: digest_sent,
            signature: seal.signature.clone(),
        };
        match after {
            Some(after) => {
                self.replace(home, iv, after, seal, acts);
                self.serve_waiters(home, acts);
            }
            None => Self::start_pull(topic, home, v, from, now, acts),
        }
        acts.push(PresenceAction::FloodDelta {
            all,
            frame,
            origin: home,
            except: Some(from),
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_heartbeat(
        &mut self,
        from: PeerId,
        home: PeerId,
        incarnation: u64,
        version: u64,
        beat: u64,
        signature: Vec<u8>,
        now: Duration,
        acts: &mut Vec<PresenceAction>,
    ) {
        if home == self.me {
            acts.push(PresenceAction::Duplicate { origin: home, from });
            return;
        }
        let topic = self.topic;
        if signature.is_empty() {
            self.on_unsigned_beat(from, home, (incarnation, version), beat, now, acts);
            return;
        }
        if self
            .homes
            .get(&home)
            .is_some_and(|v| (incarnation, beat) <= v.signed_beat)
        {
            // Had (or older, or a replay): only the tree is concerned, and
            // a neighbour could prune the link with a PRUNE anyway.
            acts.push(PresenceAction::Duplicate { origin: home, from });
            return;
        }
        // A forged heartbeat could keep a dead home alive, or claim a
        // higher incarnation or beat that hides the home's own heartbeats
        // (and drops it at HOME_STALE), or a version that sets every home
        // pulling: all are refused here, before anything changes.
        if !signed_by(
            &home,
            &beat_bytes(&topic, &home, incarnation, version, beat),
            &signature,
        ) {
            self.forged += 1;
            return;
        }
        let Some(v) = self.view(home, now) else {
            return;
        };
        v.signed_beat = (incarnation, beat);
        // Set, not raised: unsigned beats numbered past this one (forged
        // ahead) no longer hide the home's next ones.
        v.beat = (incarnation, beat);
        v.last_heard = now;
        v.last_signed = now;
        v.regrafted = false;
        v.last_from = Some(from);
        acts.push(PresenceAction::First { origin: home, from });
        if (incarnation, version) > v.version {
            v.announced = v.announced.max((incarnation, version));
            Self::start_pull(topic, home, v, from, now, acts);
        }
        acts.push(PresenceAction::Flood {
            frame: TopicFrame::Heartbeat {
                topic,
                home,
                incarnation,
                version,
                beat,
                signature,
            },
            origin: home,
            except: Some(from),
        });
    }

    /// An unsigned heartbeat (see [`SIGNED_BEAT_EVERY`]): it only says the
    /// home lives, and only of the list we hold signed by the home at the
    /// version it names, within [`UNSIGNED_BEATS_AHEAD`] of its last signed
    /// beat; it claims no version (at most it makes us pull what the home
    /// signed) and no incarnation.
    fn on_unsigned_beat(
        &mut self,
        from: PeerId,
        home: PeerId,
        iv: (u64, u64),
        beat: u64,
        now: Duration,
        acts: &mut Vec<PresenceAction>,
    ) {
        let topic = self.topic;
        let Some(v) = self.homes.get_mut(&home) else {
            // A home we never heard signed: pull its list (checked
            // against its seal); the view lives no longer than HOME_STALE
            // unless the home's own word comes.
            if let Some(v) = self.view(home, now) {
                Self::start_pull(topic, home, v, from, now, acts);
            }
            return;
        };
        if (iv.0, beat) <= v.beat {
            acts.push(PresenceAction::Duplicate { origin: home, from });
            return;
        }
        if v.seal.is_none() || iv != v.announced {
            if iv > v.version {
                Self::start_pull(topic, home, v, from, now, acts);
            }
            return;
        }
        if v.signed_beat.0 == iv.0 && beat > v.signed_beat.1.saturating_add(UNSIGNED_BEATS_AHEAD) {
            return;
        }
        v.beat = (iv.0, beat);
        v.last_heard = now;
        v.regrafted = false;
        v.last_from = Some(from);
        acts.push(PresenceAction::First { origin: home, from });
        acts.push(PresenceAction::Flood {
            frame: TopicFrame::Heartbeat {
                topic,
                home,
                incarnation: iv.0,
                version: iv.1,
                beat,
                signature: Vec::new(),
            },
            origin: home,
            except: Some(from),
        });
    }

    pub(crate) fn on_snapshot_request(
        &mut self,
        from: PeerId,
        home: PeerId,
        page: u32,
        acts: &mut Vec<PresenceAction>,
    ) {
        if let Some(v) = self.homes.get_mut(&home)
            && page == 0
            && (v.pull.is_some() || v.version < v.announced)
        {
            // Behind ourselves: answer when caught up (the requester
            // retries after SNAPSHOT_RETRY if we never are), so a subtree
            // that lost a delta catches up a round trip per level, not a
            // retry period per level.
            if v.waiters.len() < MAX_LINKS_PER_TOPIC {
                v.waiters.insert(from);
            }
            return;
        }
        // Only a list its home sealed is served, with the seal; else
        // version (0, 0), which replaces nothing anywhere.
        let (version, members, seal): ((u64, u64), Vec<PeerId>, Option<&Seal>) = if home == self.me
        {
            (
                (self.incarnation, self.version),
                self.sealed.iter().copied().collect(),
                Some(&self.seal),
            )
        } else if let Some(v) = self.homes.get(&home)
            && let Some(seal) = &v.seal
        {
            (v.version, v.members.iter().copied().collect(), Some(seal))
        } else {
            ((0, 0), Vec::new(), None)
        };
        let (changes_digest, signature) =
            seal.map_or(([0; 32], vec![0; 64]), |s| (s.changes, s.signature.clone()));
        let start = (page as usize).saturating_mul(MAX_PRESENCE_PAGE);
        let chunk: Vec<PeerId> = members
            .iter()
            .skip(start)
            .take(MAX_PRESENCE_PAGE)
            .copied()
            .collect();
        acts.push(PresenceAction::Send {
            to: from,
            frame: TopicFrame::SnapshotPage {
                topic: self.topic,
                home,
                incarnation: version.0,
                version: version.1,
                page,
                last: start + MAX_PRESENCE_PAGE >= members.len(),
                members: chunk,
                changes_digest,
                signature,
            },
        });
    }

    /// Answers the neighbours waiting for `home`'s snapshot, if the view
    /// has caught up.
    fn serve_waiters(&mut self, home: PeerId, acts: &mut Vec<PresenceAction>) {
        let Some(v) = self.homes.get_mut(&home) else {
            return;
        };
        if v.pull.is_some() || v.version < v.announced {
            return;
        }
        for w in std::mem::take(&mut v.waiters) {
            self.on_snapshot_request(w, home, 0, acts);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_snapshot_page(
        &mut self,
        from: PeerId,
        home: PeerId,
        version: (u64, u64),
        page: u32,
        last: bool,
        members: Vec<PeerId>,
        changes_digest: PresenceDigest,
        signature: Vec<u8>,
        now: Duration,
        acts: &mut Vec<PresenceAction>,
    ) {
        let topic = self.topic;
        let Some(v) = self.homes.get_mut(&home) else {
            return;
        };
        let Some(p) = v.pull.as_mut() else {
            return;
        };
        if p.from != from || p.next_page != page {
            return;
        }
        if p.version.as_ref().is_some_and(|(pv, cd, sig)| {
            *pv != version || *cd != changes_digest || *sig != signature
        }) {
            // The view changed between pages: start over.
            p.version = None;
            p.next_page = 0;
            p.acc.clear();
            p.due = now + SNAPSHOT_RETRY;
            acts.push(PresenceAction::Send {
                to: from,
                frame: TopicFrame::SnapshotRequest {
                    topic,
                    home,
                    page: 0,
                },
            });
            return;
        }
        p.version = Some((version, changes_digest, signature));
        if p.acc.len() + members.len() > MAX_MEMBERS_PER_TOPIC {
            v.pull = None;
            self.dropped += 1;
            return;
        }
        p.acc.extend(members);
        if !last {
            p.next_page += 1;
            p.due = now + SNAPSHOT_RETRY;
            acts.push(PresenceAction::Send {
                to: from,
                frame: TopicFrame::SnapshotRequest {
                    topic,
                    home,
                    page: p.next_page,
                },
            });
            return;
        }
        let acc = std::mem::take(&mut p.acc);
        let sealed = p.version.take();
        v.pull = None;
        let behind = v.announced > version;
        let mut forged = false;
        if version > v.version
            && let Some((_, changes, signature)) = sealed
        {
            // Whoever served the pages, only the home can have sealed
            // them: the list is checked against its signature before it
            // replaces anything.
            let set: BTreeSet<PeerId> = acc.into_iter().collect();
            let seal = Seal {
                members: members_digest(&set),
                changes,
                signature,
            };
            let signed = state_bytes(
                &topic,
                &home,
                version.0,
                version.1,
                &seal.members,
                &seal.changes,
            );
            if signed_by(&home, &signed, &seal.signature) {
                self.replace(home, version, set, seal, acts);
            } else {
                self.forged += 1;
                forged = true;
            }
        }
        self.serve_waiters(home, acts);
        if behind || forged {
            // The neighbour was behind the version announced: ask again
            // after a retry period (its view will have caught up). After
            // a forged snapshot, the same: the retry goes to the
            // neighbour the home is heard through then.
            if let Some(v) = self.homes.get_mut(&home) {
                v.pull = Some(Pull {
                    from,
                    version: None,
                    next_page: 0,
                    acc: Vec::new(),
                    due: now + SNAPSHOT_RETRY,
                });
            }
        }
    }
}
