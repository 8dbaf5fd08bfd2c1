//! Keeps TLS settings in step with their PEM files: the control API's
//! certificate (and client CA), and what rollout judgement presents to and
//! trusts in its peers. Certificates are renewed in place (cert-manager
//! rewrites the Secret, the kubelet swaps the mounted files), so a replica
//! that runs for months looks at its files every [`EVERY`] and reads them
//! again, off the runtime's workers, when one changed; bad new files are
//! logged and counted, and the last good settings stay in use.

use std::sync::Arc;
use std::time::Duration;

use agiproxy_control::tls::{Refresh, Reloading};
use prometheus::IntCounterVec;

/// How often the files are looked at (a `stat` each).
pub const EVERY: Duration = Duration::from_secs(30);

/// One set of followed files: its name in logs and metrics, and how to
/// look at them again.
pub struct Followed {
    name: &'static str,
    paths: String,
    refresh: Box<dyn Fn() -> Refresh + Send + Sync>,
}

impl Followed {
    pub fn new<T: Send + Sync + 'static>(name: &'static str, r: Arc<Reloading<T>>) -> Followed {
        let paths = r
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Followed {
            name,
            paths,
            refresh: Box::new(move || r.refresh()),
        }
    }
}

/// Looks at `followed` every `every` for as long as the process lives,
/// counting in `reloads` (`agiproxy_tls_reloads_total`).
pub fn spawn(reloads: IntCounterVec, followed: Vec<Followed>, every: Duration) {
    if followed.is_empty() {
        return;
    }
    for f in &followed {
        for result in ["reloaded", "refused"] {
            reloads.with_label_values(&[f.name, result]);
        }
    }
    let followed = Arc::new(followed);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now: the files were just read
        loop {
            tick.tick().await;
            let f = followed.clone();
            let Ok(results) = tokio::task::spawn_blocking(move || {
                f.iter().map(|f| (f.refresh)()).collect::<Vec<_>>()
            })
            .await
            else {
                continue;
            };
            for (f, r) in followed.iter().zip(results) {
                match r {
                    Refresh::Unchanged => {}
                    Refresh::Reloaded => {
                        reloads.with_label_values(&[f.name, "reloaded"]).inc();
                        tracing::info!(files = f.name, paths = %f.paths, "TLS files changed: reloaded");
                    }
                    Refresh::Refused(e) => {
                        reloads.with_label_values(&[f.name, "refused"]).inc();
                        tracing::warn!(files = f.name, paths = %f.paths, error = %e, "TLS files changed but cannot be used: the last good ones stay in use; fix the files (they are read again when they change)");
                    }
                }
            }
        }
    });
}
