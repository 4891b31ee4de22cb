//! The relay's signalling protocol: one request per bidirectional QUIC
//! stream on the authenticated connection between a node and a relay, like
//! the DHT's RPCs.
//!
//! ```text
//! B (behind NAT)        relay R                    A (dialer)
//!   ── Reserve ─────────►                            
//!   ◄──────── Reserved ──                            
//!                         ◄──────── Connect{B} ──────
//!   ◄── Incoming{A, id} ──                            
//!   ── Accepted ────────►                            
//!                         ── Circuit{id} ───────────►
//!   ◄═══ relay frames (circuit id) ═══ R ═══ relay frames ═══►
//!        carrying end-to-end QUIC between A and B
//! ```
//!
//! Circuit ids are random 64-bit values chosen by the relay; the relay
//! forwards a frame only between the two addresses it bound to the circuit
//! (the addresses of A's and B's own QUIC connections to it).

use serde::{Deserialize, Serialize};

use crate::PeerId;
use crate::punch::{Introduction, PunchInfo};

/// A request to a relay, or (`Incoming`) from a relay to its client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayRequest {
    /// Reserve (or renew) a slot: "accept circuits for me". `punch` is
    /// what the client knows about its NAT, kept for coordinating punches
    /// to it (renewals keep it current).
    Reserve {
        /// The client's NAT facts and addresses.
        punch: PunchInfo,
    },
    /// Open a circuit to `target`, which must hold a reservation here.
    Connect {
        /// The reservation holder to reach.
        target: PeerId,
    },
    /// Relay to client: `from` opened circuit `circuit` to you.
    Incoming {
        /// The dialer.
        from: PeerId,
        /// The circuit's id.
        circuit: u64,
    },
    /// Cancel our reservation (leaving cleanly).
    Release,
    /// Coordinate a hole punch with `target` (which holds a reservation
    /// here): the relay answers with our [`Introduction`] and sends the
    /// target its own. `attempt` counts from 0; retries swap roles.
    Punch {
        /// The peer to punch to.
        target: PeerId,
        /// 0 for the first attempt.
        attempt: u32,
        /// What the requester knows about its own NAT.
        info: PunchInfo,
    },
    /// Relay to client: a peer asked to punch through to you.
    Introduce(Introduction),
    /// The connection over circuit `circuit` closed: drop it (only its two
    /// ends may ask). Without this a circuit would live until it idled out,
    /// and a busy peer would run into the per-peer circuit limit.
    CloseCircuit {
        /// The circuit's id.
        circuit: u64,
    },
}

/// The answer to a [`RelayRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayResponse {
    /// The reservation holds for `ttl_s` seconds; renew before then.
    Reserved {
        /// Seconds the reservation holds.
        ttl_s: u32,
    },
    /// The circuit is open: frame packets with this id.
    Circuit {
        /// The circuit's id.
        circuit: u64,
    },
    /// The client accepted an incoming circuit, or a release was done.
    Accepted,
    /// The requester's introduction of a punch.
    Introduced(Introduction),
    /// Refused; `reason` is a stable kind string ([`refusal`]).
    Refused {
        /// Why (stable kind string).
        reason: String,
    },
}

/// The stable refusal reasons a relay sends (besides a refused
/// reservation's [`RefuseReason::kind`](crate::relay::service::RefuseReason::kind)).
pub mod refusal {
    /// This node does not serve as a relay (not publicly reachable, or
    /// relaying is turned off).
    pub const NOT_A_RELAY: &str = "relay_not_serving";
    /// The target holds no reservation at this relay.
    pub const NO_RESERVATION: &str = "relay_no_reservation";
    /// The target did not accept the circuit.
    pub const TARGET_UNREACHABLE: &str = "relay_target_unreachable";
    /// Too many circuits are open.
    pub const TOO_MANY_CIRCUITS: &str = "relay_too_many_circuits";
    /// A client refuses an incoming circuit it did not expect.
    pub const NOT_RESERVED: &str = "relay_not_reserved_here";
    /// No circuit of that id with the requester as an end.
    pub const NO_SUCH_CIRCUIT: &str = "relay_no_such_circuit";
    /// Only the two ends of a circuit at this relay may punch.
    pub const PUNCH_NO_CIRCUIT: &str = "relay_punch_no_circuit";
    /// Punch requests come faster than the relay coordinates them.
    pub const PUNCH_RATE: &str = "relay_punch_rate_limited";
    /// A client refuses an introduction: no relayed connection to that
    /// peer, or no UDP.
    pub const PUNCH_UNWANTED: &str = "relay_punch_unwanted";
}
