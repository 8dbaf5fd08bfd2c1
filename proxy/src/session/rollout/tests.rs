//! The routing decision across simulated replicas and a simulated clock:
//! thousands of calls, each with AGIs at different times on different
//! replicas, while the rollout steps, is overridden, or rolled back.

use std::net::{IpAddr, Ipv4Addr};

use agiproxy_config::Config;

use crate::session::header::Header;
use crate::session::router::Router;

const T0: i64 = 1_796_500_000_000;
const STEP_MS: i64 = 10_000;
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn config(steps: &str, overrides: &str) -> Config {
    let text = format!(
        "version: 1\nroutes:\n  - name: ivr\n    rollout:\n      from: blue\n      to: green\n      steps: {steps}\n      step_duration: 10s\n      start: \"{}\"\n      skew: 1s\n      canary: {{ query: {{ canary: \"1\" }}, vars: {{ agi_callerid: \"^\\\\+1555\" }} }}\n{overrides}pools:\n  - name: blue\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n  - name: green\n    backends: [{{ address: \"127.0.0.1:2\" }}]\n",
        agiproxy_config::format_ms(T0)
    );
    agiproxy_config::from_yaml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn router(cfg: &Config, previous: Option<&Router>) -> Router {
    Router::new(cfg.routes.clone(), &cfg.pools, previous)
}

fn header(uniqueid: &str, extra: &str) -> Header {
    let text = format!(
        "agi_network_script: ivr\nagi_request: agi://127.0.0.1/ivr\nagi_uniqueid: {uniqueid}\nagi_callerid: 2000\n{extra}\n"
    );
    Header::parse(text.into_bytes(), 512).unwrap()
}

/// Pool index (0 blue, 1 green) for one AGI.
fn pick(r: &Router, h: &Header, now: i64) -> usize {
    r.pool_for(0, h, LOCAL, now).0
}

/// One simulated call: created at `created` (ms), AGIs at these offsets.
struct Call {
    id: String,
    created: i64,
}

fn calls(n: usize, from: i64, span: i64) -> Vec<Call> {
    (0..n)
        .map(|i| {
            let created = from + span * i as i64 / n as i64;
            Call {
                // Asterisk's form with a system name; seconds of creation.
                id: format!("pbx-1-{}.{}", created / 1000, 4000 + i),
                created,
            }
        })
        .collect()
}

#[test]
fn stickiness_across_a_moving_split_on_three_replicas_with_a_restart() {
    let cfg = config("[10, 25, 50]", "");
    let mut replicas = [router(&cfg, None), router(&cfg, None), router(&cfg, None)];
    let all = calls(2000, T0, 3 * STEP_MS);
    // Events in time order: (time, call, agi number).
    let mut events: Vec<(i64, usize, usize)> = Vec::new();
    for (i, c) in all.iter().enumerate() {
        for (j, offset) in [
            0,
            4_000 + (i as i64 % 7) * 500,
            9_000 + (i as i64 % 5) * 1000,
        ]
        .into_iter()
        .enumerate()
        {
            events.push((c.created + offset, i, j));
        }
    }
    events.sort();
    let mut seen: Vec<Option<usize>> = vec![None; all.len()];
    let mut restarted = false;
    for (now, i, j) in events {
        if !restarted && now >= T0 + 15_000 {
            // Replica 2 restarts mid-rollout: nothing carried over.
            replicas[2] = router(&cfg, None);
            restarted = true;
        }
        let h = header(&all[i].id, "");
        let pool = pick(&replicas[(i + j) % 3], &h, now);
        match seen[i] {
            None => seen[i] = Some(pool),
            Some(first) => assert_eq!(first, pool, "call {} moved at AGI {j}", all[i].id),
        }
    }
    // The share of new calls on green follows each step within 3 points.
    for (step, want) in [(0, 10.0), (1, 25.0), (2, 50.0)] {
        let (lo, hi) = (T0 + step * STEP_MS, T0 + (step + 1) * STEP_MS);
        let in_step: Vec<usize> = (0..all.len())
            .filter(|&i| (lo..hi).contains(&all[i].created))
            .collect();
        let green = in_step.iter().filter(|&&i| seen[i] == Some(1)).count();
        let share = green as f64 * 100.0 / in_step.len() as f64;
        eprintln!(
            "step {step}: {share:.1}% of {} new calls on green (want {want}%)",
            in_step.len()
        );
        assert!(
            (share - want).abs() <= 3.0,
            "step {step}: {share:.1}% on green of {} calls, want {want}%",
            in_step.len()
        );
    }
}

/// Applies `overrides` (as ctl would, through a reload) at `applied`; every
/// call's AGIs before and after must stay on one pool, and calls made once
/// the override is in force go where it says.
fn override_keeps_calls(overrides: &str, effective: i64, after: Option<usize>) {
    let before = config("[10, 25, 50]", "");
    let with = config("[10, 25, 50]", overrides);
    let old = router(&before, None);
    let new = router(&with, Some(&old));
    let applied = effective - 1_000; // ctl's time; the skew (1 s) later it counts
    let all = calls(1500, T0, 3 * STEP_MS);
    for c in &all {
        let h = header(&c.id, "");
        let r_at = |now: i64| if now < applied { &old } else { &new };
        let first = pick(r_at(c.created), &h, c.created);
        for later in [c.created + 3_000, c.created + 12_000, c.created + 40_000] {
            assert_eq!(
                pick(r_at(later), &h, later),
                first,
                "call {} (created {}) moved at {later}",
                c.id,
                c.created - T0
            );
        }
        if let Some(pool) = after {
            if c.created >= effective + 1_000 {
                assert_eq!(first, pool, "new call {} after the override", c.id);
            }
        }
    }
}

#[test]
fn rollback_promote_and_pause_are_anchored_in_time() {
    let at = agiproxy_config::format_ms(T0 + 15_000);
    // Effective 1 s (the skew) after the time written.
    let eff = T0 + 16_000;
    let o = |action: &str| format!("      overrides: [{{ action: {action}, at: \"{at}\" }}]\n");
    override_keeps_calls(&o("rollback"), eff, Some(0));
    override_keeps_calls(&o("promote"), eff, Some(1));
    override_keeps_calls(&o("pause"), eff, None);
    // The pause holds the step in force (25 %) past the schedule's next
    // (50 % from 20 s): calls that keep their colour alone would pass with
    // the pause ignored (audit).
    let paused = router(&config("[10, 25, 50]", &o("pause")), None);
    let scheduled = router(&config("[10, 25, 50]", ""), None);
    let later = calls(1500, T0 + 21_000, 9_000);
    let share = |r: &Router| {
        let green = later
            .iter()
            .filter(|c| pick(r, &header(&c.id, ""), c.created) == 1)
            .count();
        green as f64 / later.len() as f64
    };
    let (paused, scheduled) = (share(&paused), share(&scheduled));
    assert!((0.18..0.32).contains(&paused), "paused: {paused}");
    assert!((0.43..0.57).contains(&scheduled), "scheduled: {scheduled}");
}

#[test]
fn a_judged_rollback_learnt_before_it_takes_effect_moves_no_call() {
    let cfg = config("[10, 25, 50]", "");
    let replicas = [router(&cfg, None), router(&cfg, None), router(&cfg, None)];
    let at = T0 + 12_500;
    let all = calls(1500, T0, 3 * STEP_MS);
    let live = |r: &Router| r.routes()[0].rollout.as_ref().unwrap().live.clone();
    let mut learnt = [false; 3];
    let mut events: Vec<(i64, usize, usize)> = Vec::new();
    for (i, c) in all.iter().enumerate() {
        for (j, off) in [0i64, 2_000, 7_000].into_iter().enumerate() {
            events.push((c.created + off, i, j));
        }
    }
    events.sort();
    let mut seen = vec![None; all.len()];
    for (now, i, j) in events {
        // Each replica hears of the decision at its own moment, all before `at`.
        for (r, heard) in [T0 + 12_100, T0 + 12_200, T0 + 12_400]
            .into_iter()
            .enumerate()
        {
            if now >= heard && !learnt[r] {
                learnt[r] = live(&replicas[r]).decide(super::Decision {
                    at_ms: at,
                    tick: 12,
                    reason: "test".into(),
                    source: "test".into(),
                });
            }
        }
        let pool = pick(&replicas[(i + j) % 3], &header(&all[i].id, ""), now);
        match seen[i] {
            None => seen[i] = Some(pool),
            Some(first) => assert_eq!(first, pool, "call {} moved", all[i].id),
        }
        // Whole seconds: a call created in the second of `at` counts before it.
        if all[i].created >= at + 1_000 {
            assert_eq!(pool, 0, "a call made after the rollback went to green");
        }
    }
}

#[test]
fn canaries_reach_green_at_zero_percent_and_keys_without_time_are_counted() {
    let cfg = config("[10, 25]", "");
    let r = router(&cfg, None);
    let before_start = T0 - 60_000;
    let uid = format!("{}.1", before_start / 1000);
    assert_eq!(pick(&r, &header(&uid, ""), before_start), 0);
    let by_query = Header::parse(
        format!("agi_network_script: ivr?canary=1\nagi_uniqueid: {uid}\n\n").into_bytes(),
        512,
    )
    .unwrap();
    assert_eq!(pick(&r, &by_query, before_start), 1);
    let by_callerid = Header::parse(
        format!("agi_network_script: ivr\nagi_uniqueid: {uid}\nagi_callerid: +15551234\n\n")
            .into_bytes(),
        512,
    )
    .unwrap();
    assert_eq!(pick(&r, &by_callerid, before_start), 1);

    let live = r.routes()[0].rollout.as_ref().unwrap().live.clone();
    let unkeyed = |id: &str| pick(&r, &header(id, ""), T0 + 1_000);
    unkeyed("7c3e0b1a-originate");
    assert_eq!(live.unkeyed.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// A key timestamped ahead of the clock (a forged `split_key`, an
/// Asterisk whose clock is years off) took a later step's weight: at the
/// 10 % step, every such call went green (audit). Beyond the skew, it now
/// takes the weight in force now.
#[test]
fn keys_from_the_future_take_the_weight_in_force_now() {
    let cfg = config("[10, 50, 100]", "");
    let r = router(&cfg, None);
    let now = T0 + 1_000;
    let share = |secs: i64| {
        let green: usize = (0..2000)
            .map(|i| pick(&r, &header(&format!("pbx-1-{secs}.{i}"), ""), now))
            .sum();
        green as f64 / 2000.0
    };
    let ten_years = (T0 + 10 * 365 * 86_400_000) / 1000;
    let in_an_hour = (T0 + 3_600_000) / 1000;
    for secs in [ten_years, in_an_hour] {
        let s = share(secs);
        assert!((0.07..0.13).contains(&s), "{secs}: {s}");
    }
    // Within the skew (1 s), a key keeps its own time: replicas agree.
    assert!((0.07..0.13).contains(&share(now / 1000)));
}

/// A new skew moved every override, past ones included: a `promote` in
/// force for minutes was undone by `skew: 10m` (audit). Such a change is
/// refused while an override lies between the two effective times and
/// now; otherwise it goes through.
#[test]
fn a_skew_change_that_moves_an_override_across_now_is_refused() {
    let written = T0 + 60_000;
    let promote = format!(
        "      overrides: [{{ action: promote, at: \"{}\" }}]\n",
        agiproxy_config::format_ms(written)
    );
    let old = config("[10, 25, 50]", &promote);
    let mut new = old.clone();
    let ro = new.routes[0].rollout.as_deref_mut().unwrap();
    let was = ro.skew.as_millis() as i64;
    ro.skew = std::time::Duration::from_secs(600);
    for o in &mut ro.overrides {
        o.at_ms = o.at_ms - was + 600_000;
    }
    // In force (written + 1 s) for 4 s: 10 m would undo it.
    let e = super::skew_changes(&old, &new, written + 5_000);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].path, "routes[0].rollout.skew");
    assert!(
        e[0].message.contains("promote override"),
        "{}",
        e[0].message
    );
    // In force under both: nothing moves across now.
    assert!(super::skew_changes(&old, &new, written + 700_000).is_empty());
    // Not due under either.
    assert!(super::skew_changes(&old, &new, written - 5_000).is_empty());
    // The same skew: nothing to check.
    assert!(super::skew_changes(&old, &old, written + 5_000).is_empty());
}

/// Overrides changed by a file (rollout audit): what changes where calls
/// made before now went is refused; what changes only the future, or
/// writes down what already happened (the judged rollback's time), is not.
#[test]
fn an_override_change_that_reaches_back_is_found() {
    let at = |ms: i64, action: &str| {
        format!(
            "{{ action: {action}, at: \"{}\" }}",
            agiproxy_config::format_ms(ms)
        )
    };
    let with = |list: &[String]| {
        config(
            "[10, 25, 50]",
            &format!("      overrides: [{}]\n", list.join(", ")),
        )
    };
    let none = with(&[]);
    let now = T0 + 25_000; // step 2 (50 %), steps 10 s long
    let check = |old: &Config, new: &Config, judged: Option<i64>| {
        super::past_changes(old, new, now, |_| judged)
    };
    // A rollback written for the past: refused, naming the time.
    let past = with(&[at(now - 8_000, "rollback")]);
    let e = check(&none, &past, None);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].path, "routes[0].rollout.overrides");
    let effect = agiproxy_config::format_ms(now - 7_000); // skew 1 s
    assert!(e[0].message.contains(&effect), "{}", e[0].message);
    assert!(e[0].message.contains("rolled back now"), "{}", e[0].message);
    // For the future: taken. Deleted while not due yet: taken.
    let future = with(&[at(now + 8_000, "rollback")]);
    assert!(check(&none, &future, None).is_empty());
    // Before the start, a promote due then is in the future (the first
    // version compared at the earliest time even when that was after now,
    // and refused every API override of a rollout not started).
    let before_start = with(&[at(T0 - 1_000, "promote")]);
    assert!(super::past_changes(&none, &before_start, T0 - 5_000, |_| None).is_empty());
    assert!(check(&future, &none, None).is_empty());
    // A pause in force since step 0, deleted: the calls made at 25 % and
    // 50 % since were placed at 10 %. Refused; a resume written is taken.
    let paused = with(&[at(T0 + 2_000, "pause")]);
    assert_eq!(check(&paused, &none, None).len(), 1);
    let resumed = with(&[at(T0 + 2_000, "pause"), at(now + 2_000, "resume")]);
    assert!(check(&paused, &resumed, None).is_empty());
    // A pause in force that no step passed under: deleting it moves no
    // call placed so far (only what comes next).
    let late_pause = with(&[at(now - 3_000, "pause")]);
    assert!(check(&late_pause, &none, None).is_empty());
    // The judged rollback's time written down: taken; a second earlier
    // reaches back.
    let judged = now - 5_000;
    let written = with(&[at(judged - 1_000, "rollback")]);
    assert!(check(&none, &written, Some(judged)).is_empty());
    let earlier = with(&[at(judged - 2_000, "rollback")]);
    assert_eq!(check(&none, &earlier, Some(judged)).len(), 1);
    // A new skew that moves overrides alike is `skew_changes`' to judge.
    let mut skewed = past.clone();
    let ro = skewed.routes[0].rollout.as_deref_mut().unwrap();
    ro.skew = std::time::Duration::from_secs(3);
    for o in &mut ro.overrides {
        o.at_ms += 2_000;
    }
    assert!(check(&past, &skewed, None).is_empty());
}

/// A new `split_key` while the rollout splits calls re-hashed every call in
/// progress on the other key: 133 of 300 changed colour at 30 % (audit),
/// nothing said. Refused while green's share is strictly between 0 and
/// 100 %; before the start and once final it goes through.
#[test]
fn a_split_key_change_while_the_rollout_splits_calls_is_refused() {
    let old = config("[10, 30, 100]", "");
    let mut new = old.clone();
    new.routes[0].split_key = "agi_arg_1".into();
    let r = router(&old, None);
    let at = |t: i64| {
        let r = &r;
        move |route: &str| {
            let ro = r.routes().iter().find(|x| &*x.name == route)?;
            Some(ro.rollout.as_deref()?.position(t))
        }
    };
    // Step 2 (30 %).
    let e = super::split_key_changes(&old, &new, at(T0 + 15_000));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].path, "routes[0].split_key");
    assert!(
        e[0].message.contains("30% of calls") && e[0].message.contains("about 42%"),
        "{}",
        e[0].message
    );
    // Before the start, and once promoted (100 %): nothing is split.
    assert!(super::split_key_changes(&old, &new, at(T0 - 5_000)).is_empty());
    assert!(super::split_key_changes(&old, &new, at(T0 + 60_000)).is_empty());
    // The same key, or a new rollout (another start): nothing to check.
    assert!(super::split_key_changes(&old, &old, at(T0 + 15_000)).is_empty());
    let mut other = new.clone();
    other.routes[0].rollout.as_deref_mut().unwrap().start_ms += 1_000;
    assert!(super::split_key_changes(&old, &other, at(T0 + 15_000)).is_empty());
}

/// Canaries go to green at every step but not once a rollback is in force:
/// a judged rollback left test phones on a broken green (walkthrough). A
/// canary call made before the rollback keeps green for its later AGIs.
#[test]
fn canaries_go_to_blue_once_a_rollback_is_in_force() {
    let at = agiproxy_config::format_ms(T0 + 15_000);
    let with = config(
        "[10, 25, 50]",
        &format!("      overrides: [{{ action: rollback, at: \"{at}\" }}]\n"),
    );
    let r = router(&with, None);
    let canary = |created: i64, now: i64| {
        let uid = format!("{}.7", created / 1000);
        let h = Header::parse(
            format!("agi_network_script: ivr?canary=1\nagi_uniqueid: {uid}\n\n").into_bytes(),
            512,
        )
        .unwrap();
        pick(&r, &h, now)
    };
    // Made before the rollback (effective 1 s, the skew, after `at`): green, also later.
    assert_eq!(canary(T0 + 5_000, T0 + 5_000), 1);
    assert_eq!(canary(T0 + 5_000, T0 + 60_000), 1);
    // Made after it: blue.
    assert_eq!(canary(T0 + 20_000, T0 + 20_000), 0);
    assert_eq!(canary(T0 + 20_000, T0 + 60_000), 0);
}

/// A session stays in its colour's in-flight count while its guard lives,
/// and leaves it when the guard drops, also when its task unwinds from a
/// panic (the decrement once sat in the session's normal end alone).
#[test]
fn a_session_leaves_the_in_flight_count_however_it_ends() {
    use super::Side;
    let cfg = config("[10, 50]", "");
    let r = router(&cfg, None);
    let live = r.routes()[0].rollout.as_ref().unwrap().live.clone();
    let blue = live.session_started(&pick_of(Side::Blue, false));
    let green = live.session_started(&pick_of(Side::Green, false));
    assert_eq!((live.active(Side::Blue), live.active(Side::Green)), (1, 1));
    drop(blue);
    assert_eq!(live.active(Side::Blue), 0);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _held = green;
        panic!("a bug in the session");
    }));
    assert!(unwound.is_err());
    assert_eq!(live.active(Side::Green), 0);
}

fn pick_of(side: super::Side, canary: bool) -> super::Pick {
    super::Pick {
        pool: side as usize,
        side,
        step: Some(0),
        canary,
        unkeyed: false,
    }
}

/// Judgement counts a session when its colour is picked, its failures as
/// they happen (rollout audit: counted at their end, the colour whose calls
/// last longer was judged on its quick failures alone, and rolled back);
/// canaries are not counted, nor sessions the proxy itself ended.
#[test]
fn judgement_counts_sessions_from_their_start_and_only_of_the_traffic() {
    use super::Side;
    use crate::session::outcome::{Outcome, Reason};
    let cfg = config("[10, 50]", "");
    let r = router(&cfg, None);
    let live = r.routes()[0].rollout.as_ref().unwrap().live.clone();
    let long = pick_of(Side::Green, false);
    let _running = live.session_started(&long);
    let early = pick_of(Side::Green, false);
    let closed = live.session_started(&early);
    live.session_ended(&early, Outcome::Failed, Some(Reason::BackendClosed), None);
    drop(closed);
    // The call still running counts: one early close in two sessions.
    let (_, green) = live.counts(0);
    assert_eq!(
        (green.sessions, green.early_closes, green.failures),
        (2, 1, 1)
    );
    // A test phone's call, and one the drain cut: not counted.
    let canary = pick_of(Side::Green, true);
    drop(live.session_started(&canary));
    live.session_ended(&canary, Outcome::Failed, Some(Reason::BackendClosed), None);
    let cut = pick_of(Side::Green, false);
    drop(live.session_started(&cut));
    live.session_ended(&cut, Outcome::Failed, Some(Reason::ShuttingDown), None);
    let (blue, green) = live.counts(0);
    assert_eq!(
        (green.sessions, green.early_closes, green.failures),
        (2, 1, 1)
    );
    assert_eq!(blue.sessions, 0);
}
