//! The signed topic message and the frames homes exchange.
//!
//! A message is `{topic, origin, seq, data}` signed by its publisher (the
//! origin) over a domain-separated encoding, so no home can forge or alter a
//! message in another's name and every home and subscriber can check it.
//! `seq` counts from 1 per origin per topic; (origin, seq) is the message's
//! id within its topic.
//!
//! Presence frames are signed too, by the home whose members they state
//! (see [`super::presence`] for what is signed and why).

use serde::{Deserialize, Serialize};

use super::{MAX_DATA_LEN, MAX_FRAME_LEN, MAX_IDS_PER_FRAME, MAX_PRESENCE_PAGE, TopicId};
use crate::{Keypair, PeerId};

/// Domain separator of the signed bytes.
const SIGNING_DOMAIN: &[u8] = b"reach-topic-message-v1";

/// A message's id within its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId {
    /// The publisher.
    pub origin: PeerId,
    /// Its sequence number (from 1).
    pub seq: u64,
}

/// The 8 leading bytes of an origin: what "I have", GRAFT and "not cached"
/// frames name an origin by. An "I have" is sent on every lazy link for
/// every message, so its size is most of the overlay's control cost; a full
/// 32-byte origin would make it three times bigger. Two origins sharing a
/// tag (2^-64 by chance; grinding a key for one costs ~2^64 work) only
/// confuse pulls: a pulled message is still verified and matched on its
/// full id, and a gap nobody fills is skipped after [`super::GAP_GIVE_UP`].
pub type OriginTag = [u8; 8];

/// The tag of `origin`.
pub fn tag_of(origin: &PeerId) -> OriginTag {
    let mut t = [0u8; 8];
    t.copy_from_slice(&origin.as_bytes()[..8]);
    t
}

/// A message id as control frames carry it: origin tag and seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShortId {
    /// [`tag_of`] the origin.
    pub tag: OriginTag,
    /// The message's seq.
    pub seq: u64,
}

impl From<MessageId> for ShortId {
    fn from(id: MessageId) -> Self {
        ShortId {
            tag: tag_of(&id.origin),
            seq: id.seq,
        }
    }
}

/// A signed message of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMessage {
    /// The topic it was published to.
    pub topic: TopicId,
    /// The publisher, whose key signed it.
    pub origin: PeerId,
    /// Per origin per topic, from 1.
    pub seq: u64,
    /// The application's bytes, at most [`MAX_DATA_LEN`].
    pub data: Vec<u8>,
    /// Ed25519 signature (64 bytes) over the domain-separated encoding of
    /// the other fields.
    pub signature: Vec<u8>,
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The data is over [`MAX_DATA_LEN`].
    #[error("message of {0} bytes (max {MAX_DATA_LEN})")]
    TooBig(usize),
    /// Seq 0: sequences start at 1.
    #[error("sequence number 0")]
    ZeroSeq,
    /// The signature is not 64 bytes or does not verify under the origin.
    #[error("bad signature")]
    BadSignature,
}

impl MessageError {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            MessageError::TooBig(_) => "message_too_big",
            MessageError::ZeroSeq => "message_zero_seq",
            MessageError::BadSignature => "message_bad_signature",
        }
    }
}

fn signing_bytes(topic: &TopicId, origin: &PeerId, seq: u64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(SIGNING_DOMAIN.len() + 32 + 32 + 8 + 4 + data.len());
    b.extend_from_slice(SIGNING_DOMAIN);
    b.extend_from_slice(&topic.0);
    b.extend_from_slice(origin.as_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

impl TopicMessage {
    /// Builds and signs message `seq` of `keypair`'s stream on `topic`.
    pub fn sign(
        keypair: &Keypair,
        topic: TopicId,
        seq: u64,
        data: Vec<u8>,
    ) -> Result<TopicMessage, MessageError> {
        if data.len() > MAX_DATA_LEN {
            return Err(MessageError::TooBig(data.len()));
        }
        if seq == 0 {
            return Err(MessageError::ZeroSeq);
        }
        let origin = keypair.peer_id();
        let signature = keypair
            .sign(&signing_bytes(&topic, &origin, seq, &data))
            .to_vec();
        Ok(TopicMessage {
            topic,
            origin,
            seq,
            data,
            signature,
        })
    }

    /// Checks size, seq and the signature's length, not the signature:
    /// what a home checks of a message its publisher handed it on an
    /// authenticated connection (see
    /// [`Overlay::publish_from_authenticated_member`](super::Overlay::publish_from_authenticated_member)).
    pub fn check_form(&self) -> Result<(), MessageError> {
        if self.data.len() > MAX_DATA_LEN {
            return Err(MessageError::TooBig(self.data.len()));
        }
        if self.seq == 0 {
            return Err(MessageError::ZeroSeq);
        }
        if self.signature.len() != 64 {
            return Err(MessageError::BadSignature);
        }
        Ok(())
    }

    /// Checks size, seq and signature.
    pub fn verify(&self) -> Result<(), MessageError> {
        self.check_form()?;
        let sig: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| MessageError::BadSignature)?;
        let bytes = signing_bytes(&self.topic, &self.origin, self.seq, &self.data);
        if self.origin.verify(&bytes, &sig) {
            Ok(())
        } else {
            Err(MessageError::BadSignature)
        }
    }

    /// Its id within its topic.
    pub fn id(&self) -> MessageId {
        MessageId {
            origin: self.origin,
            seq: self.seq,
        }
    }

    /// Its id as control frames carry it.
    pub fn short_id(&self) -> ShortId {
        self.id().into()
    }
}

/// What homes send each other over a federation link (postcard-encoded,
/// one frame per QUIC stream chunk or datagram as the runtime chooses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopicFrame {
    /// A whole message: eager push on a tree link, or the answer to a
    /// GRAFT.
    Message(TopicMessage),
    /// "I have these" (batched), sent on lazy links.
    IHave {
        /// The topic.
        topic: TopicId,
        /// At most [`MAX_IDS_PER_FRAME`].
        ids: Vec<ShortId>,
    },
    /// "Send me these, and make our link a tree link for their origins"
    /// (pull and tree repair). Empty `ids`: "for every origin" (repair
    /// after a link died).
    Graft {
        /// The topic.
        topic: TopicId,
        /// At most [`MAX_IDS_PER_FRAME`].
        ids: Vec<ShortId>,
    },
    /// "I got a duplicate from you: our link is lazy for `origin` now."
    Prune {
        /// The topic.
        topic: TopicId,
        /// Whose tree the link leaves.
        origin: PeerId,
    },
    /// "A first copy came to me over our link while I had it lazy for
    /// `origin`: it is a tree link for `origin` again" (two prunes of one
    /// home crossed in flight; without this both links could end up lazy).
    Eager {
        /// The topic.
        topic: TopicId,
        /// Whose tree.
        origin: PeerId,
    },
    /// The answer to a GRAFT for ids no longer (or never) cached here.
    NotCached {
        /// The topic.
        topic: TopicId,
        /// At most [`MAX_IDS_PER_FRAME`].
        ids: Vec<ShortId>,
    },
    /// A home's local members changed: version `version` of `home`'s member
    /// list is the previous one with `changes` applied.
    PresenceDelta {
        /// The topic.
        topic: TopicId,
        /// Whose members.
        home: PeerId,
        /// The home's incarnation (a restart starts a higher one).
        incarnation: u64,
        /// The home's presence version after this delta (from 1).
        version: u64,
        /// (member, joined?) at most [`MAX_PRESENCE_PAGE`].
        changes: Vec<(PeerId, bool)>,
        /// The [`members_digest`](super::presence::members_digest) of
        /// `home`'s list after `changes`, on a big delta only (over
        /// [`SMALL_DELTA`](super::presence::SMALL_DELTA) changes: it goes
        /// over the home's tree only, so a home that cannot apply it must
        /// still check and pass it on); a small one goes over every link
        /// and is checked by the homes that can apply it.
        members_digest: Option<PresenceDigest>,
        /// `home`'s Ed25519 signature (64 bytes) over topic, home,
        /// incarnation, version, the digest of `changes` and the
        /// [`members_digest`](super::presence::members_digest) of its list
        /// after them (which the receiver recomputes: see
        /// [`super::presence`]).
        signature: Vec<u8>,
    },
    /// A home is alive and at presence version `version`; `beat` counts its
    /// heartbeats (dedup of the flood).
    Heartbeat {
        /// The topic.
        topic: TopicId,
        /// The home.
        home: PeerId,
        /// Its incarnation.
        incarnation: u64,
        /// Its presence version.
        version: u64,
        /// Its heartbeat counter.
        beat: u64,
        /// `home`'s Ed25519 signature (64 bytes) over topic, home,
        /// incarnation, version and beat, or empty: one heartbeat in
        /// [`SIGNED_BEAT_EVERY`](super::presence::SIGNED_BEAT_EVERY) is
        /// signed; an unsigned one only keeps a home alive, for a bounded
        /// time, or makes a home pull the list its home signed.
        signature: Vec<u8>,
    },
    /// "Send me page `page` of your view of `home`'s members."
    SnapshotRequest {
        /// The topic.
        topic: TopicId,
        /// Whose members.
        home: PeerId,
        /// From 0.
        page: u32,
    },
    /// One page of a view of `home`'s members at `version`.
    SnapshotPage {
        /// The topic.
        topic: TopicId,
        /// Whose members.
        home: PeerId,
        /// The incarnation the pages describe.
        incarnation: u64,
        /// The version the pages describe.
        version: u64,
        /// This page's number.
        page: u32,
        /// True on the last page.
        last: bool,
        /// At most [`MAX_PRESENCE_PAGE`].
        members: Vec<PeerId>,
        /// The digest of the changes of the delta that made `version`
        /// (with the members' digest, recomputed from the pages, what
        /// `signature` covers).
        changes_digest: PresenceDigest,
        /// `home`'s signature of `version`, as its delta carried it: a
        /// neighbour serves the pages, only `home` can have signed them.
        signature: Vec<u8>,
    },
}

/// A 32-byte BLAKE3 digest of a member list or of a delta's changes, as
/// presence frames carry it.
pub type PresenceDigest = [u8; 32];

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Over [`MAX_FRAME_LEN`] bytes (checked before decoding).
    #[error("frame of {0} bytes (max {MAX_FRAME_LEN})")]
    TooLarge(usize),
    /// Not a frame (postcard failed, or bytes trailed it).
    #[error("malformed frame")]
    Malformed,
    /// Decoded, but a list or the data is over its limit.
    #[error("frame over a limit")]
    OverLimit,
}

impl FrameError {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::TooLarge(_) => "topic_frame_too_large",
            FrameError::Malformed => "topic_frame_malformed",
            FrameError::OverLimit => "topic_frame_over_limit",
        }
    }
}

impl TopicFrame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising an in-memory enum of plain fields into a growable
        // Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a frame from untrusted bytes: the size is checked before
    /// anything is decoded, every list against its limit after. Never
    /// panics. Signatures are not checked here (the overlay does, once per
    /// message it keeps).
    pub fn decode(bytes: &[u8]) -> Result<TopicFrame, FrameError> {
        if bytes.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(bytes.len()));
        }
        let (frame, rest) =
            postcard::take_from_bytes::<TopicFrame>(bytes).map_err(|_| FrameError::Malformed)?;
        if !rest.is_empty() {
            return Err(FrameError::Malformed);
        }
        if frame.within_limits() {
            Ok(frame)
        } else {
            Err(FrameError::OverLimit)
        }
    }

    /// Whether every list and the data are within their limits.
    pub fn within_limits(&self) -> bool {
        match self {
            TopicFrame::Message(m) => m.data.len() <= MAX_DATA_LEN && m.signature.len() == 64,
            TopicFrame::IHave { ids, .. }
            | TopicFrame::Graft { ids, .. }
            | TopicFrame::NotCached { ids, .. } => ids.len() <= MAX_IDS_PER_FRAME,
            TopicFrame::PresenceDelta {
                changes, signature, ..
            } => changes.len() <= MAX_PRESENCE_PAGE && signature.len() == 64,
            TopicFrame::SnapshotPage {
                members, signature, ..
            } => members.len() <= MAX_PRESENCE_PAGE && signature.len() == 64,
            TopicFrame::Heartbeat { signature, .. } => {
                signature.len() == 64 || signature.is_empty()
            }
            TopicFrame::Prune { .. }
            | TopicFrame::Eager { .. }
            | TopicFrame::SnapshotRequest { .. } => true,
        }
    }

    /// The topic the frame is about.
    pub fn topic(&self) -> TopicId {
        match self {
            TopicFrame::Message(m) => m.topic,
            TopicFrame::IHave { topic, .. }
            | TopicFrame::Graft { topic, .. }
            | TopicFrame::Prune { topic, .. }
            | TopicFrame::Eager { topic, .. }
            | TopicFrame::NotCached { topic, .. }
            | TopicFrame::PresenceDelta { topic, .. }
            | TopicFrame::Heartbeat { topic, .. }
            | TopicFrame::SnapshotRequest { topic, .. }
            | TopicFrame::SnapshotPage { topic, .. } => *topic,
        }
    }

    /// True for a frame that carries a message's payload; every other frame
    /// is control (what the simulator's control-bytes ratio counts).
    pub fn is_payload(&self) -> bool {
        matches!(self, TopicFrame::Message(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn topic() -> TopicId {
        TopicId::from_name("t").unwrap()
    }

    #[test]
    fn signed_message_verifies_and_any_change_breaks_it() {
        let kp = Keypair::from_secret_bytes([1; 32]);
        let m = TopicMessage::sign(&kp, topic(), 1, b"hello".to_vec()).unwrap();
        assert_eq!(m.verify(), Ok(()));
        let mut bad = m.clone();
        bad.data[0] ^= 1;
        assert_eq!(bad.verify(), Err(MessageError::BadSignature));
        let mut bad = m.clone();
        bad.seq = 2;
        assert_eq!(bad.verify().unwrap_err().kind(), "message_bad_signature");
        let mut bad = m.clone();
        bad.topic = TopicId::from_name("u").unwrap();
        assert!(bad.verify().is_err());
        // Another key cannot sign in the origin's name.
        let mut forged = TopicMessage::sign(
            &Keypair::from_secret_bytes([2; 32]),
            topic(),
            1,
            b"hello".to_vec(),
        )
        .unwrap();
        forged.origin = kp.peer_id();
        assert_eq!(forged.verify(), Err(MessageError::BadSignature));
        let mut short = m.clone();
        short.signature.pop();
        assert_eq!(short.verify(), Err(MessageError::BadSignature));
    }

    #[test]
    fn size_and_seq_are_checked() {
        let kp = Keypair::from_secret_bytes([1; 32]);
        assert_eq!(
            TopicMessage::sign(&kp, topic(), 1, vec![0; MAX_DATA_LEN + 1]),
            Err(MessageError::TooBig(MAX_DATA_LEN + 1))
        );
        assert!(TopicMessage::sign(&kp, topic(), 1, vec![0; MAX_DATA_LEN]).is_ok());
        assert_eq!(
            TopicMessage::sign(&kp, topic(), 0, vec![]),
            Err(MessageError::ZeroSeq)
        );
    }

    #[test]
    fn frames_round_trip_and_bad_input_is_typed() {
        let kp = Keypair::from_secret_bytes([1; 32]);
        let m = TopicMessage::sign(&kp, topic(), 7, vec![9; 100]).unwrap();
        let frames = [
            TopicFrame::Message(m.clone()),
            TopicFrame::IHave {
                topic: topic(),
                ids: vec![m.short_id(); 3],
            },
            TopicFrame::Prune {
                topic: topic(),
                origin: kp.peer_id(),
            },
            TopicFrame::SnapshotPage {
                topic: topic(),
                home: kp.peer_id(),
                incarnation: 1,
                version: 3,
                page: 0,
                last: true,
                members: vec![kp.peer_id()],
                changes_digest: [7; 32],
                signature: vec![1; 64],
            },
        ];
        for f in frames {
            assert_eq!(TopicFrame::decode(&f.encode()), Ok(f));
        }
        let mut b = TopicFrame::Prune {
            topic: topic(),
            origin: kp.peer_id(),
        }
        .encode();
        b.push(0);
        assert_eq!(TopicFrame::decode(&b), Err(FrameError::Malformed));
        assert_eq!(
            TopicFrame::decode(&vec![0; MAX_FRAME_LEN + 1])
                .unwrap_err()
                .kind(),
            "topic_frame_too_large"
        );
        let over = TopicFrame::IHave {
            topic: topic(),
            ids: vec![m.short_id(); MAX_IDS_PER_FRAME + 1],
        };
        assert_eq!(
            TopicFrame::decode(&over.encode()),
            Err(FrameError::OverLimit)
        );
        // Presence signatures are 64 bytes (a heartbeat's may be absent).
        let beat = |signature: Vec<u8>| TopicFrame::Heartbeat {
            topic: topic(),
            home: kp.peer_id(),
            incarnation: 1,
            version: 2,
            beat: 3,
            signature,
        };
        for ok in [vec![], vec![1; 64]] {
            assert_eq!(TopicFrame::decode(&beat(ok.clone()).encode()), Ok(beat(ok)));
        }
        assert_eq!(
            TopicFrame::decode(&beat(vec![1; 63]).encode()),
            Err(FrameError::OverLimit)
        );
        let delta = TopicFrame::PresenceDelta {
            topic: topic(),
            home: kp.peer_id(),
            incarnation: 1,
            version: 2,
            changes: vec![(kp.peer_id(), true)],
            members_digest: None,
            signature: vec![],
        };
        assert_eq!(
            TopicFrame::decode(&delta.encode()),
            Err(FrameError::OverLimit)
        );
        // An "I have" id is 8 + a varint seq: the control cost per message.
        let one = TopicFrame::IHave {
            topic: topic(),
            ids: vec![m.short_id()],
        }
        .encode()
        .len();
        let two = TopicFrame::IHave {
            topic: topic(),
            ids: vec![m.short_id(); 2],
        }
        .encode()
        .len();
        assert_eq!(two - one, 9);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = TopicFrame::decode(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic_the_decoder(idx in 0usize..400, byte in any::<u8>()) {
            let kp = Keypair::from_secret_bytes([3; 32]);
            let m = TopicMessage::sign(&kp, topic(), 1, vec![5; 200]).unwrap();
            let mut b = TopicFrame::Message(m).encode();
            let i = idx % b.len();
            b[i] = byte;
            if let Ok(TopicFrame::Message(m)) = TopicFrame::decode(&b) {
                // Decoding checks shape, verification the signature.
                let _ = m.verify();
            }
        }
    }
}
