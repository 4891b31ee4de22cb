//! Node identity: an Ed25519 keypair whose public key *is* the node's address.
//!
//! A [`PeerId`] has exactly one canonical text form: the 32 public-key bytes in
//! lowercase RFC 4648 base32 without padding (52 characters). Lowercase base32
//! is DNS-label safe, unambiguous to read aloud and has no `+`/`/` to escape in
//! URLs. Parsing accepts only that form, so two spellings never name one peer.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Length of an Ed25519 public key, and so of a [`PeerId`], in bytes.
pub const PEER_ID_LEN: usize = 32;
/// Length of the canonical text form of a [`PeerId`] (ceil(256 / 5)).
pub const PEER_ID_TEXT_LEN: usize = 52;
/// Length of an Ed25519 secret seed in bytes.
pub const SECRET_KEY_LEN: usize = 32;

const BASE32_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The address of a node: its Ed25519 public key.
///
/// Constructed only from bytes that are a valid Ed25519 point, so every
/// `PeerId` can verify signatures.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; PEER_ID_LEN]);

/// Why a text or byte string is not a valid [`PeerId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    #[error(
        "peer id must be {PEER_ID_TEXT_LEN} characters of lowercase base32, got {0} characters"
    )]
    /// The text is not [`PEER_ID_TEXT_LEN`] characters long (the length
    /// found).
    Length(usize),
    #[error("peer id contains {0:?} at position {1}: only a-z and 2-7 are allowed")]
    /// A character outside the base32 alphabet (the character and its
    /// position).
    Character(char, usize),
    #[error("peer id is not canonical: its last character carries non-zero padding bits")]
    /// The padding bits are not zero: a second spelling of the same key,
    /// refused so every peer has exactly one text form.
    NonCanonical,
    #[error("peer id bytes are not a valid Ed25519 public key")]
    /// The bytes are not a valid Ed25519 public key (not a point on the
    /// curve).
    InvalidKey,
}

impl PeerIdError {
    /// Stable machine-readable name of this error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerIdError::Length(_) => "peer_id_length",
            PeerIdError::Character(..) => "peer_id_character",
            PeerIdError::NonCanonical => "peer_id_non_canonical",
            PeerIdError::InvalidKey => "peer_id_invalid_key",
        }
    }
}

impl PeerId {
    /// Builds a peer id from raw public-key bytes, checking that they are a
    /// valid Ed25519 point.
    pub fn from_bytes(bytes: [u8; PEER_ID_LEN]) -> Result<Self, PeerIdError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| PeerIdError::InvalidKey)?;
        Ok(PeerId(bytes))
    }

    /// Builds a peer id from a byte slice of any length (for decoders).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, PeerIdError> {
        let arr: [u8; PEER_ID_LEN] = bytes
            .try_into()
            .map_err(|_| PeerIdError::Length(bytes.len()))?;
        Self::from_bytes(arr)
    }

    /// The raw 32 public-key bytes.
    pub fn as_bytes(&self) -> &[u8; PEER_ID_LEN] {
        &self.0
    }

    /// Verifies an Ed25519 signature made by this peer over `msg`.
    pub fn verify(&self, msg: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify(msg, &Signature::from_bytes(signature)).is_ok()
    }

    /// A short prefix of the text form, for logs and tables.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(10);
        s
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base32_encode(&self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let chars = s.chars().count();
        if chars != PEER_ID_TEXT_LEN || s.len() != PEER_ID_TEXT_LEN {
            return Err(PeerIdError::Length(chars));
        }
        let bytes = base32_decode_32(s.as_bytes())?;
        PeerId::from_bytes(bytes)
    }
}

impl Serialize for PeerId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes = <[u8; PEER_ID_LEN]>::deserialize(deserializer)?;
            PeerId::from_bytes(bytes).map_err(serde::de::Error::custom)
        }
    }
}

/// Lowercase RFC 4648 base32 without padding.
pub(crate) fn base32_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in bytes {
        acc = ((acc << 8) | u32::from(b)) & 0xFFFF;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32_ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32_ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Decodes lowercase base32 without padding; `Err((char, position))` at
/// the first character outside the alphabet, `Ok(None)` when the padding
/// bits are not zero (not the canonical spelling of any bytes).
pub(crate) fn base32_decode(text: &[u8]) -> Result<Option<Vec<u8>>, (char, usize)> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for (i, &c) in text.iter().enumerate() {
        let v = base32_value(c).ok_or((c as char, i))?;
        acc = ((acc << 5) | v) & 0xFFFF;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits >= 5 || acc & ((1 << bits) - 1) != 0 {
        return Ok(None);
    }
    Ok(Some(out))
}

fn base32_value(c: u8) -> Option<u32> {
    match c {
        b'a'..=b'z' => Some(u32::from(c - b'a')),
        b'2'..=b'7' => Some(u32::from(c - b'2') + 26),
        _ => None,
    }
}

/// Decodes exactly [`PEER_ID_TEXT_LEN`] base32 characters into 32 bytes.
fn base32_decode_32(text: &[u8]) -> Result<[u8; PEER_ID_LEN], PeerIdError> {
    // 52 * 5 = 260 bits: the last 4 bits are padding and must be zero.
    let bytes = base32_decode(text)
        .map_err(|(c, i)| PeerIdError::Character(c, i))?
        .ok_or(PeerIdError::NonCanonical)?;
    bytes.try_into().map_err(|_| PeerIdError::NonCanonical)
}

/// A node's Ed25519 keypair.
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
}

impl Keypair {
    /// Generates a fresh keypair from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut seed = [0u8; SECRET_KEY_LEN];
        // The OS RNG failing is not recoverable and not caused by input.
        getrandom::fill(&mut seed).expect("operating system random number generator failed");
        Self::from_secret_bytes(seed)
    }

    /// Rebuilds a keypair from its 32-byte secret seed.
    pub fn from_secret_bytes(seed: [u8; SECRET_KEY_LEN]) -> Self {
        Keypair {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The 32-byte secret seed. Keep it secret.
    pub fn secret_bytes(&self) -> [u8; SECRET_KEY_LEN] {
        self.signing.to_bytes()
    }

    /// This keypair's public address.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.signing.verifying_key().to_bytes())
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// The secret key as PKCS#8 v2 DER, the form TLS libraries load.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        self.signing
            .to_pkcs8_der()
            .map(|doc| doc.as_bytes().to_vec())
            // Encoding a well-formed in-memory key into a fixed-size DER
            // structure cannot fail.
            .expect("PKCS#8 encoding of an Ed25519 key")
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({:?})", self.peer_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_form_round_trips() {
        let id = Keypair::generate().peer_id();
        let text = id.to_string();
        assert_eq!(text.len(), PEER_ID_TEXT_LEN);
        assert!(
            text.bytes()
                .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c))
        );
        assert_eq!(text.parse::<PeerId>(), Ok(id));
    }

    #[test]
    fn rejects_wrong_length_and_characters() {
        let text = Keypair::generate().peer_id().to_string();
        assert_eq!(text[..51].parse::<PeerId>(), Err(PeerIdError::Length(51)));
        assert_eq!(
            format!("{text}a").parse::<PeerId>(),
            Err(PeerIdError::Length(53))
        );
        assert_eq!("".parse::<PeerId>(), Err(PeerIdError::Length(0)));
        let upper = text.to_uppercase();
        assert!(matches!(
            upper.parse::<PeerId>(),
            Err(PeerIdError::Character(c, _)) if c.is_ascii_uppercase()
        ));
        let mut bad = text.clone().into_bytes();
        bad[7] = b'1';
        assert_eq!(
            String::from_utf8(bad).unwrap().parse::<PeerId>(),
            Err(PeerIdError::Character('1', 7))
        );
        // Multi-byte characters never slip through the length check.
        let mut multi = text[..50].to_string();
        multi.push('é');
        assert!(multi.parse::<PeerId>().is_err());
    }

    #[test]
    fn rejects_non_zero_padding_bits() {
        let text = Keypair::generate().peer_id().to_string();
        let mut bytes = text.into_bytes();
        let last = base32_value(bytes[51]).unwrap();
        // Flip the lowest (padding) bit of the last character.
        bytes[51] = BASE32_ALPHABET[(last ^ 1) as usize];
        let err = String::from_utf8(bytes).unwrap().parse::<PeerId>();
        assert_eq!(err, Err(PeerIdError::NonCanonical));
    }

    #[test]
    fn rejects_bytes_that_are_not_a_curve_point() {
        // y = 2 does not decompress to a point on edwards25519.
        let mut b = [0u8; 32];
        b[0] = 2;
        assert_eq!(PeerId::from_bytes(b), Err(PeerIdError::InvalidKey));
    }

    #[test]
    fn signatures_verify_only_for_the_signer() {
        let a = Keypair::generate();
        let b = Keypair::generate();
        let sig = a.sign(b"hello");
        assert!(a.peer_id().verify(b"hello", &sig));
        assert!(!a.peer_id().verify(b"hullo", &sig));
        assert!(!b.peer_id().verify(b"hello", &sig));
    }

    #[test]
    fn secret_round_trips() {
        let a = Keypair::generate();
        let b = Keypair::from_secret_bytes(a.secret_bytes());
        assert_eq!(a.peer_id(), b.peer_id());
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,80}") {
            let _ = s.parse::<PeerId>();
        }

        #[test]
        fn any_valid_key_round_trips(seed in any::<[u8; 32]>()) {
            let id = Keypair::from_secret_bytes(seed).peer_id();
            prop_assert_eq!(id.to_string().parse::<PeerId>(), Ok(id));
        }

        #[test]
        fn base32_text_of_52_chars_parses_iff_canonical(s in "[a-z2-7]{52}") {
            if let Ok(id) = s.parse::<PeerId>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }
    }
}
