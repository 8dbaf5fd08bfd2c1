//! What the control API shows and changes of rollouts: per-replica views,
//! the counters peers read, overrides written into the running config, the
//! notes on what differs from the file, and the metrics.

use agiproxy_config::{format_ms, parse_time, OverrideAction};
use agiproxy_control::api::{CanaryView, RolloutEvaluationView, RolloutView};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use super::eval::{decision_view, to_api};
use super::file::FileRollouts;
use super::overrides::{edit_text, push_override, rollout_mut};
use crate::server::ApplyError;
use crate::session::rollout::{now_ms, CompiledRollout, Side, State};
use crate::session::router::CompiledRoute;
use crate::snapshot::Snapshot;

fn rollouts(snap: &Snapshot) -> impl Iterator<Item = (&CompiledRoute, &CompiledRollout)> {
    snap.router
        .routes()
        .iter()
        .filter_map(|r| r.rollout.as_deref().map(|ro| (r, ro)))
}

/// Every rollout route of `snap`; `file`: the config file's rollouts, to
/// say where the running rollout differs from them.
pub fn views(snap: &Snapshot, file: Option<&FileRollouts>) -> Vec<RolloutView> {
    let now = now_ms();
    rollouts(snap)
        .map(|(r, ro)| view_of(snap, r, ro, file, now))
        .collect()
}

/// The rollout of the route named `route`, if it has one: that view alone
/// (`GET /v1/rollouts/{route}` built every one to pick one: audit).
pub fn view(snap: &Snapshot, route: &str, file: Option<&FileRollouts>) -> Option<RolloutView> {
    rollouts(snap)
        .find(|(r, _)| &*r.name == route)
        .map(|(r, ro)| view_of(snap, r, ro, file, now_ms()))
}

/// The names of the routes that have a rollout, in config order.
pub fn routes(snap: &Snapshot) -> Vec<String> {
    rollouts(snap).map(|(r, _)| r.name.to_string()).collect()
}

#[cfg(test)]
thread_local! {
    /// Views built on this thread: what a status call must not do.
    static VIEWS_BUILT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One rollout's view (its times formatted: the costly part).
fn view_of(
    snap: &Snapshot,
    r: &CompiledRoute,
    ro: &CompiledRollout,
    file: Option<&FileRollouts>,
    now: i64,
) -> RolloutView {
    #[cfg(test)]
    VIEWS_BUILT.with(|n| n.set(n.get() + 1));
    let pools = &snap.config.pools;
    let p = ro.position(now);
    let plan = &ro.plan;
    RolloutView {
        route: r.name.to_string(),
        from: pools[plan.from].name.clone(),
        to: pools[plan.to].name.clone(),
        state: p.state.as_str().into(),
        step: p.step.map(|s| s + 1),
        steps: plan.steps.iter().map(|bp| f64::from(*bp) / 100.0).collect(),
        weight_percent: f64::from(p.weight_bp) / 100.0,
        start: plan.start_text.clone(),
        next_step_at: p.next_change_ms.map(format_ms),
        overrides: plan
            .overrides
            .iter()
            // Both times: the file's `at` is the one written, the
            // skew before it takes effect (one time alone was
            // copied into a file, a skew late: walkthrough).
            .map(|o| {
                format!(
                    "{} in force from {} (at: {})",
                    o.action,
                    format_ms(o.at_ms),
                    format_ms(o.at_ms - plan.skew.as_millis() as i64)
                )
            })
            .collect(),
        canary: canary_view(&plan.canary),
        decision: ro.live.decision().as_ref().map(decision_view),
        last_evaluation: ro.live.evaluation().map(|e| RolloutEvaluationView {
            tick: e.tick,
            at: format_ms(e.at_ms),
            step: e.step + 1,
            replicas: e.replicas,
            blue: to_api(&e.blue),
            green: to_api(&e.green),
            verdict: e.verdict,
        }),
        active_blue: ro.live.active(Side::Blue),
        active_green: ro.live.active(Side::Green),
        unkeyed_sessions: ro.live.unkeyed.load(std::sync::atomic::Ordering::Relaxed),
        peer_clock_offset_ms: ro.live.peer_clock_offset_ms(),
        differs_from_file: file.and_then(|f| differs(&r.route.name, ro, f)),
        identity: Some(ro.live.identity.clone()),
        split_key: Some(r.route.split_key.clone()),
    }
}

/// The canary's criteria as the API shows them; None without a canary (an
/// empty `canary: {}` matches no call).
fn canary_view(m: &agiproxy_config::RouteMatch) -> Option<CanaryView> {
    if m.is_catch_all() {
        return None;
    }
    Some(CanaryView {
        query: m.query.iter().cloned().collect(),
        args: m
            .args
            .iter()
            .map(|(n, p)| (*n, p.as_str().to_string()))
            .collect(),
        vars: m
            .vars
            .iter()
            .map(|(k, p)| (k.clone(), p.as_str().to_string()))
            .collect(),
        source: m.source.iter().map(ToString::to_string).collect(),
    })
}

/// What the running rollout of `route` has that the file lacks.
fn differs(route: &str, ro: &CompiledRollout, file: &FileRollouts) -> Option<String> {
    let in_file = file.rollout(route);
    let skew = ro.plan.skew.as_millis() as i64;
    let Some(f) = in_file else {
        return Some(format!(
            "route {route}: the config file has no rollout here; a restart from the file ends it"
        ));
    };
    if let Some(d) = ro.live.decision() {
        let kept = f
            .overrides
            .iter()
            .any(|o| o.action == OverrideAction::Rollback && o.at_ms <= d.at_ms);
        if !kept {
            return Some(format!(
                "route {route}: rolled back by judgement ({}); the file does not say so: add overrides: [{{ action: rollback, at: \"{}\" }}] to keep it across a restart of every replica",
                d.reason,
                format_ms(d.at_ms - skew)
            ));
        }
    }
    // The rollout itself (what makes it the same rollout: start, steps,
    // step and judgement intervals) was replaced through the API: no
    // `overrides:` line makes the file's rollout this one (audit: the hint
    // said to write the overrides, which changed nothing).
    if f.start_ms != ro.plan.start_ms
        || f.steps != ro.plan.steps
        || f.step_duration != ro.plan.step_duration
        || f.judge.interval != ro.plan.judge.interval
        || f.skew != ro.plan.skew
    {
        return Some(format!(
            "route {route}: the running rollout is not the config file's (changed through the API: start, steps, intervals or skew); to keep it, copy the route's rollout from `agiproxy ctl config get` into the file"
        ));
    }
    if f.overrides != ro.plan.overrides {
        let list: Vec<String> = ro
            .plan
            .overrides
            .iter()
            .map(|o| {
                format!(
                    "{{ action: {}, at: \"{}\" }}",
                    o.action,
                    format_ms(o.at_ms - skew)
                )
            })
            .collect();
        return Some(format!(
            "route {route}: the running rollout differs from the config file (changed through the API); to keep it, write overrides: [{}]",
            list.join(", ")
        ));
    }
    None
}

/// One line per rollout that differs from the file, for `/v1/status`: the
/// comparison alone, no view (each view formats its times: with 500
/// rollouts, a status loop took a `--workers 1` proxy's calls from 0.9 ms
/// to 74 ms: audit). Unauthenticated callers may ask it in a loop.
pub fn notes(snap: &Snapshot, file: Option<&FileRollouts>) -> Vec<String> {
    let Some(file) = file else {
        return Vec::new();
    };
    rollouts(snap)
        .filter_map(|(r, ro)| differs(&r.route.name, ro, file))
        .collect()
}

/// This replica's counters at `tick`, for a peer.
pub fn tick(snap: &Snapshot, route: &str, tick: i64) -> Option<agiproxy_control::api::RolloutTick> {
    rollouts(snap)
        .find(|(r, _)| &*r.name == route)
        .map(|(r, ro)| super::eval::tick_view(&ro.live, tick, &r.route.split_key))
}

/// Whether the rollout of `route` reads peers: then it runs on several
/// replicas, which must all write the same override.
pub fn reads_peers(snap: &Snapshot, route: &str) -> bool {
    rollout_of(snap, route).is_some_and(|ro| ro.plan.judge.peers != agiproxy_config::Peers::None)
}

/// The rollout of the route named `route`, if it has one.
fn rollout_of<'s>(snap: &'s Snapshot, route: &str) -> Option<&'s CompiledRollout> {
    snap.rollout(route)
}

/// Why an override `action` taking effect at `effect_ms` would change
/// nothing, by the config alone (the same on every replica running it):
/// an override has promoted or rolled back the rollout by then (final), already paused
/// (`pause`), or not paused (`resume`); None when it changes something. Such overrides are not written:
/// each one grew the running config for good, until it reached
/// `limits.max_config_bytes` and even a `rollback` was refused (audit).
/// The reason goes back to the caller: `unchanged` alone did not say which.
pub fn why_override_changes_nothing(
    snap: &Snapshot,
    route: &str,
    action: OverrideAction,
    effect_ms: i64,
) -> Option<String> {
    let ro = rollout_of(snap, route)?;
    // Final only by an override: a schedule that reached 100 % reads
    // "promoted" too, and a rollback still takes it back. The overrides
    // are sorted by time: the first final one is the one that decided.
    let final_by = ro.plan.overrides.iter().find(|o| {
        o.at_ms <= effect_ms
            && matches!(o.action, OverrideAction::Promote | OverrideAction::Rollback)
    });
    // A judged rollback is as final (the schedule reads it before any
    // override): a `promote` after it was written, answered "applied", and
    // changed nothing, and a `pause` then blamed that promote (audit).
    // Known on every replica within a judgement's interval.
    let judged = ro.live.judged_ms().filter(|j| *j <= effect_ms);
    if let Some(j) = judged.filter(|j| final_by.is_none_or(|o| *j < o.at_ms)) {
        let reason = ro.live.decision().map(|d| d.reason).unwrap_or_default();
        return Some(format!(
            "the rollout was rolled back by judgement ({reason}) from {}; to roll green \
             out again, declare a new rollout (a new start)",
            format_ms(j)
        ));
    }
    if let Some(o) = final_by {
        return Some(format!(
            "the rollout is final by then: {} in force from {}",
            o.action,
            format_ms(o.at_ms)
        ));
    }
    let state = crate::session::rollout::position(&ro.plan, effect_ms, None).state;
    match (action, state) {
        (OverrideAction::Pause, State::Halted) => {
            Some("the rollout is already paused by then".into())
        }
        (OverrideAction::Resume, s) if s != State::Halted => Some(format!(
            "the rollout is not paused by then ({})",
            s.as_str()
        )),
        _ => None,
    }
}

/// The `skew` of a route's rollout in `snap`: an override takes effect that
/// long after its time.
/// The identity of the rollout of `route`, if it has one.
pub fn identity_of(snap: &Snapshot, route: &str) -> Option<String> {
    rollout_of(snap, route).map(|ro| ro.live.identity.clone())
}

pub fn skew(snap: &Snapshot, route: &str) -> Option<std::time::Duration> {
    rollout_of(snap, route).map(|ro| ro.plan.skew)
}

/// The check, at the swap, that the overrides a change adds to `route` are
/// not yet in force: the text was made (and `at` checked) before a build
/// that takes a second or more for a large config (audit).
pub fn overrides_still_ahead(route: &str, identity: Option<String>) -> crate::server::SwapCheck {
    let route = route.to_string();
    std::sync::Arc::new(move |running, new| {
        if let Some(expected) = &identity {
            let now = new.routes.iter().find(|r| r.name == route).and_then(|r| {
                let ro = r.rollout.as_deref()?;
                Some(crate::session::rollout::live::identity(
                    &route, ro, &new.pools,
                ))
            });
            if now.as_ref() != Some(expected) {
                return Err(ApplyError::Conflict(format!(
                    "the rollout on route {route} changed while the action was applied (a reload \
                     brought {}): nothing was changed; see `ctl rollout status {route}`, and act \
                     on the rollout running",
                    now.map_or("none".to_string(), |i| format!("rollout {i}"))
                )));
            }
        }
        let overrides = |c: &agiproxy_config::Config| {
            c.routes
                .iter()
                .find(|r| r.name == route)
                .and_then(|r| r.rollout.as_ref())
                .map(|ro| ro.overrides.clone())
                .unwrap_or_default()
        };
        let mut old = overrides(running);
        let now = now_ms();
        for o in overrides(new) {
            if let Some(i) = old.iter().position(|x| *x == o) {
                old.swap_remove(i);
            } else if o.at_ms <= now {
                return Err(ApplyError::Invalid(agiproxy_config::ConfigErrors(vec![
                    agiproxy_config::ConfigError::new(
                        "at",
                        format!(
                            "the override would be in force from {} but was ready only at {}: \
                             building the config took longer than the rollout's skew; nothing \
                             was changed: send it again, or raise the rollout's skew",
                            format_ms(o.at_ms),
                            format_ms(now)
                        ),
                    ),
                ])));
            }
        }
        Ok(())
    })
}

/// Appends an override to a route's rollout in a config text. Without
/// `at`, the time is this replica's clock, unless `fleet` (the rollout reads
/// peers): each replica would write its own time and their configs would
/// differ, so `at` is then required.
///
/// `skew`: the rollout's, when known. An `at` whose effect (`at` + `skew`)
/// is already past is refused: written now, it would reach back and change
/// the colour of calls placed since (audit: a replica that took ctl's
/// request seconds late, or an old `at`, moved 894 calls of 1,000).
pub fn with_override(
    text: &str,
    route: &str,
    action: &str,
    at: Option<&str>,
    fleet: bool,
    skew: Option<std::time::Duration>,
) -> Result<String, ApplyError> {
    if OverrideAction::parse(action).is_none() {
        return Err(ApplyError::NotFound(format!(
            "no rollout action {action:?}; use pause, resume, promote or rollback"
        )));
    }
    let invalid = |m: String| {
        ApplyError::Invalid(agiproxy_config::ConfigErrors(vec![
            agiproxy_config::ConfigError::new("at", m),
        ]))
    };
    edit_text(text, |doc| {
        let rollout = rollout_mut(doc, route)?;
        // Checked after the route: what does not exist is 404, `at` or not.
        if let Some(t) = at {
            let at_ms = parse_time(t).map_err(invalid)?;
            if let Some(skew) = skew {
                let takes_effect = at_ms.saturating_add(skew.as_millis() as i64);
                let now = now_ms();
                if takes_effect <= now {
                    let ago = (now - takes_effect) as f64 / 1000.0;
                    return Err(invalid(format!(
                        "{t} plus the rollout's skew ({skew:?}) is {ago:.3}s ago: written now, the \
                         override would reach back and change the colour of calls placed since; \
                         send a time less than the skew ago (`agiproxy ctl` sends the time it runs: \
                         a replica that got it too late refuses it, and running the command again \
                         gives every replica a new time)"
                    )));
                }
            }
        }
        let at = match at {
            Some(t) => t.to_string(),
            None if fleet => {
                return Err(invalid(format!(
                    "required: this rollout reads its peers (judge.peers), and every replica must write the same override; send the same {{\"at\": \"{}\"}} to each, or use `agiproxy ctl --cluster ... rollout {action} {route}`, which does",
                    format_ms(now_ms())
                )))
            }
            None => format_ms(now_ms()),
        };
        push_override(rollout, action, &at);
        Ok(())
    })
}

/// `agiproxy_rollout_*`, read from live state at scrape time.
pub fn metric_families(snap: &Snapshot) -> Vec<MetricFamily> {
    use prometheus::core::Collector;
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        IntGaugeVec::new(Opts::new(name, help).namespace("agiproxy"), labels).expect("valid metric")
    };
    let step = gauge(
        "rollout_step",
        "Step in force (1-based; 0 before the start)",
        &["route"],
    );
    let weight = prometheus::GaugeVec::new(
        Opts::new(
            "rollout_weight_percent",
            "Green's share of new calls now, percent",
        )
        .namespace("agiproxy"),
        &["route"],
    )
    .expect("valid metric");
    let state = gauge(
        "rollout_state",
        "1 for the rollout's state: pending, progressing, halted, rolled_back, promoted",
        &["route", "state"],
    );
    let active = gauge(
        "rollout_active_sessions",
        "Sessions in flight on this replica by colour (blue: from, green: to)",
        &["route", "colour"],
    );
    let unkeyed = IntCounterVec::new(
        Opts::new(
            "rollout_unkeyed_sessions_total",
            "Sessions whose key held no creation time (routed by the weight at the time, not sticky across steps)",
        )
        .namespace("agiproxy"),
        &["route"],
    )
    .expect("valid metric");
    let offset = prometheus::GaugeVec::new(
        Opts::new(
            "rollout_peer_clock_offset_seconds",
            "The peer clock farthest from this replica's at the last judgement (theirs minus ours, within half a request's round trip); beyond skew or an eighth of judge.interval calls may change colour between replicas",
        )
        .namespace("agiproxy"),
        &["route"],
    )
    .expect("valid metric");
    let missing = gauge(
        "rollout_peers_missing",
        "Peers named in judge.peers whose counters the last judgement could not use (no answer, an error such as TLS or a token, a step apart, another rollout of the route); see the WARNs that name them",
        &["route"],
    );
    let now = now_ms();
    for (r, ro) in rollouts(snap) {
        let p = ro.position(now);
        let name = &*r.name;
        step.with_label_values(&[name])
            .set(p.step.map_or(0, |s| s as i64 + 1));
        weight
            .with_label_values(&[name])
            .set(f64::from(p.weight_bp) / 100.0);
        for s in State::ALL {
            state
                .with_label_values(&[name, s.as_str()])
                .set(i64::from(s == p.state));
        }
        active
            .with_label_values(&[name, "blue"])
            .set(ro.live.active(Side::Blue));
        active
            .with_label_values(&[name, "green"])
            .set(ro.live.active(Side::Green));
        unkeyed
            .with_label_values(&[name])
            .inc_by(ro.live.unkeyed.load(std::sync::atomic::Ordering::Relaxed));
        // Only while judgement reads peers: a reload that turns it off
        // keeps this rollout's live state, and the last count with it.
        let reads_peers =
            ro.plan.judge.enabled && ro.plan.judge.peers != agiproxy_config::Peers::None;
        missing.with_label_values(&[name]).set(if reads_peers {
            ro.live.peers_missing()
        } else {
            0
        });
        if let Some(ms) = ro.live.peer_clock_offset_ms() {
            offset.with_label_values(&[name]).set(ms as f64 / 1000.0);
        }
    }
    let mut out: Vec<MetricFamily> = [step, state, active, missing]
        .iter()
        .flat_map(|g| g.collect())
        .collect();
    out.extend(weight.collect());
    out.extend(offset.collect());
    out.extend(unkeyed.collect());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "version: 1\nroutes:\n  - name: ivr\n    rollout: { from: blue, to: green, steps: [10, 100], step_duration: 1h, start: \"2026-12-06T09:00:00Z\" }\npools:\n  - name: blue\n    backends: [{ address: \"127.0.0.1:1\" }]\n  - name: green\n    backends: [{ address: \"127.0.0.1:2\" }]\n";

    /// An action is written into the rollout it was meant for alone: a
    /// reload that replaced the rollout before the swap refuses it (reload
    /// audit: a `promote` meant for the old rollout promoted the new one).
    #[test]
    fn an_action_does_not_land_on_a_rollout_a_reload_brought() {
        let old = agiproxy_config::from_yaml_str(TEXT).unwrap();
        let id = crate::session::rollout::live::identity(
            "ivr",
            old.routes[0].rollout.as_deref().unwrap(),
            &old.pools,
        );
        let edited = with_override(
            TEXT,
            "ivr",
            "promote",
            Some("2099-01-01T00:00:00Z"),
            false,
            None,
        )
        .unwrap();
        let same = agiproxy_config::from_yaml_str(&edited).unwrap();
        let check = overrides_still_ahead("ivr", Some(id.clone()));
        assert!(check(&old, &same).is_ok());
        // A reload brought a new start meanwhile: the edit is made on it.
        let replaced = edited.replace("2026-12-06T09:00:00Z", "2026-12-06T10:00:00Z");
        let new = agiproxy_config::from_yaml_str(&replaced).unwrap();
        match check(&old, &new) {
            Err(ApplyError::Conflict(m)) => assert!(m.contains("changed while"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Without an identity (older callers), as before.
        assert!(overrides_still_ahead("ivr", None)(&old, &new).is_ok());
    }

    #[test]
    fn without_at_a_rollout_on_several_replicas_is_refused() {
        let at = "2026-12-06T09:06:00Z";
        let edited = with_override(TEXT, "ivr", "rollback", Some(at), true, None).unwrap();
        assert!(edited.contains(at), "{edited}");
        // One replica: its clock is the only one.
        let edited = with_override(TEXT, "ivr", "rollback", None, false, None).unwrap();
        assert!(edited.contains("action: rollback"), "{edited}");
        match with_override(TEXT, "ivr", "rollback", None, true, None) {
            Err(ApplyError::Invalid(e)) => {
                assert_eq!(e.0[0].path, "at");
                assert!(e.0[0].message.contains("rollout rollback ivr"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // What does not exist is still 404, `at` or not.
        assert!(matches!(
            with_override(TEXT, "menu", "rollback", None, true, None),
            Err(ApplyError::NotFound(_))
        ));
        assert!(matches!(
            with_override(TEXT, "menu", "rollback", Some("yesterday"), true, None),
            Err(ApplyError::NotFound(_))
        ));
        assert!(matches!(
            with_override(TEXT, "ivr", "undo", None, true, None),
            Err(ApplyError::NotFound(_))
        ));
    }

    /// A running text that starts with a byte order mark (the config crate
    /// accepts one) is edited as the same text without it.
    #[test]
    fn a_running_text_with_a_byte_order_mark_can_be_edited() {
        let at = "2026-12-06T09:06:00Z";
        let bom = format!("\u{feff}{TEXT}");
        assert_eq!(
            with_override(&bom, "ivr", "pause", Some(at), true, None).unwrap(),
            with_override(TEXT, "ivr", "pause", Some(at), true, None).unwrap()
        );
    }

    /// An override whose effect would be in the past is refused; one in
    /// the skew's window (or later) is written.
    #[test]
    fn an_override_that_would_reach_back_is_refused() {
        let skew = Some(std::time::Duration::from_secs(2));
        let ago = |ms: i64| format_ms(now_ms() - ms);
        match with_override(TEXT, "ivr", "promote", Some(&ago(60_000)), true, skew) {
            Err(ApplyError::Invalid(e)) => {
                assert_eq!(e.0[0].path, "at");
                assert!(e.0[0].message.contains("reach back"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let edited = with_override(TEXT, "ivr", "promote", Some(&ago(500)), true, skew).unwrap();
        assert!(edited.contains("action: promote"), "{edited}");
        let ahead = format_ms(now_ms() + 60_000);
        assert!(with_override(TEXT, "ivr", "promote", Some(&ahead), true, skew).is_ok());
    }

    /// At the swap, an override the change adds must still be ahead; one
    /// the running config already has is left alone, however old.
    #[test]
    fn at_the_swap_an_added_override_must_still_be_ahead() {
        let with = |overrides: &str| {
            agiproxy_config::from_yaml_str(&TEXT.replace(
                "start: \"2026-12-06T09:00:00Z\" }",
                &format!("start: \"2026-12-06T09:00:00Z\", skew: 2s, overrides: [{overrides}] }}"),
            ))
            .unwrap()
        };
        let old = "{ action: pause, at: \"2026-12-06T09:30:00Z\" }";
        let running = with(old);
        let check = overrides_still_ahead("ivr", None);
        assert!(check(&running, &running).is_ok(), "nothing added");
        let past = format!(
            "{old}, {{ action: promote, at: \"{}\" }}",
            format_ms(now_ms() - 2_500)
        );
        match check(&running, &with(&past)) {
            Err(ApplyError::Invalid(e)) => {
                assert!(e.0[0].message.contains("was ready only at"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let ahead = format!(
            "{old}, {{ action: promote, at: \"{}\" }}",
            format_ms(now_ms() - 1_000)
        );
        assert!(check(&running, &with(&ahead)).is_ok());
        // Another route's overrides are not this check's business.
        assert!(overrides_still_ahead("menu", None)(&running, &with(&past)).is_ok());
    }

    /// What changes nothing is not written; a rollback of a schedule that
    /// reached 100 % by itself still changes something.
    #[test]
    fn an_override_that_changes_nothing_is_told_apart() {
        use crate::snapshot::{ConfigMeta, Snapshot};
        let now = now_ms();
        let start = format_ms(now - 3 * 3_600_000);
        let snap = |overrides: &str| {
            let text = TEXT.replace(
                "start: \"2026-12-06T09:00:00Z\" }",
                &format!("start: \"{start}\", overrides: [{overrides}] }}"),
            );
            let config = agiproxy_config::from_yaml_str(&text).unwrap();
            Snapshot::build(
                config,
                ConfigMeta::new(1, "test", std::sync::Arc::from("")),
                None,
            )
        };
        let nothing = |s: &Snapshot, a| why_override_changes_nothing(s, "ivr", a, now + 2_000);
        let done = snap("");
        assert_eq!(
            nothing(&done, OverrideAction::Rollback),
            None,
            "100 % by the schedule"
        );
        assert_eq!(
            nothing(&done, OverrideAction::Resume).as_deref(),
            Some("the rollout is not paused by then (promoted)")
        );
        let promoted_at = now - 3_600_000;
        let promoted = snap(&format!(
            "{{ action: promote, at: \"{}\" }}",
            format_ms(promoted_at)
        ));
        // Shown at the time it is in force (the default skew later).
        let why = format!(
            "the rollout is final by then: promote in force from {}",
            format_ms(promoted_at + 2_000)
        );
        for a in [OverrideAction::Rollback, OverrideAction::Pause] {
            assert_eq!(nothing(&promoted, a).as_deref(), Some(&*why), "final");
        }
        let paused = snap(&format!(
            "{{ action: pause, at: \"{}\" }}",
            format_ms(now - 9_000_000)
        ));
        assert_eq!(
            nothing(&paused, OverrideAction::Pause).as_deref(),
            Some("the rollout is already paused by then")
        );
        assert_eq!(nothing(&paused, OverrideAction::Resume), None);
        assert_eq!(nothing(&paused, OverrideAction::Rollback), None);

        // Rolled back by judgement: final, whatever the action, unless an
        // override made it final earlier.
        let judged = snap("");
        let ro = rollout_of(&judged, "ivr").unwrap();
        let judged_at = now - 600_000;
        assert!(ro.live.decide(crate::session::rollout::Decision {
            at_ms: judged_at,
            tick: 3,
            reason: "early closes: green 20.0%".into(),
            source: "judged here".into(),
        }));
        let why = format!(
            "the rollout was rolled back by judgement (early closes: green 20.0%) from {}; \
             to roll green out again, declare a new rollout (a new start)",
            format_ms(judged_at)
        );
        for a in [
            OverrideAction::Promote,
            OverrideAction::Pause,
            OverrideAction::Resume,
            OverrideAction::Rollback,
        ] {
            assert_eq!(nothing(&judged, a).as_deref(), Some(&*why), "{a}");
        }
        // Not yet in force when the override would take effect: no word.
        assert_eq!(
            why_override_changes_nothing(&judged, "ivr", OverrideAction::Promote, judged_at - 1),
            None
        );
        let ro = rollout_of(&promoted, "ivr").unwrap();
        assert!(ro.live.decide(crate::session::rollout::Decision {
            at_ms: judged_at,
            tick: 3,
            reason: "late".into(),
            source: "judged here".into(),
        }));
        assert!(
            nothing(&promoted, OverrideAction::Pause)
                .unwrap()
                .starts_with("the rollout is final by then: promote"),
            "the earlier promote decided"
        );
    }

    /// A rollout replaced through the API (a new `start`) is told apart
    /// from one whose overrides alone differ: writing the overrides would
    /// not make the file's rollout the running one (audit: the hint said
    /// `write overrides: []`).
    #[test]
    fn a_rollout_changed_through_the_api_says_to_copy_it_not_to_write_overrides() {
        use crate::snapshot::{ConfigMeta, Snapshot};
        let config = |start: &str, overrides: &str| {
            agiproxy_config::from_yaml_str(&TEXT.replace(
                "start: \"2026-12-06T09:00:00Z\" }",
                &format!("start: \"{start}\", overrides: [{overrides}] }}"),
            ))
            .unwrap()
        };
        let running = |start: &str, overrides: &str| {
            Snapshot::build(
                config(start, overrides),
                ConfigMeta::new(1, "test", std::sync::Arc::from("")),
                None,
            )
        };
        let file = FileRollouts::of(&config("2026-12-06T09:00:00Z", ""));
        let note = |snap: &Snapshot| {
            let (_, ro) = rollouts(snap).next().unwrap();
            differs("ivr", ro, &file)
        };
        assert_eq!(note(&running("2026-12-06T09:00:00Z", "")), None);
        let moved = note(&running("2026-12-07T09:00:00Z", "")).unwrap();
        assert!(moved.contains("ctl config get"), "{moved}");
        assert!(!moved.contains("overrides"), "{moved}");
        let paused = note(&running(
            "2026-12-06T09:00:00Z",
            "{ action: pause, at: \"2026-12-06T09:30:00Z\" }",
        ))
        .unwrap();
        assert!(
            paused.contains("write overrides: [{ action: pause, at: \"2026-12-06T09:30:00"),
            "{paused}"
        );
    }

    /// The view carries the canary's criteria in the shapes `match:` is
    /// written in, and none without a canary: an operator could not see
    /// why a test phone reached green (or did not).
    #[test]
    fn the_view_shows_the_canary_criteria() {
        use crate::snapshot::{ConfigMeta, Snapshot};
        let view = |rollout_extra: &str| {
            let text = TEXT.replace(
                "start: \"2026-12-06T09:00:00Z\" }",
                &format!("start: \"2026-12-06T09:00:00Z\"{rollout_extra} }}"),
            );
            let config = agiproxy_config::from_yaml_str(&text).unwrap();
            let snap = Snapshot::build(
                config,
                ConfigMeta::new(1, "test", std::sync::Arc::from("")),
                None,
            );
            serde_json::to_value(&views(&snap, None)[0]).unwrap()
        };
        let v = view(
            ", canary: { query: { canary: \"1\" }, args: { \"2\": \"^qa$\", \"10\": x }, \
             vars: { agi_callerid: \"^\\\\+1555\" }, source: [\"10.9.0.0/24\"] }",
        );
        assert_eq!(
            v["canary"],
            serde_json::json!({
                "query": { "canary": "1" },
                "args": { "2": "^qa$", "10": "x" },
                "vars": { "agi_callerid": "^\\+1555" },
                "source": ["10.9.0.0/24"],
            }),
            "{v}"
        );
        // Only what is set.
        let v = view(", canary: { source: [\"10.9.0.0/24\"] }");
        assert_eq!(
            v["canary"],
            serde_json::json!({ "source": ["10.9.0.0/24"] }),
            "{v}"
        );
        // No canary (or an empty one, which matches no call): no field.
        for extra in ["", ", canary: {}"] {
            let v = view(extra);
            assert!(v.get("canary").is_none(), "{v}");
        }
    }

    /// A status call compares each rollout with the file and builds no
    /// view; one route's view is built alone. Audit: every status call
    /// built every rollout's view (its times formatted) for the notes,
    /// and `GET /v1/rollouts/{route}` built them all to pick one.
    #[test]
    fn status_notes_build_no_view_and_one_route_builds_one() {
        use crate::snapshot::{ConfigMeta, Snapshot};
        let text = |start_of_r3: &str| {
            let mut t = String::from("version: 1\nroutes:\n");
            for i in 0..20 {
                let start = if i == 3 {
                    start_of_r3
                } else {
                    "2026-12-06T09:00:00Z"
                };
                t += &format!(
                    "  - name: r{i}\n    match: {{ script: {{ prefix: \"r{i}/\" }} }}\n    rollout: {{ from: blue, to: green, steps: [10, 100], step_duration: 1h, start: \"{start}\" }}\n"
                );
            }
            t + "pools:\n  - name: blue\n    backends: [{ address: \"127.0.0.1:1\" }]\n  - name: green\n    backends: [{ address: \"127.0.0.1:2\" }]\n"
        };
        let config = |start: &str| agiproxy_config::from_yaml_str(&text(start)).unwrap();
        let snap = Snapshot::build(
            config("2026-12-07T09:00:00Z"),
            ConfigMeta::new(1, "test", std::sync::Arc::from("")),
            None,
        );
        let file = FileRollouts::of(&config("2026-12-06T09:00:00Z"));
        let built = || VIEWS_BUILT.with(|n| n.replace(0));
        built();
        let notes = notes(&snap, Some(&file));
        assert_eq!(built(), 0, "a status call built views");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("route r3: "), "{notes:?}");
        // The same notes as the views carry.
        let all: Vec<String> = views(&snap, Some(&file))
            .into_iter()
            .filter_map(|v| v.differs_from_file)
            .collect();
        assert_eq!(built(), 20);
        assert_eq!(all, notes);
        let one = view(&snap, "r7", Some(&file)).unwrap();
        assert_eq!(built(), 1, "one route's view built others");
        assert_eq!(one.route, "r7");
        assert!(view(&snap, "r20", Some(&file)).is_none());
        assert_eq!(routes(&snap).len(), 20);
        assert_eq!(built(), 0);
    }
}
