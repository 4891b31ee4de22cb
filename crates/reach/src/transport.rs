//! QUIC transport settings shared by every reach connection.

use std::sync::Arc;
use std::time::Duration;

use quinn::{TransportConfig, VarInt};

/// Keep-alive interval: comfortably below the ~30 s UDP mapping timeout of
/// common NATs, so an idle connection keeps its NAT binding open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A connection with no traffic (not even keep-alives) for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Concurrent unidirectional streams a peer may open: each message is one,
/// so this bounds messages in flight per connection.
pub const MAX_CONCURRENT_UNI_STREAMS: u32 = 1024;
/// Concurrent application bidirectional streams a peer may open.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 256;
/// How long a dial may take before it is abandoned.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport configuration every reach connection uses. Public so that a
/// benchmark can give a raw-quinn baseline the very same settings.
pub fn transport_config() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_UNI_STREAMS));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_BIDI_STREAMS));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // IDLE_TIMEOUT is far below VarInt's range, so this cannot fail.
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    Arc::new(t)
}
