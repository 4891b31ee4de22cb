//! NAT discovery's place in the node: it answers peers' filter-probe
//! requests (punch packets reach punching through [`crate::nat::PunchPackets`],
//! plugged in by [`super::punch`]).

use std::sync::Arc;

use reach_proto::wire::envelope::protocols;

use crate::node::Inner;
use crate::node::router::weak_handler;

/// Plugs NAT discovery in: the filter-probe protocol's handler.
pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    inner.router.register_builtin(
        protocols::FILTER_PROBE,
        weak_handler(
            &inner.nat,
            |nat, s| async move { nat.serve_filter_probe(s) },
        ),
    );
}
