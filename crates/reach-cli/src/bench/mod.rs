//! `reach bench …`: measurements that print JSON, one file per benchmark.

pub mod connect;
pub mod flood;
pub mod outbox;
pub mod relay;
pub mod topics;
pub mod topics_flood;
pub mod topics_forward;

pub use connect::connect;
pub use flood::flood;
pub use outbox::outbox;
pub use relay::relay;
pub use topics::topics;

/// The peer id and address a `reach node` process prints as it starts
/// (`peer id …`, `listening … (udp)`), read from its stdout lines in `rx`
/// within `within`; `who` names the process in the error.
pub(crate) fn node_identity(
    rx: &std::sync::mpsc::Receiver<String>,
    within: std::time::Duration,
    who: &str,
) -> anyhow::Result<(reach::PeerId, std::net::SocketAddr)> {
    use anyhow::Context;
    let (mut peer, mut addr) = (None, None);
    let end = std::time::Instant::now() + within;
    while peer.is_none() || addr.is_none() {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .with_context(|| format!("{who} did not print its id and address"))?;
        if let Some(p) = line.strip_prefix("peer id") {
            peer = Some(p.trim().parse::<reach::PeerId>()?);
        } else if let Some(a) = line.strip_prefix("listening") {
            let a = a.trim().trim_end_matches("(udp)").trim();
            addr = Some(a.parse::<std::net::SocketAddr>()?);
        }
    }
    Ok((peer.context("no peer id")?, addr.context("no address")?))
}
