//! The two stream protocols of topics and their frames.
//!
//! - [`FED_PROTOCOL`]: one stream between two homes carries every topic
//!   they both serve. Each side says which topics it serves
//!   ([`FedFrame::Join`], [`FedFrame::Leave`]); the link carries a topic to
//!   the overlay once both said it. Overlay frames travel encoded as
//!   reach-proto's [`TopicFrame`](reach_proto::topics::TopicFrame)
//!   ([`FedFrame::Overlay`]), decoded with its limits checked.
//! - [`MEMBER_PROTOCOL`]: one stream per topic between a member and its
//!   home: subscribe, publish (several in flight, answered in order; see
//!   [`OUT_OF_ORDER`]), and the home's pushes (deliveries, presence).
//!
//! Every frame is length-prefixed (reach's frame header) and bounded by
//! [`MAX_STREAM_FRAME`], checked before anything is read into memory.

use bytes::{Buf, Bytes, BytesMut};
use reach_proto::PeerId;
use reach_proto::topics::{MAX_FRAME_LEN, TopicId, TopicMessage};
use reach_proto::wire::{FRAME_HEADER_LEN, WireError, frame};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Federation links between homes.
pub const FED_PROTOCOL: &str = reach_proto::wire::envelope::protocols::TOPICS_FED;
/// A member's stream to its home.
pub const MEMBER_PROTOCOL: &str = reach_proto::wire::envelope::protocols::TOPICS_MEMBER;

/// Largest frame on either protocol: an overlay frame at reach-proto's
/// [`MAX_FRAME_LEN`] plus the few bytes of our own framing, or a presence
/// snapshot page (see [`MAX_SNAPSHOT`]).
pub const MAX_STREAM_FRAME: usize = MAX_FRAME_LEN + 1024;

/// Members a home lists in [`MemberFrame::Subscribed`] at most: 1,000
/// entries of two 32-byte keys (about 64 KiB) fit in one frame; presence
/// beyond it reaches the member as later changes only.
pub const MAX_SNAPSHOT: usize = 1_000;

/// A frame between two homes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FedFrame {
    /// "I serve this topic; carry it on our link."
    Join(TopicId),
    /// "I no longer serve it."
    Leave(TopicId),
    /// An overlay frame ([`TopicFrame::encode`](reach_proto::topics::TopicFrame::encode)).
    Overlay(Vec<u8>),
}

/// A frame between a member and its home.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemberFrame {
    /// Member → home, first frame: serve me on this topic.
    Subscribe {
        /// The topic's name (the home checks it and derives the id).
        topic: String,
    },
    /// Home → member, the answer to `Subscribe`: served.
    Subscribed {
        /// The highest seq of the member's own messages the home has seen
        /// (0: none): the member continues above it, so a restarted member
        /// does not reuse a seq the topic already has.
        seq_seen: u64,
        /// Members known at the home (member, its home), at most
        /// [`MAX_SNAPSHOT`].
        members: Vec<(PeerId, PeerId)>,
    },
    /// Home → member: refused (subscribe or the stream as a whole).
    Refused {
        /// A stable kind, e.g. `not_a_home`, `too_many_topics`.
        kind: String,
    },
    /// Member → home: a message the member signed.
    Publish(TopicMessage),
    /// Home → member: the publish of `seq` was taken.
    Published {
        /// The message's seq.
        seq: u64,
        /// Homes of the topic the home knows (itself included).
        homes: u32,
        /// Members of the topic the home knows.
        members: u32,
    },
    /// Home → member: the publish of `seq` was refused.
    PublishRefused {
        /// The message's seq.
        seq: u64,
        /// A stable kind, e.g. `topic_rate_limited`.
        kind: String,
    },
    /// Home → member: a message of the topic.
    Deliver(TopicMessage),
    /// Home → member: a member appeared or vanished.
    Presence {
        /// The member.
        member: PeerId,
        /// Its home.
        home: PeerId,
        /// True on join.
        joined: bool,
    },
}

/// Bytes reserved up front for a frame: a 100-byte message's delivery
/// (about 200 bytes) in one allocation, no copy or regrowth.
const ENCODE_CAPACITY: usize = 256;

/// Encodes `value` as one length-prefixed frame: the body serialized
/// straight behind room for its header (one buffer, no copy of the body).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    let mut out =
        postcard::to_extend(value, out).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = out.len() - FRAME_HEADER_LEN;
    if len > MAX_STREAM_FRAME {
        return Err(WireError::TooLarge {
            len,
            max: MAX_STREAM_FRAME,
        });
    }
    out[..FRAME_HEADER_LEN].copy_from_slice(&frame::header(len)?);
    Ok(out)
}

/// Reads one frame (at most [`MAX_STREAM_FRAME`] bytes, checked before the
/// body is read) and decodes it. `Ok(None)` when the stream ended cleanly
/// between frames.
pub async fn read<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, WireError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(WireError::Malformed(e.to_string())),
    }
    let len = frame::parse_header(&head, MAX_STREAM_FRAME)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    postcard::from_bytes::<T>(&body)
        .map(Some)
        .map_err(|e| WireError::Malformed(e.to_string()))
}

/// The refusal a home answers a member's publish with when it is not the
/// next seq the home takes from that member: it was sent behind one the
/// home refused, whose seq stays free; the member signs it again with the
/// next free seq and sends it again. So a member may have several
/// publishes in flight and a refusal still leaves no gap in its seqs.
pub const OUT_OF_ORDER: &str = "topic_out_of_order";

/// Frames decoded per [`FrameReader::read_batch`] at most: what one pass
/// under the topics state's lock handles. 64 frames of 100-byte messages
/// are about 15 KB, a dozen QUIC packets: enough to spread the lock and
/// wake-up over many frames, small enough that one member's burst holds
/// the lock for tens of microseconds, not milliseconds.
pub const READ_BATCH: usize = 64;

/// Bytes asked of the stream per read: a whole burst of small frames in
/// one call (what quinn has buffered, up to this).
const READ_CHUNK: usize = 64 * 1024;

/// Encodes `value` as one length-prefixed frame, ready for the stream.
pub fn encode_bytes<T: Serialize>(value: &T) -> Result<Bytes, WireError> {
    encode(value).map(Bytes::from)
}

/// Reads frames off a stream a chunk at a time: one read takes whatever
/// has arrived, so a burst of small frames costs one read (one lock of the
/// QUIC connection), not two per frame. Each frame's length is still
/// checked against [`MAX_STREAM_FRAME`] before its body is waited for, and
/// at most one frame plus one chunk is ever buffered.
#[derive(Default)]
pub struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    /// Waits for at least one whole frame, then decodes into `out` every
    /// whole frame buffered, up to `max`. `Ok(false)` when the stream
    /// ended cleanly between frames (nothing decoded); an error for a
    /// frame too large or not decoding, or a stream cut mid-frame. Cancel
    /// safe: what was read stays buffered here.
    pub async fn read_batch<T: DeserializeOwned>(
        &mut self,
        recv: &mut quinn::RecvStream,
        out: &mut Vec<T>,
        max: usize,
    ) -> Result<bool, WireError> {
        self.read_batch_with(recv, out, max, |body| {
            postcard::from_bytes::<T>(body).map_err(|e| WireError::Malformed(e.to_string()))
        })
        .await
    }

    /// [`FrameReader::read_batch`] with each frame's body decoded by
    /// `decode`.
    pub async fn read_batch_with<T>(
        &mut self,
        recv: &mut quinn::RecvStream,
        out: &mut Vec<T>,
        max: usize,
        decode: impl Fn(&[u8]) -> Result<T, WireError>,
    ) -> Result<bool, WireError> {
        loop {
            self.decode(out, max, &decode)?;
            if !out.is_empty() {
                return Ok(true);
            }
            match recv.read_chunk(READ_CHUNK, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) if self.buf.is_empty() => return Ok(false),
                Ok(None) => {
                    return Err(WireError::Malformed("the stream ended mid-frame".into()));
                }
                Err(e) => return Err(WireError::Malformed(e.to_string())),
            }
        }
    }

    /// Decodes the whole frames buffered, up to `max` in `out`.
    fn decode<T>(
        &mut self,
        out: &mut Vec<T>,
        max: usize,
        decode: &impl Fn(&[u8]) -> Result<T, WireError>,
    ) -> Result<(), WireError> {
        while out.len() < max && self.buf.len() >= FRAME_HEADER_LEN {
            let len = frame::parse_header(&self.buf, MAX_STREAM_FRAME)?;
            if self.buf.len() < FRAME_HEADER_LEN + len {
                break;
            }
            self.buf.advance(FRAME_HEADER_LEN);
            let body = self.buf.split_to(len);
            out.push(decode(&body)?);
        }
        Ok(())
    }
}

/// A member's publish as its home reads it: [`MemberFrame::Publish`] with
/// the origin left as bytes. Decoding a [`PeerId`] checks that it is a
/// valid Ed25519 key (a curve point decompression, most of what decoding a
/// message cost the home); on a member stream the origin must be the
/// stream's peer, whose key the connection already authenticated, so the
/// home compares bytes instead ([`HomePublish::into_message`]).
#[derive(Debug)]
pub struct HomePublish {
    topic: TopicId,
    origin: [u8; 32],
    seq: u64,
    data: Vec<u8>,
    signature: Vec<u8>,
}

/// Postcard's index of [`MemberFrame::Publish`] (a one-byte varint; a
/// test checks it against the enum).
const PUBLISH_VARIANT: u8 = 3;

/// Postcard's index of [`MemberFrame::Deliver`] (checked by a test).
const DELIVER_VARIANT: u8 = 6;

/// Longest postcard varint of a `u64`: 10 bytes of 7 bits.
const MAX_VARINT: usize = 10;

/// Appends `v` as a postcard varint (LEB128).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Takes a postcard varint off the front of `b`.
fn take_varint(b: &mut &[u8]) -> Result<u64, WireError> {
    let mut v = 0u64;
    for i in 0..MAX_VARINT {
        let Some((&x, rest)) = b.split_first() else {
            return Err(WireError::Malformed("a truncated varint".into()));
        };
        *b = rest;
        v |= u64::from(x & 0x7f) << (7 * i);
        if x & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(WireError::Malformed("a varint over 64 bits".into()))
}

/// Takes `n` bytes off the front of `b`.
fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], WireError> {
    if b.len() < n {
        return Err(WireError::Truncated {
            needed: n,
            had: b.len(),
        });
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

/// A length-prefixed byte string (postcard's `Vec<u8>`) off `b`.
fn take_bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], WireError> {
    let n = take_varint(b)?;
    take(b, usize::try_from(n).unwrap_or(usize::MAX))
}

/// `msg` as a [`MemberFrame::Deliver`] frame, the bytes [`encode`] makes,
/// written by hand: postcard writes a `Vec<u8>` a byte at a time, and a
/// home encodes one of these per message it forwards.
pub fn encode_deliver(msg: &TopicMessage) -> Result<Bytes, WireError> {
    let len = 1 + 64 + 3 * MAX_VARINT + msg.data.len() + msg.signature.len();
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + len);
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    out.push(DELIVER_VARIANT);
    out.extend_from_slice(&msg.topic.0);
    out.extend_from_slice(msg.origin.as_bytes());
    put_varint(&mut out, msg.seq);
    put_varint(&mut out, msg.data.len() as u64);
    out.extend_from_slice(&msg.data);
    put_varint(&mut out, msg.signature.len() as u64);
    out.extend_from_slice(&msg.signature);
    let body = out.len() - FRAME_HEADER_LEN;
    if body > MAX_STREAM_FRAME {
        return Err(WireError::TooLarge {
            len: body,
            max: MAX_STREAM_FRAME,
        });
    }
    out[..FRAME_HEADER_LEN].copy_from_slice(&frame::header(body)?);
    Ok(Bytes::from(out))
}

impl HomePublish {
    /// Decodes a member-stream frame body at the home: `Ok(None)` for a
    /// frame that is not a publish (not for a home to get mid-stream).
    /// Read by hand (what postcard reads, trailing bytes ignored as it
    /// does): postcard reads a `Vec<u8>` a byte at a time.
    pub fn decode(body: &[u8]) -> Result<Option<HomePublish>, WireError> {
        let Some((&PUBLISH_VARIANT, mut b)) = body.split_first() else {
            return Ok(None);
        };
        let b = &mut b;
        let mut topic = [0u8; 32];
        topic.copy_from_slice(take(b, 32)?);
        let mut origin = [0u8; 32];
        origin.copy_from_slice(take(b, 32)?);
        let seq = take_varint(b)?;
        let data = take_bytes(b)?.to_vec();
        let signature = take_bytes(b)?.to_vec();
        Ok(Some(HomePublish {
            topic: TopicId(topic),
            origin,
            seq,
            data,
            signature,
        }))
    }

    /// Its seq.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The message, if its origin is `peer` (the stream's peer).
    pub fn into_message(self, peer: PeerId) -> Option<TopicMessage> {
        (&self.origin == peer.as_bytes()).then_some(TopicMessage {
            topic: self.topic,
            origin: peer,
            seq: self.seq,
            data: self.data,
            signature: self.signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_are_refused() {
        let t = TopicId::from_name("lobby").unwrap();
        let bytes = encode(&FedFrame::Join(t)).unwrap();
        let len = frame::parse_header(&bytes, MAX_STREAM_FRAME).unwrap();
        let back: FedFrame = postcard::from_bytes(&bytes[FRAME_HEADER_LEN..]).unwrap();
        assert_eq!(len, bytes.len() - FRAME_HEADER_LEN);
        assert!(matches!(back, FedFrame::Join(x) if x == t));
        let big = FedFrame::Overlay(vec![0; MAX_STREAM_FRAME + 1]);
        assert!(matches!(encode(&big), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn a_home_reads_a_publish_as_sent_and_only_from_its_origin() {
        let kp = reach_proto::Keypair::from_secret_bytes([7; 32]);
        let t = TopicId::from_name("lobby").unwrap();
        let msg = TopicMessage::sign(&kp, t, 9, b"hello".to_vec()).unwrap();
        let bytes = encode(&MemberFrame::Publish(msg.clone())).unwrap();
        let body = &bytes[FRAME_HEADER_LEN..];
        let p = HomePublish::decode(body).unwrap().expect("a publish");
        assert_eq!(p.seq(), 9);
        let other = reach_proto::Keypair::from_secret_bytes([8; 32]).peer_id();
        let p2 = HomePublish::decode(body).unwrap().unwrap();
        assert_eq!(p2.into_message(other), None, "not from the stream's peer");
        let back = p.into_message(kp.peer_id()).expect("from its origin");
        assert_eq!(back, msg);
        assert!(back.verify().is_ok());
        // A delivery written by hand is what postcard writes, for a seq
        // and a data length over one varint byte too.
        for (seq, len) in [(9, 5), (300, 100), (u64::MAX, 20_000)] {
            let m = TopicMessage::sign(&kp, t, seq, vec![4; len]).unwrap();
            let by_hand = encode_deliver(&m).unwrap();
            assert_eq!(
                &by_hand[..],
                &encode(&MemberFrame::Deliver(m.clone())).unwrap()[..]
            );
            let p = encode(&MemberFrame::Publish(m.clone())).unwrap();
            let back = HomePublish::decode(&p[FRAME_HEADER_LEN..])
                .unwrap()
                .unwrap();
            assert_eq!(back.into_message(kp.peer_id()), Some(m));
        }
        // Cut anywhere, a publish does not decode.
        for cut in 1..bytes.len() - FRAME_HEADER_LEN {
            assert!(HomePublish::decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        // Any other frame is not a publish.
        let sub = encode(&MemberFrame::Subscribe { topic: "x".into() }).unwrap();
        assert!(
            HomePublish::decode(&sub[FRAME_HEADER_LEN..])
                .unwrap()
                .is_none()
        );
        let del = encode(&MemberFrame::Deliver(msg)).unwrap();
        assert!(
            HomePublish::decode(&del[FRAME_HEADER_LEN..])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_reader_decodes_whole_frames_in_batches_and_keeps_a_partial_one() {
        let t = TopicId::from_name("lobby").unwrap();
        let mut bytes = Vec::new();
        for _ in 0..5 {
            bytes.extend(encode(&FedFrame::Join(t)).unwrap());
        }
        let whole = bytes.len();
        bytes.extend(encode(&FedFrame::Leave(t)).unwrap());
        let mut r = FrameReader::default();
        // Five whole frames and half of the sixth.
        r.buf.extend_from_slice(&bytes[..whole + 3]);
        let mut out: Vec<FedFrame> = Vec::new();
        let de = |b: &[u8]| {
            postcard::from_bytes::<FedFrame>(b).map_err(|e| WireError::Malformed(e.to_string()))
        };
        r.decode(&mut out, 3, &de).unwrap();
        assert_eq!(out.len(), 3, "at most the batch size");
        r.decode(&mut out, 10, &de).unwrap();
        assert_eq!(out.len(), 5, "the partial frame waits");
        r.buf.extend_from_slice(&bytes[whole + 3..]);
        r.decode(&mut out, 10, &de).unwrap();
        assert!(matches!(out.last(), Some(FedFrame::Leave(x)) if *x == t));
        assert!(r.buf.is_empty());
        // A header announcing more than the limit is refused before its
        // body arrives.
        let mut r = FrameReader::default();
        r.buf
            .extend_from_slice(&((MAX_STREAM_FRAME + 1) as u32).to_be_bytes());
        assert!(matches!(
            r.decode(&mut out, 10, &de),
            Err(WireError::TooLarge { .. })
        ));
    }
}
