//! `routes[i].rollout`: a declared blue-green rollout (from, to, steps, start,
//! judgement, canary, overrides kept in the file).

use std::time::Duration;

use crate::error::Errors;
use crate::model::{
    parse_time, Judge, Override, OverrideAction, Peers, Rollout, MAX_ROLLOUT_STEPS,
};
use crate::model::{BackendTarget, Dns, RouteMatch};
use crate::raw::{RawJudge, RawOverride, RawPeers, RawRollout};

use super::checks;
use super::checks::{resolve_pool, PoolNames};
use super::matcher::compile_match;

/// The shortest `skew` (see where it is checked).
const MIN_SKEW: Duration = Duration::from_secs(1);
const DEFAULT_SKEW: Duration = Duration::from_secs(2);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const MIN_INTERVAL: Duration = Duration::from_millis(200);
const DEFAULT_MIN_SESSIONS: u64 = 100;
/// One percentage point, in basis points.
const DEFAULT_MAX_EXCESS_BP: u32 = 100;
const DEFAULT_MAX_P95: Duration = Duration::from_millis(500);

pub(super) fn compile(
    raw: &RawRollout,
    path: &str,
    pool_names: &PoolNames,
    dns: &Dns,
    errs: &mut Errors,
) -> Option<Rollout> {
    let mut local = Errors::default();
    let pool = |name: &Option<String>, key: &str, example: &str, local: &mut Errors| match name {
        None => {
            local.push(
                format!("{path}.{key}"),
                format!("missing; name the pool, e.g. {key}: {example}"),
            );
            None
        }
        Some(n) => match resolve_pool(n, pool_names) {
            Ok(i) => Some(i),
            Err(m) => {
                local.push(format!("{path}.{key}"), m);
                None
            }
        },
    };
    let from = pool(&raw.from, "from", "ivr-blue", &mut local);
    let to = pool(&raw.to, "to", "ivr-green", &mut local);
    if from.is_some() && from == to {
        local.push(
            format!("{path}.to"),
            "is the same pool as from; a rollout moves calls between two pools",
        );
    }
    let steps = steps(raw.steps.as_deref(), &format!("{path}.steps"), &mut local);
    let step_duration = duration(
        raw.step_duration.as_ref().map(|d| d.0.as_str()),
        None,
        &format!("{path}.step_duration"),
        "step_duration: 10m",
        &mut local,
    );
    let start = match &raw.start {
        None => {
            local.push(
                format!("{path}.start"),
                "missing; write when step 0 begins, e.g. start: \"2026-12-06T01:00:00Z\"",
            );
            None
        }
        Some(s) => match parse_time(&s.0) {
            Ok(ms) => Some((ms, s.0.trim().to_string())),
            Err(m) => {
                local.push(format!("{path}.start"), m);
                None
            }
        },
    };
    let skew = duration(
        raw.skew.as_ref().map(|d| d.0.as_str()),
        Some(DEFAULT_SKEW),
        &format!("{path}.skew"),
        "skew: 2s",
        &mut local,
    )
    .and_then(|d| {
        // Channel keys carry whole seconds, and an override must reach
        // every replica within the skew: below a second, `ctl`'s overrides
        // were refused at random as already past (audit).
        if d < MIN_SKEW {
            local.push(
                format!("{path}.skew"),
                format!("{d:?} is too short; use at least 1s (the default is 2s)"),
            );
            None
        } else {
            Some(d)
        }
    });
    let canary = match &raw.canary {
        None => RouteMatch::default(),
        Some(m) => {
            let mut at = format!("{path}.canary");
            if m.script.is_some() {
                local.push(
                    format!("{at}.script"),
                    "a canary is chosen by query, args, vars or source; the script already chose the route",
                );
            }
            compile_match(m, &mut at, &mut local)
        }
    };
    let judge = judge(
        raw.judge.as_ref(),
        &format!("{path}.judge"),
        dns,
        &mut local,
    );
    let overrides = overrides(
        raw.overrides.as_deref().unwrap_or_default(),
        &format!("{path}.overrides"),
        skew.unwrap_or(DEFAULT_SKEW),
        &mut local,
    );

    let ok = local.is_empty();
    errs.extend(local);
    if !ok {
        return None;
    }
    let (start_ms, start_text) = start?;
    Some(Rollout {
        from: from?,
        to: to?,
        steps: steps?,
        step_duration: step_duration?,
        start_ms,
        start_text,
        skew: skew?,
        canary,
        judge: judge?,
        overrides,
    })
}

/// Percent steps to basis points: each in (0, 100], strictly rising.
fn steps(raw: Option<&[f64]>, path: &str, errs: &mut Errors) -> Option<Vec<u32>> {
    let Some(raw) = raw else {
        errs.push(
            path,
            "missing; list green's share at each step in percent, e.g. steps: [1, 5, 25, 50, 100]",
        );
        return None;
    };
    if raw.is_empty() || raw.len() > MAX_ROLLOUT_STEPS {
        errs.push(
            path,
            format!("list 1 to {MAX_ROLLOUT_STEPS} steps, e.g. [1, 5, 25, 50, 100]"),
        );
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        if !(p.is_finite() && *p > 0.0 && *p <= 100.0) {
            errs.push(
                format!("{path}[{i}]"),
                format!("{p} is not a share; steps are percent above 0, at most 100"),
            );
            return None;
        }
        let bp = (p * 100.0).round() as u32;
        if out.last().is_some_and(|last| *last >= bp) {
            errs.push(
                format!("{path}[{i}]"),
                format!("{p} does not rise above the step before; steps must increase"),
            );
            return None;
        }
        out.push(bp.max(1));
    }
    Some(out)
}

fn duration(
    raw: Option<&str>,
    default: Option<Duration>,
    path: &str,
    example: &str,
    errs: &mut Errors,
) -> Option<Duration> {
    match (raw, default) {
        (None, Some(d)) => Some(d),
        (None, None) => {
            errs.push(path, format!("missing; write e.g. {example}"));
            None
        }
        (Some(text), _) => match crate::duration::parse(text) {
            Ok(d) => Some(d),
            Err(m) => {
                errs.push(path, m);
                None
            }
        },
    }
}

/// A rate excess in percentage points (0..=100) to basis points.
fn points(raw: Option<f64>, path: &str, errs: &mut Errors) -> u32 {
    match raw {
        None => DEFAULT_MAX_EXCESS_BP,
        Some(p) if p.is_finite() && (0.0..=100.0).contains(&p) => (p * 100.0).round() as u32,
        Some(p) => {
            errs.push(
                path,
                format!("{p} is out of range; percentage points from 0 to 100 (default 1)"),
            );
            0
        }
    }
}

fn judge(raw: Option<&RawJudge>, path: &str, dns: &Dns, errs: &mut Errors) -> Option<Judge> {
    let default_raw = RawJudge {
        enabled: None,
        interval: None,
        min_sessions: None,
        max_failures: None,
        max_connect_errors: None,
        max_early_closes: None,
        max_deadlines: None,
        max_first_command_p95: None,
        peers: None,
    };
    let r = raw.unwrap_or(&default_raw);
    let interval = duration(
        r.interval.as_ref().map(|d| d.0.as_str()),
        Some(DEFAULT_INTERVAL),
        &format!("{path}.interval"),
        "interval: 30s",
        errs,
    );
    if interval.is_some_and(|i| i < MIN_INTERVAL) {
        errs.push(
            format!("{path}.interval"),
            format!(
                "shorter than {MIN_INTERVAL:?}; replicas need time to read each other's counters"
            ),
        );
    }
    let min_sessions = match r.min_sessions {
        None => DEFAULT_MIN_SESSIONS,
        Some(n) => match checks::in_range(n, 1..=u64::from(u32::MAX), Some(DEFAULT_MIN_SESSIONS)) {
            Ok(n) => n,
            Err(m) => {
                errs.push(format!("{path}.min_sessions"), m);
                DEFAULT_MIN_SESSIONS
            }
        },
    };
    let p95 = duration(
        r.max_first_command_p95.as_ref().map(|d| d.0.as_str()),
        Some(DEFAULT_MAX_P95),
        &format!("{path}.max_first_command_p95"),
        "max_first_command_p95: 500ms",
        errs,
    );
    let peers = match &r.peers {
        None => Peers::None,
        Some(RawPeers::Dns(spec)) => {
            let at = format!("{path}.peers");
            match spec.strip_prefix("dns:") {
                None => {
                    errs.push(
                        at,
                        format!("{spec:?}: write dns:NAME:PORT, dns:_control._tcp.NAME, or a list of ip:port"),
                    );
                    Peers::None
                }
                Some(name) if name.starts_with('_') => match checks::dns_name(name) {
                    Ok(name) => Peers::Dns {
                        target: BackendTarget::Srv { name },
                        dns: dns.clone(),
                    },
                    Err(m) => {
                        errs.push(at, m);
                        Peers::None
                    }
                },
                Some(name) => match checks::backend_address(name) {
                    Ok(BackendTarget::Static(a)) => Peers::Static(vec![a]),
                    Ok(target) => Peers::Dns {
                        target,
                        dns: dns.clone(),
                    },
                    Err(m) => {
                        errs.push(at, m);
                        Peers::None
                    }
                },
            }
        }
        Some(RawPeers::List(list)) => {
            let mut out = Vec::new();
            for (i, a) in list.iter().enumerate() {
                match a.trim().parse() {
                    Ok(addr) => out.push(addr),
                    Err(_) => errs.push(
                        format!("{path}.peers[{i}]"),
                        format!("{a:?} is not ip:port (a replica's control API)"),
                    ),
                }
            }
            Peers::Static(out)
        }
    };
    Some(Judge {
        enabled: r.enabled.unwrap_or(true),
        interval: interval?,
        min_sessions,
        max_failures_bp: points(r.max_failures, &format!("{path}.max_failures"), errs),
        max_connect_errors_bp: points(
            r.max_connect_errors,
            &format!("{path}.max_connect_errors"),
            errs,
        ),
        max_early_closes_bp: points(
            r.max_early_closes,
            &format!("{path}.max_early_closes"),
            errs,
        ),
        max_deadlines_bp: points(r.max_deadlines, &format!("{path}.max_deadlines"), errs),
        max_first_command_p95: p95?,
        peers,
    })
}

fn overrides(raw: &[RawOverride], path: &str, skew: Duration, errs: &mut Errors) -> Vec<Override> {
    let mut out = Vec::new();
    for (i, o) in raw.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let action = match o.action.as_deref().map(|a| (a, OverrideAction::parse(a))) {
            Some((_, Some(a))) => Some(a),
            Some((a, None)) => {
                errs.push(
                    format!("{at}.action"),
                    format!("{a:?} is not an action; use pause, resume, promote or rollback"),
                );
                None
            }
            None => {
                errs.push(format!("{at}.action"), "missing; e.g. action: rollback");
                None
            }
        };
        let time = match &o.at {
            None => {
                errs.push(
                    format!("{at}.at"),
                    "missing; the time ctl printed, e.g. at: \"2026-12-06T02:10:00Z\"",
                );
                None
            }
            Some(t) => match parse_time(&t.0) {
                Ok(ms) => Some(ms),
                Err(m) => {
                    errs.push(format!("{at}.at"), m);
                    None
                }
            },
        };
        if let (Some(action), Some(ms)) = (action, time) {
            out.push(Override {
                action,
                at_ms: ms + skew.as_millis() as i64,
            });
        }
    }
    // Stable: two overrides at one time keep their file order.
    out.sort_by_key(|o| o.at_ms);
    out
}

#[cfg(test)]
mod tests {
    use crate::from_yaml_str;

    fn cfg(rollout: &str) -> String {
        format!(
            "version: 1\nroutes:\n  - name: ivr\n    rollout:\n{rollout}\npools:\n  - name: blue\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n  - name: green\n    backends: [{{ address: \"127.0.0.1:2\" }}]\n"
        )
    }

    #[test]
    fn a_full_rollout_compiles() {
        let c = from_yaml_str(&cfg(
            "      from: blue\n      to: green\n      steps: [0.5, 5, 25, 100]\n      step_duration: 10m\n      start: \"2026-12-06T01:00:00Z\"\n      canary: { query: { canary: \"1\" }, source: [\"10.9.0.0/24\"] }\n      judge: { interval: 10s, min_sessions: 50, max_early_closes: 2.5, peers: \"dns:_control._tcp.agiproxy.svc\" }\n      overrides: [{ action: rollback, at: \"2026-12-06T01:30:00Z\" }]",
        ))
        .unwrap();
        let r = &c.routes[0];
        let ro = r.rollout.as_ref().unwrap();
        assert!(matches!(r.target, crate::RouteTarget::Pool(0)));
        assert_eq!((ro.from, ro.to), (0, 1));
        assert_eq!(ro.steps, vec![50, 500, 2500, 10000]);
        assert_eq!(ro.judge.max_early_closes_bp, 250);
        assert_eq!(ro.judge.max_failures_bp, 100);
        assert_eq!(ro.canary.query.len(), 1);
        assert_eq!(
            ro.overrides[0].at_ms,
            crate::model::parse_time("2026-12-06T01:30:02Z").unwrap()
        );
        assert!(matches!(ro.judge.peers, crate::Peers::Dns { .. }));
    }

    #[test]
    fn mistakes_are_reported_with_paths() {
        let e = from_yaml_str(&cfg(
            "      from: blue\n      to: blue\n      steps: [5, 5]\n      start: \"noon\"\n      overrides: [{ action: undo }]",
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "routes[0].rollout.to: is the same pool",
            "routes[0].rollout.steps[1]: 5 does not rise",
            "routes[0].rollout.step_duration: missing",
            "routes[0].rollout.start: \"noon\" is not an RFC 3339",
            "routes[0].rollout.overrides[0].action: \"undo\"",
            "routes[0].rollout.overrides[0].at: missing",
        ] {
            assert!(e.contains(want), "{want}\n---\n{e}");
        }
        let e = from_yaml_str(
            &cfg("      from: blue\n      to: green\n      steps: [5]\n      step_duration: 1m\n      start: \"2026-12-06T01:00:00Z\"")
                .replace("    rollout:", "    pool: blue\n    rollout:"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("routes[0]: has both pool: and rollout:"), "{e}");
    }
}
