//! The `rollout:` block of a route as written (see `validate::rollout`).

use serde::Deserialize;

use crate::raw::{DurationText, RawMatch, Scalar};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRollout {
    pub from: Option<String>,
    pub to: Option<String>,
    pub steps: Option<Vec<f64>>,
    pub step_duration: Option<DurationText>,
    pub start: Option<Scalar>,
    pub skew: Option<DurationText>,
    pub canary: Option<RawMatch>,
    pub judge: Option<RawJudge>,
    pub overrides: Option<Vec<RawOverride>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJudge {
    pub enabled: Option<bool>,
    pub interval: Option<DurationText>,
    pub min_sessions: Option<u64>,
    pub max_failures: Option<f64>,
    pub max_connect_errors: Option<f64>,
    pub max_early_closes: Option<f64>,
    pub max_deadlines: Option<f64>,
    pub max_first_command_p95: Option<DurationText>,
    pub peers: Option<RawPeers>,
}

/// `peers: "dns:NAME:PORT"` / `"dns:_control._tcp.NAME"`, or a list of `ip:port`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawPeers {
    Dns(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOverride {
    pub action: Option<String>,
    pub at: Option<Scalar>,
}
