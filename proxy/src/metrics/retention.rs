//! Keeps `sessions_total` from growing for ever. Its `backend` label is an
//! address, and with DNS discovery in Kubernetes every rollout of the
//! backends brings new pod addresses: a replica up for months would export
//! (and hold) a series for every pod that ever served it. A series whose
//! route, pool or backend has been gone from the running config and the
//! pools' current members for [`RETAIN`], with no session still running on
//! it, is dropped, as linkerd2-proxy drops the metrics of endpoints idle for
//! its `metrics_retain_idle`.
//! Prometheus reads a dropped counter as ended; if the backend comes back,
//! its series starts again from 0, which `rate()` takes as a reset.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::IntCounterVec;

/// How long a series outlives its route, pool or backend.
pub const RETAIN: Duration = Duration::from_secs(600);
/// How often series are looked at.
pub const EVERY: Duration = Duration::from_secs(60);

/// The label values a session can still end with: those of the running
/// config and of its pools' members now. `-` is always live.
#[derive(Debug, Default)]
pub struct LiveLabels {
    pub routes: HashSet<String>,
    pub pools: HashSet<String>,
    pub backends: HashSet<String>,
}

impl LiveLabels {
    /// Adds `other`'s labels.
    pub fn extend(&mut self, other: LiveLabels) {
        self.routes.extend(other.routes);
        self.pools.extend(other.pools);
        self.backends.extend(other.backends);
    }

    fn has(&self, [route, pool, backend, _]: &[String; 4]) -> bool {
        let live = |set: &HashSet<String>, v: &String| v == "-" || set.contains(v);
        live(&self.routes, route) && live(&self.pools, pool) && live(&self.backends, backend)
    }
}

/// When each series of a vanished route, pool or backend was first seen so.
#[derive(Debug, Default)]
pub struct Retention {
    gone_since: HashMap<[String; 4], Instant>,
}

impl Retention {
    /// Drops the `sessions` series whose labels have not been live for
    /// [`RETAIN`] at `now`; returns how many were dropped.
    pub fn prune(&mut self, sessions: &IntCounterVec, live: &LiveLabels, now: Instant) -> usize {
        let mut gone = HashSet::new();
        let mut dropped = 0;
        for family in sessions.collect() {
            for metric in family.get_metric() {
                let mut labels: [String; 4] = Default::default();
                for pair in metric.get_label() {
                    let at = match pair.name() {
                        "route" => 0,
                        "pool" => 1,
                        "backend" => 2,
                        "outcome" => 3,
                        _ => continue,
                    };
                    labels[at] = pair.value().to_string();
                }
                if live.has(&labels) {
                    continue;
                }
                let since = *self.gone_since.entry(labels.clone()).or_insert(now);
                if now.saturating_duration_since(since) >= RETAIN {
                    let values: Vec<&str> = labels.iter().map(String::as_str).collect();
                    if sessions.remove_label_values(&values).is_ok() {
                        dropped += 1;
                    }
                } else {
                    gone.insert(labels);
                }
            }
        }
        // Back to live, or dropped: forget them.
        self.gone_since.retain(|labels, _| gone.contains(labels));
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn series(v: &IntCounterVec) -> Vec<String> {
        let mut out: Vec<String> = v.collect()[0]
            .get_metric()
            .iter()
            .map(|m| {
                let l = m.get_label();
                // Labels come sorted by name: backend, outcome, pool, route.
                format!("{}/{}/{}", l[3].value(), l[2].value(), l[0].value())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn series_of_a_vanished_route_pool_or_backend_go_after_retain() {
        let v = IntCounterVec::new(
            Opts::new("sessions_total", "test"),
            &["route", "pool", "backend", "outcome"],
        )
        .unwrap();
        for labels in [
            ["ivr", "ivr", "10.0.0.1:4573", "completed"],
            ["ivr", "ivr", "10.0.0.2:4573", "completed"],
            ["ivr", "ivr", "10.0.0.2:4573", "failed"],
            ["old", "ivr", "10.0.0.1:4573", "completed"],
            ["ivr", "gone", "-", "failed"],
            ["-", "-", "-", "bad_header"],
        ] {
            v.with_label_values(&labels).inc();
        }
        let set = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        // 10.0.0.2 has left the pool (a pod replaced), route `old` and
        // pool `gone` the config.
        let live = LiveLabels {
            routes: set(&["ivr"]),
            pools: set(&["ivr"]),
            backends: set(&["10.0.0.1:4573", "10.0.0.3:4573"]),
        };
        let mut r = Retention::default();
        let t0 = Instant::now();
        assert_eq!(r.prune(&v, &live, t0), 0);
        assert_eq!(r.prune(&v, &live, t0 + RETAIN - EVERY), 0);
        assert_eq!(series(&v).len(), 6);

        // 10.0.0.2 comes back before its time is up: kept, and its clock
        // starts again when it leaves once more.
        let mut back = LiveLabels { ..live };
        back.backends.insert("10.0.0.2:4573".into());
        assert_eq!(r.prune(&v, &back, t0 + RETAIN - EVERY / 2), 0);
        back.backends.remove("10.0.0.2:4573");
        assert_eq!(r.prune(&v, &back, t0 + RETAIN), 2, "old and gone");
        assert_eq!(
            series(&v),
            [
                "-/-/-",
                "ivr/ivr/10.0.0.1:4573",
                "ivr/ivr/10.0.0.2:4573",
                "ivr/ivr/10.0.0.2:4573"
            ]
        );
        assert_eq!(r.prune(&v, &back, t0 + 2 * RETAIN - EVERY), 0);
        assert_eq!(r.prune(&v, &back, t0 + 2 * RETAIN), 2);
        assert_eq!(series(&v), ["-/-/-", "ivr/ivr/10.0.0.1:4573"]);
        assert!(r.gone_since.is_empty());

        // A session of an older config ending later counts again, and its
        // series is dropped RETAIN after it was next seen.
        v.with_label_values(&["old", "ivr", "10.0.0.1:4573", "completed"])
            .inc();
        let t1 = t0 + 3 * RETAIN;
        assert_eq!(r.prune(&v, &back, t1), 0);
        assert_eq!(r.prune(&v, &back, t1 + RETAIN), 1);
        assert_eq!(series(&v), ["-/-/-", "ivr/ivr/10.0.0.1:4573"]);
    }
}
