//! Edge cases of each failure reason, and regressions found in review.

mod common;

use std::time::{Duration, Instant};

use agiproxy::Outcome;
use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend, Reply, Step};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn regression_too_many_lines_in_one_write_gets_failure_at_once() {
    // The whole header, blank line included, arrives in one segment: the
    // proxy must not wait for a blank line it already read.
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "limits:\n  max_header_lines: 30\n",
    ))
    .await;
    let args: Vec<String> = (0..40).map(|i| format!("a{i}")).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let header = AgiHeader::realistic("x", &args, "1.1").to_bytes();
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let t = Instant::now();
    s.write_all(&header).await.unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).await.unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    assert_eq!(line, b"SET VARIABLE AGIPROXY_ERROR \"header_too_large\"");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(b.stats().accepted(), 0);
}

#[tokio::test]
async fn regression_latin1_header_values_pass_byte_exact() {
    // Asterisk sends channel data as it has it; a Latin-1 caller name is
    // not UTF-8 and must not turn the call into a silent close.
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let mut raw = AgiHeader::realistic("ivr/main", &[], "1.1").to_bytes();
    let at = raw
        .windows(15)
        .position(|w| w == b"agi_calleridnam")
        .unwrap();
    let end = at + raw[at..].iter().position(|c| *c == b'\n').unwrap();
    raw.splice(
        at..end,
        b"agi_calleridname: Ren\xe9 M\xfcller".iter().copied(),
    );
    let mut s = FakeAsterisk::raw_session(p.addr, &raw).await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"NOOP\n");
    assert!(b.stats().wait_completed(0, Duration::from_secs(1)).await);
    assert_eq!(
        b.stats().headers()[0],
        raw,
        "the header reached the backend byte for byte"
    );
}

#[tokio::test]
async fn a_truncated_header_is_counted() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let mut rx = p.server.subscribe();
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"agi_network: yes\nagi_network_script: x\n")
        .await
        .unwrap();
    drop(s);
    let rec = next_record(&mut rx).await;
    assert_eq!(
        (rec.outcome, rec.header_error),
        (Outcome::BadHeader, Some("truncated"))
    );
}

#[tokio::test]
async fn a_full_backend_gives_pool_full_at_once() {
    let b = FakeBackend::start(Behaviour::script(&["EXEC Wait 1"])).await;
    let body = format!(
        "routes:\n  - name: r\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\", max_sessions: 1 }}\n",
        b.addr()
    );
    let p = proxy(&body).await;
    let addr = p.addr;
    let holder = tokio::spawn(async move {
        caller("x", "1.1")
            .reply_with(|_| Reply::ok().after(Duration::from_millis(600)))
            .run(addr)
            .await
    });
    wait_until("accepted", Duration::from_secs(5), || {
        b.stats().accepted() >= 1
    })
    .await;
    let out = caller("x", "1.2").run(p.addr).await;
    assert_failure(&out, "pool_full");
    assert!(out.elapsed < Duration::from_millis(50), "{:?}", out.elapsed);
    assert_eq!(holder.await.unwrap().status, AgiStatus::Success);
}

#[tokio::test]
async fn an_endless_backend_line_gives_backend_protocol() {
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::Command("NOOP".into()),
        Step::Send(vec![b'A'; 20_000]),
        Step::Sleep(Duration::from_secs(5)),
    ]))
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_failure(&out, "backend_protocol");
    assert!(
        out.violations.is_empty(),
        "no partial line reached Asterisk: {:?}",
        out.violations
    );
    assert!(out.elapsed < Duration::from_secs(2));
}

#[tokio::test]
async fn asterisk_leaving_during_the_search_is_client_gone() {
    let stalled = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let p = proxy(&one_pool("round_robin", &[stalled.addr()], "")).await;
    let mut rx = p.server.subscribe();
    let s = FakeAsterisk::raw_session(p.addr, &AgiHeader::realistic("x", &[], "1.1").to_bytes())
        .await
        .unwrap();
    wait_until("accepted", Duration::from_secs(5), || {
        stalled.stats().accepted() >= 1
    })
    .await;
    drop(s);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, Outcome::ClientGone);
    // The backend, which had the whole header, is told HANGUP and closed.
    assert!(
        stalled
            .stats()
            .wait_completed(1, Duration::from_secs(3))
            .await
    );
    assert_eq!(stalled.stats().hangups(), 1);
}

/// Asterisk leaves while backends are still being connected to (its
/// caller hung up with `AGIEXITONHANGUP`: `HANGUP`, then a close): no
/// FAILURE can be heard, so none is counted and the session is
/// `client_gone`. Before, it was `failed` `connect_failed`, counted in
/// `failures_sent_total` and held against a rollout's pool (an audit).
#[tokio::test]
async fn asterisk_leaving_while_backends_are_tried_is_client_gone() {
    let (_hole, addr) = chaos_tests::blackholed_listener();
    let p = proxy(&one_pool(
        "round_robin",
        &[addr],
        "timeouts:\n  connect: 400ms\n",
    ))
    .await;
    let mut rx = p.server.subscribe();
    let mut bytes = AgiHeader::realistic("x", &[], "1.1").to_bytes();
    bytes.extend_from_slice(b"HANGUP\n");
    let s = FakeAsterisk::raw_session(p.addr, &bytes).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, Outcome::ClientGone, "{rec:?}");
    assert_eq!(rec.reason, None);
    let m = p.server.metrics().render();
    assert_eq!(
        counter(
            &m,
            "agiproxy_failures_sent_total{reason=\"connect_failed\"}"
        ),
        0,
        "{m}"
    );
}

#[tokio::test]
async fn the_drain_deadline_tells_a_waiting_asterisk_shutting_down() {
    let b = FakeBackend::start(Behaviour::StallAfterCommands(1)).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  next_command: 30s\n",
    ))
    .await;
    let addr = p.addr;
    let call = tokio::spawn(async move { caller("x", "1.1").run(addr).await });
    wait_until("replies", Duration::from_secs(5), || {
        b.stats().replies() >= 1
    })
    .await;
    // The backend owes a command when the drain deadline passes.
    assert!(!p.server.drain(Duration::from_millis(300)).await);
    let out = call.await.unwrap();
    assert_failure(&out, "shutting_down");
}

/// A call still waiting for its backend's first command at the drain
/// deadline (a slow script, a `first_command` longer than the drain) is
/// told FAILURE `shutting_down` at once. Before, nothing cut it: the
/// process exited 5 s later and Asterisk read the close as SUCCESS, with
/// no access-log line (an audit).
#[tokio::test]
async fn the_drain_deadline_tells_a_call_waiting_for_its_first_command_shutting_down() {
    let b = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  first_command: 8s\n",
    ))
    .await;
    let addr = p.addr;
    let mut rx = p.server.subscribe();
    let call = tokio::spawn(async move { caller("x", "1.1").run(addr).await });
    wait_until("the backend has the header", Duration::from_secs(5), || {
        b.stats().active() == 1
    })
    .await;
    let t0 = Instant::now();
    assert!(!p.server.drain(Duration::from_millis(300)).await);
    let out = call.await.unwrap();
    assert_failure(&out, "shutting_down");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, Outcome::Failed);
    // The backend was ended politely (`HANGUP`, then a close), and is not
    // blamed for the shutdown.
    wait_until(
        "the backend's connection ends",
        Duration::from_secs(3),
        || b.stats().active() == 0,
    )
    .await;
    let m = p.server.metrics().render();
    assert!(
        !m.lines()
            .any(|l| l.starts_with("agiproxy_backend_ejections") && !l.ends_with(" 0")),
        "{m}"
    );
}

/// A backend that never sends its first command, beside a healthy one,
/// with the default timeouts: its wait (`first_command`, 3 s) outlasts the
/// budget (1.5 s), so the call fails without trying the other. The reason
/// says why: `first_command_timeout`, not `budget_exhausted` (which hid
/// hung backends from an alert on first-command timeouts).
#[tokio::test]
async fn a_first_command_wait_that_uses_up_the_budget_is_told_as_such() {
    let stalled = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let good = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[stalled.addr(), good.addr()],
        "timeouts:\n  first_command: 1600ms\n",
    ))
    .await;
    let mut rx = p.server.subscribe();
    let mut seen = Vec::new();
    let mut recs = Vec::new();
    for i in 0..2 {
        let out = caller("x", &format!("1.{i}")).run(p.addr).await;
        seen.push((out.status, out.variables.get("AGIPROXY_ERROR").cloned()));
        recs.push(next_record(&mut rx).await);
    }
    assert!(
        seen.contains(&(AgiStatus::Failure, Some("first_command_timeout".into()))),
        "{seen:?}"
    );
    // The other call (round robin: it started with the good backend) went
    // through.
    assert!(seen.contains(&(AgiStatus::Success, None)), "{seen:?}");
    // The failed call did not go on to the other backend: one attempt,
    // and the good backend took only the call that succeeded.
    let failed: Vec<_> = recs
        .iter()
        .filter(|r| r.reason == Some(agiproxy::Reason::FirstCommandTimeout))
        .collect();
    assert_eq!(failed.len(), 1, "{recs:?}");
    assert_eq!(failed[0].attempts, 1, "{:?}", failed[0]);
    assert_eq!(good.stats().accepted(), 1, "{recs:?}");
    assert_eq!(stalled.stats().accepted(), 1, "{recs:?}");
    let m = p.server.metrics().render();
    assert_eq!(
        counter(
            &m,
            "agiproxy_failures_sent_total{reason=\"first_command_timeout\"}"
        ),
        1,
        "{m}"
    );
}

/// Asterisk runs a long command (an `EXEC Dial` that outlasts the drain)
/// when the drain deadline passes: a `failure` line waits for it, and when
/// the command returns AGISTATUS is FAILURE, so the dialplan's fallback
/// runs. Before, the bare close read as SUCCESS.
#[tokio::test]
async fn the_drain_deadline_during_a_command_leaves_failure_for_when_it_returns() {
    let b = FakeBackend::start(Behaviour::script(&["EXEC Dial PJSIP/100", "NOOP"])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let addr = p.addr;
    let call = tokio::spawn(async move {
        FakeAsterisk::new()
            .exec_takes(Duration::from_millis(1500))
            .run(addr)
            .await
    });
    wait_until("the command runs", Duration::from_secs(5), || {
        b.stats().active() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!p.server.drain(Duration::from_millis(300)).await);
    let out = call.await.unwrap();
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    assert_eq!(out.commands, ["EXEC Dial PJSIP/100", "failure"], "{out:?}");
    assert!(out.elapsed >= Duration::from_millis(1500), "{out:?}");
    // The line was there before the reply: the fake Asterisk, which checks
    // that no command is sent early, notes it (a real one reads it next).
    assert_eq!(out.violations.len(), 1, "{:?}", out.violations);
    assert!(out.violations[0].starts_with("pipelining"), "{out:?}");
    let m = p.server.metrics().render();
    assert_eq!(
        counter(&m, "agiproxy_failures_sent_total{reason=\"shutting_down\"}"),
        1,
        "{m}"
    );
}

#[tokio::test]
async fn a_reload_whose_listener_cannot_bind_changes_nothing() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = format!(
        "version: 1\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\n  - name: extra\n    address: \"{}\"\n{}",
        taken.local_addr().unwrap(),
        one_pool("round_robin", &[b.addr()], "")
    );
    let err = p.server.apply(&text, "api", false, None).await.unwrap_err();
    assert!(err.to_string().contains("listeners[1] (extra)"), "{err}");
    assert_eq!(p.server.snapshot().meta.generation, 1);
    assert_eq!(
        caller("x", "1.1").run(p.addr).await.status,
        AgiStatus::Success
    );
}

#[tokio::test]
async fn regression_a_header_of_100000_lines_gets_failure_not_a_reset() {
    // 1.5 MB of header: the proxy used to stop discarding after 1 MiB and
    // close with unread bytes (a reset, which Asterisk reads as SUCCESS).
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let mut raw = AgiHeader::realistic("ivr/main", &[], "1.1").to_bytes();
    raw.pop();
    for i in 0..100_000 {
        raw.extend_from_slice(format!("agi_x_{i}: 1\n").as_bytes());
    }
    raw.push(b'\n');
    let header = AgiHeader::parse(&raw).expect("a header");
    assert!(header.to_bytes().len() > 1_300_000);
    let out = FakeAsterisk::new().header(header).run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    assert_eq!(
        out.variables.get("AGIPROXY_ERROR").map(String::as_str),
        Some("header_too_large")
    );
    assert_eq!(b.stats().accepted(), 0);
}

/// What the proxy reports matches what happened (an accounting audit):
/// a header refused to an Asterisk already gone was heard by nobody
/// (`client_gone`, no FAILURE counted); refused headers and overload
/// rejections are not timed as sessions; a port probe is no session.
#[tokio::test]
async fn refusals_are_counted_as_what_they_were() {
    let b = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let p = proxy(&format!(
        "limits:\n  max_header_lines: 30\n  max_sessions: 1\n{}",
        one_pool(
            "round_robin",
            &[b.addr()],
            "timeouts:\n  first_command: 30s\n  budget: 30s\n"
        )
    ))
    .await;
    let mut rx = p.server.subscribe();
    // 40 lines, over the 30 allowed, whole; then Asterisk is gone.
    let mut big = Vec::new();
    for i in 0..40 {
        big.extend_from_slice(format!("agi_x{i}: y\n").as_bytes());
    }
    big.push(b'\n');
    let s = FakeAsterisk::raw_session(p.addr, &big).await.unwrap();
    drop(s);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, Outcome::ClientGone, "{rec:?}");
    // A port probe: connect, close.
    drop(tokio::net::TcpStream::connect(p.addr).await.unwrap());
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.header_error, Some("closed"), "{rec:?}");
    // One call takes the only slot; the next is refused, overloaded.
    let addr = p.addr;
    let held = tokio::spawn(async move { caller("ivr", "1.1").run(addr).await });
    wait_until(
        "the first call on its backend",
        Duration::from_secs(5),
        || b.stats().accepted() == 1,
    )
    .await;
    assert_failure(&caller("ivr", "1.2").run(p.addr).await, "overloaded");
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, Outcome::Failed, "{rec:?}");
    let m = p.server.metrics().render();
    let count = |name| counter(&m, name);
    assert_eq!(
        count("agiproxy_failures_sent_total{reason=\"header_too_large\"}"),
        0,
        "{m}"
    );
    assert_eq!(
        count("agiproxy_failures_sent_total{reason=\"overloaded\"}"),
        1,
        "{m}"
    );
    assert_eq!(count("agiproxy_session_seconds_count"), 0, "{m}");
    assert!(!m.contains("outcome=\"bad_header\""), "{m}");
    held.abort();
}

/// Bytes are counted as relayed, not as read: a CR the proxy takes out, a
/// withheld `HANGUP` and a refused over-long line never reach the other
/// side; a `HANGUP` Asterisk sent while the backend was sought does, and
/// marks the session `hangup` even when no backend answered (audit).
#[tokio::test]
async fn bytes_and_hangup_are_counted_as_relayed() {
    // CRLF commands: 2 x "NOOP\r\n" read, 2 x "NOOP\n" relayed.
    let b = FakeBackend::start(Behaviour::script(&["NOOP\r", "NOOP\r"])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let mut rx = p.server.subscribe();
    let out = caller("ivr", "2.1").run(p.addr).await;
    assert_eq!(out.commands, vec!["NOOP", "NOOP"], "{out:?}");
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.bytes_to_asterisk, 10, "{rec:?}");

    // A silent backend; Asterisk hangs up during the search: FAILURE, and
    // the session says the caller hung up.
    let silent = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[silent.addr()],
        "timeouts:\n  first_command: 300ms\n",
    ))
    .await;
    let mut rx = p.server.subscribe();
    let mut bytes = AgiHeader::realistic("ivr", &[], "2.2").to_bytes();
    bytes.extend_from_slice(b"HANGUP\n");
    let mut s = FakeAsterisk::raw_session(p.addr, &bytes).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        // Answer whatever the proxy says (its SET VARIABLE) until it closes.
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sink.extend_from_slice(&buf[..n]);
                    let _ = s.write_all(b"200 result=1\n").await;
                }
            }
        }
    })
    .await
    .expect("the proxy tells FAILURE and closes within 5 s");
    // Asterisk closes after FAILURE (the proxy waits for that).
    drop(s);
    // Asterisk was told FAILURE, the reason first.
    assert_eq!(
        String::from_utf8_lossy(&sink),
        "SET VARIABLE AGIPROXY_ERROR \"first_command_timeout\"\nFAILURE\n"
    );
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, Outcome::Failed, "{rec:?}");
    assert!(rec.caller_hung_up, "{rec:?}");
    // The HANGUP reached the backend, once.
    assert!(
        silent
            .stats()
            .wait_completed(1, Duration::from_secs(5))
            .await,
        "the silent backend's connection was not ended within 5 s"
    );
    assert_eq!(
        silent.stats().hangups(),
        1,
        "{:?}",
        silent.stats().sessions()
    );
}
