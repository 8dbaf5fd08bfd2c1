//! Metric series of labels no config in use names any more.

use std::sync::Arc;
use std::time::Instant;

use crate::session::Shared;
use crate::snapshot::Snapshot;

/// The labels a session can still end with: the running config's, and
/// those of the configs it replaced that sessions still run on (a call may
/// last hours: its series must not be dropped under it, to come back at 1,
/// a count `rate()` never sees; metrics audit).
pub(super) fn live_labels(shared: &Shared) -> crate::metrics::retention::LiveLabels {
    let mut live = shared.snapshot.load().live_labels();
    let older: Vec<Arc<Snapshot>> = {
        let mut replaced = shared
            .replaced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        replaced.retain(|w| w.strong_count() > 0);
        replaced
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    };
    for snap in &older {
        live.extend(snap.live_labels());
    }
    live
}

/// Drops `sessions_total` series of routes, pools and backends gone for a
/// while (`metrics::retention`); ends with the server.
pub(super) async fn retire_session_series(shared: std::sync::Weak<Shared>) {
    use crate::metrics::retention::{Retention, EVERY};
    let mut retention = Retention::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let live = live_labels(&shared);
        let dropped = retention.prune(&shared.metrics.sessions, &live, Instant::now());
        if dropped > 0 {
            tracing::debug!(
                dropped,
                "sessions_total: series of vanished routes, pools or backends dropped"
            );
        }
    }
}
