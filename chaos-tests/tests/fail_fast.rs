//! Every failure before commit ends with AGISTATUS=FAILURE and the reason in
//! AGIPROXY_ERROR, inside the budget; at once when no backend is eligible.

mod common;

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use chaos_tests::{
    blackholed_listener, refused_addr, still_open, AgiStatus, Behaviour, FakeBackend,
};
use common::*;

const BUDGET: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn refused_backend_gives_failure_fast() {
    let p = proxy(&one_pool("round_robin", &[refused_addr()], "")).await;
    let out = caller("ivr/main", "1.1").run(p.addr).await;
    assert_failure(&out, "connect_failed");
    assert!(
        out.elapsed < Duration::from_millis(200),
        "{:?}",
        out.elapsed
    );
}

#[tokio::test]
async fn blackholed_backend_gives_failure_within_budget() {
    let (_hole, addr) = blackholed_listener();
    let p = proxy(&one_pool("round_robin", &[addr], "")).await;
    let out = caller("ivr/main", "1.1").run(p.addr).await;
    assert_failure(&out, "connect_failed");
    // One 250 ms connect attempt, well inside the budget.
    assert!(
        out.elapsed >= Duration::from_millis(240),
        "{:?}",
        out.elapsed
    );
    assert!(out.elapsed < BUDGET, "{:?}", out.elapsed);
}

#[tokio::test]
async fn budget_bounds_many_blackholed_backends() {
    let holes: Vec<_> = (0..4).map(|_| blackholed_listener()).collect();
    let addrs: Vec<_> = holes.iter().map(|(_, a)| *a).collect();
    let t = "timeouts:\n  budget: 600ms\n  connect: 250ms\n";
    let p = proxy(&one_pool("round_robin", &addrs, t)).await;
    let out = caller("ivr/main", "1.1").run(p.addr).await;
    assert_failure(&out, "budget_exhausted");
    assert!(
        out.elapsed >= Duration::from_millis(590),
        "{:?}",
        out.elapsed
    );
    assert!(
        out.elapsed < Duration::from_millis(900),
        "{:?}",
        out.elapsed
    );
}

#[tokio::test]
async fn backends_closing_before_the_first_byte_give_failure() {
    for behaviour in [
        Behaviour::CloseImmediately,
        Behaviour::CloseAfterHeader,
        Behaviour::ResetImmediately,
        Behaviour::ResetAfterHeader,
    ] {
        let b = FakeBackend::start(behaviour.clone()).await;
        let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
        let out = caller("ivr/main", "1.1").run(p.addr).await;
        assert_failure(&out, "backend_closed");
        assert!(
            out.elapsed < Duration::from_millis(500),
            "{behaviour:?}: {:?}",
            out.elapsed
        );
    }
}

/// A backend that resets in the middle of its first command line has sent
/// nothing Asterisk could see (the relay forwards whole lines): the call
/// is failed over like one whose backend said nothing. Before, it
/// committed on the first byte and got FAILURE `backend_reset`, with a
/// second backend idle. A piece of a line followed by an orderly close is
/// run, as a directly connected Asterisk runs what it read before the end
/// of file.
#[tokio::test]
async fn a_backend_resetting_mid_first_line_is_failed_over() {
    use chaos_tests::{Step, Then};
    let mid_line = |then| Behaviour::Steps {
        steps: vec![
            Step::Send(b"STREAM FILE hel".to_vec()),
            Step::Sleep(Duration::from_millis(50)),
        ],
        then,
    };
    let start = |then| async move {
        let dying = FakeBackend::start(mid_line(then)).await;
        let live = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
        let p = proxy(&one_pool("round_robin", &[dying.addr(), live.addr()], "")).await;
        (p, live, dying)
    };
    let (p, live, _dying) = start(Then::Reset).await;
    let mut records = p.server.subscribe();
    let out = caller("x", "1.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["NOOP"]);
    let rec = next_record(&mut records).await;
    assert_eq!((rec.attempts, rec.backend), (2, Some(live.addr())));
    // Closed after the piece: committed, and the piece run whole.
    let (p, _live, dying) = start(Then::Close).await;
    let mut records = p.server.subscribe();
    let out = caller("x", "1.2").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["STREAM FILE hel"]);
    let rec = next_record(&mut records).await;
    assert_eq!((rec.attempts, rec.backend), (1, Some(dying.addr())));
    // A line that comes whole after a pause mid-line commits as before.
    let slow = FakeBackend::start(Behaviour::SplitLines(vec!["NOOP".into()])).await;
    let p = proxy(&one_pool("round_robin", &[slow.addr()], "")).await;
    let out = caller("x", "1.3").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["NOOP"]);
}

#[tokio::test]
async fn no_eligible_backend_fails_at_once_without_a_connect() {
    let b = FakeBackend::start(Behaviour::CloseImmediately).await;
    // Passive ejection empties a pool only when asked to (issue 18): the
    // opt-in of the old behaviour, one failure ejects and 100% may go.
    let mut body = one_pool("round_robin", &[b.addr()], "");
    body.push_str("    max_ejection_percent: 100\n    passive: { consecutive_failures: 1 }\n");
    let p = proxy(&body).await;
    // The first call finds the backend broken: it enters its backoff.
    assert_failure(&caller("x", "1.1").run(p.addr).await, "backend_closed");
    let accepted = b.stats().accepted();
    for i in 0..20 {
        let out = caller("x", &format!("2.{i}")).run(p.addr).await;
        assert_failure(&out, "no_backend");
        assert!(out.elapsed < Duration::from_millis(50), "{:?}", out.elapsed);
    }
    assert_eq!(
        b.stats().accepted(),
        accepted,
        "no connect to a backend known to be down"
    );
}

#[tokio::test]
async fn no_route_gives_failure() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let body = format!(
        "routes:\n  - name: ivr\n    match: {{ script: {{ prefix: \"ivr/\" }} }}\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\" }}\n",
        b.addr()
    );
    let p = proxy(&body).await;
    let out = caller("billing/x", "1.1").run(p.addr).await;
    assert_failure(&out, "no_route");
    assert!(out.elapsed < Duration::from_millis(50), "{:?}", out.elapsed);
    assert_eq!(b.stats().accepted(), 0);
}

#[tokio::test]
async fn first_command_deadline_fails_over_then_failure() {
    let stalled = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let t = "timeouts:\n  first_command: 300ms\n  budget: 1500ms\n";
    let p = proxy(&one_pool("round_robin", &[stalled.addr()], t)).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_failure(&out, "first_command_timeout");
    assert!(
        out.elapsed >= Duration::from_millis(290) && out.elapsed < Duration::from_millis(800),
        "{:?}",
        out.elapsed
    );
    // The abandoned backend got a whole header, then HANGUP, then a close.
    assert!(
        stalled
            .stats()
            .wait_completed(1, Duration::from_secs(3))
            .await
    );
    assert_eq!(stalled.stats().hangups(), 1);

    // With a live second backend the call fails over and succeeds.
    let live = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let stalled2 = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let p = proxy(&one_pool("round_robin", &[stalled2.addr(), live.addr()], t)).await;
    let out = caller("x", "1.2").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["NOOP"]);
}

#[tokio::test]
async fn over_max_sessions_gives_failure_not_a_hang() {
    let b = FakeBackend::start(Behaviour::script(&["EXEC Wait 1"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "limits:\n  max_sessions: 2\n",
    ))
    .await;
    // Two calls hold the proxy's two session slots.
    let slow = |i: u32| {
        let addr = p.addr;
        tokio::spawn(async move {
            caller("x", &format!("1.{i}"))
                .reply_with(|_| chaos_tests::Reply::ok().after(Duration::from_millis(800)))
                .run(addr)
                .await
        })
    };
    let (s1, s2) = (slow(1), slow(2));
    wait_until("two sessions", Duration::from_secs(5), || {
        b.stats().accepted() >= 2
    })
    .await;
    // The third is answered at once with FAILURE, its header read first.
    let out = caller("x", "1.3").run(p.addr).await;
    assert_failure(&out, "overloaded");
    assert!(
        out.elapsed < Duration::from_millis(100),
        "{:?}",
        out.elapsed
    );
    assert_eq!(s1.await.unwrap().status, AgiStatus::Success);
    assert_eq!(s2.await.unwrap().status, AgiStatus::Success);
    // Slots free again: the next call is served.
    assert_eq!(
        caller("x", "1.4").run(p.addr).await.status,
        AgiStatus::Success
    );
    assert_eq!(b.stats().accepted(), 3);
}

/// Connections over `max_sessions` are refused with FAILURE, which needs
/// their header first; slow or silent ones used to hold their descriptor
/// and header buffer for the whole header timeout, without bound (an
/// audit: 1,500 of them took 58 MB). Now a refused connection gets 1 s for
/// its header, and at most max(64, max_sessions / 8) are held: the rest
/// are closed at once, unanswered, and counted.
#[tokio::test]
async fn refused_connections_are_bounded_in_number_and_time() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "limits:\n  max_sessions: 2\ntimeouts:\n  header: 10s\n",
    ))
    .await;
    // Two silent connections take the two session slots (10 s header
    // timeout), 64 more the refusals.
    let mut silent = Vec::new();
    for _ in 0..66 {
        silent.push(tokio::net::TcpStream::connect(p.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(silent.iter().all(still_open), "closed too early");
    // One more is closed at once, unanswered.
    let mut extra = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_millis(500), extra.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    let m = p.server.metrics().render();
    assert_eq!(
        counter(&m, "agiproxy_refusals_dropped_total{reason=\"overloaded\"}"),
        1,
        "{m}"
    );
    // The refused ones are closed after 1 s without their header; the
    // admitted ones wait their 10 s.
    let t0 = Instant::now();
    while silent[2..].iter().any(still_open) {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "refusals held past 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(silent[..2].iter().all(still_open));
    // A real call is refused with FAILURE again.
    let out = caller("x", "1.3").run(p.addr).await;
    assert_failure(&out, "overloaded");
    assert_eq!(b.stats().accepted(), 0);
}

/// A handshake that is not over when `connect` returns (the backend's accept
/// queue was full and the SYN is retried a second later) still delivers
/// the whole header once it completes: the header is written after the
/// connect, not lost to the optimistic first write.
#[tokio::test]
async fn slow_handshake_still_delivers_the_whole_header() {
    let (hole, addr) = blackholed_listener();
    let t = "timeouts:\n  budget: 5s\n  connect: 4s\n";
    let p = proxy(&one_pool("round_robin", &[addr], t)).await;
    let call = tokio::spawn(async move { caller("ivr/main", "1.1").run(p.addr).await });
    // The proxy's SYN has been dropped; a real backend takes the address
    // before the kernel retries it (about a second after the first).
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(hole);
    let backend = FakeBackend::start_on(addr, Behaviour::script(&["NOOP"]))
        .await
        .expect("rebind the blackholed address");
    let out = call.await.unwrap();
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(
        out.elapsed >= Duration::from_millis(500),
        "the handshake was retried: {:?}",
        out.elapsed
    );
    let headers = backend.stats().headers();
    assert_eq!(headers.len(), 1);
    let header = String::from_utf8_lossy(&headers[0]);
    assert!(
        header.contains("agi_network_script: ivr/main\n"),
        "{header}"
    );
    assert!(header.ends_with("\n\n"), "{header}");
}

/// One host that opens connections and sends its header slowly (or never)
/// could hold every session slot, so every real call got `overloaded` (an
/// audit), and every slot's header buffer. Once the replica is half full,
/// at most `limits.max_headers_per_peer` of one host's connections wait
/// for their header at once; past that its connections are refused, and
/// other hosts' calls go on. Below half full, a burst is never refused.
#[tokio::test]
async fn one_host_cannot_hold_every_slot_with_slow_headers() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "limits:\n  max_sessions: 8\n  max_headers_per_peer: 2\ntimeouts:\n  header: 10s\n",
    ))
    .await;
    let from = |ip: &str| {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        sock.connect(p.addr)
    };
    let addr = p.addr;
    let call = |ip: &str, id: &str| {
        let c = caller("x", id).source(ip.parse().unwrap());
        async move { c.run(addr).await }
    };
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(from("127.0.0.3").await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 2 of 8 sessions: the host's third connection is served.
    let out = call("127.0.0.3", "1.1").await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    // Half full (4 of 8), the host at its 2: its next call is refused...
    for _ in 0..2 {
        slow.push(from("127.0.0.3").await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = call("127.0.0.3", "1.2").await;
    assert_failure(&out, "overloaded");
    // ...another host's is served, and the slow ones were left alone.
    let out = call("127.0.0.4", "1.3").await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(slow.iter().all(still_open));
    let m = p.server.metrics().render();
    assert_eq!(counter(&m, "agiproxy_peer_header_limit_total"), 1, "{m}");
    assert_eq!(counter(&m, "agiproxy_active_sessions"), 4, "{m}");
    // Once its slow headers are gone, the host is served again.
    drop(slow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = call("127.0.0.3", "1.4").await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
}

/// A call whose header (40 arguments of about 100 bytes, some 5 KB) needs
/// more than the first 2 KiB of header buffer.
fn large_caller(uniqueid: &str) -> chaos_tests::FakeAsterisk {
    let args: Vec<String> = (0..40).map(|i| format!("{i}{}", "v".repeat(100))).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    chaos_tests::FakeAsterisk::new()
        .header(chaos_tests::AgiHeader::realistic("x", &args, uniqueid))
        .call_timeout(Duration::from_secs(20))
}

/// A flood of large, slow headers from many addresses (each under
/// `max_headers_per_peer`) grew every connection's buffer to
/// `max_header_bytes`: 24 KB a connection, 470 MB at the chart's 20,000
/// sessions, and a proxy in a 48 MiB cgroup was OOM-killed by 2,500 of
/// them. Buffers past their first 2 KiB now share
/// `limits.max_header_memory`: past it, a header that needs more is told
/// FAILURE `overloaded`, ordinary headers (about 1 KB) are served, and the
/// budget is given back when the slow ones go.
#[tokio::test]
async fn large_slow_headers_share_a_memory_budget() {
    use tokio::io::AsyncWriteExt;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "limits:\n  max_sessions: 1000\n  max_header_bytes: 16384\n  max_header_memory: 1048576\ntimeouts:\n  header: 10s\n",
    ))
    .await;
    let gauge = |m: &str| counter(m, "agiproxy_header_memory_bytes");
    // 100 connections from 100 addresses, each 15 KB into a header that
    // never ends: 14 KiB each past the first 2 KiB, 1 MiB holds 73.
    let mut slow = Vec::new();
    for i in 0..100 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("127.0.1.{}:0", i + 1).parse().unwrap())
            .unwrap();
        let mut s = sock.connect(p.addr).await.unwrap();
        let line = format!("agi_network: yes\nagi_x: {}\n", "a".repeat(15_000));
        s.write_all(line.as_bytes()).await.unwrap();
        slow.push(s);
    }
    // Each one either holds its 14 KiB or was refused (and gave back what
    // it had taken); which ones depends on how their reads interleave.
    const EACH: u64 = 16_384 - 2_048;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (refused, held) = loop {
        let m = p.server.metrics().render();
        let refused = counter(&m, "agiproxy_header_errors_total{reason=\"no_memory\"}");
        let held = gauge(&m);
        if refused + held / EACH == 100 && held % EACH == 0 {
            break (refused, held);
        }
        assert!(
            Instant::now() < deadline,
            "refused {refused}, held {held}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(held <= 1 << 20, "{held}");
    assert!(refused >= 100 - (1 << 20) / EACH, "{refused}");
    // Not far from full: the budget is used, not just bounded.
    assert!(held >= (1 << 20) - 3 * EACH, "{held}");
    // An ordinary header needs no more than its first 2 KiB: served.
    let out = caller("x", "2.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    // A large one (40 arguments of 100 bytes) needs more: overloaded, at once.
    let out = large_caller("2.2").run(p.addr).await;
    assert_failure(&out, "overloaded");
    assert!(out.elapsed < Duration::from_secs(1), "{:?}", out.elapsed);
    // The slow ones gone, the budget is free again and the large header served.
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(5);
    while gauge(&p.server.metrics().render()) != 0 {
        assert!(Instant::now() < deadline, "the budget was not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = large_caller("2.3").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
}

/// A large header's memory stays counted while it is kept: through the
/// backend search, not just its reading (before, a flood of large complete
/// headers waiting on slow backends held memory the budget did not see).
#[tokio::test]
async fn a_large_header_counts_against_the_budget_until_the_search_ends() {
    let stalled = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[stalled.addr()],
        "timeouts:\n  first_command: 800ms\n",
    ))
    .await;
    let call = large_caller("3.1");
    let addr = p.addr;
    let running = tokio::spawn(async move { call.run(addr).await });
    let gauge = || counter(&p.server.metrics().render(), "agiproxy_header_memory_bytes");
    // Waiting for the stalled backend's first command: still held.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(gauge() >= 2048, "{}", gauge());
    let out = running.await.unwrap();
    assert_failure(&out, "first_command_timeout");
    // Given back once the session is done with it.
    wait_until(
        "the header's memory given back",
        Duration::from_secs(3),
        || gauge() == 0,
    )
    .await;
}
