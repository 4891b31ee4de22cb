//! Sealing a durable message for an offline recipient's mailbox, and
//! opening it (the format is reach-proto's [`reach_proto::mailbox`]).
//!
//! - The recipient's X25519 key is its Ed25519 key in Montgomery form
//!   (ed25519-dalek's `to_montgomery`; its secret: `to_scalar_bytes`), so
//!   a sender needs nothing but the recipient's peer id.
//! - Each box has an ephemeral X25519 key; the box key is HKDF-SHA256 of
//!   the agreement (with both public keys in the info, so a key is bound
//!   to its box), and AES-256-GCM seals the contents.
//! - The DHT record is signed by a throwaway Ed25519 key whose secret is
//!   inside the box: storers learn nothing of the sender, and the recipient
//!   can sign the record's deletion notice.
//!
//! Re-depositing must put the *same* record again (a storer refuses a
//! different record in the same (publisher, seq) slot, and a deleted slot
//! must stay deleted), across restarts of the sender too. So the ephemeral
//! and the throwaway keys are derived, not drawn: HKDF of the sender's
//! secret seed over (recipient, seq, epoch, SHA-256 of the data). A box is
//! then a deterministic function of the message and the epoch; the fixed
//! nonce stays safe because a key is only ever used for one plaintext
//! (different data derives a different ephemeral key), and a new epoch
//! derives new keys, so storers of two epochs cannot link the two records
//! by their publisher.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use aws_lc_rs::{digest, hkdf};
use ed25519_dalek::{SigningKey, VerifyingKey};
use reach_proto::dht::Key;
use reach_proto::dht::record::{RecordKind, SignedRecord};
use reach_proto::mailbox::{
    BoxContents, MAX_MAILBOX_MESSAGE, SEAL_KDF_INFO, SEAL_KDF_SALT, SEAL_NONCE, SEAL_VERSION,
    SealedBox, sender_signing_bytes,
};
use reach_proto::{Keypair, PeerId};

/// HKDF salt of the sender-side derivations (ephemeral and throwaway keys).
const DERIVE_SALT: &[u8] = b"reach mailbox v1 sender derivations";
const INFO_EPHEMERAL: &[u8] = b"reach mailbox v1 ephemeral x25519 key";
const INFO_THROWAWAY: &[u8] = b"reach mailbox v1 throwaway ed25519 key";

/// The seq of every mailbox record: each record has its own throwaway
/// publisher, so the slot (publisher, seq) needs no counter, and a
/// constant tells storers nothing.
pub const RECORD_SEQ: u64 = 1;

/// Why a message was not sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The message is larger than [`MAX_MAILBOX_MESSAGE`]: it stays on the
    /// direct path only.
    #[error("message of {0} bytes is larger than a mailbox holds")]
    TooLarge(usize),
    /// The recipient's id has no X25519 form (not a usable key).
    #[error("the recipient's key has no X25519 form")]
    BadRecipient,
}

/// Why a mailbox record was not opened: counted and skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a sealed box of this version.
    #[error("not a sealed box")]
    Garbage,
    /// It does not decrypt for us.
    #[error("not sealed for this node")]
    NotForUs,
    /// The contents are not addressed to us, the sender's signature fails,
    /// or the throwaway key inside is not the record's publisher.
    #[error("the box's contents do not verify")]
    BadContents,
}

impl OpenError {
    /// Stable machine-readable name.
    pub fn kind(&self) -> &'static str {
        match self {
            OpenError::Garbage => "garbage",
            OpenError::NotForUs => "not_for_us",
            OpenError::BadContents => "bad_contents",
        }
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf32(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> [u8; 32] {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = [0u8; 32];
    // 32 bytes from HKDF-SHA256 cannot fail (the limit is 255 × 32).
    prk.expand(info, Len(32))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 expands 32 bytes");
    out
}

/// `keypair`'s X25519 secret (its Ed25519 secret scalar).
fn x25519_secret(keypair: &Keypair) -> [u8; 32] {
    SigningKey::from_bytes(&keypair.secret_bytes()).to_scalar_bytes()
}

/// `peer`'s X25519 public key (its Ed25519 key in Montgomery form).
fn x25519_public(peer: &PeerId) -> Option<[u8; 32]> {
    Some(
        VerifyingKey::from_bytes(peer.as_bytes())
            .ok()?
            .to_montgomery()
            .to_bytes(),
    )
}

/// The box key from the agreement of `ours` with `theirs`; `eph` and
/// `recipient` are the box's two public keys.
fn box_key(
    ours: &[u8; 32],
    theirs: &[u8; 32],
    eph: &[u8; 32],
    recipient: &[u8; 32],
) -> Option<LessSafeKey> {
    let private = PrivateKey::from_private_key(&X25519, ours).ok()?;
    let key = agreement::agree(
        &private,
        UnparsedPublicKey::new(&X25519, theirs),
        (),
        |shared| {
            Ok(hkdf32(
                SEAL_KDF_SALT,
                shared,
                &[SEAL_KDF_INFO, eph, recipient],
            ))
        },
    )
    .ok()?;
    Some(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).ok()?))
}

/// What the sender derives for one message in one epoch.
fn derive(
    sender: &Keypair,
    recipient: &PeerId,
    seq: u64,
    epoch: u64,
    data: &[u8],
) -> [[u8; 32]; 2] {
    let hash = digest::digest(&digest::SHA256, data);
    let ctx = [
        recipient.as_bytes().as_slice(),
        &seq.to_be_bytes(),
        &epoch.to_be_bytes(),
        hash.as_ref(),
    ]
    .concat();
    let seed = sender.secret_bytes();
    [
        hkdf32(DERIVE_SALT, &seed, &[INFO_EPHEMERAL, &ctx]),
        hkdf32(DERIVE_SALT, &seed, &[INFO_THROWAWAY, &ctx]),
    ]
}

/// A sealed deposit: the record to store and the throwaway key that signed
/// it (for the sender's own deletion notice once the message is acked).
pub struct Sealed {
    /// The mailbox record, signed by `throwaway`.
    pub record: SignedRecord,
    /// The record's publisher.
    pub throwaway: Keypair,
}

/// Seals message `seq` (`data`) from `sender` for `recipient`, as a
/// mailbox record at `key` (the recipient's mailbox in `epoch`), created
/// at `created_ms` and living `ttl`. Deterministic (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn seal(
    sender: &Keypair,
    recipient: &PeerId,
    seq: u64,
    data: &[u8],
    epoch: u64,
    key: Key,
    created_ms: u64,
    ttl: std::time::Duration,
) -> Result<Sealed, SealError> {
    if data.len() > MAX_MAILBOX_MESSAGE {
        return Err(SealError::TooLarge(data.len()));
    }
    let [eph_secret, throwaway_seed] = derive(sender, recipient, seq, epoch, data);
    let contents = BoxContents {
        sender: sender.peer_id(),
        recipient: *recipient,
        seq,
        data: data.to_vec(),
        throwaway: throwaway_seed,
        signature: sender
            .sign(&sender_signing_bytes(recipient, seq, data))
            .to_vec(),
    };
    let payload = seal_box(&contents, &eph_secret).ok_or(SealError::BadRecipient)?;
    let throwaway = Keypair::from_secret_bytes(throwaway_seed);
    let record = SignedRecord::sign(
        &throwaway,
        RecordKind::Mailbox,
        key,
        RECORD_SEQ,
        created_ms,
        ttl,
        payload,
    );
    Ok(Sealed { record, throwaway })
}

/// Seals `contents` for `contents.recipient` with the ephemeral secret
/// `eph_secret`: the payload of a mailbox record.
fn seal_box(contents: &BoxContents, eph_secret: &[u8; 32]) -> Option<Vec<u8>> {
    let their_x = x25519_public(&contents.recipient)?;
    let eph_public: [u8; 32] = PrivateKey::from_private_key(&X25519, eph_secret)
        .ok()?
        .compute_public_key()
        .ok()?
        .as_ref()
        .try_into()
        .ok()?;
    let mut buf = postcard::to_allocvec(contents).ok()?;
    let k = box_key(eph_secret, &their_x, &eph_public, &their_x)?;
    k.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(SEAL_NONCE),
        Aad::from([SEAL_VERSION]),
        &mut buf,
    )
    .ok()?;
    Some(
        SealedBox {
            version: SEAL_VERSION,
            ephemeral: eph_public,
            ciphertext: buf,
        }
        .encode(),
    )
}

/// Opens a mailbox record for `me`: decrypts it, checks that it is
/// addressed to us, the sender's signature, and that the throwaway key
/// inside signed the record. Never panics on any input.
pub fn open(me: &Keypair, record: &SignedRecord) -> Result<BoxContents, OpenError> {
    let sealed = SealedBox::decode(&record.payload).ok_or(OpenError::Garbage)?;
    let my_x = x25519_public(&me.peer_id()).ok_or(OpenError::NotForUs)?;
    let k = box_key(
        &x25519_secret(me),
        &sealed.ephemeral,
        &sealed.ephemeral,
        &my_x,
    )
    .ok_or(OpenError::NotForUs)?;
    let mut buf = sealed.ciphertext;
    let plain = k
        .open_in_place(
            Nonce::assume_unique_for_key(SEAL_NONCE),
            Aad::from([SEAL_VERSION]),
            &mut buf,
        )
        .map_err(|_| OpenError::NotForUs)?;
    let contents: BoxContents = postcard::from_bytes(plain).map_err(|_| OpenError::BadContents)?;
    if !contents.verify(&me.peer_id())
        || Keypair::from_secret_bytes(contents.throwaway).peer_id() != record.publisher
    {
        return Err(OpenError::BadContents);
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::mailbox::deposit_key;
    use std::time::Duration;

    const NOW: u64 = 1_800_000_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    fn seal_for(a: &Keypair, b: &PeerId, seq: u64, data: &[u8]) -> Sealed {
        let epoch = reach_proto::mailbox::epoch_of(NOW);
        seal(a, b, seq, data, epoch, deposit_key(b, NOW), NOW, HOUR).unwrap()
    }

    #[test]
    fn the_recipient_opens_what_was_sealed_for_it_and_nobody_else_does() {
        let (a, b, c) = (
            Keypair::generate(),
            Keypair::generate(),
            Keypair::generate(),
        );
        let data = vec![0x5a; MAX_MAILBOX_MESSAGE];
        let s = seal_for(&a, &b.peer_id(), 7, &data);
        assert!(s.record.payload.len() <= reach_proto::dht::record::MAX_MAILBOX_PAYLOAD);
        assert_eq!(s.record.validate(NOW), Ok(()));
        assert_eq!(s.record.publisher, s.throwaway.peer_id());
        assert_ne!(s.record.publisher, a.peer_id());
        let got = open(&b, &s.record).unwrap();
        assert_eq!((got.sender, got.seq, got.data), (a.peer_id(), 7, data));
        assert_eq!(open(&c, &s.record), Err(OpenError::NotForUs));
        assert_eq!(open(&a, &s.record), Err(OpenError::NotForUs));
    }

    #[test]
    fn too_large_is_a_typed_error_and_8_kib_fits() {
        let (a, b) = (Keypair::generate(), Keypair::generate().peer_id());
        const { assert!(MAX_MAILBOX_MESSAGE >= 8 * 1024) };
        let epoch = reach_proto::mailbox::epoch_of(NOW);
        let r = seal(
            &a,
            &b,
            1,
            &vec![0; MAX_MAILBOX_MESSAGE + 1],
            epoch,
            deposit_key(&b, NOW),
            NOW,
            HOUR,
        );
        assert_eq!(r.err(), Some(SealError::TooLarge(MAX_MAILBOX_MESSAGE + 1)));
    }

    #[test]
    fn sealing_again_gives_the_same_record_and_another_epoch_another_publisher() {
        let (a, b) = (Keypair::generate(), Keypair::generate().peer_id());
        let one = seal_for(&a, &b, 3, b"hello");
        let again = seal_for(&a, &b, 3, b"hello");
        assert_eq!(one.record, again.record);
        let other = seal_for(&a, &b, 3, b"hullo");
        assert_ne!(one.record.publisher, other.record.publisher);
        let next = seal(
            &a,
            &b,
            3,
            b"hello",
            1 + reach_proto::mailbox::epoch_of(NOW),
            Key([1; 32]),
            NOW,
            HOUR,
        )
        .unwrap();
        assert_ne!(one.record.publisher, next.record.publisher);
        assert_ne!(one.record.payload, next.record.payload);
    }

    #[test]
    fn tampered_forged_or_garbage_boxes_are_refused_without_panicking() {
        let (a, b) = (Keypair::generate(), Keypair::generate());
        let s = seal_for(&a, &b.peer_id(), 1, b"pay me");
        // A flipped byte anywhere in the payload.
        for i in 0..s.record.payload.len() {
            let mut r = s.record.clone();
            r.payload[i] ^= 0x01;
            assert!(open(&b, &r).is_err(), "flipped byte {i} opened");
        }
        // Garbage and truncations.
        for len in [0, 1, 10, 40, s.record.payload.len() - 1] {
            let mut r = s.record.clone();
            r.payload.truncate(len);
            assert!(open(&b, &r).is_err());
        }
        // The box re-published by someone else's throwaway key.
        let mut r = s.record.clone();
        r.publisher = Keypair::generate().peer_id();
        assert_eq!(open(&b, &r), Err(OpenError::BadContents));
        // M seals a box for B that claims to come from A: A's signature
        // is not M's to make.
        let m = Keypair::generate();
        let throwaway = Keypair::generate();
        let data = b"pay M".to_vec();
        let contents = BoxContents {
            sender: a.peer_id(),
            recipient: b.peer_id(),
            seq: 2,
            signature: m
                .sign(&sender_signing_bytes(&b.peer_id(), 2, &data))
                .to_vec(),
            data,
            throwaway: throwaway.secret_bytes(),
        };
        let forged = SignedRecord::sign(
            &throwaway,
            RecordKind::Mailbox,
            s.record.key,
            RECORD_SEQ,
            NOW,
            HOUR,
            seal_box(&contents, &[9; 32]).unwrap(),
        );
        assert_eq!(open(&b, &forged), Err(OpenError::BadContents));
        // Sealed for B, but addressed inside to C: refused by B.
        let c = Keypair::generate().peer_id();
        let mut readdressed = contents.clone();
        readdressed.sender = m.peer_id();
        readdressed.recipient = c;
        readdressed.signature = m
            .sign(&sender_signing_bytes(&c, 2, &readdressed.data))
            .to_vec();
        let mut boxed = SealedBox::decode(&seal_box(&readdressed, &[9; 32]).unwrap()).unwrap();
        // seal_box sealed it for C (the recipient inside); re-seal for B by
        // hand: same contents, B's key.
        let eph_public: [u8; 32] = PrivateKey::from_private_key(&X25519, &[9; 32])
            .unwrap()
            .compute_public_key()
            .unwrap()
            .as_ref()
            .try_into()
            .unwrap();
        let bx = x25519_public(&b.peer_id()).unwrap();
        let k = box_key(&[9; 32], &bx, &eph_public, &bx).unwrap();
        let mut buf = postcard::to_allocvec(&readdressed).unwrap();
        k.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(SEAL_NONCE),
            Aad::from([SEAL_VERSION]),
            &mut buf,
        )
        .unwrap();
        boxed.ciphertext = buf;
        let r = SignedRecord::sign(
            &throwaway,
            RecordKind::Mailbox,
            s.record.key,
            RECORD_SEQ,
            NOW,
            HOUR,
            boxed.encode(),
        );
        assert_eq!(open(&b, &r), Err(OpenError::BadContents));
    }
}
