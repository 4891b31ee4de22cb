//! The coordinator's side of a punch: a relay introduces the two ends of a
//! circuit it carries (see reach-proto's `punch::coordinate`).

use std::net::SocketAddr;

use reach_proto::PeerId;
use reach_proto::punch::{PunchInfo, Technique};
use reach_proto::relay::rpc::{RelayRequest, RelayResponse, refusal};

use super::{PunchRuntime, lock};
use crate::relay::client;
use crate::vaddr::is_virtual;

/// Introductions a coordinator hands out per second at most (every one
/// makes two peers send packets).
pub const INTRODUCTIONS_PER_SEC: u32 = 50;

impl PunchRuntime {
    /// The coordinator's side: `peer` (at `remote`) asks to punch through to
    /// `target`, which holds a reservation here.
    pub(crate) async fn coordinate(
        &self,
        peer: PeerId,
        remote: SocketAddr,
        target: PeerId,
        attempt: u32,
        info: PunchInfo,
    ) -> RelayResponse {
        use reach_proto::punch::coordinate::{Party, introduce};
        let refused = |reason: &str| RelayResponse::Refused {
            reason: reason.into(),
        };
        if !self.relay.is_serving() || is_virtual(&remote) {
            return refused(refusal::NOT_A_RELAY);
        }
        if !self.relay.paths.has_reservation(&target) {
            return refused(refusal::NO_RESERVATION);
        }
        // Only the two ends of a circuit here may punch: nobody else learns
        // the target's address or spends the introduction budget on it.
        if !self.relay.paths.has_circuit_between(&peer, &target) {
            return refused(refusal::PUNCH_NO_CIRCUIT);
        }
        let (Some(requester_conn), Some(target_conn)) =
            (self.peers.live(&peer), self.peers.live(&target))
        else {
            return refused(refusal::TARGET_UNREACHABLE);
        };
        let now = tokio::time::Instant::now();
        if !lock(&self.introductions).allow(now) {
            return refused(refusal::PUNCH_RATE);
        }
        let Ok(id) = crate::util::random_u64() else {
            return refused(refusal::PUNCH_RATE);
        };
        let requester = Party {
            peer,
            info,
            observed: remote,
            rtt: requester_conn.rtt(),
        };
        let target_party = Party {
            peer: target,
            info: self.info_of(&target),
            observed: target_conn.remote_address(),
            rtt: target_conn.rtt(),
        };
        let (for_requester, for_target) = introduce(id, &requester, &target_party, attempt);
        if for_requester.technique != Technique::StayRelayed {
            // Both introductions leave now; the fire delays absorb the
            // difference in path lengths.
            self.core.spawn(async move {
                let _ = tokio::time::timeout(
                    client::RELAY_RPC_TIMEOUT,
                    client::rpc(&target_conn, RelayRequest::Introduce(for_target)),
                )
                .await;
            });
        }
        tracing::debug!(from = %peer, to = %target, technique = for_requester.technique.name(), "introduced");
        RelayResponse::Introduced(for_requester)
    }
}
