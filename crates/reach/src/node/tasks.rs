//! The node's tasks and how they stop.
//!
//! Two kinds of task run on a node:
//!
//! - **Services** ([`TaskSet::spawn`]): accept loops, per-connection
//!   readers, maintenance timers, request handlers. They hold nothing that
//!   would be lost if they stopped at any await point, so they are dropped
//!   the moment shutdown begins.
//! - **Flushing tasks** ([`TaskSet::spawn_flushing`]): work that must not be
//!   cut mid-write (a store on disk, an answer half sent). They see
//!   [`TaskSet::stopping`] fire, get up to a deadline to finish, and only
//!   then are aborted.
//!
//! Spawning is O(1): finished tasks leave the set by themselves (a
//! [`TaskTracker`] counts them), unlike a list of handles that has to be
//! swept on every spawn.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long [`crate::Node::shutdown`] lets flushing tasks finish before
/// aborting them: long enough for a write to a local disk or one round
/// trip to a peer, short enough that stopping a node stays quick.
pub const SHUTDOWN_FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// How long a stop waits, once everything is told to stop, for the tasks
/// to be dropped: a cancelled task ends at its next poll, so this bounds
/// only a task stuck in synchronous work. Until they are dropped they may
/// hold files (the outbox) the next node on the data dir needs.
pub const SHUTDOWN_DROP_DEADLINE: Duration = Duration::from_secs(1);

/// What a graceful stop found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StopReport {
    /// Every flushing task finished within the deadline.
    pub flushed: bool,
    /// Every task was dropped within [`SHUTDOWN_DROP_DEADLINE`] after.
    pub dropped: bool,
}

/// The node's tasks: spawn, signal, wait, abort.
#[derive(Default)]
pub(crate) struct TaskSet {
    tracker: TaskTracker,
    /// Fires when shutdown begins: services stop, flushing tasks wind up.
    stop: CancellationToken,
    /// Fires when the flush deadline has passed: everything stops.
    abort: CancellationToken,
    /// Flushing tasks still running.
    flushing: TaskTracker,
}

// The flushing half is the seam the durable outbox (issue #16) stops
// through; until it lands only this module's tests use it.
#[allow(dead_code)]
impl TaskSet {
    /// Runs a service until it ends by itself or shutdown begins.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// Runs a task that must be allowed to finish its work: at shutdown it
    /// sees [`Self::stopping`] fire and has until the flush deadline.
    pub fn spawn_flushing(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let abort = self.abort.clone();
        let task = async move {
            tokio::select! {
                biased;
                _ = abort.cancelled() => {}
                _ = fut => {}
            }
        };
        self.tracker.spawn(self.flushing.track_future(task));
    }

    /// A token that fires when shutdown begins: what a flushing task
    /// watches to know it should finish up.
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Signals shutdown, waits up to `deadline` for flushing tasks to
    /// finish, then aborts whatever still runs and waits (up to
    /// [`SHUTDOWN_DROP_DEADLINE`]) until every task is gone, with what it
    /// held.
    pub async fn stop(&self, deadline: Duration) -> StopReport {
        self.stop.cancel();
        self.tracker.close();
        self.flushing.close();
        let flushed = tokio::time::timeout(deadline, self.flushing.wait())
            .await
            .is_ok();
        self.abort.cancel();
        let dropped = tokio::time::timeout(SHUTDOWN_DROP_DEADLINE, self.tracker.wait())
            .await
            .is_ok();
        StopReport { flushed, dropped }
    }

    /// Stops everything at once (the last handle to the node was dropped:
    /// nobody is left to wait for a flush).
    pub fn abort(&self) {
        self.stop.cancel();
        self.abort.cancel();
        self.tracker.close();
        self.flushing.close();
    }

    /// Tasks still running (services and flushing tasks).
    pub fn len(&self) -> usize {
        self.tracker.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A flushing task that writes `chunks` chunks, one per `gap`, once
    /// shutdown begins; counts what it wrote.
    fn writer(set: &TaskSet, chunks: usize, gap: Duration) -> Arc<AtomicUsize> {
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        let stopping = set.stopping();
        set.spawn_flushing(async move {
            stopping.cancelled().await;
            for _ in 0..chunks {
                tokio::time::sleep(gap).await;
                w.fetch_add(1, Ordering::SeqCst);
            }
        });
        written
    }

    #[tokio::test(start_paused = true)]
    async fn a_flushing_task_finishes_its_write_before_the_deadline() {
        let set = TaskSet::default();
        let written = writer(&set, 4, Duration::from_millis(300));
        let report = set.stop(SHUTDOWN_FLUSH_DEADLINE).await;
        assert!(report.flushed);
        assert_eq!(written.load(Ordering::SeqCst), 4, "the whole write landed");
        assert_eq!(set.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_past_the_deadline_is_aborted() {
        let set = TaskSet::default();
        let written = writer(&set, 10, Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        let report = set.stop(SHUTDOWN_FLUSH_DEADLINE).await;
        assert!(!report.flushed);
        assert!(report.dropped);
        assert_eq!(started.elapsed(), SHUTDOWN_FLUSH_DEADLINE);
        // Gone by the time stop returned: nothing more is written.
        assert_eq!(set.len(), 0);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(written.load(Ordering::SeqCst), 6, "cut at the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn services_stop_at_once_and_do_not_hold_shutdown() {
        let set = TaskSet::default();
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        // What a service holds (say, a file's handle) is let go of by the
        // time stop returns: the next node on the data dir may need it.
        let held = Arc::new(());
        let h = held.clone();
        set.spawn(async move {
            let _h = h;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let started = tokio::time::Instant::now();
        let report = set.stop(SHUTDOWN_FLUSH_DEADLINE).await;
        assert!(report.flushed && report.dropped);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(Arc::strong_count(&held), 1, "the service let go");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 2);
        assert_eq!(set.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn abort_stops_flushing_tasks_too() {
        let set = TaskSet::default();
        let written = writer(&set, 4, Duration::from_millis(300));
        set.abort();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(written.load(Ordering::SeqCst), 0);
        assert_eq!(set.len(), 0);
    }
}
