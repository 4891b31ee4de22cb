//! The client side of the non-QUIC datagrams: address probes, filtering
//! tests and STUN binding requests, each retried until answered; the
//! answers arrive through [`super::datagrams`].

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reach_proto::wire::datagram::{ControlPacket, FilterVia, PROBE_ATTEMPTS, PROBE_RETRY_AFTER};
use reach_proto::wire::stun;
use tokio::sync::oneshot;

use super::Nat;
use crate::error::{Error, Result};
use crate::util::random_u64;

/// Outstanding requests of one kind this node waits on at most.
pub const MAX_PENDING: usize = 256;

/// One waiting request: who may answer, and where the (sender, value)
/// answer goes.
type Waiter = (
    Option<SocketAddr>,
    oneshot::Sender<(SocketAddr, SocketAddr)>,
);

/// Requests this node sent that await an answer, by id. The answer must
/// come from `expect_from` when set.
pub(crate) struct Waiters<K> {
    map: Mutex<HashMap<K, Waiter>>,
}

impl<K> Default for Waiters<K> {
    fn default() -> Self {
        Waiters {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Copy> Waiters<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Waiter>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(
        &self,
        key: K,
        expect_from: Option<SocketAddr>,
    ) -> Result<oneshot::Receiver<(SocketAddr, SocketAddr)>> {
        let mut m = self.lock();
        if m.len() >= MAX_PENDING {
            return Err(Error::Config(format!(
                "too many requests in flight (limit {MAX_PENDING})"
            )));
        }
        let (tx, rx) = oneshot::channel();
        m.insert(key, (expect_from, tx));
        Ok(rx)
    }

    /// Completes the waiter for `key` with (sender, value) if `from` is
    /// allowed to answer it.
    /// Returns whether an answer was expected (only those are believed).
    pub(super) fn complete(&self, key: K, from: SocketAddr, value: SocketAddr) -> bool {
        let mut m = self.lock();
        if m.get(&key)
            .is_some_and(|(e, _)| e.is_none_or(|e| e == from))
            && let Some((_, tx)) = m.remove(&key)
        {
            let _ = tx.send((from, value));
            return true;
        }
        false
    }

    fn cancel(&self, key: K) {
        self.lock().remove(&key);
    }
}

/// All the kinds of waiters.
#[derive(Default)]
pub(crate) struct PendingProbes {
    pub probes: Waiters<u64>,
    pub filter: Waiters<u64>,
    pub stun: Waiters<stun::TransactionId>,
}

impl Nat {
    /// Sends `packet` to `to` up to [`PROBE_ATTEMPTS`] times until `rx` fires.
    async fn retry_until<T>(
        &self,
        to: SocketAddr,
        packet: &[u8],
        mut rx: oneshot::Receiver<T>,
        wait: Duration,
    ) -> Option<T> {
        for _ in 0..PROBE_ATTEMPTS {
            let _ = self.core.socket.send_datagram(to, packet);
            match tokio::time::timeout(wait, &mut rx).await {
                Ok(Ok(v)) => return Some(v),
                Ok(Err(_)) => return None,
                Err(_) => continue,
            }
        }
        None
    }

    /// Asks `addr` which address it sees us at.
    pub(crate) async fn probe(self: &Arc<Self>, addr: SocketAddr) -> Result<SocketAddr> {
        let pending = &self.pending.probes;
        let nonce = random_u64()?;
        let rx = pending.register(nonce, Some(addr))?;
        let packet = ControlPacket::Probe { nonce }.encode();
        let got = self.retry_until(addr, &packet, rx, PROBE_RETRY_AFTER).await;
        pending.cancel(nonce);
        got.map(|(_, observed)| observed)
            .ok_or(Error::Timeout("address probe"))
    }

    /// Runs one filtering test through `helper`: whether an unsolicited probe
    /// sent as `via` reaches us. `Ok(false)` when none arrived in time.
    pub(crate) async fn filter_test(
        self: &Arc<Self>,
        helper: SocketAddr,
        via: FilterVia,
        exclude: Vec<std::net::IpAddr>,
    ) -> Result<bool> {
        Ok(self
            .filter_probe_source(helper, via, exclude)
            .await?
            .is_some())
    }

    /// Like [`filter_test`], returning where the probe came from.
    pub(crate) async fn filter_probe_source(
        self: &Arc<Self>,
        helper: SocketAddr,
        via: FilterVia,
        exclude: Vec<std::net::IpAddr>,
    ) -> Result<Option<SocketAddr>> {
        let pending = &self.pending.filter;
        let nonce = random_u64()?;
        let rx = pending.register(nonce, None)?;
        let packet = ControlPacket::FilterTest {
            nonce,
            via,
            exclude,
        }
        .encode();
        let got = self
            .retry_until(helper, &packet, rx, PROBE_RETRY_AFTER)
            .await;
        pending.cancel(nonce);
        Ok(got.map(|(from, _)| from))
    }

    /// Asks the STUN server at `server` for our reflexive address.
    pub(crate) async fn stun_binding(self: &Arc<Self>, server: SocketAddr) -> Result<SocketAddr> {
        let pending = &self.pending.stun;
        let mut tx = [0u8; 12];
        getrandom::fill(&mut tx).map_err(|e| Error::Config(format!("random: {e}")))?;
        let rx = pending.register(tx, Some(server))?;
        let packet = stun::binding_request(tx);
        let got = self
            .retry_until(server, &packet, rx, PROBE_RETRY_AFTER)
            .await;
        pending.cancel(tx);
        got.map(|(_, mapped)| mapped)
            .ok_or(Error::Timeout("STUN binding request"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_the_expected_sender_completes_a_request() {
        let w: Waiters<u64> = Waiters::default();
        let mut rx = w.register(7, Some(sa("198.51.100.1:4433"))).unwrap();
        assert!(!w.complete(7, sa("198.51.100.9:4433"), sa("203.0.113.2:1")));
        assert!(!w.complete(8, sa("198.51.100.1:4433"), sa("203.0.113.2:1")));
        assert!(rx.try_recv().is_err());
        assert!(w.complete(7, sa("198.51.100.1:4433"), sa("203.0.113.2:1")));
        assert_eq!(
            rx.try_recv().unwrap(),
            (sa("198.51.100.1:4433"), sa("203.0.113.2:1"))
        );
        assert!(
            !w.complete(7, sa("198.51.100.1:4433"), sa("203.0.113.2:1")),
            "once"
        );
    }

    #[test]
    fn requests_in_flight_are_bounded() {
        let w: Waiters<u64> = Waiters::default();
        let held: Vec<_> = (0..MAX_PENDING as u64)
            .map(|k| w.register(k, None).unwrap())
            .collect();
        assert!(w.register(u64::MAX, None).is_err());
        w.cancel(0);
        assert!(w.register(u64::MAX, None).is_ok());
        drop(held);
    }
}
