//! Per-session log lines that a failure storm repeats, one per call: a
//! backend that resets mid-script, stalls or sends over-long lines, a
//! client that is not an Asterisk, a drain that cuts every call. At
//! thousands of calls a second each was thousands of lines a second
//! (audit: 5,000 calls to a backend resetting after its first command, 5,000
//! `telling Asterisk FAILURE after commit` lines besides the access log).
//!
//! Each class of line is logged at most [`BURST`] times every [`EVERY`]; the
//! rest are counted (by reason, where the class has several) and told in one
//! line when the interval ends, as refused headers are (`HEADER_WARNINGS` in
//! `session/mod.rs`). Metrics and the access log still count every one.

use std::time::Duration;

use crate::throttle::Throttle;

/// The span each class's lines are counted over.
pub const EVERY: Duration = Duration::from_secs(10);
/// Lines of a class logged in full per [`EVERY`].
pub const BURST: u64 = 5;

/// A throttle whose summary, at `$level`, says how many lines of `$what`
/// were not logged, by kind when it has kinds, and where they are counted.
macro_rules! throttle {
    ($(#[$doc:meta])* $name:ident, $level:ident, $what:literal, $metric:literal) => {
        $(#[$doc])*
        pub static $name: Throttle = Throttle::new(
            EVERY,
            BURST,
            &[],
            Some(|total, _| {
                tracing::$level!(
                    count = total,
                    "{total} more {} in the last {} s; see {}",
                    $what,
                    EVERY.as_secs(),
                    $metric
                )
            }),
        );
    };
    ($(#[$doc:meta])* $name:ident, $level:ident, $what:literal, $metric:literal, $kinds:expr) => {
        $(#[$doc])*
        pub static $name: Throttle = Throttle::new(
            EVERY,
            BURST,
            $kinds,
            Some(|total, by_kind| {
                tracing::$level!(
                    count = total,
                    "{total} more {} in the last {} s ({by_kind}); see {}",
                    $what,
                    EVERY.as_secs(),
                    $metric
                )
            }),
        );
    };
}

/// Tells what every throttled line of the data plane held back: at exit,
/// after the drain, so that a count held back within the last interval is
/// not lost with the process (its timer would have told it later).
pub fn flush_all() {
    for t in [
        &FAILURE_AFTER_COMMIT,
        &NO_FIRST_COMMAND,
        &ASTERISK_LINE,
        &BACKEND_LINE,
        &super::HEADER_WARNINGS,
    ] {
        t.flush();
    }
}

throttle!(
    /// `telling Asterisk FAILURE after commit` and `… after its running
    /// command`, by reason.
    FAILURE_AFTER_COMMIT,
    info,
    "sessions told FAILURE after commit",
    "agiproxy_failures_sent_total",
    &[
        "next_command_timeout",
        "backend_reset",
        "backend_protocol",
        "asterisk_protocol",
        "shutting_down",
        "internal",
        "local_resources",
    ]
);

throttle!(
    /// `backend sent no first command in time`.
    NO_FIRST_COMMAND,
    info,
    "backends sent no first command in time",
    "agiproxy_failures_sent_total{reason=\"first_command_timeout\"}"
);

throttle!(
    /// `Asterisk side sent a line over the limit` (`over_limit`) and
    /// `Asterisk's line stopped before its end` (`cut_off`, or
    /// `held_back` when it was held back for a slow backend).
    ASTERISK_LINE,
    warn,
    "sessions ended for a line from Asterisk over the limit or cut off",
    "agiproxy_failures_sent_total{reason=~\"asterisk_protocol|next_command_timeout\"}",
    &["over_limit", "cut_off", "held_back"]
);

throttle!(
    /// `backend sent a … line over the limit` (`command`, `payload`) and
    /// `backend stopped taking Asterisk's replies` (`stopped_taking`).
    BACKEND_LINE,
    warn,
    "sessions ended for a backend line over the limit or a backend that stopped taking replies",
    "agiproxy_failures_sent_total{reason=~\"backend_protocol|next_command_timeout\"}",
    &["command", "payload", "stopped_taking"]
);
