//! Prometheus metrics. Every label comes from a closed set (outcomes,
//! reasons) or from the config (routes, pools, backends): no per-call
//! labels. FAILURE reasons are resolved to counter handles once. Live state
//! (active sessions per backend, backend state) is read at scrape time
//! instead of being updated on the session path.

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::session::outcome::{Outcome, Reason};

pub mod retention;

/// Every `reason` of `config_watch_losses_total`, exported at 0 from the
/// start (see [`RELOAD_RESULTS`]).
pub const WATCH_LOSS_REASONS: [&str; 2] = ["directory", "error"];

/// What `connect_attempts_total` counts, by its `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectResult {
    Connected,
    Refused,
    Reset,
    Timeout,
    Error,
}

impl ConnectResult {
    pub const ALL: [ConnectResult; 5] = [
        ConnectResult::Connected,
        ConnectResult::Refused,
        ConnectResult::Reset,
        ConnectResult::Timeout,
        ConnectResult::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectResult::Connected => "connected",
            ConnectResult::Refused => "refused",
            ConnectResult::Reset => "reset",
            ConnectResult::Timeout => "timeout",
            ConnectResult::Error => "error",
        }
    }
}

/// Every `result` of `config_reloads_total`. Exported at 0 from the start,
/// so the first refused reload is an increase an alert can see (a series
/// born at 1 has none).
pub const RELOAD_RESULTS: [&str; 9] = [
    "applied",
    "unchanged",
    "dry_run",
    "invalid",
    "stale",
    "bind_failed",
    "not_found",
    "error",
    "abandoned",
];

pub struct Metrics {
    pub registry: Registry,
    /// `process_*` (CPU, memory, descriptors, threads, start time): kept out
    /// of `registry`, whose prefix would rename them; unprefixed, they have
    /// the names every exporter uses, so stock dashboards and alerts work.
    process: Registry,
    /// By route, pool, backend and outcome: bounded by the config and the
    /// pools' members, past ones dropped after a while (`retention`).
    pub sessions: IntCounterVec,
    failures: Vec<IntCounter>,
    pub header_errors: IntCounterVec,
    pub active_sessions: IntGauge,
    /// When a drain started cuts what is left (Unix seconds); 0 when not
    /// draining. With `active_sessions`, an alert sees a cut coming: the
    /// cut's own counters come moments before the exit, which no scrape
    /// sees (audit).
    pub drain_deadline: IntGauge,
    pub connect_attempts: IntCounterVec,
    /// `connect_attempts` by result, resolved once (the session path).
    connect_results: [IntCounter; 5],
    pub bytes_from_asterisk: IntCounter,
    pub bytes_to_asterisk: IntCounter,
    pub crlf_fixed: IntCounter,
    /// Operations that failed for want of a local resource, by `op`.
    pub local_resource_errors: IntCounterVec,
    pub refusals_dropped: IntCounterVec,
    pub peer_header_limit: IntCounter,
    pub header_memory_bytes: IntGauge,
    pub connect_seconds: Histogram,
    pub first_command_seconds: Histogram,
    pub session_seconds: Histogram,
    pub config_reloads: IntCounterVec,
    pub credential_reloads: IntCounterVec,
    pub credential_expiry: IntGaugeVec,
    pub config_generation: IntGauge,
    /// The config file's watch lost or refused, by `reason`
    /// ([`WATCH_LOSS_REASONS`]).
    pub config_watch_losses: IntCounterVec,
    /// 1 while the config file's directory is watched.
    pub config_watch_up: IntGauge,
    pub control_requests: IntCounterVec,
    pub control_refused: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("agiproxy".into()), None).expect("valid prefix");
        let sessions = IntCounterVec::new(
            Opts::new(
                "sessions_total",
                "Sessions ended, by route, pool, backend and outcome (\"-\" where none was reached)",
            ),
            &["route", "pool", "backend", "outcome"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Config changes (file, signal, API), by result: applied, unchanged, dry_run, invalid, stale, bind_failed, not_found, error, abandoned",
            ),
            &["result"],
        )
        .expect("valid metric");
        let credential_reloads = IntCounterVec::new(
            Opts::new(
                "credential_reloads_total",
                "Changed credential files read again, by files (control_tls: the control API's certificate, key and client CA; peer_tls: what rollout judgement trusts in and presents to peers; token: the control token file) and result (reloaded; refused: the new files are bad and the last good ones stay in use)",
            ),
            &["files", "result"],
        )
        .expect("valid metric");
        let credential_expiry = IntGaugeVec::new(
            Opts::new(
                "credential_expiry_timestamp_seconds",
                "When the certificate in use expires, Unix seconds, by files (control_tls: the control API's; peer_tls: the one presented to peers): alert on it minus time()",
            ),
            &["files"],
        )
        .expect("valid metric");
        let config_generation =
            IntGauge::new("config_generation", "Generation of the running config")
                .expect("valid metric");
        let config_watch_losses = IntCounterVec::new(
            Opts::new(
                "config_watch_losses_total",
                "The config file's watch lost, by reason: directory (its directory was removed, moved or replaced, or the path now leads to another one: watched again), error (the watch could not be set up, or failed: inotify limits most often; the file is still looked at every 30 s and on SIGHUP)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let config_watch_up = IntGauge::new(
            "config_watch_up",
            "1 while the config file's directory is watched (changes applied within a second); 0 without a watch (looked at every 30 s)",
        )
        .expect("valid metric");
        let control_requests = IntCounterVec::new(
            Opts::new(
                "control_requests_total",
                "Control API requests, by endpoint and status code",
            ),
            &["endpoint", "code"],
        )
        .expect("valid metric");
        let control_refused = IntCounterVec::new(
            Opts::new(
                "control_connections_refused_total",
                "Control API connections closed by the server, by reason: tls_handshake (failed: no or a wrong client certificate, plain HTTP to the TLS port), tls_timeout (not finished within control.request_timeout), connection_cap (64 open already), peer_cap (16 open from that address or IPv6 /64 already), evicted (at the cap, an address holding at least two fewer took the slot of this address's oldest connection), write_timeout (the client took no byte of its answer for control.request_timeout, or had not taken it by the end of the connection's life), accept_failed (the process could not take a connection: out of descriptors most often)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in agiproxy_control::server::REFUSED_REASONS {
            control_refused.with_label_values(&[reason]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Always 1; the version in a label"),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let failures_vec = IntCounterVec::new(
            Opts::new(
                "failures_sent_total",
                "FAILUREs sent to Asterisk (AGISTATUS=FAILURE), by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let header_errors = IntCounterVec::new(
            Opts::new("header_errors_total", "Refused Asterisk headers, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        let connect_attempts = IntCounterVec::new(
            Opts::new(
                "connect_attempts_total",
                "Backend connect attempts, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let active_sessions =
            IntGauge::new("active_sessions", "Sessions in flight").expect("valid metric");
        let drain_deadline = IntGauge::new(
            "drain_deadline_timestamp_seconds",
            "Draining: when sessions still in flight will be cut (Unix time); 0 when not draining",
        )
        .expect("valid metric");
        let header_memory_bytes = IntGauge::new(
            "header_memory_bytes",
            "Bytes of header buffers grown past their first 2 KiB, in connections still sending their header or looking for a backend (at most limits.max_header_memory)",
        )
        .expect("valid metric");
        let bytes_from_asterisk = IntCounter::new(
            "bytes_from_asterisk_total",
            "Bytes relayed from Asterisk to backends",
        )
        .expect("valid metric");
        let bytes_to_asterisk = IntCounter::new(
            "bytes_to_asterisk_total",
            "Bytes relayed from backends to Asterisk",
        )
        .expect("valid metric");
        let crlf_fixed = IntCounter::new(
            "backend_crlf_commands_total",
            "Backend commands ending in CRLF, forwarded with LF (Asterisk rejects CRLF)",
        )
        .expect("valid metric");
        let local_resource_errors = IntCounterVec::new(
            Opts::new(
                "local_resource_errors_total",
                "Accepts and backend connects that failed for want of descriptors, socket buffers or memory, or that would have used the descriptor reserve, by op (accept, connect); not held against any backend",
            ),
            &["op"],
        )
        .expect("valid metric");
        for op in ["accept", "connect"] {
            local_resource_errors.with_label_values(&[op]);
        }
        let refusals_dropped = IntCounterVec::new(
            Opts::new(
                "refusals_dropped_total",
                "Connections refused (over max_sessions, or in the descriptor reserve) and closed at once, unanswered, because too many refused ones were still being told FAILURE: a flood of slow connections. Asterisk reads such a close as SUCCESS",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in ["overloaded", "local_resources"] {
            refusals_dropped.with_label_values(&[reason]);
        }
        let peer_header_limit = IntCounter::new(
            "peer_header_limit_total",
            "Connections refused (FAILURE overloaded) because the replica was half full and their address already had limits.max_headers_per_peer connections sending their header: a flood of slow connections from one host",
        )
        .expect("valid metric");
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let connect_seconds = Histogram::with_opts(
            HistogramOpts::new("connect_seconds", "Time from header to a connected backend")
                .buckets(buckets.clone()),
        )
        .expect("valid metric");
        let first_command_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "first_command_seconds",
                "Time from header to the backend's whole first command line",
            )
            .buckets(buckets),
        )
        .expect("valid metric");
        let session_seconds = Histogram::with_opts(
            HistogramOpts::new("session_seconds", "Session duration").buckets(vec![
                0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
        )
        .expect("valid metric");
        for c in [
            Box::new(sessions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(config_reloads.clone()),
            Box::new(credential_reloads.clone()),
            Box::new(credential_expiry.clone()),
            Box::new(config_generation.clone()),
            Box::new(config_watch_losses.clone()),
            Box::new(config_watch_up.clone()),
            Box::new(control_requests.clone()),
            Box::new(control_refused.clone()),
            Box::new(build_info),
            Box::new(failures_vec.clone()),
            Box::new(header_errors.clone()),
            Box::new(connect_attempts.clone()),
            Box::new(active_sessions.clone()),
            Box::new(drain_deadline.clone()),
            Box::new(header_memory_bytes.clone()),
            Box::new(bytes_from_asterisk.clone()),
            Box::new(bytes_to_asterisk.clone()),
            Box::new(crlf_fixed.clone()),
            Box::new(local_resource_errors.clone()),
            Box::new(refusals_dropped.clone()),
            Box::new(peer_header_limit.clone()),
            Box::new(connect_seconds.clone()),
            Box::new(first_command_seconds.clone()),
            Box::new(session_seconds.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        let connect_results =
            ConnectResult::ALL.map(|r| connect_attempts.with_label_values(&[r.as_str()]));
        // Label values known in advance start at 0 (see RELOAD_RESULTS).
        for result in RELOAD_RESULTS {
            config_reloads.with_label_values(&[result]);
        }
        for reason in WATCH_LOSS_REASONS {
            config_watch_losses.with_label_values(&[reason]);
        }
        for reason in crate::session::header::HeaderError::REASONS {
            header_errors.with_label_values(&[reason]);
        }
        let failures = Reason::ALL
            .iter()
            .map(|r| failures_vec.with_label_values(&[r.as_str()]))
            .collect();
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registered once");
        Metrics {
            registry,
            process,
            sessions,
            failures,
            header_errors,
            active_sessions,
            drain_deadline,
            connect_attempts,
            connect_results,
            bytes_from_asterisk,
            bytes_to_asterisk,
            crlf_fixed,
            local_resource_errors,
            refusals_dropped,
            peer_header_limit,
            header_memory_bytes,
            connect_seconds,
            first_command_seconds,
            session_seconds,
            config_reloads,
            credential_reloads,
            credential_expiry,
            config_generation,
            config_watch_losses,
            config_watch_up,
            control_requests,
            control_refused,
        }
    }

    pub fn session(&self, route: &str, pool: &str, backend: &str, o: Outcome) {
        self.sessions
            .with_label_values(&[route, pool, backend, o.as_str()])
            .inc();
    }

    /// The `connect_attempts_total` counter of one result.
    pub fn connect_result(&self, result: ConnectResult) -> &IntCounter {
        &self.connect_results[result as usize]
    }

    pub fn failure(&self, r: Reason) -> &IntCounter {
        &self.failures[r as usize]
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.render_with(Vec::new())
    }

    /// The exposition plus families computed at scrape time (live state).
    pub fn render_with(&self, extra: Vec<prometheus::proto::MetricFamily>) -> String {
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        families.extend(log_lines_dropped().collect());
        // A family without samples (no pool has health checks, say) is an
        // encoding error that would cut the exposition short.
        families.extend(extra.into_iter().filter(|f| !f.get_metric().is_empty()));
        let mut out = String::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "metrics exposition incomplete");
        }
        out
    }
}

/// `agiproxy_log_lines_dropped_total`, read from the log writer's own
/// count at each scrape (a fresh counter, so two scrapes cannot race).
fn log_lines_dropped() -> IntCounter {
    let c = IntCounter::with_opts(
        Opts::new(
            "log_lines_dropped_total",
            "Log lines dropped because the log writer was --log-buffer-lines behind (a stalled stderr reader)",
        )
        .namespace("agiproxy"),
    )
    .expect("valid metric");
    c.inc_by(crate::logging::dropped_lines());
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connect_result_counts_under_its_own_label() {
        let m = Metrics::new();
        for (i, r) in ConnectResult::ALL.into_iter().enumerate() {
            // `connect_result` indexes by discriminant: ALL must follow it.
            assert_eq!(r as usize, i);
            m.connect_result(r).inc_by(i as u64 + 1);
        }
        let text = m.render();
        for (i, r) in ConnectResult::ALL.into_iter().enumerate() {
            let line = format!(
                "agiproxy_connect_attempts_total{{result=\"{}\"}} {}",
                r.as_str(),
                i + 1
            );
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn counters_with_known_labels_are_exported_at_zero_from_the_start() {
        let text = Metrics::new().render();
        let mut expected: Vec<String> = RELOAD_RESULTS
            .iter()
            .map(|r| format!("agiproxy_config_reloads_total{{result=\"{r}\"}} 0"))
            .collect();
        expected.extend(
            crate::session::header::HeaderError::REASONS
                .iter()
                .map(|r| format!("agiproxy_header_errors_total{{reason=\"{r}\"}} 0")),
        );
        expected.extend(Reason::ALL.iter().map(|r| {
            format!(
                "agiproxy_failures_sent_total{{reason=\"{}\"}} 0",
                r.as_str()
            )
        }));
        expected.extend(ConnectResult::ALL.iter().map(|r| {
            format!(
                "agiproxy_connect_attempts_total{{result=\"{}\"}} 0",
                r.as_str()
            )
        }));
        for line in expected {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    /// The value of the unlabelled sample `name` in an exposition.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
            .parse()
            .expect("a number")
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_exposition_has_the_process_metrics_unprefixed() {
        let text = Metrics::new().render();
        // This test process has its standard streams open, some memory, a
        // start time after 2020 and a descriptor limit above what it uses.
        let open = sample(&text, "process_open_fds");
        assert!(open >= 3.0, "{open}");
        assert!(sample(&text, "process_max_fds") > open);
        assert!(sample(&text, "process_resident_memory_bytes") > 1e6);
        assert!(sample(&text, "process_start_time_seconds") > 1.6e9);
        assert!(sample(&text, "process_threads") >= 1.0);
        sample(&text, "process_cpu_seconds_total");
        assert!(!text.contains("agiproxy_process_"), "{text}");
    }
}
