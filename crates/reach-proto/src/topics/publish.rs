//! A member's publish window on its stream to its home: which seq to sign
//! next, what is in flight, what an answer does. Sans-IO: the driver signs,
//! writes and reads; this machine only decides.
//!
//! The home takes a member's publishes only in seq order: one that is not
//! the next seq is refused as out of order, and a refused publish leaves
//! its seq free. So the member keeps up to [`PUBLISH_WINDOW`] publishes in
//! flight (answered in the order sent); a refusal frees its seq and the
//! publishes sent behind it, refused out of order, go again in order with
//! the freed seqs (signed again by the driver): refusals leave no gap in
//! the member's seqs and take nothing twice. After a refusal the window
//! starts over at one and doubles with each publish taken, so a member
//! held at a rate limit sends one at a time.
//!
//! The driver's side: [`PublishWindow::can_send_new`] says whether a new
//! publish may go now, [`PublishWindow::next_again`] hands back one that
//! must go again first; to send one, [`PublishWindow::begin`] gives its
//! seq, then [`PublishWindow::sent`] (or [`PublishWindow::not_sent`] if
//! it could not be signed); each answer of the home goes to
//! [`PublishWindow::answer`], which says whose publish was taken or
//! refused (the caller is told) or keeps it to go again.

use std::collections::VecDeque;

/// Publishes a member has in flight to its home per topic at most (sent,
/// not answered): enough that publishes go out several to a packet and
/// the home takes them in batches instead of one per round trip; few
/// enough that a refusal costs at most this many messages signed and sent
/// again. After a refusal the window starts over at one and doubles with
/// each message taken, so a member held at a rate limit sends one at a
/// time (each refused one costs one frame, not a window of them).
pub const PUBLISH_WINDOW: usize = 32;

/// The home's answer to one publish, as far as the window cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Taken: the seq is used.
    Taken,
    /// Refused as not the next seq (it was sent behind a refused one).
    OutOfOrder,
    /// Refused for any other reason (a rate limit, …): its seq is free.
    Refused,
}

/// What an answer means for the publish it answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Taken as `seq`: tell the caller.
    Taken {
        /// Its seq.
        seq: u64,
        /// The publish.
        item: T,
    },
    /// Refused: tell the caller (its seq is free again). An out-of-order
    /// refusal with no refusal since the publish was sent is one too: the
    /// home and the member disagree on the seq, and the caller is told
    /// rather than the publish going round again.
    Refused {
        /// The seq it was sent as.
        seq: u64,
        /// The publish.
        item: T,
    },
}

/// A publish sent and not answered yet.
#[derive(Debug)]
struct Sent<T> {
    seq: u64,
    item: T,
    /// Refusals when it was sent: refused out of order with no refusal
    /// since, the home and this member disagree on the seq.
    refusals_at_send: u64,
}

/// One member stream's publishes (`T`: what the driver keeps per publish,
/// e.g. its data and where its outcome goes).
#[derive(Debug)]
pub struct PublishWindow<T> {
    next_seq: u64,
    in_flight: VecDeque<Sent<T>>,
    /// Refused out of order (sent behind a refused one): sent again, in
    /// the order first published, before anything new.
    again: VecDeque<T>,
    /// Where in `again` the next publish refused out of order goes: after
    /// those refused out of order since the last refusal (sent before it)
    /// and before those still waiting from an earlier refusal (published
    /// after it, since everything in flight was published before whatever
    /// waits).
    again_at: usize,
    /// Publishes in flight at most now (1 ..= [`PUBLISH_WINDOW`]).
    window: usize,
    /// Refusals (other than out of order) so far.
    refusals: u64,
}

impl<T> PublishWindow<T> {
    /// A window whose first publish is `first_seq` (one above the highest
    /// the home says it has seen of this member, or this member sent),
    /// [`PUBLISH_WINDOW`] wide.
    pub fn new(first_seq: u64) -> Self {
        PublishWindow {
            next_seq: first_seq.max(1),
            in_flight: VecDeque::new(),
            again: VecDeque::new(),
            again_at: 0,
            window: PUBLISH_WINDOW,
            refusals: 0,
        }
    }

    /// Whether a new publish may be sent now: the window has room and
    /// nothing waits to go again.
    pub fn can_send_new(&self) -> bool {
        self.again.is_empty() && self.in_flight.len() < self.window
    }

    /// A publish that must go again (in order, before anything new), if
    /// the window has room for it.
    pub fn next_again(&mut self) -> Option<T> {
        if self.in_flight.len() < self.window {
            let item = self.again.pop_front()?;
            self.again_at = self.again_at.saturating_sub(1);
            Some(item)
        } else {
            None
        }
    }

    /// The seq to sign the publish being sent with; it counts as handed
    /// out (see [`Self::last_handed_out`]) from now on.
    pub fn begin(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The publish of [`Self::begin`]'s `seq` could not be signed and was
    /// not sent: the seq is free again.
    pub fn not_sent(&mut self, seq: u64) {
        if seq + 1 == self.next_seq {
            self.next_seq = seq;
        }
    }

    /// The publish `item` went out as `seq` (from [`Self::begin`]).
    pub fn sent(&mut self, seq: u64, item: T) {
        self.in_flight.push_back(Sent {
            seq,
            item,
            refusals_at_send: self.refusals,
        });
    }

    /// The home's answer to the publish sent as `seq` (answers come in the
    /// order sent; one that does not answer the oldest in flight is
    /// ignored). `None`: nothing to tell (ignored, or kept to go again).
    pub fn answer(&mut self, seq: u64, answer: Answer) -> Option<Outcome<T>> {
        if self.in_flight.front()?.seq != seq {
            return None;
        }
        let sent = self.in_flight.pop_front()?;
        match answer {
            Answer::Taken => {
                self.window = (self.window * 2).min(PUBLISH_WINDOW);
                Some(Outcome::Taken {
                    seq,
                    item: sent.item,
                })
            }
            Answer::OutOfOrder if sent.refusals_at_send < self.refusals => {
                // Not behind the publishes still waiting from an earlier
                // refusal: they were published after it. Found by the
                // model-home test (publishes taken out of the callers'
                // order after two refusals close together).
                let at = self.again_at.min(self.again.len());
                self.again.insert(at, sent.item);
                self.again_at = at + 1;
                None
            }
            Answer::OutOfOrder | Answer::Refused => {
                // Its seq is free again: the next publish sent takes it
                // (those in flight behind it are refused out of order and
                // go again, renumbered, in order).
                self.next_seq = self.next_seq.min(seq);
                self.refusals += 1;
                self.window = 1;
                // What it answers next was published before what waits.
                self.again_at = 0;
                Some(Outcome::Refused {
                    seq,
                    item: sent.item,
                })
            }
        }
    }

    /// The highest seq handed out (0: none): a publish in flight may have
    /// been taken, so a later stream numbers above it.
    pub fn last_handed_out(&self) -> u64 {
        self.next_seq - 1
    }

    /// Publishes in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Publishes in flight at most now.
    pub fn window(&self) -> usize {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends what the window allows from `queue` (again first), returning
    /// (seq, item) in the order sent.
    fn pump(w: &mut PublishWindow<u32>, queue: &mut VecDeque<u32>) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        loop {
            let item = match w.next_again() {
                Some(i) => i,
                None if w.can_send_new() => match queue.pop_front() {
                    Some(i) => i,
                    None => break,
                },
                None => break,
            };
            let seq = w.begin();
            w.sent(seq, item);
            out.push((seq, item));
        }
        out
    }

    #[test]
    fn a_fresh_window_sends_32_consecutive_seqs_then_waits() {
        let mut w = PublishWindow::new(8);
        let mut q: VecDeque<u32> = (0..40).collect();
        let sent = pump(&mut w, &mut q);
        assert_eq!(sent.len(), PUBLISH_WINDOW);
        assert!(sent.iter().zip(8..).all(|((s, _), want)| *s == want));
        assert!(!w.can_send_new());
        // Each answer makes room for one more.
        assert_eq!(
            w.answer(8, Answer::Taken),
            Some(Outcome::Taken { seq: 8, item: 0 })
        );
        assert_eq!(pump(&mut w, &mut q), vec![(40, 32)]);
        assert_eq!(w.last_handed_out(), 40);
    }

    #[test]
    fn a_refusal_frees_its_seq_and_what_followed_goes_again_renumbered_in_order() {
        let mut w = PublishWindow::new(1);
        let mut q: VecDeque<u32> = (10..15).collect();
        assert_eq!(pump(&mut w, &mut q).len(), 5); // seqs 1..=5
        assert!(matches!(
            w.answer(1, Answer::Taken),
            Some(Outcome::Taken { .. })
        ));
        assert_eq!(
            w.answer(2, Answer::Refused),
            Some(Outcome::Refused { seq: 2, item: 11 })
        );
        assert_eq!(w.window(), 1);
        for seq in 3..=5 {
            assert_eq!(w.answer(seq, Answer::OutOfOrder), None, "goes again");
        }
        q.push_back(99);
        // One at a time, with the freed seqs, before anything new.
        assert_eq!(pump(&mut w, &mut q), vec![(2, 12)]);
        assert!(w.answer(2, Answer::Taken).is_some());
        assert_eq!(w.window(), 2);
        assert_eq!(pump(&mut w, &mut q), vec![(3, 13), (4, 14)]);
        assert!(w.answer(3, Answer::Taken).is_some());
        assert!(w.answer(4, Answer::Taken).is_some());
        assert_eq!(w.window(), 8);
        assert_eq!(pump(&mut w, &mut q), vec![(5, 99)]);
    }

    #[test]
    fn a_second_refusal_while_publishes_wait_keeps_them_in_the_callers_order() {
        let mut w = PublishWindow::new(1);
        let mut q: VecDeque<u32> = (0..6).collect();
        assert_eq!(pump(&mut w, &mut q).len(), 6); // seqs 1..=6
        assert!(w.answer(1, Answer::Refused).is_some());
        for seq in 2..=6 {
            assert_eq!(w.answer(seq, Answer::OutOfOrder), None);
        }
        // Items 1..=5 wait; 1 goes, is taken, then 2 and 3 go.
        assert_eq!(pump(&mut w, &mut q), vec![(1, 1)]);
        assert!(w.answer(1, Answer::Taken).is_some());
        assert_eq!(pump(&mut w, &mut q), vec![(2, 2), (3, 3)]);
        // 2 is refused and 3, sent behind it, goes again: before 4 and 5,
        // which were published after it.
        assert!(w.answer(2, Answer::Refused).is_some());
        assert_eq!(w.answer(3, Answer::OutOfOrder), None);
        assert_eq!(pump(&mut w, &mut q), vec![(2, 3)]);
        assert!(w.answer(2, Answer::Taken).is_some());
        assert_eq!(pump(&mut w, &mut q), vec![(3, 4), (4, 5)]);
    }

    #[test]
    fn out_of_order_with_no_refusal_since_is_told_to_the_caller() {
        let mut w = PublishWindow::new(5);
        let mut q: VecDeque<u32> = (0..2).collect();
        pump(&mut w, &mut q);
        // The home expected another seq: a disagreement, not a resend.
        assert_eq!(
            w.answer(5, Answer::OutOfOrder),
            Some(Outcome::Refused { seq: 5, item: 0 })
        );
        assert_eq!(w.last_handed_out(), 4, "its seq is free");
    }

    #[test]
    fn an_answer_to_anything_but_the_oldest_in_flight_is_ignored() {
        let mut w = PublishWindow::new(1);
        let mut q: VecDeque<u32> = (0..3).collect();
        pump(&mut w, &mut q);
        assert_eq!(w.answer(2, Answer::Taken), None);
        assert_eq!(w.answer(7, Answer::Refused), None);
        assert_eq!(w.in_flight(), 3);
        assert!(w.answer(1, Answer::Taken).is_some());
    }

    #[test]
    fn a_publish_not_signed_gives_its_seq_back() {
        let mut w: PublishWindow<u32> = PublishWindow::new(3);
        let seq = w.begin();
        w.not_sent(seq);
        assert_eq!(w.begin(), 3);
        assert_eq!(w.last_handed_out(), 3);
    }

    /// A home as the runtime's: takes a member's publishes in seq order,
    /// refuses one past the next expected as out of order, and refuses
    /// the others by `refuse` (a rate limit), which leaves the seq free.
    struct Home {
        expected: Option<u64>,
        taken: Vec<(u64, u32)>,
    }

    impl Home {
        fn take(&mut self, seq: u64, item: u32, refuse: bool) -> Answer {
            if self.expected.is_some_and(|e| seq > e) {
                return Answer::OutOfOrder;
            }
            if refuse {
                self.expected.get_or_insert(seq);
                return Answer::Refused;
            }
            self.expected = Some(self.expected.map_or(seq + 1, |e| e.max(seq + 1)));
            self.taken.push((seq, item));
            Answer::Taken
        }
    }

    #[test]
    fn random_refusals_leave_no_gap_no_duplicate_no_reorder_and_every_caller_answered() {
        // A small deterministic generator: same cases every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _case in 0..200 {
            let first = 1 + rand(100);
            let total = 1 + rand(300) as u32;
            let refuse_per_1000 = rand(600);
            let mut w = PublishWindow::new(first);
            let mut home = Home {
                expected: None,
                taken: Vec::new(),
            };
            let mut q: VecDeque<u32> = (0..total).collect();
            let mut wire: VecDeque<(u64, u32)> = VecDeque::new();
            let mut back: VecDeque<(u64, Answer)> = VecDeque::new();
            let (mut ok, mut refused) = (Vec::new(), 0u32);
            let mut steps = 0;
            while ok.len() as u32 + refused < total {
                steps += 1;
                assert!(steps < 100_000, "stuck");
                wire.extend(pump(&mut w, &mut q));
                assert!(w.in_flight() <= PUBLISH_WINDOW);
                // The home reads part of what arrived.
                for _ in 0..=rand(wire.len() as u64 + 1) {
                    let Some((seq, item)) = wire.pop_front() else {
                        break;
                    };
                    back.push_back((seq, home.take(seq, item, rand(1000) < refuse_per_1000)));
                }
                // The member reads part of the answers.
                for _ in 0..=rand(back.len() as u64 + 1) {
                    let Some((seq, a)) = back.pop_front() else {
                        break;
                    };
                    match w.answer(seq, a) {
                        Some(Outcome::Taken { seq, item }) => ok.push((seq, item)),
                        Some(Outcome::Refused { .. }) => refused += 1,
                        None => {}
                    }
                }
            }
            // The home took consecutive seqs from the first, each item at
            // most once, in the order the callers published them.
            let seqs: Vec<u64> = home.taken.iter().map(|(s, _)| *s).collect();
            let want: Vec<u64> = (first..first + seqs.len() as u64).collect();
            assert_eq!(seqs, want, "no gap");
            let items: Vec<u32> = home.taken.iter().map(|(_, i)| *i).collect();
            assert!(
                items.windows(2).all(|p| p[0] < p[1]),
                "once, in the callers' order: {items:?}"
            );
            assert_eq!(ok, home.taken, "each caller told what the home took");
            assert_eq!(w.last_handed_out(), first + seqs.len() as u64 - 1);
        }
    }
}
