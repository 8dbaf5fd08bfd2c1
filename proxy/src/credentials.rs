//! Keeps credentials in step with their files: the control API's
//! certificate (and client CA), what rollout judgement presents to and
//! trusts in its peers, and the bearer token. Secrets are renewed in place
//! (cert-manager rewrites a Secret, the kubelet swaps the mounted files),
//! so a replica that runs for months looks at its files every [`EVERY`] and
//! reads them again, off the runtime's workers, when one changed; bad new
//! files are logged and counted, and the last good settings stay in use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agiproxy_control::files::Refresh;
use agiproxy_control::tls::Reloading;
use agiproxy_control::token::FollowedToken;
use prometheus::{IntCounterVec, IntGaugeVec};

/// How often the files are looked at (a `stat` each).
pub const EVERY: Duration = Duration::from_secs(30);

/// One set of followed files: its name in logs and metrics, and how to
/// look at them again.
pub struct Followed {
    name: &'static str,
    paths: String,
    refresh: Box<dyn Fn() -> Refresh + Send + Sync>,
    /// When the certificate in use expires (Unix seconds), for TLS files.
    expiry: Option<Box<dyn Fn() -> Option<i64> + Send + Sync>>,
}

impl Followed {
    fn new(
        name: &'static str,
        paths: &[PathBuf],
        refresh: impl Fn() -> Refresh + Send + Sync + 'static,
    ) -> Followed {
        let paths = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Followed {
            name,
            paths,
            refresh: Box::new(refresh),
            expiry: None,
        }
    }

    /// TLS settings, under `name` (`control_tls`, `peer_tls`).
    pub fn tls<T: Send + Sync + 'static>(name: &'static str, r: Arc<Reloading<T>>) -> Followed {
        let paths = r.paths().to_vec();
        let seen = r.clone();
        let mut f = Followed::new(name, &paths, move || r.refresh());
        f.expiry = Some(Box::new(move || seen.validity().map(|v| v.not_after)));
        f
    }

    fn note_expiry(&self, gauge: &IntGaugeVec) {
        let Some(expiry) = &self.expiry else { return };
        match expiry() {
            Some(t) => gauge.with_label_values(&[self.name]).set(t),
            // None readable (not X.509 to x509-parser, or no certificate
            // presented now): no date, rather than the last one's (review).
            None => {
                let _ = gauge.remove_label_values(&[self.name]);
            }
        }
    }

    /// The control API's token file (`token`).
    pub fn token(t: FollowedToken) -> Followed {
        let paths = t.paths().to_vec();
        Followed::new("token", &paths, move || t.refresh())
    }
}

/// Asks the follower to look at once (SIGHUP), not at its next tick.
#[derive(Clone, Default)]
pub struct LookNow(Arc<tokio::sync::Notify>);

impl LookNow {
    pub fn now(&self) {
        self.0.notify_one();
    }
}

/// Looks at `followed` every `every`, and when `look_now` says so, for as
/// long as the process lives, counting in `reloads`
/// (`agiproxy_credential_reloads_total`) and keeping `expiry`
/// (`agiproxy_credential_expiry_timestamp_seconds`) to the certificates in use.
pub fn spawn(
    reloads: IntCounterVec,
    expiry: IntGaugeVec,
    followed: Vec<Followed>,
    every: Duration,
) -> LookNow {
    let look_now = LookNow::default();
    for f in &followed {
        f.note_expiry(&expiry);
    }
    if followed.is_empty() {
        return look_now;
    }
    let asked = look_now.0.clone();
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
            tokio::select! {
                _ = tick.tick() => {}
                _ = asked.notified() => {}
            }
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
                        f.note_expiry(&expiry);
                        tracing::info!(files = f.name, paths = %f.paths, "credential files changed: reloaded");
                    }
                    Refresh::Refused(e) => {
                        reloads.with_label_values(&[f.name, "refused"]).inc();
                        tracing::warn!(files = f.name, paths = %f.paths, error = %e, "credential files changed but cannot be used: the last good ones stay in use; fix the files (they are read again when they change)");
                    }
                }
            }
        }
    });
    look_now
}
