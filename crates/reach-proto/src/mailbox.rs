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

use std::time::Duration;

use crate::PeerId;
use crate::dht::Key;

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
