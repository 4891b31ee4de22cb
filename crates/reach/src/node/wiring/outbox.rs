//! Durable delivery's place in the node: the `reach/outbox/1` protocol,
//! and the peer table's path events (a connection that comes up makes the
//! peer's pending messages due at once).

use std::sync::{Arc, Weak};

use crate::node::Inner;
use crate::node::router::weak_handler;
use crate::peers::ConnectionObserver;

pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    inner.router.register_builtin(
        reach_proto::outbox::PROTOCOL,
        weak_handler(
            &inner.durable,
            |d, s| async move { d.serve_stream(s).await },
        ),
    );
    inner
        .peers
        .observe(Arc::downgrade(&inner.durable) as Weak<dyn ConnectionObserver>);
}
