//! A declared blue-green rollout on a route: the validated model. The
//! schedule, stickiness and judgement that run on it live in the proxy
//! (`proxy/src/rollout/`); this is data only, identical on every replica
//! that reads the same file.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::model::{BackendTarget, Dns, RouteMatch};

/// Steps at most; each has its own counters on every replica.
pub const MAX_ROLLOUT_STEPS: usize = 20;

#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index into `Config::pools`: the running colour (blue).
    pub from: usize,
    /// Index into `Config::pools`: the new colour (green).
    pub to: usize,
    /// Green's share at each step, in basis points (1..=10000), strictly rising.
    pub steps: Vec<u32>,
    pub step_duration: Duration,
    /// When step 0 begins, Unix milliseconds (UTC).
    pub start_ms: i64,
    /// `start` as written (RFC 3339).
    pub start_text: String,
    /// Clock difference tolerated between Asterisk and the proxies (and
    /// between proxies): an override takes effect this long after the time
    /// `ctl` gives it, so every replica knows it before calls that late exist.
    pub skew: Duration,
    /// Calls matching any criterion go to `to` at every step, 0 % included.
    pub canary: RouteMatch,
    pub judge: Judge,
    /// Operator decisions kept in the file (GitOps), sorted by time.
    pub overrides: Vec<Override>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Judge {
    pub enabled: bool,
    /// Ticks at `start + k * interval`; a bad verdict takes effect at
    /// `tick + interval / 2`.
    pub interval: Duration,
    /// Sessions each colour needs in the step, over all replicas, before a verdict.
    pub min_sessions: u64,
    /// How much worse green may be than blue, in basis points of the
    /// session count (100 = one percentage point).
    pub max_failures_bp: u32,
    pub max_connect_errors_bp: u32,
    pub max_early_closes_bp: u32,
    pub max_deadlines_bp: u32,
    /// How much later green's p95 time to first command may be.
    pub max_first_command_p95: Duration,
    pub peers: Peers,
}

/// Where a replica finds the others to read their counters.
#[derive(Debug, Clone, PartialEq)]
pub enum Peers {
    /// Judge on this replica's counters alone (one replica).
    None,
    /// Fixed control API addresses (this replica may be among them).
    Static(Vec<SocketAddr>),
    /// The name `ctl --cluster dns:...` uses, resolved with `dns`.
    Dns { target: BackendTarget, dns: Dns },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Override {
    pub action: OverrideAction,
    /// Unix milliseconds at which it takes effect (`skew` already added).
    pub at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideAction {
    /// Hold the current step (its weight stays) until `resume`.
    Pause,
    Resume,
    /// Green takes every new call.
    Promote,
    /// Blue takes every new call; calls already on green finish there.
    Rollback,
}

impl OverrideAction {
    pub const ALL: [OverrideAction; 4] = [
        OverrideAction::Pause,
        OverrideAction::Resume,
        OverrideAction::Promote,
        OverrideAction::Rollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OverrideAction::Pause => "pause",
            OverrideAction::Resume => "resume",
            OverrideAction::Promote => "promote",
            OverrideAction::Rollback => "rollback",
        }
    }

    pub fn parse(s: &str) -> Option<OverrideAction> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for OverrideAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Unix milliseconds as RFC 3339 UTC (`2026-12-06T01:00:00.000Z`).
pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// RFC 3339 UTC (`2026-12-06T01:00:00Z`, fractions allowed) to Unix milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339(text.trim()).map_err(|e| {
        format!("{text:?} is not an RFC 3339 UTC time ({e}); write e.g. \"2026-12-06T01:00:00Z\"")
    })?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?;
    Ok(d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let ms = parse_time("2026-12-06T01:00:00.250Z").unwrap();
        assert_eq!(ms, 1_796_518_800_250);
        assert_eq!(format_ms(ms), "2026-12-06T01:00:00.250Z");
        assert!(parse_time("yesterday").is_err());
    }
}
