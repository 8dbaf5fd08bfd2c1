//! The relay after commit: binary payloads byte-exact, raw mode, pacing of
//! pipelined and split commands, half-close, HANGUP, and the turn deadlines.

mod common;

use std::time::{Duration, Instant};

use chaos_tests::{AgiStatus, Behaviour, FakeAsterisk, FakeBackend, Reply, Step, Then};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

#[tokio::test]
async fn put_soundfile_payload_passes_byte_exact() {
    let data = pattern(1 << 20, 7);
    // Payload bytes include '\n' and look like commands: they must not be paced.
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::Command("VERBOSE \"sending\" 1".into()),
        Step::PutFile {
            name: "greeting".into(),
            data: data.clone(),
        },
        Step::Command("NOOP".into()),
    ]))
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{:?}", out.status);
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.received_files.len(), 1);
    assert!(
        out.received_files[0].1 == data,
        "payload changed in transit"
    );
    assert_eq!(out.commands.last().map(String::as_str), Some("NOOP"));
}

#[tokio::test]
async fn get_soundfile_reply_payload_passes_byte_exact() {
    let data = pattern(300_000, 3);
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::GetFile { name: "rec".into() },
        Step::Command("NOOP".into()),
    ]))
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let out = caller("x", "1.1")
        .file("rec", data.clone())
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success);
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    let sessions = b.stats().sessions();
    assert!(
        sessions[0].files.len() == 1 && sessions[0].files[0].1 == data,
        "GET SOUNDFILE payload changed"
    );
    assert_eq!(out.commands, vec!["GET SOUNDFILE rec", "NOOP"]);
}

#[tokio::test]
async fn raw_mode_passes_arbitrary_bytes_both_ways() {
    let b = FakeBackend::start(Behaviour::Raw).await;
    let body = format!(
        "routes:\n  - name: raw\n    mode: raw\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\" }}\n",
        b.addr()
    );
    let p = proxy(&body).await;
    let header = chaos_tests::AgiHeader::realistic("raw/x", &[], "1.1").to_bytes();
    let mut s = FakeAsterisk::raw_session(p.addr, &header).await.unwrap();
    let data = pattern(1 << 20, 11);
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_, got) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(send, recv) })
            .await
            .expect("raw relay finishes");
    // The echo backend returns the header it received, then our bytes.
    assert_eq!(&got[..header.len()], &header[..]);
    assert!(
        got[header.len()..] == data[..],
        "raw bytes changed in transit"
    );
}

#[tokio::test]
async fn pipelined_commands_reach_asterisk_one_at_a_time() {
    let b = FakeBackend::start(Behaviour::Pipelined(vec![
        "VERBOSE \"one\" 1".into(),
        "VERBOSE \"two\" 1".into(),
        "NOOP".into(),
    ]))
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    // Asterisk takes 100 ms per command: the next must wait for the reply.
    let out = caller("x", "1.1")
        .reply_with(|_| Reply::ok().after(Duration::from_millis(100)))
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success);
    assert_eq!(out.commands.len(), 3, "{:?}", out.commands);
    assert!(
        out.violations.is_empty(),
        "pipelined bytes reached Asterisk: {:?}",
        out.violations
    );
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    assert_eq!(b.stats().sessions()[0].reply_count, 3);
}

#[tokio::test]
async fn split_lines_reach_asterisk_whole() {
    let b = FakeBackend::start(Behaviour::SplitLines(vec![
        "VERBOSE \"split\" 1".into(),
        "NOOP".into(),
    ]))
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success);
    assert_eq!(out.commands, vec!["VERBOSE \"split\" 1", "NOOP"]);
    assert!(
        out.violations.is_empty(),
        "a partial line reached Asterisk: {:?}",
        out.violations
    );
}

#[tokio::test]
async fn crlf_commands_are_sent_with_lf() {
    let b = FakeBackend::start(Behaviour::steps(vec![Step::Send(b"NOOP\r\n".to_vec())])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_eq!(out.commands, vec!["NOOP"]);
    assert!(out.violations.is_empty(), "{:?}", out.violations);
}

#[tokio::test]
async fn hangup_from_asterisk_reaches_the_backend() {
    let b = FakeBackend::start(Behaviour::Script {
        commands: vec!["NOOP".into(), "NOOP".into(), "NOOP".into()],
        then: Then::WaitForHangupThenClose,
    })
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let mut rx = p.server.subscribe();
    let out = caller("x", "1.1").hangup_after(1).run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Hangup, "{out:?}");
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    // The unsolicited HANGUP reaches the backend; the end-of-session one,
    // sent after the backend closed, is dropped quietly.
    assert_eq!(b.stats().hangups(), 1);
    assert!(next_record(&mut rx).await.caller_hung_up);
}

#[tokio::test]
async fn hangup_can_be_withheld_from_fragile_backends() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP", "NOOP", "NOOP"])).await;
    let body = format!(
        "routes:\n  - name: r\n    forward_hangup: false\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\" }}\n",
        b.addr()
    );
    let p = proxy(&body).await;
    let out = caller("x", "1.1").hangup_after(1).run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Hangup);
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    assert_eq!(b.stats().hangups(), 0);
    assert_eq!(
        b.stats().sessions()[0].reply_count,
        3,
        "replies stay in step"
    );
}

#[tokio::test]
async fn half_close_from_asterisk_side_is_propagated() {
    // Asterisk half-closes after the header; the backend still gets its
    // whole conversation's end and the session ends cleanly.
    let b = FakeBackend::start(Behaviour::Raw).await;
    let body = format!(
        "routes:\n  - name: raw\n    mode: raw\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\" }}\n",
        b.addr()
    );
    let p = proxy(&body).await;
    let header = chaos_tests::AgiHeader::realistic("raw/x", &[], "1.1").to_bytes();
    let mut s = FakeAsterisk::raw_session(p.addr, &header).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("EOF propagates")
        .unwrap();
    assert_eq!(got, header);
}

#[tokio::test]
async fn half_close_from_backend_side_in_lines_mode() {
    // The backend sends its last command and closes at once (no wait for the
    // reply): Asterisk still gets the command, replies, and the session ends.
    let b = FakeBackend::start(Behaviour::steps(vec![Step::Send(
        b"NOOP\nVERBOSE \"bye\" 1\n".to_vec(),
    )]))
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let out = caller("x", "1.1")
        .reply_with(|_| Reply::ok().after(Duration::from_millis(50)))
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success);
    assert_eq!(out.commands, vec!["NOOP", "VERBOSE \"bye\" 1"]);
    assert!(out.violations.is_empty(), "{:?}", out.violations);
}

#[tokio::test]
async fn stall_after_commit_gives_failure_at_next_command_deadline() {
    let b = FakeBackend::start(Behaviour::StallAfterCommands(2)).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  next_command: 400ms\n",
    ))
    .await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_failure(&out, "next_command_timeout");
    assert!(
        out.elapsed >= Duration::from_millis(390) && out.elapsed < Duration::from_millis(1500),
        "{:?}",
        out.elapsed
    );
    // The backend is told HANGUP and closed politely.
    assert!(b.stats().wait_completed(1, Duration::from_secs(3)).await);
    assert_eq!(b.stats().hangups(), 1);
}

#[tokio::test]
async fn the_next_command_deadline_moves_with_each_reply() {
    // The timer is re-armed lazily (when it fires early), so check both
    // edges: commands that keep coming inside `next_command`, well past the
    // first-command deadline and past several `next_command` spans in all,
    // are never cut; the stall after them is cut one `next_command` after
    // the last reply, not earlier and not much later.
    let mut steps = Vec::new();
    for _ in 0..6 {
        steps.push(Step::Command("NOOP".into()));
        steps.push(Step::Sleep(Duration::from_millis(200)));
    }
    steps.push(Step::Command("NOOP".into()));
    steps.push(Step::Sleep(Duration::from_secs(5)));
    steps.push(Step::Command("VERBOSE late 1".into()));
    let b = FakeBackend::start(Behaviour::steps(steps)).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  first_command: 300ms\n  next_command: 500ms\n",
    ))
    .await;
    let started = Instant::now();
    let out = caller("x", "1.1").run(p.addr).await;
    assert_failure(&out, "next_command_timeout");
    let noops = out.commands.iter().take_while(|c| *c == "NOOP").count();
    assert_eq!(noops, 7, "{:?}", out.commands);
    assert!(!out.commands.iter().any(|c| c.starts_with("VERBOSE")));
    // 6 gaps of 200 ms, then 500 ms of stall.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1650) && took < Duration::from_millis(2600),
        "{took:?}"
    );
}

#[tokio::test]
async fn reset_after_commit_gives_failure_at_once() {
    let b = FakeBackend::start(Behaviour::ResetAfterCommands(1)).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  next_command: 30s\n",
    ))
    .await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_failure(&out, "backend_reset");
    assert!(
        out.elapsed < Duration::from_millis(500),
        "{:?}",
        out.elapsed
    );
}

#[tokio::test]
async fn a_long_command_is_not_cut() {
    // EXEC Dial may run for hours: no deadline while Asterisk executes.
    let b = FakeBackend::start(Behaviour::script(&["EXEC Dial PJSIP/100", "NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  next_command: 1s\n  first_command: 1s\n",
    ))
    .await;
    let started = Instant::now();
    let out = caller("x", "1.1")
        .reply_with(|cmd| {
            if cmd.starts_with("EXEC") {
                Reply::ok().after(Duration::from_secs(5))
            } else {
                Reply::ok()
            }
        })
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["EXEC Dial PJSIP/100", "NOOP"]);
    assert!(started.elapsed() >= Duration::from_secs(5));
}

#[tokio::test]
async fn backend_failure_line_passes_through() {
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::Command("NOOP".into()),
        Step::Send(b"FAILURE\n".to_vec()),
    ]))
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Failure);
    assert!(
        !out.variables.contains_key("AGIPROXY_ERROR"),
        "the backend's own FAILURE is not the proxy's"
    );
}

#[tokio::test]
async fn regression_first_command_deadline_counts_from_the_committing_attempt() {
    // The first backend stalls past first_command; the second one starts its
    // first command at once but finishes the line 50 ms later. The deadline
    // for that line is the second attempt's, not the first one's (which has
    // passed by then).
    let stalled = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let split = FakeBackend::start(Behaviour::SplitLines(vec!["NOOP".into()])).await;
    let t = "timeouts:\n  first_command: 300ms\n";
    let p = proxy(&one_pool("round_robin", &[stalled.addr(), split.addr()], t)).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["NOOP"]);
}
