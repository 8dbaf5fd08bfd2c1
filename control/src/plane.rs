//! The narrow interface between the control API and the proxy's runtime.
//! The proxy implements it; this crate knows nothing else of the runtime.

use std::future::Future;

use crate::api::{
    Applied, BackendView, ConfigView, FieldError, PoolView, RolloutTick, RolloutView, SplitWeight,
    Status,
};

/// Why a control operation was refused; each maps to one HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// 400: the config (or request) is invalid; every error with its path.
    #[error("invalid: {} error{}", .0.len(), if .0.len() == 1 { "" } else { "s" })]
    Invalid(Vec<FieldError>),
    /// 412: `If-Match` named a generation that is no longer running; or,
    /// without `If-Match`, an edit of the running config (a split, an
    /// override) lost to other changes too often to be made.
    #[error("{}", stale(*current, *if_match))]
    Stale { current: u64, if_match: bool },
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: valid, but could not be applied (a listener could not bind).
    #[error("{0}")]
    Conflict(String),
    /// 503: e.g. no config file to reload from, or draining.
    #[error("{0}")]
    Unavailable(String),
}

fn stale(current: u64, if_match: bool) -> String {
    if if_match {
        format!("the running generation is {current}, not the one in If-Match")
    } else {
        format!(
            "other config changes kept coming in while this edit was made (generation \
             {current} now); nothing was changed: send it again"
        )
    }
}

/// What the control API may ask of the runtime.
pub trait ControlPlane: Send + Sync + 'static {
    /// Served on a blocking thread (as are the rollout views and the
    /// metrics): it may walk the whole config, and anyone may ask it in a
    /// loop.
    fn status(&self) -> Status;
    /// Config loaded, listeners bound, not draining.
    fn ready(&self) -> bool;
    /// Prometheus text exposition.
    fn metrics_text(&self) -> String;
    fn config(&self) -> ConfigView;
    /// Validates `text` (YAML or JSON) and, unless `dry_run`, applies it.
    /// `if_match`: apply only if this generation is still running.
    fn apply_config(
        &self,
        text: String,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> impl Future<Output = Result<Applied, ControlError>> + Send;
    /// Re-reads the config file and applies it.
    fn reload_file(&self) -> impl Future<Output = Result<Applied, ControlError>> + Send;
    fn pools(&self) -> Vec<PoolView>;
    /// One pool's view. Override it where building every pool's view is
    /// costly (a fleet's pools of discovered backends): this default does.
    fn pool(&self, name: &str) -> Option<PoolView> {
        self.pools().into_iter().find(|p| p.name == name)
    }
    /// Drain (no new sessions, existing ones finish) or re-enable a backend.
    fn set_backend_draining(
        &self,
        pool: &str,
        backend: &str,
        draining: bool,
    ) -> Result<BackendView, ControlError>;
    /// Sets a route's pool weights (blue-green).
    fn set_split(
        &self,
        route: &str,
        split: Vec<SplitWeight>,
        if_match: Option<u64>,
    ) -> impl Future<Output = Result<Applied, ControlError>> + Send;
    /// Every rollout route as this replica runs it.
    fn rollouts(&self) -> Vec<RolloutView>;
    /// The rollout of `route` as this replica runs it, if it has one. The
    /// default picks it from [`ControlPlane::rollouts`]; a runtime with
    /// many rollouts builds that one alone.
    fn rollout(&self, route: &str) -> Option<RolloutView> {
        self.rollouts().into_iter().find(|r| r.route == route)
    }
    /// The routes that have a rollout (a 404 names them).
    fn rollout_routes(&self) -> Vec<String> {
        self.rollouts().into_iter().map(|r| r.route).collect()
    }
    /// The running `limits.max_config_bytes`: the request bodies held at
    /// once (read, or waiting for their parse) are at most
    /// [`crate::budget::BODIES_AT_ONCE`] of it. None: of the body limit.
    fn config_bytes_limit(&self) -> Option<usize> {
        None
    }
    /// This replica's counters of a rollout as frozen at evaluation `tick`
    /// (what peers sum to judge).
    fn rollout_tick(&self, route: &str, tick: i64) -> Result<RolloutTick, ControlError>;
    /// Writes `pause`, `resume`, `promote` or `rollback` at `req.at` (RFC
    /// 3339; None: now) into the running config's rollout of `route`, the
    /// rollout of `req.identity` (None: the one running when asked) alone.
    fn rollout_override(
        &self,
        route: &str,
        action: &str,
        req: crate::api::RolloutOverrideRequest,
    ) -> impl Future<Output = Result<Applied, ControlError>> + Send;
    /// Drains the whole replica, as on SIGTERM.
    fn drain(&self);
    /// Counts one control request (bounded labels: the route template).
    fn observe_request(&self, endpoint: &str, status: u16);
    /// Counts one connection closed by the server (refused, or its client
    /// not taking its answers), by `reason`: one of
    /// [`crate::server::REFUSED_REASONS`].
    fn observe_refused_connection(&self, reason: &'static str) {
        let _ = reason;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edit that lost to other changes had no If-Match to name (audit).
    #[test]
    fn a_stale_change_names_if_match_only_when_it_had_one() {
        let e = |if_match| {
            ControlError::Stale {
                current: 7,
                if_match,
            }
            .to_string()
        };
        assert_eq!(
            e(true),
            "the running generation is 7, not the one in If-Match"
        );
        assert!(!e(false).contains("If-Match"), "{}", e(false));
        assert!(e(false).contains("generation 7 now"), "{}", e(false));
    }
}
