//! The pool layer's unit tests: policies, ejection, checks, slow start, tiers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::clock::now_ms;
use super::policy::smooth_wrr;
use super::*;

/// The hash key's value in a call (what a session reads from its header).
type Header = str;

fn pool_with(yaml_balance: &str, n: usize, extra: &str) -> PoolState {
    let backends: String = (0..n)
        .map(|i| {
            format!(
                "      - {{ address: \"127.0.0.1:{}\", weight: {} }}\n",
                6000 + i,
                i + 1
            )
        })
        .collect();
    let text = format!(
        "version: 1\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    balance: {yaml_balance}\n{extra}    backends:\n{backends}"
    );
    let cfg = agiproxy_config::from_yaml_str(&text).unwrap();
    // As a running snapshot's pools are (no background work is started).
    let pool = PoolState::new(&cfg.pools[0], None);
    pool.activate();
    pool
}

fn pool(yaml_balance: &str, n: usize) -> PoolState {
    pool_with(yaml_balance, n, "")
}

fn order(p: &PoolState, h: &Header) -> Result<Vec<usize>, NoBackend> {
    p.candidates(Some(h)).map(|c| c.order)
}

fn lease(p: &PoolState, i: usize) -> Option<Lease> {
    p.lease(&p.members().backends[i])
}

fn live(p: &PoolState, i: usize) -> Arc<BackendLive> {
    p.members().backends[i].live.clone()
}

fn fail(p: &PoolState, i: usize) -> Option<Duration> {
    p.passive_failure(&live(p, i), "connect refused")
}

/// Applies one check result to backend `i` as the pool's checks do.
fn record(p: &PoolState, i: usize, ok: bool, rise: u32, fall: u32) -> bool {
    live(p, i).record_check(check(ok), rise, fall, "p", &p.shared().check_epoch())
}

fn header(uid: &str) -> String {
    uid.to_string()
}

fn check(ok: bool) -> CheckResult {
    CheckResult {
        ok,
        latency: Duration::from_millis(1),
        at: SystemTime::now(),
        detail: if ok {
            "first command \"NOOP\""
        } else {
            "refused"
        }
        .into(),
    }
}

#[test]
fn smooth_wrr_interleaves() {
    assert_eq!(smooth_wrr(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    assert_eq!(smooth_wrr(&[1, 2, 3]).len(), 6);
    // Common factors do not lengthen it: the same order.
    assert_eq!(smooth_wrr(&[500, 100, 100]), smooth_wrr(&[5, 1, 1]));
}

/// A large pool's schedule is bounded (its rebuild took 30 s for 6,000
/// backends of weight 1,000) and keeps the shares within rounding.
#[test]
fn a_large_tiers_schedule_is_bounded_and_keeps_the_shares() {
    let equal = vec![1000; 4096];
    let s = smooth_wrr(&equal);
    assert_eq!(s.len(), 4096);
    let mut distinct: Vec<u32> = (1..=1000).collect();
    distinct.extend(std::iter::repeat_n(1000, 3096));
    let started = std::time::Instant::now();
    let s = smooth_wrr(&distinct);
    let took = started.elapsed();
    assert!(s.len() as u64 <= super::policy::MAX_SCHEDULE + distinct.len() as u64);
    let mut counts = vec![0u64; distinct.len()];
    for &i in &s {
        counts[i as usize] += 1;
    }
    // Weight 1000 against weight 500: twice the share, within one entry.
    let (a, b) = (counts[999], counts[499]);
    assert!(a.abs_diff(2 * b) <= 2, "{a} vs {b}");
    assert!(counts.iter().all(|&c| c >= 1));
    eprintln!(
        "4,096 backends of mixed weights: schedule of {} in {took:?}",
        s.len()
    );
}

#[test]
fn weighted_follows_weights() {
    let p = pool("weighted", 3);
    let h = header("1");
    let mut counts = [0; 3];
    for _ in 0..600 {
        counts[order(&p, &h).unwrap()[0]] += 1;
    }
    assert_eq!(counts, [100, 200, 300]);
}

#[test]
fn round_robin_rotates() {
    let p = pool("round_robin", 3);
    let h = header("1");
    let firsts: Vec<usize> = (0..6).map(|_| order(&p, &h).unwrap()[0]).collect();
    assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn least_sessions_prefers_idle_per_weight() {
    let p = pool("least_sessions", 2);
    let _l1 = lease(&p, 0).unwrap();
    let h = header("1");
    assert_eq!(order(&p, &h).unwrap()[0], 1);
    let _l2 = lease(&p, 1).unwrap();
    // 1 session on weight 1 vs 1 on weight 2: backend 1 still lighter.
    assert_eq!(order(&p, &h).unwrap()[0], 1);
}

#[test]
fn ejection_backs_off_and_empty_pool_fails_at_once() {
    let p = pool_with(
        "round_robin",
        2,
        "    max_ejection_percent: 100\n    passive: { consecutive_failures: 1, backoff: 5ms, max_backoff: 60s }\n",
    );
    assert_eq!(fail(&p, 0), Some(Duration::from_millis(5)));
    // Already ejected: a late failure does not stretch the backoff.
    assert_eq!(fail(&p, 0), None);
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(live(&p, 0).state(), BackendState::Healthy);
    assert_eq!(fail(&p, 0), Some(Duration::from_millis(10)));
    assert_eq!(fail(&p, 0), None);
    assert_eq!(live(&p, 0).state(), BackendState::Ejected);
    let h = header("1");
    assert_eq!(order(&p, &h).unwrap(), vec![1]);
    fail(&p, 1);
    assert_eq!(order(&p, &h), Err(NoBackend::AllEjected));
    p.passive_success(&live(&p, 0));
    assert_eq!(order(&p, &h).unwrap(), vec![0]);
    assert_eq!(live(&p, 0).state(), BackendState::Healthy);
    assert_eq!(live(&p, 0).ejections.load(Ordering::Relaxed), 2);
}

/// Sessions that picked a backend before it was ejected fail late (their
/// first-command wait outlasts the backoff): those failures do not eject it
/// again. A session that picks it after the backoff does count.
#[test]
fn failures_of_sessions_that_picked_a_backend_before_its_ejection_do_not_count() {
    let p = pool_with(
        "round_robin",
        2,
        "    max_ejection_percent: 100\n    passive: { consecutive_failures: 1, backoff: 5ms, max_backoff: 60s }\n",
    );
    let early: Vec<Lease> = (0..3).map(|_| lease(&p, 0).unwrap()).collect();
    assert_eq!(
        p.lease_failed(&early[0], "x"),
        Some(Duration::from_millis(5))
    );
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(live(&p, 0).state(), BackendState::Healthy);
    // The backoff is over; the other two sessions' failures come now.
    assert_eq!(p.lease_failed(&early[1], "x"), None);
    assert_eq!(p.lease_failed(&early[2], "x"), None);
    assert_eq!(live(&p, 0).state(), BackendState::Healthy);
    assert_eq!(live(&p, 0).ejections.load(Ordering::Relaxed), 1);
    // A session that picked it after the ejection counts, and the backoff
    // goes on doubling (nothing committed in between).
    let late = lease(&p, 0).unwrap();
    assert_eq!(p.lease_failed(&late, "x"), Some(Duration::from_millis(10)));
}

/// Every ejection is logged, also one that comes before the watcher has
/// reported the end of the one before.
#[test]
fn a_re_ejection_is_logged_too() {
    let log = crate::test_log::captured(|| {
        let p = pool_with(
            "round_robin",
            2,
            "    max_ejection_percent: 100\n    passive: { consecutive_failures: 1, backoff: 5ms, max_backoff: 60s }\n",
        );
        assert!(fail(&p, 0).is_some());
        std::thread::sleep(Duration::from_millis(10));
        // No watcher runs here: the end of the backoff is not reported.
        assert!(fail(&p, 0).is_some());
    });
    let ejections = log
        .lines()
        .filter(|l| l.contains("backend state changed") && l.contains("to=\"ejected\""))
        .count();
    assert_eq!(ejections, 2, "{log}");
}

#[test]
fn ejection_threshold_counts_failures_in_a_row() {
    let p = pool_with(
        "round_robin",
        2,
        "    passive: { consecutive_failures: 3, backoff: 10s }\n",
    );
    assert_eq!(fail(&p, 0), None);
    assert_eq!(fail(&p, 0), None);
    assert_eq!(fail(&p, 0), Some(Duration::from_secs(10)));
    assert_eq!(live(&p, 0).consecutive_failures.load(Ordering::Relaxed), 3);
}

#[test]
fn ejection_cap_keeps_the_least_bad_in_rotation() {
    // 4 backends, default 50%: at most 2 are ever treated as ejected.
    let p = pool_with(
        "round_robin",
        4,
        "    passive: { consecutive_failures: 1, backoff: 10s, max_backoff: 60s }\n",
    );
    let h = header("1");
    fail(&p, 0);
    fail(&p, 1);
    assert!(!p.status().panic);
    let mut o = order(&p, &h).unwrap();
    o.sort_unstable();
    assert_eq!(o, vec![2, 3]);
    // Backends 2 and 3 have failed more often before (their failure
    // streaks are longer): 0 and 1 are the least bad.
    live(&p, 2).consecutive_failures.store(1, Ordering::Relaxed);
    live(&p, 3).consecutive_failures.store(2, Ordering::Relaxed);
    fail(&p, 2);
    fail(&p, 3);
    let o = order(&p, &h).unwrap();
    assert_eq!(o.len(), 2, "the pool is never emptied by ejection: {o:?}");
    let mut o2 = o.clone();
    o2.sort_unstable();
    assert_eq!(o2, vec![0, 1], "least bad (one failure each) kept: {o:?}");
    assert!(p.status().panic);
    // A one-backend pool is never emptied by passive ejection: its
    // backend stays in rotation, ejected or not (issue 18).
    let one = pool_with(
        "round_robin",
        1,
        "    passive: { consecutive_failures: 1 }\n",
    );
    fail(&one, 0);
    assert_eq!(live(&one, 0).state(), BackendState::Ejected);
    assert_eq!(order(&one, &h).unwrap(), vec![0]);
    // Only 100% (an explicit opt-in) lets it empty the pool.
    let all = pool_with(
        "round_robin",
        1,
        "    max_ejection_percent: 100\n    passive: { consecutive_failures: 1 }\n",
    );
    fail(&all, 0);
    assert_eq!(order(&all, &h), Err(NoBackend::AllEjected));
    // 0% never treats any backend as ejected.
    let none = pool_with("round_robin", 1, "    max_ejection_percent: 0\n");
    fail(&none, 0);
    assert_eq!(order(&none, &h).unwrap(), vec![0]);
}

#[test]
fn active_checks_rise_and_fall_and_unhealthy_is_never_offered() {
    let p = pool_with(
        "round_robin",
        2,
        "    health: { type: tcp, interval: 1s, timeout: 500ms, rise: 2, fall: 3 }\n",
    );
    let b = live(&p, 0);
    let h = header("1");
    assert!(record(&p, 0, true, 2, 3));
    assert_eq!(b.check_verdict(), Some(true));
    assert!(record(&p, 0, false, 2, 3));
    assert!(record(&p, 0, false, 2, 3));
    assert_eq!(b.state(), BackendState::Healthy);
    assert!(record(&p, 0, false, 2, 3));
    assert_eq!(b.state(), BackendState::Unhealthy);
    // Unhealthy is out even past the ejection cap: it is known down.
    assert_eq!(order(&p, &h).unwrap(), vec![1]);
    assert!(record(&p, 1, false, 2, 3));
    assert_eq!(order(&p, &h), Err(NoBackend::AllEjected));
    assert!(record(&p, 0, true, 2, 3));
    assert_eq!(b.state(), BackendState::Unhealthy);
    assert!(record(&p, 0, true, 2, 3));
    assert_eq!(b.state(), BackendState::Healthy);
    assert_eq!(order(&p, &h).unwrap(), vec![0]);
    let s = &p.snapshot_state()[0];
    assert_eq!((s.checks, s.check_passes, s.check_failures), (6, 2, 0));
    assert!(s.last_check.as_ref().unwrap().ok);
}

#[test]
fn with_checks_an_ejected_backend_waits_for_a_passing_check() {
    let p = pool_with(
        "round_robin",
        2,
        "    health: { type: tcp, interval: 1s, timeout: 500ms }\n    passive: { consecutive_failures: 1, backoff: 1ms, max_backoff: 1ms }\n",
    );
    let b = live(&p, 0);
    fail(&p, 0);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(
        b.state(),
        BackendState::Ejected,
        "backoff over, no check yet"
    );
    assert!(record(&p, 0, true, 2, 3));
    assert_eq!(b.state(), BackendState::Healthy);
    assert_eq!(order(&p, &header("1")).unwrap().len(), 2);
}

#[test]
fn draining_is_never_offered() {
    let p = pool("round_robin", 2);
    assert!(p.set_draining("127.0.0.1:6000".parse().unwrap(), true));
    assert_eq!(live(&p, 0).state(), BackendState::Draining);
    assert_eq!(order(&p, &header("1")).unwrap(), vec![1]);
    assert!(!p.set_draining("127.0.0.1:1".parse().unwrap(), true));
    live(&p, 0).set_draining(false);
    assert_eq!(order(&p, &header("1")).unwrap().len(), 2);
}

#[test]
fn slow_start_share_rises_over_the_window() {
    let p = pool_with("round_robin", 2, "    slow_start: 10s\n");
    let b = live(&p, 0);
    let h = header("1");
    // Came back 1 s ago: 10% of the window, so a share of about 10%.
    b.begin_ramp(now_ms() - 1000);
    assert_eq!(b.state(), BackendState::SlowStart);
    let first = (0..2000).filter(|_| order(&p, &h).unwrap()[0] == 0).count();
    // Round robin puts it first in half the orders; it keeps ~10% of those.
    assert!((50..160).contains(&first), "{first}");
    // Always still a candidate (a fallback), never dropped.
    assert_eq!(order(&p, &h).unwrap().len(), 2);
    // 9 s in: about 90%.
    b.begin_ramp(now_ms() - 9000);
    let first = (0..2000).filter(|_| order(&p, &h).unwrap()[0] == 0).count();
    assert!((800..1000).contains(&first), "{first}");
    b.begin_ramp(now_ms() - 10_001);
    assert_eq!(b.state(), BackendState::Healthy);
}

#[test]
fn tiers_fail_over_in_order() {
    let text = "version: 1\npools:\n  - name: p\n    balance: round_robin\n    passive: { consecutive_failures: 1 }\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n      - { address: \"127.0.0.1:7002\" }\n      - { address: \"127.0.0.1:7003\" }\n";
    let p = PoolState::new(
        &agiproxy_config::from_yaml_str(text).unwrap().pools[0],
        None,
    );
    let mut bs: Vec<Backend> = p.members().backends.clone();
    bs[0].tier = 1;
    p.set_members(Members::new(bs, false));
    let h = header("1");
    for _ in 0..4 {
        let o = order(&p, &h).unwrap();
        assert_eq!(o[2], 0, "the tier-1 backend comes last: {o:?}");
    }
    p.passive_failure(&live(&p, 1), "x");
    p.passive_failure(&live(&p, 2), "x");
    // Cap 50% of 3 = 1: one of them is kept, after the tier-1 backend.
    assert_eq!(order(&p, &h).unwrap()[0], 0);
}

#[test]
fn hash_is_sticky_and_moves_only_removed_keys() {
    let text4 = "version: 1\npools:\n  - name: p\n    balance: hash\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n      - { address: \"127.0.0.1:7002\" }\n      - { address: \"127.0.0.1:7003\" }\n      - { address: \"127.0.0.1:7004\" }\n";
    let text3 = text4.replace("      - { address: \"127.0.0.1:7003\" }\n", "");
    let p4 = PoolState::new(
        &agiproxy_config::from_yaml_str(text4).unwrap().pools[0],
        None,
    );
    let p3 = PoolState::new(
        &agiproxy_config::from_yaml_str(&text3).unwrap().pools[0],
        None,
    );
    let mut moved = 0;
    for k in 0..2000 {
        let h = header(&format!("17000000{k}.{k}"));
        let a = p4.members().backends[order(&p4, &h).unwrap()[0]].addr;
        assert_eq!(a, p4.members().backends[order(&p4, &h).unwrap()[0]].addr);
        let b = p3.members().backends[order(&p3, &h).unwrap()[0]].addr;
        if a != b {
            assert_eq!(
                a.port(),
                7003,
                "a key moved that was not on the removed backend"
            );
            moved += 1;
        }
    }
    assert!(
        (350..650).contains(&moved),
        "about a quarter should move: {moved}"
    );
}

#[test]
fn max_sessions_is_a_hard_cap() {
    let text = "version: 1\npools:\n  - name: p\n    backends:\n      - { address: \"127.0.0.1:7001\", max_sessions: 1 }\n";
    let p = PoolState::new(
        &agiproxy_config::from_yaml_str(text).unwrap().pools[0],
        None,
    );
    let h = header("1");
    let l = lease(&p, 0).unwrap();
    assert_eq!(order(&p, &h), Err(NoBackend::Full));
    assert!(lease(&p, 0).is_none());
    drop(l);
    assert_eq!(live(&p, 0).active.load(Ordering::Relaxed), 0);
    assert!(lease(&p, 0).is_some());
}

/// The pool's `max_sessions` holds when calls look at once: each saw room
/// in `candidates`, and only the lease, which counts, may decide.
#[test]
fn the_pool_cap_holds_for_calls_that_looked_at_once() {
    let p = pool_with("round_robin", 2, "    max_sessions: 1\n");
    let h = header("1");
    let (first, second) = (order(&p, &h).unwrap(), order(&p, &h).unwrap());
    let l = lease(&p, first[0]).expect("room for one");
    assert!(
        lease(&p, second[0]).is_none(),
        "two sessions in a pool of one"
    );
    assert_eq!(p.live.active.load(Ordering::Relaxed), 1);
    drop(l);
    assert!(lease(&p, second[0]).is_some());
}

#[test]
fn reload_carries_backend_state_and_drops_stale_verdicts() {
    let with = "version: 1\npools:\n  - name: p\n    health: { type: tcp }\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n";
    let without =
        "version: 1\npools:\n  - name: p\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n";
    let a = PoolState::new(
        &agiproxy_config::from_yaml_str(with).unwrap().pools[0],
        None,
    );
    assert!(record(&a, 0, false, 2, 3));
    let _l = lease(&a, 0).unwrap();
    let b = PoolState::new(
        &agiproxy_config::from_yaml_str(with).unwrap().pools[0],
        Some(&a),
    );
    assert!(Arc::ptr_eq(&live(&a, 0), &live(&b, 0)));
    assert_eq!(live(&b, 0).state(), BackendState::Unhealthy);
    let c = PoolState::new(
        &agiproxy_config::from_yaml_str(without).unwrap().pools[0],
        Some(&b),
    );
    // Built but not running (a dry run): nothing changes.
    assert_eq!(live(&c, 0).state(), BackendState::Unhealthy);
    // Running (no runtime here, so no tasks): the stale verdict goes.
    c.activate();
    assert_eq!(live(&c, 0).state(), BackendState::Healthy);
    assert_eq!(live(&c, 0).active.load(Ordering::Relaxed), 1);
}

/// Pool `p` of one backend, with `health` (a YAML flow map) unless empty.
fn one_backend(health: &str) -> agiproxy_config::Pool {
    pool_p("127.0.0.1:7002", health)
}

/// Pool `p` of one backend `address` (an address or a DNS name), with
/// `health` unless empty.
fn pool_p(address: &str, health: &str) -> agiproxy_config::Pool {
    let health = if health.is_empty() {
        String::new()
    } else {
        format!("    health: {health}\n")
    };
    let text = format!(
        "version: 1\npools:\n  - name: p\n{health}    backends:\n      - {{ address: \"{address}\" }}\n"
    );
    agiproxy_config::from_yaml_str(&text)
        .unwrap()
        .pools
        .remove(0)
}

/// A reload ends the check epoch of the config it replaces: a result of the
/// old checks (a probe in flight at the reload) no longer applies, neither
/// after the checks changed nor after they went; a config built but never
/// run (a dry run) ends nothing.
#[test]
fn a_result_of_a_replaced_configs_checks_is_dropped() {
    let old_checks = one_backend("{ type: tcp, interval: 1s, fall: 1 }");
    let new_checks = one_backend("{ type: tcp, interval: 2s, fall: 1 }");
    let none = one_backend("");
    let a = PoolState::new(&old_checks, None);
    assert!(a.activate());
    let old = a.shared().check_epoch();
    assert!(record(&a, 0, true, 1, 1));
    let b = PoolState::new(&new_checks, Some(&a));
    let dry = PoolState::new(&none, Some(&a));
    assert!(record(&a, 0, true, 1, 1), "a dry run ends no epoch");
    drop(dry);

    assert!(b.activate());
    let be = live(&b, 0);
    assert!(!be.record_check(check(false), 1, 1, "p", &old));
    assert!(!be.record_not_run(&old));
    assert_eq!(
        (be.state(), be.check_verdict()),
        (BackendState::Healthy, Some(true))
    );
    assert_eq!(be.checks_not_run.load(Ordering::Relaxed), 0);
    assert!(record(&b, 0, false, 1, 1), "the new checks judge");
    assert_eq!(be.state(), BackendState::Unhealthy);

    let c = PoolState::new(&none, Some(&b));
    assert!(c.activate());
    let was = b.shared().check_epoch();
    assert!(!be.record_check(check(false), 1, 1, "p", &was));
    assert!(!be.record_check(check(true), 1, 1, "p", &old));
    assert_eq!(
        (be.state(), be.check_verdict()),
        (BackendState::Healthy, None)
    );
    assert_eq!(be.checks.load(Ordering::Relaxed), 0);
    assert!(be.last_check().is_none());
}

/// A reload that keeps a pool's checks as they were keeps their epoch: a
/// probe in flight still counts, and the loop that takes over goes on with
/// the schedule. Checks that go and come back start a new one.
#[test]
fn a_reload_that_keeps_the_checks_keeps_their_epoch() {
    let checks = one_backend("{ type: tcp, interval: 1s, fall: 2 }");
    let none = one_backend("");
    let a = PoolState::new(&checks, None);
    assert!(a.activate());
    let old = a.shared().check_epoch();
    let at = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    live(&a, 0).schedule_check(&old, at);

    let b = PoolState::new(&checks, Some(&a));
    assert!(b.activate());
    let be = live(&b, 0);
    assert_eq!(be.next_check(&b.shared().check_epoch()), Some(at));
    assert!(be.record_check(check(false), 2, 2, "p", &old));
    assert!(record(&b, 0, false, 2, 2), "the second failure in a row");
    assert_eq!(be.state(), BackendState::Unhealthy);

    let c = PoolState::new(&none, Some(&b));
    assert!(c.activate());
    let d = PoolState::new(&checks, Some(&c));
    assert!(d.activate());
    let now = d.shared().check_epoch();
    assert!(!be.record_check(check(false), 2, 2, "p", &old));
    assert_eq!(
        be.next_check(&now),
        None,
        "checks that came back start afresh"
    );
    assert_eq!(be.check_verdict(), None);
}

/// A session that began before a reload removed the pool's checks ejects
/// its backend for the backoff alone: waiting for a passing check that no
/// check would ever give kept it out for good (in rotation only while the
/// ejection cap kept it).
#[test]
fn an_ejection_after_the_checks_went_waits_for_no_check() {
    let mut checked = one_backend("{ type: tcp, interval: 1s }");
    checked.eject_after = 1;
    let mut unchecked = one_backend("");
    unchecked.eject_after = 1;
    let old = PoolState::new(&checked, None);
    assert!(old.activate());
    let new = PoolState::new(&unchecked, Some(&old));
    assert!(new.activate());
    // The old config's session fails on the backend.
    assert!(fail(&old, 0).is_some());
    let be = live(&new, 0);
    assert!(!be.awaiting_check.load(Ordering::Relaxed));
    assert!(!be.is_ejected(be.ejected_until.load(Ordering::Relaxed) + 1));

    // With the checks still there, it waits for one.
    let back = PoolState::new(&checked, Some(&new));
    assert!(back.activate());
    be.consecutive_failures.store(0, Ordering::Relaxed);
    be.ejected_until.store(0, Ordering::Relaxed);
    assert!(
        fail(&new, 0).is_some(),
        "a session of the config without checks"
    );
    assert!(be.awaiting_check.load(Ordering::Relaxed));
}

/// The end of an epoch and a result of it cannot interleave: once a
/// reload that removes the checks has activated, the verdict is forgotten
/// for good, whatever the old checks were doing meanwhile.
#[test]
fn no_result_lands_after_the_checks_are_forgotten() {
    let with = one_backend("{ type: tcp, fall: 1 }");
    let without = one_backend("");
    let mut running = PoolState::new(&with, None);
    running.activate();
    for _ in 0..200 {
        let epoch = running.shared().check_epoch();
        let be = live(&running, 0);
        // An old check loop, failing the backend as fast as it can.
        let loop_ = std::thread::spawn({
            let be = be.clone();
            move || while be.record_check(check(false), 1, 1, "p", &epoch) {}
        });
        while be.checks.load(Ordering::Relaxed) == 0 {
            std::hint::spin_loop();
        }
        let next = PoolState::new(&without, Some(&running));
        next.activate();
        loop_.join().unwrap();
        assert_eq!(live(&next, 0).check_verdict(), None);
        running = PoolState::new(&with, Some(&next));
        running.activate();
    }
}

/// Pool `p` following the DNS name `svc.test:7002`, with `health` (a YAML
/// flow map) unless empty.
fn by_name(health: &str) -> agiproxy_config::Pool {
    pool_p("svc.test:7002", health)
}

/// The name of [`by_name`] answers `addr`, and `p` rebuilds its members.
fn dns_answers(p: &PoolState, addr: std::net::SocketAddr) {
    use super::live::{key, Discovered, Found};
    let answer = Discovered {
        found: vec![Found {
            addr,
            weight: None,
            tier: 0,
            new: false,
        }],
        ..Discovered::default()
    };
    let target = &p.config().backends[0].target;
    p.live.discovery.lock().unwrap().insert(key(target), answer);
    p.shared().rebuild_members();
}

/// A backend that DNS brings back into a pool whose checks a reload
/// removed, while a session still held it: its old verdict goes too.
#[test]
fn a_backend_back_by_dns_after_checks_went_has_no_verdict() {
    let a = PoolState::new(&one_backend("{ type: tcp, fall: 1 }"), None);
    assert!(a.activate());
    assert!(record(&a, 0, false, 1, 1));
    let held = live(&a, 0);
    let b = PoolState::new(&by_name(""), Some(&a));
    assert!(b.activate());
    assert!(b.members().backends.is_empty(), "the name has not answered");
    dns_answers(&b, held.addr);
    assert!(Arc::ptr_eq(&live(&b, 0), &held));
    assert_eq!(
        (held.state(), held.check_verdict()),
        (BackendState::Healthy, None)
    );
}

/// An address DNS adds starts slow, and that is no change to log: it was
/// logged as `from="healthy" to="slow_start"` (audit: 1,572 such lines in
/// four minutes of churn, for addresses never in the pool). A change of a
/// backend known before is still logged.
#[test]
fn an_address_new_in_dns_logs_no_state_change_for_its_slow_start() {
    use super::live::{key, Discovered, Found};
    let text = "version: 1\npools:\n  - name: p\n    slow_start: 30s\n    backends:\n      - { address: \"svc.test:7002\" }\n";
    let cfg = agiproxy_config::from_yaml_str(text)
        .unwrap()
        .pools
        .remove(0);
    let p = PoolState::new(&cfg, None);
    assert!(p.activate());
    let found = |last: u8, new: bool| Found {
        addr: std::net::SocketAddr::from(([127, 0, 0, last], 7002)),
        weight: None,
        tier: 0,
        new,
    };
    let answer = |found: Vec<Found>| Discovered {
        found,
        ..Discovered::default()
    };
    let target = &cfg.backends[0].target;
    p.live
        .discovery
        .lock()
        .unwrap()
        .insert(key(target), answer(vec![found(1, false)]));
    p.shared().rebuild_members();
    p.live
        .discovery
        .lock()
        .unwrap()
        .insert(key(target), answer(vec![found(1, false), found(2, true)]));
    p.shared().rebuild_members();
    let added = live(&p, 1);
    assert_eq!(added.state(), BackendState::SlowStart);
    let log = crate::test_log::captured(|| {
        for b in &p.members().backends {
            b.live.note("p", None);
        }
        // A known backend's change is still logged.
        live(&p, 0).set_draining(true);
    });
    assert!(!log.contains("127.0.0.2:7002"), "{log}");
    assert!(
        log.contains("127.0.0.1:7002") && log.contains("to=\"draining\""),
        "{log}"
    );
}

/// A backend a reload removes while it holds a session is still listed,
/// as `draining` from `removed`, until the session ends: the pool's active
/// sessions then add up to its backends' (audit: 10 against 0).
#[test]
fn a_removed_backend_is_listed_while_it_holds_sessions() {
    let two = pool_with("round_robin", 2, "");
    let held = lease(&two, 1).unwrap();
    let gone: std::net::SocketAddr = "127.0.0.1:6001".parse().unwrap();
    let one = PoolState::new(&one_backend(""), Some(&two));
    assert!(one.activate());
    drop(two);
    let status = one.status();
    let listed: Vec<_> = status
        .backends
        .iter()
        .map(|b| (b.address, b.source.as_str(), b.state, b.active_sessions))
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        listed[1],
        (gone, "removed", BackendState::Draining, 1),
        "{listed:?}"
    );
    assert!(status.backends[1].draining);
    let sum: u32 = status.backends.iter().map(|b| b.active_sessions).sum();
    assert_eq!(sum, 1);
    drop(held);
    let addrs: Vec<_> = one.status().backends.iter().map(|b| b.address).collect();
    assert_eq!(addrs, vec!["127.0.0.1:7002".parse().unwrap()]);
}

/// Issue 18: passive ejection never turns one failure into many. With the
/// defaults, one failure ejects nothing; a backend ejected after several
/// stays in rotation when it is the pool's last; only 100% empties a pool.
#[test]
fn passive_ejection_alone_never_empties_a_pool() {
    use super::state::ejection_cap;
    // (backends not draining, of them failing checks, percent) -> cap
    for (counted, unhealthy, pct, cap) in [
        (1, 0, 50, 0),
        (1, 0, 99, 0),
        (1, 0, 100, 1),
        (2, 0, 50, 1),
        (2, 1, 50, 0),
        (3, 0, 25, 1),
        (4, 0, 50, 2),
        (4, 0, 90, 3),
        (4, 0, 100, 4),
        (4, 0, 0, 0),
        (10, 9, 50, 0),
    ] {
        assert_eq!(
            ejection_cap(counted, unhealthy, pct),
            cap,
            "{counted} backends, {unhealthy} unhealthy, {pct}%"
        );
    }
    let p = pool("round_robin", 1);
    let h = header("1");
    for _ in 0..4 {
        assert_eq!(fail(&p, 0), None, "below the default of 5 in a row");
    }
    assert_eq!(live(&p, 0).state(), BackendState::Healthy);
    assert!(fail(&p, 0).is_some(), "the 5th in a row ejects");
    assert_eq!(
        order(&p, &h).unwrap(),
        vec![0],
        "but the pool's last backend stays"
    );
    // With a second backend failing its checks, the passing one is the last.
    let two = pool_with(
        "round_robin",
        2,
        "    health: { type: tcp, interval: 1s, timeout: 500ms, fall: 1 }\n    passive: { consecutive_failures: 1 }\n",
    );
    assert!(record(&two, 1, false, 2, 1));
    fail(&two, 0);
    assert_eq!(order(&two, &h).unwrap(), vec![0]);
}

/// A reload hands the lookup of a name it keeps with the same settings over
/// to the new config; a name dropped or resolved differently ends its
/// lookup; only the config the lookups work for ends them when it retires.
/// An answer that changed between a pool's build and its activation (the
/// lookup then applied it to the config running) is in its member set.
#[test]
fn a_reload_hands_over_the_lookups_of_the_names_it_keeps() {
    use super::live::{key, Discovered, Follower, Found};
    let by_name = |name: &str, min_ttl: &str| {
        let text = format!(
            "version: 1\npools:\n  - name: p\n    dns: {{ nameservers: [\"127.0.0.1:9\"], min_ttl: {min_ttl} }}\n    backends:\n      - {{ address: \"{name}:7002\" }}\n"
        );
        agiproxy_config::from_yaml_str(&text)
            .unwrap()
            .pools
            .remove(0)
    };
    // What `discovery::start` does, without a runtime to run the lookup on.
    let follow = |p: &PoolState| {
        let cancel = tokio_util::sync::CancellationToken::new();
        let k = key(&p.config().backends[0].target);
        let dns = p.config().dns.clone();
        let mut followers = p.live.followers.lock().unwrap();
        assert!(followers.work_for(Arc::as_ptr(p.shared())));
        followers.by_name.insert(
            k,
            Follower {
                target: p.config().backends[0].target.clone(),
                dns,
                cancel: cancel.clone(),
                reloads: Default::default(),
            },
        );
        cancel
    };
    let a = PoolState::new(&by_name("x.test", "1s"), None);
    assert!(a.activate());
    let first = follow(&a);

    // Built while `a` runs; then x.test's lookup records a new answer.
    let b = PoolState::new(&by_name("X.test", "1s"), Some(&a));
    let answer = Discovered {
        found: vec![Found {
            addr: "127.0.0.1:7002".parse().unwrap(),
            weight: None,
            tier: 0,
            new: false,
        }],
        ..Discovered::default()
    };
    {
        let mut map = a.live.discovery.lock().unwrap();
        map.insert(key(&a.config().backends[0].target), answer);
        a.live.answers_changed.fetch_add(1, Ordering::Relaxed);
    }
    a.shared().rebuild_members();
    assert!(b.members().backends.is_empty());
    assert!(b.activate());
    assert_eq!(b.members().backends.len(), 1, "the new answer is applied");
    a.retire();
    drop(a);
    assert!(
        !first.is_cancelled(),
        "the same name and settings: handed over"
    );
    assert_eq!(b.live.followers.lock().unwrap().by_name.len(), 1);

    let handed = |p: &PoolState| {
        p.live
            .followers
            .lock()
            .unwrap()
            .by_name
            .values()
            .map(|f| f.reloads.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    assert_eq!(
        handed(&b),
        1,
        "told to read the system's configuration again"
    );

    // Other settings: the lookup ends (a new one starts), the answer stays.
    let c = PoolState::new(&by_name("x.test", "2s"), Some(&b));
    assert!(c.activate());
    assert!(first.is_cancelled());
    assert!(c.live.followers.lock().unwrap().by_name.is_empty());
    assert_eq!(c.members().backends.len(), 1);
    b.retire();
    let second = follow(&c);

    // The same name with a final dot asks another question (no search
    // list): the lookup ends (a new one asks at once), and the answer
    // serves until the new spelling answers; the old one's backoff goes.
    for d in c.live.discovery.lock().unwrap().values_mut() {
        d.failing = 5;
    }
    let c2 = PoolState::new(&by_name("x.test.", "2s"), Some(&c));
    assert_eq!(c2.members().backends.len(), 1, "built with the old answer");
    assert!(c2.activate());
    assert!(second.is_cancelled());
    assert!(c2.live.followers.lock().unwrap().by_name.is_empty());
    let kept: Vec<u32> = c2
        .live
        .discovery
        .lock()
        .unwrap()
        .values()
        .map(|d| d.failing)
        .collect();
    assert_eq!(kept, vec![0]);
    assert_eq!(c2.members().backends.len(), 1, "{:?}", c2.members());
    c.retire();
    let second = follow(&c2);

    // Another name: the lookup ends and the answer goes.
    {
        let mut map = c2.live.discovery.lock().unwrap();
        map.insert(key(&c2.config().backends[0].target), Discovered::default());
    }
    let d = PoolState::new(&by_name("y.test", "2s"), Some(&c2));
    assert!(d.activate());
    assert!(second.is_cancelled());
    assert!(d.live.discovery.lock().unwrap().is_empty());
    c2.retire();
    let third = follow(&d);
    // The pool goes (no newer config took the lookups over).
    drop(d);
    assert!(third.is_cancelled());
}

/// A backend that a reload removes and a later one brings back (a config
/// that flaps, a revert) comes back with its state: failing its checks,
/// ejected or drained, it is not offered (before, it came back healthy and
/// took calls until its first check: soak, 47 of 10,675 calls
/// `connect_failed`). Only for [`members::RETIRED_MS`], and nothing is
/// listed meanwhile.
#[test]
fn a_backend_removed_and_brought_back_keeps_its_state() {
    let health = "    health: { type: tcp, fall: 1, rise: 2 }\n";
    let text = |n: usize| {
        let backends: String = (0..n)
            .map(|i| format!("      - {{ address: \"127.0.0.1:{}\" }}\n", 6000 + i))
            .collect();
        let text = format!("version: 1\npools:\n  - name: p\n{health}    backends:\n{backends}");
        agiproxy_config::from_yaml_str(&text)
            .unwrap()
            .pools
            .remove(0)
    };
    let three = PoolState::new(&text(3), None);
    assert!(three.activate());
    // 6001 fails its check; 6002 is drained through the API.
    assert!(record(&three, 1, false, 2, 1));
    assert_eq!(live(&three, 1).state(), BackendState::Unhealthy);
    live(&three, 2).set_draining(true);
    // Compared by address only: held here, they would be found anyway.
    let (failing, drained) = (Arc::as_ptr(&live(&three, 1)), Arc::as_ptr(&live(&three, 2)));
    // Removed, as the old config ends (no session holds them)...
    let one = PoolState::new(&text(1), Some(&three));
    assert!(one.activate());
    drop(three);
    let listed: Vec<_> = one.status().backends.iter().map(|b| b.address).collect();
    assert_eq!(listed, vec!["127.0.0.1:6000".parse().unwrap()]);
    // ...and brought back: the same state, not offered.
    let again = PoolState::new(&text(3), Some(&one));
    assert!(again.activate());
    drop(one);
    assert_eq!(Arc::as_ptr(&live(&again, 1)), failing);
    assert_eq!(Arc::as_ptr(&live(&again, 2)), drained);
    assert_eq!(live(&again, 1).state(), BackendState::Unhealthy);
    assert!(live(&again, 2).is_draining());
    for uid in ["a", "b", "c", "d", "e", "f"] {
        assert_eq!(order(&again, &header(uid)).unwrap(), vec![0], "{uid}");
    }
    // Past the time a state is kept, an address comes back new.
    let one = PoolState::new(&text(1), Some(&again));
    assert!(one.activate());
    drop(again);
    // (Back-dated: held that long, with no reload in between.)
    for held in one.live.retired.lock().unwrap().iter_mut() {
        held.0 -= members::RETIRED_MS;
    }
    let fresh = PoolState::new(&text(2), Some(&one));
    assert!(fresh.activate());
    assert_eq!(live(&fresh, 1).state(), BackendState::Healthy);
}

/// A static backend a reload retired (drained, failing) whose address then
/// comes in a DNS answer is another host as far as the pool knows (a pod's
/// IP reused): it starts new, not drained.
#[test]
fn a_retired_static_backend_does_not_pass_its_state_to_a_dns_answer() {
    let a = PoolState::new(&one_backend("{ type: tcp, fall: 1 }"), None);
    assert!(a.activate());
    assert!(record(&a, 0, false, 1, 1));
    live(&a, 0).set_draining(true);
    let addr = live(&a, 0).addr;
    let b = PoolState::new(&by_name("{ type: tcp, fall: 1 }"), Some(&a));
    assert!(b.activate());
    drop(a);
    assert_eq!(b.live.retired.lock().unwrap().len(), 1, "held");
    dns_answers(&b, addr);
    assert!(!live(&b, 0).is_draining());
    assert_eq!(live(&b, 0).state(), BackendState::Healthy);
}
