//! Rate-limited warnings. A warning that a flood repeats (descriptor
//! exhaustion, refused Asterisk headers) must not flood the log: 2,000 slow
//! connections gave 20,000 header warnings, 10 MB, in 50 s. The first
//! `burst` occurrences of each interval are logged by the caller; the rest
//! are counted by kind and, when the throttle has a summary, told in one
//! line when the interval ends (or before the next interval's first line,
//! whichever comes first). Metrics still count every occurrence.
//!
//! Atomics only: in a flood this is the hot path. The one allocation is
//! the summary's (a timer task and its text), once an interval at most.

use std::fmt::Write;
use std::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{AcqRel, Relaxed},
};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Kinds a throttle counts apart; one not in its list (or beyond this)
/// is counted in the last slot, told as `other`.
const MAX_KINDS: usize = 8;

/// Writes a summary: how many were not logged in all, and by kind
/// (`timeout: 3, malformed: 1`).
pub type Summary = fn(total: u64, by_kind: &str);

pub struct Throttle {
    every_ms: u64,
    burst: u64,
    kinds: &'static [&'static str],
    summary: Option<Summary>,
    /// When the current interval began, ms on [`now_ms`]'s clock (0: none yet).
    start: AtomicU64,
    /// Occurrences in the current interval, logged or not.
    seen: AtomicU64,
    /// Occurrences not logged since the last summary, by kind.
    skipped: [AtomicU64; MAX_KINDS],
    /// A timer will write the summary at the interval's end.
    armed: AtomicBool,
}

/// Milliseconds since the first call, from 1: 0 stays "none yet".
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl Throttle {
    /// At most `burst` lines per `every`; the others are counted under
    /// `kinds` and given to `summary` (with none, they are only dropped).
    pub const fn new(
        every: Duration,
        burst: u64,
        kinds: &'static [&'static str],
        summary: Option<Summary>,
    ) -> Throttle {
        Throttle {
            every_ms: every.as_millis() as u64,
            burst,
            kinds,
            summary,
            start: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            skipped: [const { AtomicU64::new(0) }; MAX_KINDS],
            armed: AtomicBool::new(false),
        }
    }

    /// Whether this occurrence (of `kind`, one of `kinds`) may be logged;
    /// if not, it is counted for the summary.
    pub fn admit(&'static self, kind: &str) -> bool {
        let now = now_ms();
        let start = self.start.load(Relaxed);
        if (start == 0 || now >= start + self.every_ms)
            && self
                .start
                .compare_exchange(start, now, Relaxed, Relaxed)
                .is_ok()
        {
            // A new interval: what the last one held back is told first.
            self.flush();
            self.seen.store(0, Relaxed);
        }
        if self.seen.fetch_add(1, Relaxed) < self.burst {
            return true;
        }
        let i = self
            .kinds
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(MAX_KINDS)
            .min(MAX_KINDS - 1);
        self.skipped[i].fetch_add(1, Relaxed);
        // AcqRel, as the timer's own swap: a skip that finds the timer armed
        // is seen by that timer's flush, or arms the next one.
        if self.summary.is_some() && !self.armed.swap(true, AcqRel) {
            self.arm();
        }
        false
    }

    /// Writes the summary at the end of the current interval, so a flood
    /// that stops is still told. Without a runtime (no timer), the next
    /// interval's first occurrence tells it.
    fn arm(&'static self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.armed.store(false, Relaxed);
            return;
        };
        let end = self.start.load(Relaxed) + self.every_ms;
        let wait = Duration::from_millis(end.saturating_sub(now_ms()));
        rt.spawn(async move {
            tokio::time::sleep(wait).await;
            // An RMW, so it reads (and acquires) the last skip's swap.
            self.armed.swap(false, AcqRel);
            self.flush();
        });
    }

    /// The summary of what was held back since the last one, if anything was:
    /// at the interval's end, and at exit (a count held back when the process
    /// stops within its interval was never told).
    pub fn flush(&self) {
        let mut counts = [0u64; MAX_KINDS];
        for (n, skipped) in counts.iter_mut().zip(&self.skipped) {
            *n = skipped.swap(0, Relaxed);
        }
        let total: u64 = counts.iter().sum();
        let Some(summary) = self.summary.filter(|_| total > 0) else {
            return;
        };
        let mut by_kind = String::new();
        for (i, n) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            let kind = self.kinds.get(i).copied().unwrap_or("other");
            let sep = if by_kind.is_empty() { "" } else { ", " };
            let _ = write!(by_kind, "{sep}{kind}: {n}");
        }
        summary(total, &by_kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    static TOLD: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());

    fn tell(total: u64, by_kind: &str) {
        TOLD.lock().unwrap().push((total, by_kind.to_owned()));
    }

    static T: Throttle = Throttle::new(Duration::from_millis(300), 2, &["a", "b"], Some(tell));

    #[tokio::test]
    async fn the_first_few_are_logged_the_rest_told_at_the_interval_end() {
        let admitted = (0..10)
            .filter(|i| T.admit(if i % 3 == 0 { "a" } else { "b" }))
            .count();
        assert_eq!(admitted, 2);
        assert!(TOLD.lock().unwrap().is_empty(), "told before the end");
        tokio::time::sleep(Duration::from_millis(500)).await;
        // 0 and 1 logged; of 2..9, 3, 6 and 9 are `a`.
        assert_eq!(*TOLD.lock().unwrap(), [(8, "a: 3, b: 5".to_owned())]);
        // A new interval: logged again, and nothing more to tell.
        assert!(T.admit("zzz"));
        assert!(T.admit("a"));
        assert!(!T.admit("zzz"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(TOLD.lock().unwrap()[1..], [(1, "other: 1".to_owned())]);
    }
}
