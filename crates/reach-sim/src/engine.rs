//! The event queue and virtual clock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// Virtual time since the start of a run.
pub type SimTime = Duration;

struct Entry<E> {
    at: SimTime,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A queue of future events. Events at the same instant pop in the order
/// they were scheduled, which keeps runs deterministic.
pub struct EventQueue<E> {
    now: SimTime,
    seq: u64,
    heap: BinaryHeap<Reverse<Entry<E>>>,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            now: Duration::ZERO,
            seq: 0,
            heap: BinaryHeap::new(),
        }
    }
}

impl<E> EventQueue<E> {
    /// The current virtual time: that of the last popped event.
    pub fn now(&self) -> SimTime {
        self.now
    }

    /// Schedules `event` `after` from now.
    pub fn schedule(&mut self, after: Duration, event: E) {
        let seq = self.seq;
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            at: self.now + after,
            seq,
            event,
        }));
    }

    /// Advances the clock to the next event and returns it.
    pub fn pop(&mut self) -> Option<(SimTime, E)> {
        let Reverse(e) = self.heap.pop()?;
        self.now = e.at;
        Some((e.at, e.event))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_time_then_insertion_order() {
        let mut q = EventQueue::default();
        q.schedule(Duration::from_millis(5), "late");
        q.schedule(Duration::from_millis(1), "first");
        q.schedule(Duration::from_millis(1), "second");
        assert_eq!(q.pop(), Some((Duration::from_millis(1), "first")));
        assert_eq!(q.pop(), Some((Duration::from_millis(1), "second")));
        q.schedule(Duration::from_millis(1), "relative");
        assert_eq!(q.pop(), Some((Duration::from_millis(2), "relative")));
        assert_eq!(q.pop(), Some((Duration::from_millis(5), "late")));
        assert_eq!(q.pop(), None);
        assert_eq!(q.now(), Duration::from_millis(5));
    }
}
