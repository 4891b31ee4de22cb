//! Mailboxes: where sealed messages for an offline recipient live in the DHT.
//!
//! A sender whose durable message stays undelivered seals it for the
//! recipient and stores it as a [`RecordKind::Mailbox`](crate::dht::RecordKind)
//! record at the k nodes closest to [`Key::for_mailbox`]`(recipient, epoch)`.
//! The key rotates every [`MAILBOX_EPOCH`]: a storer sees a different key
//! each epoch and, unless it already knows the recipient's id, cannot link
//! the two. Records live at most a week
//! ([`MAX_MAILBOX_TTL`](crate::dht::record::MAX_MAILBOX_TTL)), so a record
//! stored in some epoch is gone before the epoch after the next begins: the
//! recipient finds everything still alive by fetching the current epoch's
//! key and the previous one ([`epochs_to_fetch`]), two lookups however long
//! it was away.

//!
//! ## The sealed box
//!
//! A record's payload is a [`SealedBox`]: an ephemeral X25519 public key
//! (fresh for each box) and an AES-256-GCM ciphertext under a key derived
//! with HKDF-SHA256 ([`SEAL_KDF_SALT`], [`SEAL_KDF_INFO`]) from the X25519
//! agreement between the ephemeral key and the recipient's X25519 key (its
//! Ed25519 key in Montgomery form). Each box has its own key, so the nonce
//! is fixed ([`SEAL_NONCE`]). Inside is a [`BoxContents`]: the sender's
//! id, the message's seq (the outbox's per-destination seq, so the
//! receiver's log dedups it with the direct path), the data, the secret of
//! the throwaway key that signs the DHT record (so the recipient can sign
//! its deletion notice), and the sender's signature over
//! [`sender_signing_bytes`]. Storers see a throwaway publisher and an
//! opaque blob; the crypto itself lives in the runtime.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::PeerId;
use crate::dht::Key;
use crate::dht::record::MAX_MAILBOX_PAYLOAD;

/// Version byte of [`SealedBox`]: a future format bumps it.
pub const SEAL_VERSION: u8 = 1;
/// HKDF salt of the box key: reach's label for mailboxes, versioned.
pub const SEAL_KDF_SALT: &[u8] = b"reach mailbox v1";
/// HKDF info of the box key (names the algorithms it is for).
pub const SEAL_KDF_INFO: &[u8] = b"reach mailbox v1 x25519 hkdf-sha256 aes-256-gcm box key";
/// The AES-GCM nonce of every box: safe because every box has its own
/// key (a fresh ephemeral X25519 key per box).
pub const SEAL_NONCE: [u8; 12] = [0; 12];
/// Domain separator of the sender's signature inside the box.
pub const SENDER_SIGNING_DOMAIN: &[u8] = b"reach-mailbox-message-v1";
/// Bytes a box adds to its data at most: the ephemeral key, the GCM tag,
/// the sender and recipient ids, the throwaway secret, the signature, and
/// postcard's length prefixes and the seq (varints), rounded up.
pub const BOX_OVERHEAD: usize = 512;
/// Largest message that is deposited in a mailbox: what fits in one
/// mailbox record with the box around it (15.5 KiB, above the 8 KiB the
/// issue asks for). A larger durable message is not deposited: it stays on
/// the direct path only.
pub const MAX_MAILBOX_MESSAGE: usize = MAX_MAILBOX_PAYLOAD - BOX_OVERHEAD;

/// A mailbox record's payload: what storers see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedBox {
    /// [`SEAL_VERSION`].
    pub version: u8,
    /// The ephemeral X25519 public key of this box.
    pub ephemeral: [u8; 32],
    /// AES-256-GCM of a postcard [`BoxContents`], tag appended.
    pub ciphertext: Vec<u8>,
}

impl SealedBox {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a payload; `None` if it is not a box of this version.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let b: SealedBox = postcard::from_bytes(payload).ok()?;
        (b.version == SEAL_VERSION).then_some(b)
    }
}

/// What is inside a [`SealedBox`] (only the recipient reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxContents {
    /// Who sent the message.
    pub sender: PeerId,
    /// Whom it is for: checked by the recipient, so a box re-addressed to
    /// another recipient's mailbox is refused.
    pub recipient: PeerId,
    /// The message's seq from `sender` to `recipient` (the outbox's).
    pub seq: u64,
    /// The message.
    pub data: Vec<u8>,
    /// The secret seed of the throwaway key that signed the DHT record.
    pub throwaway: [u8; 32],
    /// The sender's Ed25519 signature over [`sender_signing_bytes`].
    pub signature: Vec<u8>,
}

impl BoxContents {
    /// Checks the sender's signature and that the box is for `me`.
    pub fn verify(&self, me: &PeerId) -> bool {
        if self.recipient != *me {
            return false;
        }
        let Ok(sig) = <[u8; 64]>::try_from(self.signature.as_slice()) else {
            return false;
        };
        self.sender.verify(
            &sender_signing_bytes(&self.recipient, self.seq, &self.data),
            &sig,
        )
    }
}

/// The bytes the sender signs: domain label, recipient, seq, data.
pub fn sender_signing_bytes(recipient: &PeerId, seq: u64, data: &[u8]) -> Vec<u8> {
    postcard::to_allocvec(&(SENDER_SIGNING_DOMAIN, recipient, seq, data)).unwrap_or_default()
}

/// Where epoch `epoch` starts, Unix milliseconds.
pub fn epoch_start_ms(epoch: u64) -> u64 {
    epoch.saturating_mul(MAILBOX_EPOCH.as_millis() as u64)
}

/// How long one mailbox key is used: as long as a mailbox record can live,
/// so the current and the previous epoch hold every live record (two
/// lookups per fetch), while the key still changes every week.
pub const MAILBOX_EPOCH: Duration = Duration::from_secs(7 * 24 * 3600);

/// The epoch that Unix time `unix_ms` falls in.
pub fn epoch_of(unix_ms: u64) -> u64 {
    unix_ms / MAILBOX_EPOCH.as_millis() as u64
}

/// The epochs a recipient fetches at Unix time `unix_ms`, newest first:
/// the current one and the previous one (see the module docs).
pub fn epochs_to_fetch(unix_ms: u64) -> [u64; 2] {
    let now = epoch_of(unix_ms);
    [now, now.saturating_sub(1)]
}

/// The DHT key of `recipient`'s mailbox in the epoch of `unix_ms`: where a
/// sender stores a sealed message now.
pub fn deposit_key(recipient: &PeerId, unix_ms: u64) -> Key {
    Key::for_mailbox(recipient, epoch_of(unix_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use crate::dht::record::MAX_MAILBOX_TTL;

    const WEEK_MS: u64 = 7 * 24 * 3600 * 1000;

    #[test]
    fn a_record_stored_at_any_time_is_found_until_it_expires() {
        // Stored at the last millisecond of an epoch or the first, it is in
        // one of the two epochs fetched at any moment of its life.
        let who = Keypair::generate().peer_id();
        for stored in [5 * WEEK_MS, 6 * WEEK_MS - 1, 5 * WEEK_MS + 12_345] {
            let key = deposit_key(&who, stored);
            let life = MAX_MAILBOX_TTL.as_millis() as u64;
            for later in [stored, stored + life / 2, stored + life - 1] {
                let fetched = epochs_to_fetch(later).map(|e| Key::for_mailbox(&who, e));
                assert!(fetched.contains(&key), "stored {stored}, fetched {later}");
            }
        }
    }

    #[test]
    fn the_key_changes_every_epoch_and_differs_between_recipients() {
        let a = Keypair::generate().peer_id();
        let b = Keypair::generate().peer_id();
        assert_ne!(Key::for_mailbox(&a, 7), Key::for_mailbox(&a, 8));
        assert_ne!(Key::for_mailbox(&a, 7), Key::for_mailbox(&b, 7));
        assert_ne!(Key::for_mailbox(&a, 7), Key::for_peer(&a));
        assert_eq!(deposit_key(&a, 7 * WEEK_MS), Key::for_mailbox(&a, 7));
    }
}
