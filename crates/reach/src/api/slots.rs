//! Places for the control API's long-lived streams.
//!
//! A server-sent-events stream (`/v1/recv`, `/v1/topics/sub`, the
//! dashboard's) holds one of the API's connections for as long as it
//! lasts. Each kind has its own cap, so no kind can take every connection
//! (the CLI's plain requests must still get in) or starve the others. A
//! stream past its cap is refused with a JSON 503 `busy`. A client that
//! went away gives its place back when the server next writes to it (an
//! event, or the SSE keep-alive comment).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The places of one kind of stream. Cheap to clone (clones share them).
#[derive(Clone, Debug)]
pub(crate) struct StreamSlots {
    taken: Arc<AtomicUsize>,
    max: usize,
}

impl StreamSlots {
    /// `max` places.
    pub(crate) fn new(max: usize) -> Self {
        StreamSlots {
            taken: Arc::default(),
            max,
        }
    }

    /// Takes a place, if one is free; it is given back when the
    /// [`StreamSlot`] is dropped (with the stream that holds it).
    pub(crate) fn admit(&self) -> Option<StreamSlot> {
        let before = self.taken.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot(self.taken.clone());
        (before < self.max).then_some(slot)
    }
}

/// One place, given back when dropped.
pub(crate) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_capped_and_given_back_when_dropped() {
        let slots = StreamSlots::new(2);
        let a = slots.admit().expect("first");
        let b = slots.admit().expect("second");
        assert!(slots.admit().is_none(), "over the cap");
        drop(a);
        let c = slots.admit().expect("a freed place");
        assert!(slots.admit().is_none());
        drop((b, c));
        assert!(slots.clone().admit().is_some(), "clones share the places");
    }
}
