//! What the load generator counts: latency histograms and errors by kind.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in nanoseconds up to this bound (larger values
/// are clamped to it): an idle session's whole life fits, a hung one shows
/// up as the maximum.
const MAX_NANOS: u64 = 600_000_000_000;

/// A latency histogram with 3 significant digits (0.1 % resolution), so a
/// difference of a microsecond at loopback round-trip times still shows.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self(
            Histogram::new_with_bounds(1, MAX_NANOS, 3).expect("static histogram bounds are valid"),
        )
    }

    pub fn record(&mut self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.saturating_record(nanos.min(MAX_NANOS));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: adding cannot fail.
        self.0.add(&other.0).expect("histograms share their bounds");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The percentiles the report shows, in microseconds.
    pub fn summary(&self) -> Summary {
        let us = |nanos: u64| nanos as f64 / 1000.0;
        if self.0.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.0.len(),
            mean: self.0.mean() / 1000.0,
            p50: us(self.0.value_at_quantile(0.50)),
            p90: us(self.0.value_at_quantile(0.90)),
            p99: us(self.0.value_at_quantile(0.99)),
            p999: us(self.0.value_at_quantile(0.999)),
            max: us(self.0.max()),
        }
    }
}

/// Percentiles of one latency, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Why a session did not complete as a normal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Nothing listening: Asterisk would set FAILURE in under a millisecond.
    ConnectRefused,
    /// No answer to the SYN within the connect timeout (Asterisk: 2000 ms).
    ConnectTimeout,
    ConnectOther,
    /// The server reset the connection (or a write hit a closed socket).
    Reset,
    /// The session did not finish within its time bound.
    Timeout,
    /// The server sent a `failure` line: AGISTATUS=FAILURE.
    Failure,
    /// The server closed after fewer commands than expected.
    ShortSession,
    /// An idle session's server spoke or closed while we held its command.
    DroppedIdle,
    /// A command arrived before our reply to the previous one (pipelining,
    /// which a real Asterisk stalls on), or a line overflowed the buffer.
    Protocol,
    /// Any other socket error.
    Io,
}

/// Errors by kind; `total` is their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    pub connect_refused: u64,
    pub connect_timeout: u64,
    pub connect_other: u64,
    pub reset: u64,
    pub timeout: u64,
    pub failure: u64,
    pub short_session: u64,
    pub dropped_idle: u64,
    pub protocol: u64,
    pub io: u64,
}

impl ErrorCounts {
    pub fn add(&mut self, kind: ErrorKind) {
        *self.slot(kind) += 1;
    }

    fn slot(&mut self, kind: ErrorKind) -> &mut u64 {
        match kind {
            ErrorKind::ConnectRefused => &mut self.connect_refused,
            ErrorKind::ConnectTimeout => &mut self.connect_timeout,
            ErrorKind::ConnectOther => &mut self.connect_other,
            ErrorKind::Reset => &mut self.reset,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Failure => &mut self.failure,
            ErrorKind::ShortSession => &mut self.short_session,
            ErrorKind::DroppedIdle => &mut self.dropped_idle,
            ErrorKind::Protocol => &mut self.protocol,
            ErrorKind::Io => &mut self.io,
        }
    }

    pub fn merge(&mut self, o: &ErrorCounts) {
        for (mine, theirs) in self.fields_mut().into_iter().zip(o.fields()) {
            *mine += theirs;
        }
    }

    fn fields(&self) -> [u64; 10] {
        [
            self.connect_refused,
            self.connect_timeout,
            self.connect_other,
            self.reset,
            self.timeout,
            self.failure,
            self.short_session,
            self.dropped_idle,
            self.protocol,
            self.io,
        ]
    }

    fn fields_mut(&mut self) -> [&mut u64; 10] {
        [
            &mut self.connect_refused,
            &mut self.connect_timeout,
            &mut self.connect_other,
            &mut self.reset,
            &mut self.timeout,
            &mut self.failure,
            &mut self.short_session,
            &mut self.dropped_idle,
            &mut self.protocol,
            &mut self.io,
        ]
    }

    pub const NAMES: [&'static str; 10] = [
        "connect_refused",
        "connect_timeout",
        "connect_other",
        "reset",
        "timeout",
        "failure",
        "short_session",
        "dropped_idle",
        "protocol",
        "io",
    ];

    pub fn total(&self) -> u64 {
        self.fields().iter().sum()
    }

    /// `kind=n` for every non-zero kind, or `none`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = Self::NAMES
            .iter()
            .zip(self.fields())
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

/// One client's (or a whole run's) counts.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    /// Connect start to the first command line received.
    pub setup: Latency,
    /// Our reply written to the next command line received.
    pub rtt: Latency,
    /// Connect start to our close.
    pub session: Latency,
    /// Sessions completed normally inside the measurement window.
    pub sessions: u64,
    /// Commands answered inside the measurement window.
    pub commands: u64,
    pub errors: ErrorCounts,
}

impl Recorder {
    pub fn merge(&mut self, o: &Recorder) {
        self.setup.merge(&o.setup);
        self.rtt.merge(&o.rtt);
        self.session.merge(&o.session);
        self.sessions += o.sessions;
        self.commands += o.commands;
        self.errors.merge(&o.errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_microseconds() {
        let mut h = Latency::new();
        // 90 fast samples and 10 slow ones: p50 and p90 are fast, p99 slow.
        for _ in 0..90 {
            h.record(Duration::from_micros(40));
        }
        for _ in 0..10 {
            h.record(Duration::from_millis(5));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!((39.9..40.1).contains(&s.p50), "{s:?}");
        assert!((39.9..40.1).contains(&s.p90), "{s:?}");
        assert!((4990.0..5010.0).contains(&s.p99), "{s:?}");
        assert!((4990.0..5010.0).contains(&s.max), "{s:?}");
    }

    #[test]
    fn merged_histograms_and_errors_add_up() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        a.rtt.record(Duration::from_micros(10));
        b.rtt.record(Duration::from_micros(20));
        b.rtt.record(Duration::from_secs(3600)); // beyond the bound: clamped, kept
        a.errors.add(ErrorKind::Reset);
        b.errors.add(ErrorKind::Reset);
        b.errors.add(ErrorKind::Failure);
        a.merge(&b);
        assert_eq!(a.rtt.count(), 3);
        assert_eq!(a.errors.reset, 2);
        assert_eq!(a.errors.total(), 3);
        assert_eq!(a.errors.describe(), "reset=2 failure=1");
        assert!(a.rtt.summary().max >= 599_000_000.0);
    }
}
