//! Messaging's place in the node: the `reach/stream` protocol, the peers'
//! unidirectional streams (messages), and the connection events it queues
//! for the application (it observes the peers).

use std::sync::{Arc, Weak};

use reach_proto::wire::envelope::protocols;

use crate::node::Inner;
use crate::node::router::weak_handler;
use crate::peers::ConnectionObserver;

/// Plugs messaging in (after the other connection observers: the
/// application hears of a connection once the node has reacted to it).
pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    inner.router.register_builtin(
        protocols::STREAM,
        weak_handler(
            &inner.messaging,
            |m, s| async move { m.serve_stream(s).await },
        ),
    );
    inner
        .peers
        .observe(Arc::downgrade(&inner.messaging) as Weak<dyn ConnectionObserver>);
    let messaging = Arc::downgrade(&inner.messaging);
    inner
        .peers
        .set_uni_handler(Arc::new(move |peer, stream| match messaging.upgrade() {
            Some(m) => Box::pin(async move { m.receive(peer, stream).await }),
            None => Box::pin(async {}),
        }));
}
