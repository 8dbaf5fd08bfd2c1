//! The control API's wire types (JSON), shared by the server and `ctl`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: f64,
    /// Increases by one with every applied config.
    pub generation: u64,
    /// Content hash of the running config text (hex).
    pub hash: String,
    /// Where the running config came from: `file:PATH`, `api`, `embedded`.
    pub source: String,
    /// The config file's current content differs from the running config
    /// (a change through the API, or a file edit not yet applied).
    pub differs_from_file: bool,
    pub listeners: Vec<ListenerView>,
    pub active_sessions: u64,
    pub draining: bool,
    /// Rollouts whose running state differs from the config file, one
    /// line each saying what to write to keep it across a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts_differ: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListenerView {
    pub name: String,
    pub address: String,
}

/// `GET /v1/config`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigView {
    pub generation: u64,
    pub hash: String,
    pub source: String,
    /// The config text as applied.
    pub text: String,
}

/// The answer to a config change (`PUT /v1/config`, `POST /v1/reload`,
/// `PUT /v1/routes/{route}/split`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Applied {
    pub generation: u64,
    pub hash: String,
    /// Validated only (`?dry_run=true`): nothing changed.
    pub dry_run: bool,
    /// False when the new text equals the running one.
    pub changed: bool,
    /// Why nothing changed, when the server knows more than `changed:
    /// false` says: a rollout override that would change nothing (the
    /// rollout final by then, already paused, not paused). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `PUT /v1/config`: the rollout overrides the running config had that
    /// the text lacks, of the same rollout, which applying it dropped (a
    /// dry run: would drop), as `route ivr: { action: rollback, at: "…" }`.
    /// Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped_overrides: Vec<String>,
}

/// One validation error, with the config path it concerns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// The running generation, on 412.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// `GET /v1/pools/{pool}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolView {
    pub name: String,
    pub balance: String,
    pub active_sessions: u64,
    /// More backends are ejected than the pool's cap allows: some ejected
    /// ones are kept in rotation (Envoy's panic mode).
    #[serde(default)]
    pub panic: bool,
    pub backends: Vec<BackendView>,
    /// DNS names the pool follows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discovery: Vec<DiscoveryView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiscoveryView {
    /// `NAME:PORT` (A/AAAA) or `srv NAME`.
    pub target: String,
    /// The last good answer.
    pub addresses: Vec<String>,
    pub ttl_seconds: f64,
    pub lookups: u64,
    /// Failed or empty lookups (the last good set was kept).
    pub failures: u64,
    /// Failures since the last good answer: 0 while the name answers.
    #[serde(default)]
    pub failures_in_a_row: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendView {
    pub address: String,
    /// `static`, `dns NAME:PORT` or `srv NAME`.
    #[serde(default)]
    pub source: String,
    /// healthy, unhealthy, ejected, draining, slow_start.
    pub state: String,
    pub weight: u32,
    pub max_sessions: Option<u32>,
    pub active_sessions: u64,
    pub total_sessions: u64,
    pub consecutive_failures: u64,
    pub ejections: u64,
    pub draining: bool,
    /// Seconds left in the passive backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_for_seconds: Option<f64>,
    /// Share of new sessions while in slow start (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_share: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckView {
    pub ok: bool,
    pub latency_ms: f64,
    pub detail: String,
}

/// `PUT /v1/routes/{route}/split`: pool weights for a blue-green route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SplitRequest {
    pub split: Vec<SplitWeight>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SplitWeight {
    pub pool: String,
    pub weight: u32,
}

/// One colour's sessions in one step of a rollout (see the proxy's
/// `rollout::judge::Counts`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RolloutCounts {
    pub sessions: u64,
    pub failures: u64,
    pub connect_errors: u64,
    pub early_closes: u64,
    pub deadlines: u64,
    /// Committed sessions by time to first command: <= 5, 10, 25, 50, 100,
    /// 250, 500, 1000, 2500, 5000, 10000 ms, longer.
    pub first_command: [u64; 12],
}

/// A judged rollback (`GET /v1/rollouts`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RolloutDecisionView {
    /// RFC 3339: calls created from then on go to blue.
    pub at: String,
    pub at_ms: i64,
    pub tick: i64,
    pub reason: String,
    /// `judged here` or `adopted from REPLICA`.
    pub source: String,
}

/// `GET /v1/rollouts/{route}/counts?tick=K`: this replica's counters of
/// one step as frozen at tick K (what peers sum for judgement).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RolloutTick {
    /// Random per process: a replica listed twice is counted once.
    pub replica: String,
    pub tick: i64,
    /// 0-based: the index into the rollout's `steps` (unlike the 1-based
    /// `step` of `RolloutView` and `RolloutEvaluationView`). Peers sum
    /// only counters of their own step, so it stays 0-based for fleets of
    /// mixed releases. None when this replica has not published tick K
    /// (yet, or any more).
    pub step: Option<usize>,
    pub blue: RolloutCounts,
    pub green: RolloutCounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<RolloutDecisionView>,
    /// The rollout these counters and this decision belong to (see
    /// `RolloutView::identity`). A reader uses them only when it runs the
    /// same one; absent from releases before it was added, which counts as
    /// another rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The route's `split_key` (see `RolloutView::split_key`); absent from
    /// older releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_key: Option<String>,
    /// The answering replica's clock (Unix milliseconds) when it answered:
    /// the reader compares it with its own, halfway through the request.
    /// Absent from older releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now_ms: Option<i64>,
}

/// The last judgement on this replica.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RolloutEvaluationView {
    pub tick: i64,
    pub at: String,
    /// 1-based.
    pub step: usize,
    /// Replicas whose counters were summed (this one included).
    pub replicas: usize,
    pub blue: RolloutCounts,
    pub green: RolloutCounts,
    pub verdict: String,
}

/// `GET /v1/rollouts`: one rollout route as this replica runs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutView {
    pub route: String,
    pub from: String,
    pub to: String,
    /// pending, progressing, halted, rolled_back, promoted.
    pub state: String,
    /// 1-based step in force (None before the start).
    pub step: Option<usize>,
    pub steps: Vec<f64>,
    /// Green's share of new calls now, percent.
    pub weight_percent: f64,
    pub start: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_step_at: Option<String>,
    /// Overrides in the running config, as `ACTION at TIME` (effective time).
    pub overrides: Vec<String>,
    /// The rollout's `canary`; absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<RolloutDecisionView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluation: Option<RolloutEvaluationView>,
    /// Sessions in flight on this replica, per colour.
    pub active_blue: i64,
    pub active_green: i64,
    /// Sessions whose key held no creation time (routed by today's weight).
    pub unkeyed_sessions: u64,
    /// The peer clock farthest from this replica's at the last judgement,
    /// in milliseconds (theirs minus ours, within half the request's round
    /// trip); absent before the first judgement that read a peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_clock_offset_ms: Option<i64>,
    /// Set when what runs differs from the config file (an override made
    /// through the API, or a judged rollback): what to write to keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differs_from_file: Option<String>,
    /// A fingerprint of what defines this rollout (route, from, to, start,
    /// steps, step_duration, judge.interval): replicas exchange counters
    /// and decisions only when theirs are equal. Absent from older releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The route's `split_key`: not in the identity, but replicas that
    /// differ in it colour the same call differently. Absent from older
    /// releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_key: Option<String>,
}

/// A rollout's canary criteria, in the shapes the config's `match:` writes
/// them (no `script`); those not set are absent. A call matching any one
/// goes to green at every step, until a rollback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct CanaryView {
    /// Query parameters and the value each must have, as written.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
    /// `agi_arg_N` by N, against a regex.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub args: BTreeMap<usize, String>,
    /// `agi_*` header variables against a regex.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
    /// Networks Asterisk's address may be in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source: Vec<String>,
}

impl CanaryView {
    /// The criteria in `agiproxy check`'s words:
    /// `query canary=1, args 2~^qa$, vars agi_callerid~^\+1555, source 10.9.0.0/24`.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        if !self.query.is_empty() {
            let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push(format!("query {}", q.join("&")));
        }
        if !self.args.is_empty() {
            let a: Vec<String> = self.args.iter().map(|(n, r)| format!("{n}~{r}")).collect();
            out.push(format!("args {}", a.join(" ")));
        }
        if !self.vars.is_empty() {
            let v: Vec<String> = self.vars.iter().map(|(k, r)| format!("{k}~{r}")).collect();
            out.push(format!("vars {}", v.join(" ")));
        }
        if !self.source.is_empty() {
            out.push(format!("source {}", self.source.join(" ")));
        }
        out.join(", ")
    }
}

/// `POST /v1/rollouts/{route}/{pause|resume|promote|rollback}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RolloutOverrideRequest {
    /// RFC 3339 UTC; default now on the replica. `ctl` sends one time to
    /// every replica so they all write the same override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The rollout's identity (`ctl rollout status` prints it): when given,
    /// the action is refused (409) unless the route still runs that
    /// rollout, so that it cannot land on a new one a reload brought in
    /// meanwhile. Without it, the rollout running when the request comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}
