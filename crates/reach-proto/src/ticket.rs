//! Tickets: one string that says how to reach a node, its peer id and its
//! current addresses (its relay among them), to share out of band ("how
//! to reach me"). A ticket lets a peer dial a node whose endpoint record
//! is not (yet) in the DHT, or without a DHT at all.
//!
//! Text form: `reach1` then lowercase base32 (no padding, the peer id's
//! alphabet) of a postcard encoding of the peer id and the typed
//! addresses. The `1` is the format's version. Parsing takes untrusted
//! text: bounded length and address count, a typed [`TicketError`], only
//! the canonical spelling accepted.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dht::record::{AddrKind, TypedAddr};
use crate::identity::{PeerId, base32_decode, base32_encode};

/// What every ticket starts with (the format and its version).
pub const TICKET_PREFIX: &str = "reach1";
/// Addresses a ticket carries at most: as many as an endpoint record
/// (a relay, a few direct and LAN addresses); more would only make the
/// string unwieldy to paste.
pub const MAX_TICKET_ADDRS: usize = 8;
/// Longest ticket text accepted: the prefix and the base32 of a peer id
/// and [`MAX_TICKET_ADDRS`] IPv6 relay addresses with their relays' ids,
/// with room to spare. Anything longer is refused unread.
pub const MAX_TICKET_LEN: usize = 1024;

/// A peer id and the addresses it can be reached at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The node.
    pub peer: PeerId,
    /// Where to dial it, best first (as its endpoint record lists them).
    pub addrs: Vec<TypedAddr>,
}

/// Why text is not a ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// It does not start with [`TICKET_PREFIX`].
    #[error("not a reach ticket: it must start with \"{TICKET_PREFIX}\"")]
    Prefix,
    /// Longer than [`MAX_TICKET_LEN`].
    #[error("ticket of {0} characters exceeds {MAX_TICKET_LEN}")]
    TooLong(usize),
    /// A character outside the base32 alphabet.
    #[error("ticket has {0:?} at position {1}, outside lowercase base32")]
    Character(char, usize),
    /// Not the one spelling of a ticket: base32 padding bits set, or bytes
    /// that decode but are not what the ticket encodes to.
    #[error("ticket is not in its canonical form")]
    NonCanonical,
    /// The bytes do not decode to a ticket (cut short, or extra bytes).
    #[error("ticket does not decode: {0}")]
    Malformed(String),
    /// More than [`MAX_TICKET_ADDRS`] addresses.
    #[error("ticket has more than {MAX_TICKET_ADDRS} addresses")]
    TooManyAddrs,
    /// A relay address without the relay's id (it could not be dialed).
    #[error("ticket has a relay address without its relay's id")]
    RelayWithoutId,
}

impl TicketError {
    /// Stable machine-readable name of this error kind.
    pub fn kind(&self) -> &'static str {
        match self {
            TicketError::Prefix => "ticket_prefix",
            TicketError::TooLong(_) => "ticket_too_long",
            TicketError::Character(..) => "ticket_character",
            TicketError::NonCanonical => "ticket_non_canonical",
            TicketError::Malformed(_) => "ticket_malformed",
            TicketError::TooManyAddrs => "ticket_too_many_addrs",
            TicketError::RelayWithoutId => "ticket_relay_without_id",
        }
    }
}

impl Ticket {
    /// A ticket for `peer` at `addrs` (the first [`MAX_TICKET_ADDRS`]).
    pub fn new(peer: PeerId, mut addrs: Vec<TypedAddr>) -> Ticket {
        addrs.truncate(MAX_TICKET_ADDRS);
        Ticket { peer, addrs }
    }

    /// Whether `text` looks like a ticket (rather than a bare peer id):
    /// for parsers that accept either.
    pub fn looks_like(text: &str) -> bool {
        text.starts_with(TICKET_PREFIX) && text.len() > crate::identity::PEER_ID_TEXT_LEN
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Serialising a peer id and a bounded list of plain addresses into
        // a Vec cannot fail.
        let bytes = postcard::to_stdvec(self).map_err(|_| fmt::Error)?;
        write!(f, "{TICKET_PREFIX}{}", base32_encode(&bytes))
    }
}

impl FromStr for Ticket {
    type Err = TicketError;

    fn from_str(text: &str) -> Result<Ticket, TicketError> {
        if text.len() > MAX_TICKET_LEN {
            return Err(TicketError::TooLong(text.len()));
        }
        let body = text
            .strip_prefix(TICKET_PREFIX)
            .ok_or(TicketError::Prefix)?;
        let bytes = base32_decode(body.as_bytes())
            .map_err(|(c, i)| TicketError::Character(c, i + TICKET_PREFIX.len()))?
            .ok_or(TicketError::NonCanonical)?;
        let (ticket, rest): (Ticket, _) =
            postcard::take_from_bytes(&bytes).map_err(|e| TicketError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(TicketError::Malformed(format!(
                "{} bytes after the ticket",
                rest.len()
            )));
        }
        if ticket.addrs.len() > MAX_TICKET_ADDRS {
            return Err(TicketError::TooManyAddrs);
        }
        if ticket
            .addrs
            .iter()
            .any(|a| a.kind == AddrKind::Relay && a.via.is_none())
        {
            return Err(TicketError::RelayWithoutId);
        }
        // One spelling per ticket: bytes that decode but are not what the
        // ticket encodes to (an overlong varint, say) are refused, so two
        // strings never name the same ticket (found by fuzzing).
        if ticket.to_string() != text {
            return Err(TicketError::NonCanonical);
        }
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Keypair;
    use proptest::prelude::*;

    fn ticket() -> Ticket {
        let peer = Keypair::from_secret_bytes([1; 32]).peer_id();
        let relay = Keypair::from_secret_bytes([2; 32]).peer_id();
        Ticket::new(
            peer,
            vec![
                TypedAddr {
                    kind: AddrKind::Relay,
                    addr: "203.0.113.7:4433".parse().unwrap(),
                    via: Some(relay),
                },
                TypedAddr {
                    kind: AddrKind::Direct,
                    addr: "[2001:db8::5]:4433".parse().unwrap(),
                    via: None,
                },
                TypedAddr {
                    kind: AddrKind::Lan,
                    addr: "192.168.1.5:4433".parse().unwrap(),
                    via: None,
                },
            ],
        )
    }

    #[test]
    fn a_ticket_round_trips_through_its_text() {
        let t = ticket();
        let text = t.to_string();
        assert!(text.starts_with(TICKET_PREFIX));
        assert!(Ticket::looks_like(&text));
        assert!(text.len() <= MAX_TICKET_LEN);
        assert!(
            text[TICKET_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        );
        assert_eq!(text.parse::<Ticket>(), Ok(t));
    }

    #[test]
    fn a_full_ticket_fits_the_length_limit() {
        let relay = Keypair::from_secret_bytes([2; 32]).peer_id();
        let addrs = (0..MAX_TICKET_ADDRS + 3)
            .map(|i| TypedAddr {
                kind: AddrKind::Relay,
                addr: format!("[2001:db8::{i}]:65535").parse().unwrap(),
                via: Some(relay),
            })
            .collect();
        let t = Ticket::new(ticket().peer, addrs);
        assert_eq!(t.addrs.len(), MAX_TICKET_ADDRS);
        let text = t.to_string();
        assert!(text.len() <= MAX_TICKET_LEN, "{}", text.len());
        assert_eq!(text.parse::<Ticket>(), Ok(t));
    }

    #[test]
    fn bad_text_gets_a_typed_error() {
        let text = ticket().to_string();
        let peer_id = ticket().peer.to_string();
        assert_eq!(peer_id.parse::<Ticket>(), Err(TicketError::Prefix));
        assert!(!Ticket::looks_like(&peer_id));
        let upper = text.to_uppercase();
        assert_eq!(upper.parse::<Ticket>(), Err(TicketError::Prefix));
        let mut bad = text.clone();
        bad.push('!');
        assert!(matches!(
            bad.parse::<Ticket>(),
            Err(TicketError::Character('!', _))
        ));
        let cut = &text[..text.len() - 10];
        assert!(cut.parse::<Ticket>().is_err());
        let long = format!("{TICKET_PREFIX}{}", "a".repeat(MAX_TICKET_LEN));
        assert!(matches!(
            long.parse::<Ticket>(),
            Err(TicketError::TooLong(_))
        ));
        // A relay address without its relay is refused.
        let mut t = ticket();
        t.addrs[0].via = None;
        assert_eq!(
            t.to_string().parse::<Ticket>(),
            Err(TicketError::RelayWithoutId)
        );
        for e in [TicketError::Prefix, TicketError::NonCanonical] {
            assert!(e.kind().starts_with("ticket_"));
        }
    }

    #[test]
    fn a_second_spelling_of_a_ticket_is_refused() {
        // Found by fuzzing: decodes to a ticket that prints differently.
        let other = "reach1aacwwwwwwwwwwwwwrerwwwwwrereareaeareacwwrwrwweeareaahaaaaeacreacllraiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(other.parse::<Ticket>(), Err(TicketError::NonCanonical));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "reach1[a-z2-7]{0,300}") {
            let _ = s.parse::<Ticket>();
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = s.parse::<Ticket>();
        }
    }
}
