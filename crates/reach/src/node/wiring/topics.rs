//! Topics' place in the node: the federation and member protocols.

use std::sync::Arc;

use crate::node::Inner;
use crate::node::router::weak_handler;
use crate::topics::wire::{FED_PROTOCOL, MEMBER_PROTOCOL};

pub(in crate::node) fn plug_in(inner: &Arc<Inner>) {
    inner.router.register_builtin(
        FED_PROTOCOL,
        weak_handler(&inner.topics, |t, s| async move { t.serve_fed(s).await }),
    );
    inner.router.register_builtin(
        MEMBER_PROTOCOL,
        weak_handler(&inner.topics, |t, s| async move { t.serve_member(s).await }),
    );
}
