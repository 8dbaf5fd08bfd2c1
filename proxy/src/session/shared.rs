//! What every session of a running proxy shares: the running config, the
//! metrics, the drain signals, the count of sessions and the feed of
//! finished ones. The server owns it; sessions only read it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::broadcast;

use super::outcome::Reason;
use super::record::SessionRecord;
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// State every session shares.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub drain: Drain,
    active: AtomicUsize,
    /// Refused connections still being told FAILURE (see [`Shared::refuse`]).
    refusing: AtomicUsize,
    records: broadcast::Sender<SessionRecord>,
}

impl Shared {
    pub fn new(snapshot: Snapshot) -> Shared {
        let (records, _) = broadcast::channel(4096);
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics: Metrics::new(),
            drain: Drain::new(),
            active: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            records,
        }
    }

    pub(crate) fn publish(&self, rec: SessionRecord) {
        if self.records.receiver_count() > 0 {
            let _ = self.records.send(rec);
        }
    }

    /// A feed of finished sessions (for tests, the demo and tooling).
    pub fn subscribe(&self) -> broadcast::Receiver<SessionRecord> {
        self.records.subscribe()
    }

    /// Sessions running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a new session unless `max` are running already.
    pub(crate) fn admit(self: &Arc<Self>, max: usize) -> Option<ActiveGuard> {
        if self.active.fetch_add(1, Ordering::Relaxed) >= max {
            self.active.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.metrics.active_sessions.inc();
        Some(ActiveGuard(self.clone()))
    }
}

impl Shared {
    /// A slot to tell a refused connection FAILURE (it must first read its
    /// header), if fewer than `max` are in use. Refused connections are not
    /// bounded by `max_sessions` (they are its overflow), and a slow peer
    /// holds one for its header timeout: without this bound, a flood of
    /// them took every descriptor of the reserve (the control API's) and
    /// memory without end.
    pub(crate) fn refuse(self: &Arc<Self>, max: usize, reason: Reason) -> Option<Refusal> {
        if self.refusing.fetch_add(1, Ordering::Relaxed) >= max {
            self.refusing.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Refusal {
            shared: self.clone(),
            reason,
        })
    }
}

/// A refused connection's slot, held until it is done with, and why it was
/// refused.
pub struct Refusal {
    shared: Arc<Shared>,
    pub reason: Reason,
}

impl Drop for Refusal {
    fn drop(&mut self) {
        self.shared.refusing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a session as active until it ends, however it ends.
pub struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active_sessions.dec();
    }
}
