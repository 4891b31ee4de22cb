//! Encryption of outbox entries at rest.
//!
//! Two keys are derived with HKDF-SHA256 from the node's Ed25519 secret seed
//! (salt [`KDF_SALT`], distinct `info` labels), so the outbox file is
//! readable only with the node's identity and a key for the outbox is never
//! the key of anything else:
//! - an AES-256-GCM key sealing every value: `nonce ‖ ciphertext ‖ tag`, a
//!   fresh random 96-bit nonce per write (random nonces under one key are
//!   safe for far more than 2^32 writes' worth of margin below the birthday
//!   bound; an outbox writes millions at most), and associated data binding
//!   the table name and the entry's key, so an entry copied or swapped to
//!   another key or table fails to open;
//! - an HMAC-SHA256 key naming peers in table keys, so per-peer rows are
//!   found by peer without the peer id being on disk.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{hkdf, hmac};
use reach_proto::{Keypair, PeerId};

/// HKDF salt: reach's label for the outbox, versioned so a future format
/// derives different keys.
pub const KDF_SALT: &[u8] = b"reach outbox v1";
const INFO_AEAD: &[u8] = b"reach outbox v1 aes-256-gcm entry key";
const INFO_PEER: &[u8] = b"reach outbox v1 hmac-sha256 peer name key";
/// Bytes a sealed value adds to its plaintext: nonce and tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The outbox's keys, derived from the node identity.
pub struct Sealer {
    aead: LessSafeKey,
    peer: hmac::Key,
}

/// A value failed to open: tampered, truncated, or moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenError;

impl Sealer {
    /// Derives the keys from `keypair`'s secret seed.
    pub fn new(keypair: &Keypair) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(&keypair.secret_bytes());
        let mut aead_key = [0u8; 32];
        let mut peer_key = [0u8; 32];
        // Expanding 32 bytes from SHA-256 HKDF cannot fail (the limit is
        // 255 × 32), nor can a 32-byte key for AES-256.
        prk.expand(&[INFO_AEAD], Len(32))
            .and_then(|okm| okm.fill(&mut aead_key))
            .expect("HKDF-SHA256 expands 32 bytes");
        prk.expand(&[INFO_PEER], Len(32))
            .and_then(|okm| okm.fill(&mut peer_key))
            .expect("HKDF-SHA256 expands 32 bytes");
        let unbound = UnboundKey::new(&AES_256_GCM, &aead_key).expect("32-byte AES-256 key");
        Sealer {
            aead: LessSafeKey::new(unbound),
            peer: hmac::Key::new(hmac::HMAC_SHA256, &peer_key),
        }
    }

    /// The table key naming `peer`: HMAC-SHA256 of its id under the peer key.
    pub fn peer_name(&self, peer: &PeerId) -> [u8; 32] {
        let tag = hmac::sign(&self.peer, peer.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    fn aad(table: &str, key: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(table.len() + 1 + key.len());
        aad.extend_from_slice(table.as_bytes());
        aad.push(0);
        aad.extend_from_slice(key);
        aad
    }

    /// Seals `plaintext` for row `key` of `table`.
    pub fn seal(&self, table: &str, key: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        // The OS RNG failing is not recoverable and not caused by input.
        getrandom::fill(&mut nonce).expect("operating system random number generator failed");
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(table, key)),
                &mut body,
            )
            .expect("AES-GCM seals any length the outbox allows");
        out.extend_from_slice(&body);
        out
    }

    /// Opens a value sealed for row `key` of `table`.
    pub fn open(&self, table: &str, key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(OpenError);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| OpenError)?;
        let mut body = body.to_vec();
        let plain = self
            .aead
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(table, key)),
                &mut body,
            )
            .map_err(|_| OpenError)?;
        let n = plain.len();
        body.truncate(n);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_every_binding_is_checked() {
        let kp = Keypair::from_secret_bytes([3; 32]);
        let s = Sealer::new(&kp);
        let sealed = s.seal("entries", b"k1", b"hello");
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(s.open("entries", b"k1", &sealed).unwrap(), b"hello");
        // Fresh nonce per write.
        assert_ne!(s.seal("entries", b"k1", b"hello"), sealed);
        assert_eq!(s.open("entries", b"k2", &sealed), Err(OpenError));
        assert_eq!(s.open("other", b"k1", &sealed), Err(OpenError));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert_eq!(s.open("entries", b"k1", &bad), Err(OpenError), "byte {i}");
        }
        assert_eq!(s.open("entries", b"k1", &sealed[..10]), Err(OpenError));
        // Another identity cannot open it, and names peers differently.
        let other = Sealer::new(&Keypair::from_secret_bytes([4; 32]));
        assert_eq!(other.open("entries", b"k1", &sealed), Err(OpenError));
        let p = kp.peer_id();
        assert_eq!(s.peer_name(&p), s.peer_name(&p));
        assert_ne!(s.peer_name(&p), other.peer_name(&p));
        assert_ne!(&s.peer_name(&p), p.as_bytes());
    }
}
