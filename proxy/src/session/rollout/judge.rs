//! Green against blue on the counters of one step, summed over every
//! replica. Integer arithmetic and a fixed order of checks: replicas that
//! sum the same counters reach the same verdict with the same words.

use agiproxy_config::Judge;

/// Upper bounds (ms) of the time-to-first-command buckets; the last is
/// "longer". Fixed, so sums over replicas give the same p95 everywhere.
pub const BUCKETS_MS: [u64; 12] = [
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10_000,
    u64::MAX,
];

/// One colour's sessions in one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sessions: u64,
    /// FAILUREs sent to Asterisk, whatever the reason.
    pub failures: u64,
    /// Failed to connect (refused, timed out, no backend left) or reset
    /// after commit.
    pub connect_errors: u64,
    /// A backend closed before its first command.
    pub early_closes: u64,
    /// Ended by the first- or next-command deadline.
    pub deadlines: u64,
    /// Committed sessions by time to first command (see [`BUCKETS_MS`]).
    pub first_command: [u64; 12],
}

/// The most a summed counter holds: far beyond any fleet's sessions in a
/// step, and small enough that the judge's products of two counts (and a
/// factor of 10,000) stay inside `i128`. A peer's answer is another
/// process's numbers: one reporting `u64::MAX` wrapped the sum (audit).
const MAX_COUNT: u64 = 1 << 40;

fn sum(a: u64, b: u64) -> u64 {
    a.saturating_add(b).min(MAX_COUNT)
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.sessions = sum(self.sessions, o.sessions);
        self.failures = sum(self.failures, o.failures);
        self.connect_errors = sum(self.connect_errors, o.connect_errors);
        self.early_closes = sum(self.early_closes, o.early_closes);
        self.deadlines = sum(self.deadlines, o.deadlines);
        for (a, b) in self.first_command.iter_mut().zip(o.first_command) {
            *a = sum(*a, b);
        }
    }

    /// The bucket bound under which 95 % of first commands came; None
    /// without committed sessions; `u64::MAX` when beyond the last bound.
    pub fn p95_ms(&self) -> Option<u64> {
        let total: u128 = self.first_command.iter().map(|&n| u128::from(n)).sum();
        if total == 0 {
            return None;
        }
        let want = (total * 95).div_ceil(100);
        let mut seen = 0;
        for (&n, bound) in self.first_command.iter().zip(BUCKETS_MS) {
            seen += u128::from(n);
            if seen >= want {
                return Some(bound);
            }
        }
        Some(u64::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Too few sessions yet (the text says which colour).
    Wait(String),
    Pass,
    /// Green is worse than the thresholds allow: roll back.
    Fail(String),
}

impl Verdict {
    pub fn text(&self) -> String {
        match self {
            Verdict::Wait(s) => format!("waiting: {s}"),
            Verdict::Pass => "pass".into(),
            Verdict::Fail(s) => format!("fail: {s}"),
        }
    }
}

fn pct(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 * 100.0 / d as f64
    }
}

pub fn judge(j: &Judge, blue: &Counts, green: &Counts) -> Verdict {
    for (name, c) in [("blue", blue), ("green", green)] {
        if c.sessions < j.min_sessions {
            return Verdict::Wait(format!(
                "{name} has {} of the {} sessions needed",
                c.sessions, j.min_sessions
            ));
        }
    }
    let rates = [
        (
            "early closes",
            blue.early_closes,
            green.early_closes,
            j.max_early_closes_bp,
        ),
        (
            "connect errors",
            blue.connect_errors,
            green.connect_errors,
            j.max_connect_errors_bp,
        ),
        (
            "deadlines",
            blue.deadlines,
            green.deadlines,
            j.max_deadlines_bp,
        ),
        ("failures", blue.failures, green.failures, j.max_failures_bp),
    ];
    let (bn, gn) = (i128::from(blue.sessions), i128::from(green.sessions));
    for (name, b, g, max_bp) in rates {
        // g/gn - b/bn > max/10000, without division.
        let excess = (i128::from(g) * bn - i128::from(b) * gn) * 10_000;
        if excess > i128::from(max_bp) * gn * bn {
            return Verdict::Fail(format!(
                "{name}: green {:.1}% ({g} of {}) vs blue {:.1}% ({b} of {}), more than {:.1} points worse",
                pct(g, green.sessions),
                green.sessions,
                pct(b, blue.sessions),
                blue.sessions,
                f64::from(max_bp) / 100.0
            ));
        }
    }
    if let (Some(b), Some(g)) = (blue.p95_ms(), green.p95_ms()) {
        let max = j.max_first_command_p95.as_millis() as u64;
        if g.saturating_sub(b) > max {
            let show = |v: u64| {
                if v == u64::MAX {
                    "over 10s".to_string()
                } else {
                    format!("<= {v}ms")
                }
            };
            return Verdict::Fail(format!(
                "first command p95: green {} vs blue {}, more than {max}ms later",
                show(g),
                show(b)
            ));
        }
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn judge_cfg() -> Judge {
        Judge {
            enabled: true,
            interval: Duration::from_secs(1),
            min_sessions: 20,
            max_failures_bp: 100,
            max_connect_errors_bp: 100,
            max_early_closes_bp: 100,
            max_deadlines_bp: 100,
            max_first_command_p95: Duration::from_millis(100),
            peers: agiproxy_config::Peers::None,
        }
    }

    fn counts(sessions: u64, early: u64, fast: u64) -> Counts {
        let mut c = Counts {
            sessions,
            early_closes: early,
            failures: early,
            ..Counts::default()
        };
        c.first_command[0] = fast;
        c
    }

    #[test]
    fn too_few_sessions_wait() {
        let v = judge(&judge_cfg(), &counts(100, 0, 100), &counts(19, 19, 0));
        assert_eq!(
            v,
            Verdict::Wait("green has 19 of the 20 sessions needed".into())
        );
    }

    #[test]
    fn early_closes_fail_and_small_differences_pass() {
        let v = judge(&judge_cfg(), &counts(400, 0, 400), &counts(100, 20, 80));
        match v {
            Verdict::Fail(s) => assert!(
                s.starts_with("early closes: green 20.0% (20 of 100) vs blue 0.0% (0 of 400)"),
                "{s}"
            ),
            other => panic!("{other:?}"),
        }
        // One point exactly is allowed, a hair more is not.
        let ok = judge(&judge_cfg(), &counts(400, 4, 396), &counts(100, 2, 98));
        assert_eq!(ok, Verdict::Pass);
        let bad = judge(&judge_cfg(), &counts(400, 4, 396), &counts(99, 2, 97));
        assert!(matches!(bad, Verdict::Fail(_)), "{bad:?}");
    }

    #[test]
    fn a_slow_first_command_fails_on_p95() {
        let mut green = counts(100, 0, 90);
        green.first_command[6] = 10; // <= 500 ms
        let v = judge(&judge_cfg(), &counts(100, 0, 100), &green);
        assert_eq!(
            v,
            Verdict::Fail(
                "first command p95: green <= 500ms vs blue <= 5ms, more than 100ms later".into()
            )
        );
        let mut sum = counts(1, 0, 1);
        sum.add(&green);
        assert_eq!(sum.sessions, 101);
        assert_eq!(sum.p95_ms(), Some(500));
    }

    /// A peer's counters are another process's numbers: huge ones saturate
    /// (they wrapped, and panicked in a debug build), and the judge still
    /// gives a verdict.
    #[test]
    fn huge_counters_from_a_peer_saturate() {
        let mut huge = counts(u64::MAX, u64::MAX, 0);
        huge.first_command = [u64::MAX; 12];
        let mut sum = counts(369, 0, 369);
        sum.add(&huge);
        assert_eq!(sum.sessions, MAX_COUNT);
        assert_eq!(sum.p95_ms(), Some(BUCKETS_MS[11]));
        let _ = judge(&judge_cfg(), &sum, &sum);
        let _ = judge(&judge_cfg(), &counts(10, 0, 10), &sum);
        let _ = judge(&judge_cfg(), &sum, &counts(10, 0, 10));
    }
}
