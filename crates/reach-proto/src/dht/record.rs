//! Signed DHT records.
//!
//! One envelope for every kind: {kind, key, publisher, seq, created, ttl,
//! payload, signature}. The publisher signs a domain-separated encoding of
//! all other fields, so no field can be changed or moved to another key.
//!
//! Kinds:
//! - **Endpoint**: the publisher's whole typed address set, at
//!   `Key::for_peer(publisher)`. A newer seq replaces the whole set.
//! - **Topic**: "publisher is a member of topic T", at `Key::for_topic(T)`;
//!   the payload names T so the key binding can be checked. Many publishers
//!   per key.
//! - **Mailbox**: an opaque sealed payload for a recipient, at
//!   `Key::for_mailbox(recipient, epoch)` (see [`crate::mailbox`]), signed
//!   by a throwaway key. Many per key, one per (publisher, seq).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Key;
use crate::{Keypair, PeerId};

/// Domain separator of the signed bytes.
const SIGNING_DOMAIN: &[u8] = b"reach-dht-record-v1";
/// Largest payload of an endpoint or topic record: 16 addresses fit in well
/// under 1 KiB; the slack is for future address kinds.
pub const MAX_SMALL_PAYLOAD: usize = 2048;
/// Largest mailbox payload: a sealed message; bigger data goes peer to peer.
pub const MAX_MAILBOX_PAYLOAD: usize = 16 * 1024;
/// Addresses in one endpoint record at most.
pub const MAX_ENDPOINT_ADDRS: usize = 16;
/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Shortest lifetime accepted: anything shorter expires in transit.
pub const MIN_TTL: Duration = Duration::from_secs(10);
/// Longest lifetime of endpoint and topic records: they are republished
/// hourly, so a day is generous and bounds how long a stale one can live.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime of a mailbox record: a week offline is a long holiday.
pub const MAX_MAILBOX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How far in the future a record's creation time may lie (clock skew).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RecordKind {
    /// A publisher's addresses, at `Key::for_peer(publisher)`.
    Endpoint,
    /// Topic membership, at `Key::for_topic(topic)`.
    Topic,
    /// A sealed message for an offline recipient, at
    /// `Key::for_mailbox(recipient, epoch)`.
    Mailbox,
}

/// How an address in an endpoint record was learned, which tells a dialer
/// how much to trust it and in which order to try it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddrKind {
    /// Verified reachable from outside.
    Direct,
    /// Believed but not verified (e.g. a bound address, a mapped port).
    Unverified,
    /// A relay that forwards to the publisher.
    Relay,
    /// On the publisher's local network.
    Lan,
}

/// One address of an endpoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TypedAddr {
    /// How the address was learned (trust and dial order).
    pub kind: AddrKind,
    /// The address to dial.
    pub addr: SocketAddr,
    /// For `Relay`: the relay's identity.
    pub via: Option<PeerId>,
}

/// Payload of an endpoint record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPayload {
    /// The publisher's addresses, at most [`MAX_ENDPOINT_ADDRS`].
    pub addrs: Vec<TypedAddr>,
}

/// Payload of a topic record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPayload {
    /// The topic's name: the key is derived from it, so a verifier can
    /// check the binding.
    pub topic: String,
}

/// A signed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    /// What the record says, which fixes how `key` and `payload` are checked.
    pub kind: RecordKind,
    /// Where the record is stored in the DHT.
    pub key: Key,
    /// Who signed it.
    pub publisher: PeerId,
    /// Sequence number: a higher one replaces a lower one of the same
    /// publisher at the same key.
    pub seq: u64,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Lifetime in seconds from `created_ms`.
    pub ttl_s: u32,
    /// Kind-specific bytes ([`EndpointPayload`], [`TopicPayload`] or an
    /// opaque mailbox payload).
    pub payload: Vec<u8>,
    /// Ed25519 signature (64 bytes) over [`SignedRecord::signing_bytes`].
    pub signature: Vec<u8>,
}

/// Why a record was refused. Every refusal is counted by its `kind()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("bad signature")]
    /// The signature does not verify under the publisher's key.
    BadSignature,
    #[error("key is not bound to the publisher")]
    /// The key is not the one the kind derives (from the publisher or the
    /// topic): a record cannot be moved to another key.
    KeyMismatch,
    #[error("record expired")]
    /// Its lifetime is over.
    Expired,
    #[error("ttl outside the accepted range")]
    /// Its TTL is below [`MIN_TTL`] or above its kind's maximum.
    AbsurdTtl,
    #[error("created too far in the future")]
    /// Created more than [`MAX_CLOCK_SKEW`] in the future.
    FromTheFuture,
    #[error("sequence number not newer than the stored one")]
    /// A record with the same or a higher seq is already stored.
    Stale,
    #[error("payload too large")]
    /// The payload exceeds its kind's size limit.
    Oversize,
    #[error("store quota exceeded")]
    /// The store (records or bytes), the key or the publisher is at its
    /// quota.
    QuotaExceeded,
    #[error("the sender's network holds its share of the store")]
    /// The sender's network ([`Source`](super::store::Source)) is at its
    /// share of the store.
    SourceQuotaExceeded,
    #[error("this node is not among the closest to the key")]
    /// This node is not among the k closest to the key: the record belongs
    /// elsewhere.
    NotClosest,
    #[error("malformed payload")]
    /// The payload does not decode as its kind's payload.
    Malformed,
    #[error("the record's slot was deleted by its publisher")]
    /// Its (key, publisher, seq) slot was deleted by a signed
    /// [`DeletionNotice`] and the tombstone has not expired: a lagging
    /// re-put cannot resurrect it.
    Deleted,
    #[error("only mailbox records can be deleted")]
    /// A deletion notice for a kind other than [`RecordKind::Mailbox`]
    /// (endpoint and topic records are replaced by a newer seq instead).
    NotDeletable,
}

impl RecordError {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordError::BadSignature => "bad_signature",
            RecordError::KeyMismatch => "key_mismatch",
            RecordError::Expired => "expired",
            RecordError::AbsurdTtl => "absurd_ttl",
            RecordError::FromTheFuture => "from_the_future",
            RecordError::Stale => "stale_seq",
            RecordError::Oversize => "oversize",
            RecordError::QuotaExceeded => "quota_exceeded",
            RecordError::SourceQuotaExceeded => "source_quota_exceeded",
            RecordError::NotClosest => "not_closest",
            RecordError::Malformed => "malformed",
            RecordError::Deleted => "deleted",
            RecordError::NotDeletable => "not_deletable",
        }
    }
}

impl SignedRecord {
    /// Builds and signs a record.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        keypair: &Keypair,
        kind: RecordKind,
        key: Key,
        seq: u64,
        created_ms: u64,
        ttl: Duration,
        payload: Vec<u8>,
    ) -> Self {
        let mut r = SignedRecord {
            kind,
            key,
            publisher: keypair.peer_id(),
            seq,
            created_ms,
            ttl_s: ttl.as_secs().min(u64::from(u32::MAX)) as u32,
            payload,
            signature: Vec::new(),
        };
        r.signature = keypair.sign(&r.signing_bytes()).to_vec();
        r
    }

    /// An endpoint record for `keypair`'s own addresses.
    pub fn endpoint(
        keypair: &Keypair,
        addrs: Vec<TypedAddr>,
        seq: u64,
        created_ms: u64,
        ttl: Duration,
    ) -> Self {
        let payload = postcard::to_allocvec(&EndpointPayload { addrs }).unwrap_or_default();
        Self::sign(
            keypair,
            RecordKind::Endpoint,
            Key::for_peer(&keypair.peer_id()),
            seq,
            created_ms,
            ttl,
            payload,
        )
    }

    /// A topic-membership record.
    pub fn topic(keypair: &Keypair, topic: &str, seq: u64, created_ms: u64, ttl: Duration) -> Self {
        let payload = postcard::to_allocvec(&TopicPayload {
            topic: topic.to_string(),
        })
        .unwrap_or_default();
        Self::sign(
            keypair,
            RecordKind::Topic,
            Key::for_topic(topic),
            seq,
            created_ms,
            ttl,
            payload,
        )
    }

    /// The exact bytes the signature covers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(&(
            SIGNING_DOMAIN,
            self.kind,
            self.key,
            self.publisher,
            self.seq,
            self.created_ms,
            self.ttl_s,
            &self.payload,
        ))
        .unwrap_or_default()
    }

    /// When the record expires, Unix milliseconds.
    pub fn expires_ms(&self) -> u64 {
        self.created_ms
            .saturating_add(u64::from(self.ttl_s).saturating_mul(1000))
    }

    /// The decoded addresses of an endpoint record.
    pub fn endpoint_addrs(&self) -> Result<Vec<TypedAddr>, RecordError> {
        if self.kind != RecordKind::Endpoint {
            return Err(RecordError::Malformed);
        }
        let p: EndpointPayload =
            postcard::from_bytes(&self.payload).map_err(|_| RecordError::Malformed)?;
        Ok(p.addrs)
    }

    /// Checks everything that can be checked without the store: signature,
    /// key binding, lifetime and payload shape. `now_ms` is Unix time.
    pub fn validate(&self, now_ms: u64) -> Result<(), RecordError> {
        let (max_payload, max_ttl) = match self.kind {
            RecordKind::Mailbox => (MAX_MAILBOX_PAYLOAD, MAX_MAILBOX_TTL),
            _ => (MAX_SMALL_PAYLOAD, MAX_TTL),
        };
        if self.payload.len() > max_payload {
            return Err(RecordError::Oversize);
        }
        let ttl = Duration::from_secs(u64::from(self.ttl_s));
        if ttl < MIN_TTL || ttl > max_ttl {
            return Err(RecordError::AbsurdTtl);
        }
        let sig: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| RecordError::BadSignature)?;
        if !self.publisher.verify(&self.signing_bytes(), &sig) {
            return Err(RecordError::BadSignature);
        }
        if self.created_ms > now_ms.saturating_add(MAX_CLOCK_SKEW.as_millis() as u64) {
            return Err(RecordError::FromTheFuture);
        }
        if self.expires_ms() <= now_ms {
            return Err(RecordError::Expired);
        }
        match self.kind {
            RecordKind::Endpoint => {
                if self.key != Key::for_peer(&self.publisher) {
                    return Err(RecordError::KeyMismatch);
                }
                let p: EndpointPayload =
                    postcard::from_bytes(&self.payload).map_err(|_| RecordError::Malformed)?;
                if p.addrs.len() > MAX_ENDPOINT_ADDRS {
                    return Err(RecordError::Oversize);
                }
            }
            RecordKind::Topic => {
                let p: TopicPayload =
                    postcard::from_bytes(&self.payload).map_err(|_| RecordError::Malformed)?;
                if p.topic.len() > MAX_TOPIC_LEN {
                    return Err(RecordError::Oversize);
                }
                if self.key != Key::for_topic(&p.topic) {
                    return Err(RecordError::KeyMismatch);
                }
            }
            RecordKind::Mailbox => {}
        }
        Ok(())
    }
}

/// Domain separator of the bytes a deletion notice's signature covers.
const DELETE_DOMAIN: &[u8] = b"reach-dht-delete-v1";

/// "Drop my record (kind, key, seq)": signed by the record's publisher.
/// For mailbox records, whose publisher is a throwaway key whose secret
/// travels inside the sealed box: the recipient (and the sender) can sign
/// it, the storers cannot, and nobody else can.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionNotice {
    /// The record's kind (only [`RecordKind::Mailbox`] is deletable).
    pub kind: RecordKind,
    /// Where the record is stored.
    pub key: Key,
    /// The record's publisher, who signs the notice.
    pub publisher: PeerId,
    /// The record's seq: the slot (publisher, seq) at `key`.
    pub seq: u64,
    /// Ed25519 signature (64 bytes) over [`DeletionNotice::signing_bytes`].
    pub signature: Vec<u8>,
}

impl DeletionNotice {
    /// Builds and signs a notice for `keypair`'s record (kind, key, seq).
    pub fn sign(keypair: &Keypair, kind: RecordKind, key: Key, seq: u64) -> Self {
        let mut n = DeletionNotice {
            kind,
            key,
            publisher: keypair.peer_id(),
            seq,
            signature: Vec::new(),
        };
        n.signature = keypair.sign(&n.signing_bytes()).to_vec();
        n
    }

    /// The notice for `record`, signed by its publisher's `keypair`.
    pub fn for_record(keypair: &Keypair, record: &SignedRecord) -> Self {
        Self::sign(keypair, record.kind, record.key, record.seq)
    }

    /// The exact bytes the signature covers (domain-separated from
    /// records' signed bytes, so no record signature is a notice).
    pub fn signing_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(&(DELETE_DOMAIN, self.kind, self.key, self.publisher, self.seq))
            .unwrap_or_default()
    }

    /// Checks the kind and the publisher's signature.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.kind != RecordKind::Mailbox {
            return Err(RecordError::NotDeletable);
        }
        let sig: [u8; 64] = self
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| RecordError::BadSignature)?;
        if !self.publisher.verify(&self.signing_bytes(), &sig) {
            return Err(RecordError::BadSignature);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    fn addrs() -> Vec<TypedAddr> {
        vec![TypedAddr {
            kind: AddrKind::Direct,
            addr: "198.51.100.1:4433".parse().unwrap(),
            via: None,
        }]
    }

    #[test]
    fn valid_records_of_each_kind_pass() {
        let kp = Keypair::generate();
        let e = SignedRecord::endpoint(&kp, addrs(), 1, NOW, HOUR);
        assert_eq!(e.validate(NOW), Ok(()));
        assert_eq!(e.endpoint_addrs().unwrap(), addrs());
        assert_eq!(
            SignedRecord::topic(&kp, "rust", 1, NOW, HOUR).validate(NOW),
            Ok(())
        );
        let recipient = Keypair::generate().peer_id();
        let m = SignedRecord::sign(
            &kp,
            RecordKind::Mailbox,
            Key::for_peer(&recipient),
            1,
            NOW,
            HOUR,
            vec![1, 2, 3],
        );
        assert_eq!(m.validate(NOW), Ok(()));
    }

    #[test]
    fn every_rejection_reason() {
        let kp = Keypair::generate();
        let good = SignedRecord::endpoint(&kp, addrs(), 1, NOW, HOUR);

        let mut tampered = good.clone();
        tampered.seq = 2;
        assert_eq!(tampered.validate(NOW), Err(RecordError::BadSignature));
        let mut short_sig = good.clone();
        short_sig.signature.pop();
        assert_eq!(short_sig.validate(NOW), Err(RecordError::BadSignature));

        let other = Keypair::generate().peer_id();
        let wrong_key = SignedRecord::sign(
            &kp,
            RecordKind::Endpoint,
            Key::for_peer(&other),
            1,
            NOW,
            HOUR,
            good.payload.clone(),
        );
        assert_eq!(wrong_key.validate(NOW), Err(RecordError::KeyMismatch));
        let topic_wrong_key = SignedRecord::sign(
            &kp,
            RecordKind::Topic,
            Key::for_topic("a"),
            1,
            NOW,
            HOUR,
            postcard::to_allocvec(&TopicPayload { topic: "b".into() }).unwrap(),
        );
        assert_eq!(topic_wrong_key.validate(NOW), Err(RecordError::KeyMismatch));

        let old = SignedRecord::endpoint(&kp, addrs(), 1, NOW - 2 * 3_600_000, HOUR);
        assert_eq!(old.validate(NOW), Err(RecordError::Expired));
        let future = SignedRecord::endpoint(&kp, addrs(), 1, NOW + 3_600_000, HOUR);
        assert_eq!(future.validate(NOW), Err(RecordError::FromTheFuture));
        for ttl in [Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600)] {
            let r = SignedRecord::endpoint(&kp, addrs(), 1, NOW, ttl);
            assert_eq!(r.validate(NOW), Err(RecordError::AbsurdTtl));
        }
        let many = vec![addrs()[0]; MAX_ENDPOINT_ADDRS + 1];
        let r = SignedRecord::endpoint(&kp, many, 1, NOW, HOUR);
        assert_eq!(r.validate(NOW), Err(RecordError::Oversize));
        let huge = SignedRecord::sign(
            &kp,
            RecordKind::Mailbox,
            Key([0; 32]),
            1,
            NOW,
            HOUR,
            vec![0; MAX_MAILBOX_PAYLOAD + 1],
        );
        assert_eq!(huge.validate(NOW), Err(RecordError::Oversize));
        let junk = SignedRecord::sign(
            &kp,
            RecordKind::Endpoint,
            Key::for_peer(&kp.peer_id()),
            1,
            NOW,
            HOUR,
            vec![0xff; 10],
        );
        assert_eq!(junk.validate(NOW), Err(RecordError::Malformed));
    }
}
