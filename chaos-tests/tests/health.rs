//! Active health checks, passive ejection with its cap, slow start, and
//! sessions across a backend that is killed and restarted.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agiproxy::pool::{BackendState, BackendStatus};
use agiproxy::{Outcome, SessionRecord};
use chaos_tests::{AgiStatus, Behaviour, FakeBackend, Reply};
use common::*;

const INTERVAL: Duration = Duration::from_millis(100);
const JITTER: Duration = Duration::from_millis(10);
const TIMEOUT: Duration = Duration::from_millis(100);

/// The state of every backend of pool `pool`, by address.
fn states(p: &Proxy, pool: &str) -> HashMap<SocketAddr, BackendStatus> {
    p.server
        .snapshot()
        .pool(pool)
        .expect("pool exists")
        .snapshot_state()
        .into_iter()
        .map(|s| (s.address, s))
        .collect()
}

/// Polls `cond` every 5 ms until it holds; returns how long that took.
/// Panics after `within`.
async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

fn is_probe(header: &[u8]) -> bool {
    let text = String::from_utf8_lossy(header);
    text.contains("\nagi_channel: agiproxy/healthcheck\n")
}

/// A pool of `backends` with agi checks on script `healthz`.
fn checked_pool(
    balance: &str,
    backends: &[SocketAddr],
    rise: u32,
    fall: u32,
    extra: &str,
) -> String {
    let list: String = backends
        .iter()
        .map(|a| format!("      - {{ address: \"{a}\" }}\n"))
        .collect();
    format!(
        "routes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    balance: {balance}\n{extra}    health: {{ type: agi, script: healthz, interval: {}ms, timeout: {}ms, jitter: {}ms, rise: {rise}, fall: {fall} }}\n    backends:\n{list}",
        INTERVAL.as_millis(),
        TIMEOUT.as_millis(),
        JITTER.as_millis()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_accepting_is_marked_down_then_readmitted_with_slow_start() {
    let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let (rise, fall) = (2u32, 3u32);
    let body = checked_pool(
        "round_robin",
        &[a.addr(), b.addr()],
        rise,
        fall,
        "    slow_start: 1s\n",
    );
    let p = proxy(&body).await;
    wait_until("both backends pass a check", Duration::from_secs(2), || {
        states(&p, "p")
            .values()
            .all(|s| s.check_verdict == Some(true))
    })
    .await;

    // B stops accepting: refused connects. No call is made meanwhile, so
    // only the checks can find out.
    b.stop().await;
    let down = wait_until("B marked unhealthy", Duration::from_secs(3), || {
        states(&p, "p")[&b.addr()].state == BackendState::Unhealthy
    })
    .await;
    let bound = (INTERVAL + JITTER) * fall + TIMEOUT + Duration::from_millis(100);
    assert!(down <= bound, "unhealthy after {down:?}, bound {bound:?}");
    assert!(
        down >= (INTERVAL - JITTER) * (fall - 1),
        "unhealthy after {down:?}: faster than {fall} checks can run"
    );
    let s = &states(&p, "p")[&b.addr()];
    assert!(!s.last_check.as_ref().unwrap().ok);
    assert_eq!(s.last_check.as_ref().unwrap().detail, "connect refused");

    // It gets no new sessions: not even a connect attempt.
    let mut rx = p.server.subscribe();
    for i in 0..20 {
        let out = caller("x", &format!("1.{i}")).run(p.addr).await;
        assert_eq!(out.status, AgiStatus::Success, "{out:?}");
        let rec = next_record(&mut rx).await;
        assert_eq!((rec.backend, rec.attempts), (Some(a.addr()), 1));
    }

    // Back: readmitted after `rise` passing checks, then slow start.
    b.restart().await.unwrap();
    let up = wait_until("B readmitted", Duration::from_secs(3), || {
        states(&p, "p")[&b.addr()].state != BackendState::Unhealthy
    })
    .await;
    assert!(
        up >= (INTERVAL - JITTER) * (rise - 1),
        "readmitted after {up:?}: faster than {rise} checks can run"
    );
    assert!(up <= (INTERVAL + JITTER) * (rise + 1) + TIMEOUT, "{up:?}");
    assert_eq!(states(&p, "p")[&b.addr()].state, BackendState::SlowStart);

    // Early in the 1 s window B gets a small share; round robin alone would
    // give it half.
    let mut to_b = 0;
    for i in 0..40 {
        let out = caller("x", &format!("2.{i}")).run(p.addr).await;
        assert_eq!(out.status, AgiStatus::Success, "{out:?}");
        if next_record(&mut rx).await.backend == Some(b.addr()) {
            to_b += 1;
        }
    }
    assert!(
        to_b <= 12,
        "B took {to_b} of 40 calls early in its slow start"
    );

    // After the window: its full share.
    wait_until("slow start over", Duration::from_secs(3), || {
        states(&p, "p")[&b.addr()].state == BackendState::Healthy
    })
    .await;
    let mut to_b = 0;
    for i in 0..40 {
        caller("x", &format!("3.{i}")).run(p.addr).await;
        if next_record(&mut rx).await.backend == Some(b.addr()) {
            to_b += 1;
        }
    }
    assert!(
        (16..=24).contains(&to_b),
        "B took {to_b} of 40 after slow start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agi_probes_tell_silent_and_garbage_backends_from_working_ones() {
    let good = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let silent = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let garbage = FakeBackend::start(Behaviour::Garbage(
        b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
    ))
    .await;
    // A banner whose byte 7 falls inside a character: judging it once
    // panicked, which ended the backend's check loop and froze it healthy.
    let localized = FakeBackend::start(Behaviour::Garbage("Привет\n".as_bytes().to_vec())).await;
    let verbose = FakeBackend::start(Behaviour::script(&["VERBOSE \"up\" 1"])).await;
    let mut body = checked_pool(
        "round_robin",
        &[good.addr(), silent.addr(), garbage.addr(), localized.addr()],
        1,
        2,
        "",
    );
    // A second pool whose checks expect VERBOSE: the NOOP backend fails there.
    body.push_str(&format!(
        "  - name: q\n    health: {{ script: healthz, expect: \"^VERBOSE\", interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }}\n    backends:\n      - {{ address: \"{}\" }}\n      - {{ address: \"{}\" }}\n",
        good.addr(),
        verbose.addr()
    ));
    let p = proxy(&body).await;
    wait_until("verdicts on every backend", Duration::from_secs(3), || {
        let s = states(&p, "p");
        let q = states(&p, "q");
        s[&good.addr()].state == BackendState::Healthy
            && s[&silent.addr()].state == BackendState::Unhealthy
            && s[&garbage.addr()].state == BackendState::Unhealthy
            && s[&localized.addr()].state == BackendState::Unhealthy
            && q[&good.addr()].state == BackendState::Unhealthy
            && q[&verbose.addr()].check_verdict == Some(true)
    })
    .await;
    let s = states(&p, "p");
    let detail = |st: &BackendStatus| st.last_check.as_ref().unwrap().detail.clone();
    assert_eq!(detail(&s[&good.addr()]), "first command \"NOOP\"");
    assert_eq!(detail(&s[&silent.addr()]), "no command within 100ms");
    assert!(
        detail(&s[&garbage.addr()]).contains("not an AGI command"),
        "{}",
        detail(&s[&garbage.addr()])
    );
    assert!(
        detail(&s[&localized.addr()]).contains("not an AGI command"),
        "{}",
        detail(&s[&localized.addr()])
    );
    assert!(
        detail(&states(&p, "q")[&good.addr()]).contains("does not match expect"),
        "{:?}",
        states(&p, "q")[&good.addr()]
    );

    // Calls reach only the working backend.
    let mut rx = p.server.subscribe();
    for i in 0..10 {
        let out = caller("ivr/main", &format!("1.{i}")).run(p.addr).await;
        assert_eq!(out.status, AgiStatus::Success, "{out:?}");
        let rec = next_record(&mut rx).await;
        assert_eq!((rec.backend, rec.attempts), (Some(good.addr()), 1));
    }

    // A probe is a whole, well-formed session that names itself as one; a
    // call never looks like a probe, and a probe never uses a call's script.
    for backend in [&good, &silent, &garbage, &verbose] {
        for h in backend.stats().headers() {
            let text = String::from_utf8_lossy(&h).into_owned();
            assert!(text.ends_with("\n\n"), "{text}");
            if is_probe(&h) {
                assert!(text.contains("\nagi_network_script: healthz\n"), "{text}");
                assert!(text.contains("\nagi_uniqueid: agiproxy-probe-"), "{text}");
                assert!(
                    text.contains("\nagi_context: agiproxy-healthcheck\n"),
                    "{text}"
                );
            } else {
                assert!(!text.contains("agiproxy"), "{text}");
                assert!(text.contains("\nagi_network_script: ivr/main\n"), "{text}");
            }
        }
    }
    let calls = |b: &FakeBackend| b.stats().headers().iter().filter(|h| !is_probe(h)).count();
    assert_eq!((calls(&good), calls(&silent), calls(&garbage)), (10, 0, 0));

    // The working backend's probes were answered like Asterisk answers, then
    // got HANGUP; the silent one's probes were each ended with a HANGUP too.
    let good_probes: Vec<_> = good
        .stats()
        .sessions()
        .into_iter()
        .filter(|s| is_probe(&s.header))
        .collect();
    assert!(!good_probes.is_empty());
    for s in &good_probes {
        assert_eq!(s.replies, vec!["200 result=0".to_string()], "{s:?}");
        assert_eq!(s.hangups, 1, "{s:?}");
    }
    let silent_done = silent.stats().sessions();
    assert!(!silent_done.is_empty());
    for s in &silent_done {
        assert_eq!(s.hangups, 1, "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_backend_down_a_session_fails_at_once_without_a_connect() {
    // Both accept but never speak: down as far as the checks can tell.
    let x = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let y = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let p = proxy(&checked_pool(
        "least_sessions",
        &[x.addr(), y.addr()],
        1,
        1,
        "",
    ))
    .await;
    wait_until("both unhealthy", Duration::from_secs(2), || {
        states(&p, "p")
            .values()
            .all(|s| s.state == BackendState::Unhealthy)
    })
    .await;
    let mut rx = p.server.subscribe();
    for i in 0..20 {
        let out = caller("x", &format!("1.{i}")).run(p.addr).await;
        assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
        assert_eq!(
            out.variables.get("AGIPROXY_ERROR").map(String::as_str),
            Some("no_backend")
        );
        assert!(out.elapsed < Duration::from_millis(50), "{:?}", out.elapsed);
        assert_eq!(next_record(&mut rx).await.attempts, 0);
    }
    // Whatever the backends accepted were probes.
    for b in [&x, &y] {
        assert!(b.stats().headers().iter().all(|h| is_probe(h)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_alone_never_empties_a_pool() {
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(FakeBackend::start(Behaviour::CloseImmediately).await);
    }
    let list: String = backends
        .iter()
        .map(|b| format!("      - {{ address: \"{}\" }}\n", b.addr()))
        .collect();
    let body = format!(
        "routes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    passive: {{ consecutive_failures: 1, backoff: 30s, max_backoff: 30s }}\n    backends:\n{list}"
    );
    let p = proxy(&body).await;
    let mut rx = p.server.subscribe();
    for i in 0..10 {
        let out = caller("x", &format!("1.{i}")).run(p.addr).await;
        assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
        assert_eq!(
            out.variables.get("AGIPROXY_ERROR").map(String::as_str),
            Some("backend_closed"),
            "call {i}: the pool was emptied"
        );
        let rec = next_record(&mut rx).await;
        // First call: all four tried; later: the two the cap keeps.
        assert_eq!(rec.attempts, if i == 0 { 4 } else { 2 }, "call {i}");
    }
    let pool = p.server.snapshot();
    let status = pool.pool("p").unwrap().status();
    assert!(status.panic, "{status:?}");
    assert!(status
        .backends
        .iter()
        .all(|b| b.state == BackendState::Ejected && b.ejections >= 1));
    let accepted: u64 = backends.iter().map(|b| b.stats().accepted()).sum();
    assert_eq!(accepted, 4 + 9 * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sessions_while_a_backend_is_killed_and_restarted() {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(FakeBackend::start(Behaviour::script(&["NOOP", "NOOP"])).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let victim = addrs[1];
    let p = proxy(&checked_pool(
        "least_sessions",
        &addrs,
        2,
        2,
        "    slow_start: 300ms\n    passive: { backoff: 200ms, max_backoff: 1s }\n",
    ))
    .await;
    wait_until("all pass a check", Duration::from_secs(2), || {
        states(&p, "p")
            .values()
            .all(|s| s.check_verdict == Some(true))
    })
    .await;
    let mut rx = p.server.subscribe();
    let collector = tokio::spawn(async move {
        let mut recs: Vec<SessionRecord> = Vec::new();
        while recs.len() < 1000 {
            recs.push(next_record(&mut rx).await);
        }
        recs
    });

    const WORKERS: usize = 25;
    const PER_WORKER: usize = 40;
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let addr = p.addr;
            let done = done.clone();
            tokio::spawn(async move {
                let mut outs = Vec::new();
                for i in 0..PER_WORKER {
                    let script = format!("s/{w}/{i}");
                    // Each command "runs" 10 ms: sessions are in flight
                    // on the victim when it is killed.
                    let out = caller(&script, &format!("{w}.{i}"))
                        .reply_with(|_| Reply::ok().after(Duration::from_millis(10)))
                        .run(addr)
                        .await;
                    outs.push((script, out, started.elapsed()));
                    done.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
                outs
            })
        })
        .collect();

    // Kill the victim a little way in, bring it back a little later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_flight_at_kill = backends[1].stats().active();
    backends[1].stop().await;
    let killed_at = started.elapsed();
    tokio::time::sleep(Duration::from_millis(400)).await;
    backends[1].restart().await.unwrap();
    let restarted_at = started.elapsed();
    assert!(
        done.load(Ordering::Relaxed) < 800,
        "the restart came too late to matter"
    );

    let mut outs = Vec::new();
    for w in workers {
        outs.extend(w.await.unwrap());
    }
    let recs = collector.await.unwrap();
    assert_eq!(outs.len(), 1000);
    let by_script: HashMap<&str, &SessionRecord> =
        recs.iter().map(|r| (r.script.as_str(), r)).collect();

    // Every session succeeded, except those the kill cut short on the
    // victim after they had committed there (no alternative then).
    let mut cut = 0;
    for (script, out, _) in &outs {
        let rec = by_script[script.as_str()];
        assert!(rec.backend.is_some(), "{script}: never attached: {rec:?}");
        // Cut or not, Asterisk saw a clean session: nothing a real one
        // would choke on, no hang, no hang-up of its own.
        assert!(
            out.violations.is_empty(),
            "{script}: {:?} {out:?}",
            out.violations
        );
        assert!(
            matches!(out.status, AgiStatus::Success | AgiStatus::Failure),
            "{script}: {out:?} {rec:?}"
        );
        let whole = out.status == AgiStatus::Success && out.commands == ["NOOP", "NOOP"];
        if !whole {
            assert_eq!(rec.backend, Some(victim), "{script}: {out:?} {rec:?}");
            // Told FAILURE only for what a backend dying mid-call causes
            // (its close ending the session early reads as SUCCESS).
            if out.status == AgiStatus::Failure {
                let why = out.variables.get("AGIPROXY_ERROR").map(String::as_str);
                assert!(
                    matches!(
                        why,
                        Some("backend_reset" | "backend_closed" | "next_command_timeout")
                    ),
                    "{script}: FAILURE {why:?}: {out:?} {rec:?}"
                );
            }
            cut += 1;
        }
    }
    assert!(
        cut as u64 <= in_flight_at_kill.max(1) + WORKERS as u64,
        "{cut} sessions cut, {in_flight_at_kill} were in flight"
    );
    assert!(recs
        .iter()
        .all(|r| r.outcome == Outcome::Completed || r.backend == Some(victim)));

    // The victim was used before the kill and again after the restart.
    let on_victim_after = outs
        .iter()
        .filter(|(s, _, at)| *at > restarted_at && by_script[s.as_str()].backend == Some(victim))
        .count();
    assert!(
        on_victim_after > 0,
        "never readmitted (killed at {killed_at:?})"
    );
    let on_victim_before = outs
        .iter()
        .filter(|(s, _, at)| *at < killed_at && by_script[s.as_str()].backend == Some(victim))
        .count();
    assert!(
        on_victim_before > 0,
        "the victim served nothing before the kill"
    );
    let retried = recs.iter().filter(|r| r.attempts > 1).count();
    eprintln!(
        "victim: {on_victim_before} sessions before the kill, {on_victim_after} after the restart; \
         {cut} cut by the kill ({in_flight_at_kill} in flight), {retried} retried before commit"
    );

    // The counters add up: per backend, sessions committed = records.
    let st = states(&p, "p");
    let mut total = 0;
    for a in &addrs {
        let records = recs.iter().filter(|r| r.backend == Some(*a)).count() as u64;
        assert_eq!(st[a].total_sessions, records, "{a}");
        assert_eq!(st[a].active_sessions, 0, "{a}");
        total += st[a].total_sessions;
    }
    assert_eq!(total, 1000);
    let calls_seen: usize = backends
        .iter()
        .map(|b| b.stats().headers().iter().filter(|h| !is_probe(h)).count())
        .sum();
    assert!(calls_seen >= 1000, "{calls_seen}");
    // And the proxy's own metric agrees (summed over whatever labels it has).
    let m = p.server.metrics().render();
    let completed = recs
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .count() as u64;
    let metric: u64 = m
        .lines()
        .filter(|l| {
            l.starts_with("agiproxy_sessions_total{") && l.contains("outcome=\"completed\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(metric, completed, "{m}");
}

/// A one-backend pool at `backend` with `health` (a YAML flow map, or
/// nothing): a body for [`proxy`].
fn one_checked(backend: SocketAddr, health: &str) -> String {
    let health = if health.is_empty() {
        String::new()
    } else {
        format!("    health: {health}\n")
    };
    format!(
        "routes:\n  - name: all\n    pool: p\npools:\n  - name: p\n{health}    backends:\n      - {{ address: \"{backend}\" }}\n"
    )
}

/// Replaces the running config of `p` with `body` (as [`proxy`] takes it).
async fn reload(p: &Proxy, body: &str) {
    let text =
        format!("version: 1\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\n{body}");
    p.server
        .apply(&text, "test", false, None)
        .await
        .expect("the reload applies");
}

/// Waits until the backend has taken a new connection (a probe: no call is
/// made) and returns how many it has taken.
async fn next_probe(b: &FakeBackend) -> u64 {
    let seen = b.stats().accepted();
    wait_until("the next probe", Duration::from_secs(3), || {
        b.stats().accepted() > seen
    })
    .await;
    b.stats().accepted()
}

/// Regression: a reload that removes `health:` forgets the verdict; a probe
/// of the old checks still in flight then failed and, landing on a backend
/// that was no longer checked, marked it unhealthy for good: nothing was
/// left to check it again, and every call got `no_backend`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_probe_in_flight_does_not_undo_a_reload_that_removes_checks() {
    let b = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let checks = "{ type: agi, script: healthz, interval: 700ms, timeout: 500ms, jitter: 1ms, rise: 1, fall: 1 }";
    let p = proxy(&one_checked(b.addr(), checks)).await;
    wait_until("unhealthy", Duration::from_secs(3), || {
        states(&p, "p")[&b.addr()].state == BackendState::Unhealthy
    })
    .await;

    // A probe of the old checks is in flight (it fails in 500 ms) when the
    // reload removes them, and the backend is mended.
    next_probe(&b).await;
    reload(&p, &one_checked(b.addr(), "")).await;
    b.set_behaviour(Behaviour::script(&["NOOP"]));
    assert_eq!(b.stats().active(), 1, "the probe ended before the reload");
    let s = &states(&p, "p")[&b.addr()];
    assert_eq!((s.state, s.check_verdict), (BackendState::Healthy, None));

    // The probe fails, and is ignored.
    wait_until("the probe in flight ends", Duration::from_secs(2), || {
        b.stats().active() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = &states(&p, "p")[&b.addr()];
    assert_eq!(
        (s.state, s.check_verdict, s.checks),
        (BackendState::Healthy, None, 0),
        "{s:?}"
    );
    assert!(s.last_check.is_none(), "{s:?}");
    for i in 0..5 {
        let out = caller("x", &format!("1.{i}")).run(p.addr).await;
        assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    }
}

/// A reload that changes the checks: a probe of the old ones in flight
/// does not judge the backend once the new ones run (it would have made it
/// unhealthy with the old `fall: 1`, until the new `rise: 3` passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_in_flight_of_replaced_checks_does_not_judge_the_backend() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let old = "{ type: agi, script: healthz, interval: 700ms, timeout: 500ms, jitter: 1ms, rise: 1, fall: 1 }";
    let new = "{ type: agi, script: healthz, interval: 150ms, timeout: 100ms, jitter: 1ms, rise: 3, fall: 1 }";
    let p = proxy(&one_checked(b.addr(), old)).await;
    wait_until("a passing check", Duration::from_secs(3), || {
        states(&p, "p")[&b.addr()].check_verdict == Some(true)
    })
    .await;

    // The next probe of the old checks stalls (fails in 500 ms); then the
    // backend is mended and the checks change.
    b.set_behaviour(Behaviour::StallAfterHeader);
    let stalled = next_probe(&b).await;
    b.set_behaviour(Behaviour::script(&["NOOP"]));
    reload(&p, &one_checked(b.addr(), new)).await;

    // Until well after the stalled probe ended, the backend stays healthy.
    let started = Instant::now();
    let mut ended = None;
    while ended.is_none_or(|at: Instant| at.elapsed() < Duration::from_millis(400)) {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the stalled probe never ended"
        );
        let s = &states(&p, "p")[&b.addr()];
        assert_eq!(s.state, BackendState::Healthy, "{s:?}");
        let stalled_done = b
            .stats()
            .sessions()
            .iter()
            .any(|l| is_probe(&l.header) && l.replies.is_empty());
        if ended.is_none() && stalled_done {
            ended = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(b.stats().accepted() > stalled, "the new checks never ran");
    let s = &states(&p, "p")[&b.addr()];
    assert!(s.last_check.as_ref().unwrap().ok, "{s:?}");
}

/// Reloads that leave a pool's checks as they were neither rush nor restart
/// them: a control plane that changes weights every 100 ms (or a config
/// map rolled out to every replica at once) used to start every backend's
/// checks afresh, a probe within `jitter` of each reload, from every
/// replica together; and a probe in flight at a reload had its result
/// dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_that_keep_the_checks_neither_rush_nor_restart_them() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let checks = |rise| {
        format!("{{ type: agi, script: healthz, interval: 1500ms, timeout: 1s, jitter: 5ms, rise: {rise}, fall: 1 }}")
    };
    // A second, unchecked pool whose weight the "control plane" turns.
    let body = |weight: u32, rise: u32| {
        format!(
            "{}  - name: other\n    backends:\n      - {{ address: \"127.0.0.1:9\", weight: {weight} }}\n",
            one_checked(b.addr(), &checks(rise))
        )
    };
    let p = proxy(&body(1, 2)).await;
    let first = next_probe(&b).await;
    let probed = Instant::now();

    // Reloads 100 ms apart for 1 s: within the 1.5 s interval, no probe is due.
    let mut weight = 1;
    while probed.elapsed() < Duration::from_secs(1) && weight < 20 {
        weight += 1;
        reload(&p, &body(weight, 2)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(weight >= 5, "only {} reloads in 1 s", weight - 1);
    assert_eq!(
        b.stats().accepted(),
        first,
        "a reload that keeps the checks probed the backend again ({} reloads)",
        weight - 1
    );
    // The schedule carried on: the next probe is due 1.5 s after the first.
    let second = next_probe(&b).await;
    assert_eq!(second, first + 1);

    // A probe in flight at such a reload still counts: it fails (the
    // backend stalls), and with `fall: 1` the backend goes down when it
    // ends, not a check later.
    b.set_behaviour(Behaviour::StallAfterHeader);
    let stalled = next_probe(&b).await;
    reload(&p, &body(99, 2)).await;
    wait_until(
        "the stalled probe's verdict",
        Duration::from_secs(3),
        || states(&p, "p")[&b.addr()].state == BackendState::Unhealthy,
    )
    .await;
    assert_eq!(
        b.stats().accepted(),
        stalled,
        "the verdict came from another probe than the one in flight"
    );

    // A reload that changes the checks starts them afresh: a probe within
    // `jitter` (plus the watcher's 200 ms), whose verdict is the new rise's.
    b.set_behaviour(Behaviour::script(&["NOOP"]));
    let before = b.stats().accepted();
    reload(&p, &body(99, 1)).await;
    wait_until(
        "a probe of the new checks",
        Duration::from_millis(800),
        || b.stats().accepted() > before,
    )
    .await;
    wait_until("healthy again", Duration::from_secs(2), || {
        states(&p, "p")[&b.addr()].state != BackendState::Unhealthy
    })
    .await;
}
