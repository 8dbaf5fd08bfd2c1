//! The relay after commit: sound-file transfers (issue 20), raw mode, pacing of
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

/// A proxy in front of `b` with a short `next_command`.
async fn soundfile_proxy(b: &FakeBackend) -> Proxy {
    proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  next_command: 500ms\n",
    ))
    .await
}

/// A call through [`soundfile_proxy`] to `b`, whose sound-file module gives
/// up waiting for a payload after 1 s; how long it took.
async fn call_with_an_impatient_module(b: &FakeBackend) -> (chaos_tests::CallOutcome, Duration) {
    let p = soundfile_proxy(b).await;
    let started = Instant::now();
    let out = caller("x", "1.1")
        .soundfile_timeout(Duration::from_secs(1))
        .run(p.addr)
        .await;
    (out, started.elapsed())
}

#[tokio::test]
async fn issue_20_put_then_get_of_50_kb_and_1_mib_pass_byte_exact() {
    let small = pattern(50 * 1024, 7);
    let large = pattern(1 << 20, 9);
    // `next_command` far below the 1 MiB payload's time on a loaded
    // machine would still not cut it: it bounds silence, not transfers.
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::Command("VERBOSE \"sending\" 1".into()),
        Step::PutFile {
            name: "small.gsm".into(),
            data: small.clone(),
        },
        Step::PutFile {
            name: "large.gsm".into(),
            data: large.clone(),
        },
        Step::GetFile {
            name: "small.gsm".into(),
        },
        Step::GetFile {
            name: "large.gsm".into(),
        },
        Step::Command("NOOP".into()),
    ]))
    .await;
    let p = soundfile_proxy(&b).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.received_files.len(), 2);
    assert!(
        out.received_files[0].1 == small,
        "50 KB PUT changed in transit"
    );
    assert!(
        out.received_files[1].1 == large,
        "1 MiB PUT changed in transit"
    );
    // Not one payload line reached Asterisk as a command.
    assert_eq!(
        out.commands,
        [
            "VERBOSE \"sending\" 1".to_owned(),
            format!("PUT SOUNDFILE small.gsm {}", small.len()),
            format!("PUT SOUNDFILE large.gsm {}", large.len()),
            "GET SOUNDFILE small.gsm".into(),
            "GET SOUNDFILE large.gsm".into(),
            "NOOP".into(),
        ]
    );
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    let s = &b.stats().sessions()[0];
    assert_eq!(s.files.len(), 2, "{:?}", s.replies);
    assert!(s.files[0].1 == small, "50 KB GET changed in transit");
    assert!(s.files[1].1 == large, "1 MiB GET changed in transit");
    assert_eq!(
        s.replies,
        [
            "200 result=0",
            "200 result=0",
            "200 result=0",
            "200 result=0",
            "200 result=0",
            "200 result=0 size=51200",
            "200 result=0 size=1048576",
            "200 result=0",
        ]
    );
}

/// Asterisk splits a command on any run of spaces and tabs and matches its
/// words in any case: `PUT  SOUNDFILE` is the module's command, and its
/// payload must pass as payload, not reach Asterisk line by line as commands
/// (the module waits 1 s here for the lines the proxy held back).
#[tokio::test]
async fn a_soundfile_command_with_extra_whitespace_or_lower_case_is_still_one() {
    let data = pattern(1000, 3);
    let put = format!("PUT  SOUNDFILE x.gsm {}", data.len());
    let put_tab = format!("\tput soundfile\ty.gsm\t {}", data.len());
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::PutFileAs {
            command: put.clone(),
            data: data.clone(),
        },
        Step::PutFileAs {
            command: put_tab.clone(),
            data: data.clone(),
        },
        Step::Command("GET\tSOUNDFILE  x.gsm".into()),
        Step::Command("NOOP".into()),
    ]))
    .await;
    let (out, took) = call_with_an_impatient_module(&b).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert!(
        took < Duration::from_secs(1),
        "the module timed out: {took:?}"
    );
    assert_eq!(out.received_files.len(), 2, "{:?}", out.commands);
    assert!(out.received_files.iter().all(|(_, f)| *f == data));
    assert_eq!(
        out.commands,
        [put, put_tab, "GET\tSOUNDFILE  x.gsm".into(), "NOOP".into()]
    );
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    let s = &b.stats().sessions()[0];
    assert!(
        s.files.len() == 1 && s.files[0].1 == data,
        "{:?}",
        s.replies
    );
}

#[tokio::test]
async fn issue_20_a_command_pipelined_after_the_payload_waits_for_the_final_reply() {
    let data = pattern(10_000, 1);
    let b = FakeBackend::start(Behaviour::steps(vec![
        // The whole payload, then at once (no wait for the final reply) a
        // command: it must reach Asterisk only after that reply.
        Step::PutFileCut {
            name: "x.gsm".into(),
            data: data.clone(),
            send: data.len(),
        },
        Step::Command("NOOP".into()),
        Step::Command("NOOP".into()),
    ]))
    .await;
    let p = soundfile_proxy(&b).await;
    let out = caller("x", "1.1")
        .reply_with(|_| Reply::ok().after(Duration::from_millis(20)))
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert!(out.received_files[0].1 == data);
    assert_eq!(out.commands.len(), 3, "{:?}", out.commands);
}

#[tokio::test]
async fn issue_20_put_answered_minus_10_has_no_payload_and_the_next_command_works() {
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::PutFile {
            name: "x.gsm".into(),
            data: pattern(5000, 2),
        },
        Step::Command("NOOP".into()),
    ]))
    .await;
    let p = soundfile_proxy(&b).await;
    let out = caller("x", "1.1").put_ready(-10).run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.commands, ["PUT SOUNDFILE x.gsm 5000", "NOOP"]);
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    assert_eq!(
        b.stats().sessions()[0].replies,
        ["200 result=-10", "200 result=0"]
    );
}

#[tokio::test]
async fn issue_20_put_to_an_asterisk_without_the_module_gets_510() {
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::PutFile {
            name: "x.gsm".into(),
            data: pattern(5000, 2),
        },
        Step::GetFile {
            name: "x.gsm".into(),
        },
        Step::Command("NOOP".into()),
    ]))
    .await;
    let p = soundfile_proxy(&b).await;
    let out = caller("x", "1.1").without_audiotx().run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.commands.len(), 3, "{:?}", out.commands);
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    assert_eq!(
        b.stats().sessions()[0].replies,
        [
            "510 Invalid or unknown command",
            "510 Invalid or unknown command",
            "200 result=0"
        ]
    );
}

#[tokio::test]
async fn issue_20_a_payload_cut_midway_ends_in_failure_after_the_module_answers() {
    // Stalled: bounded by `next_command` like any silence. Closed: the file
    // is incomplete. Either way Asterisk's module is reading payload lines
    // and hears nothing until it gives up; then the dialplan gets FAILURE.
    for (then, reason) in [
        (Then::Stall, "next_command_timeout"),
        (Then::Close, "backend_closed"),
    ] {
        let b = FakeBackend::start(Behaviour::Steps {
            steps: vec![
                Step::Command("NOOP".into()),
                Step::PutFileCut {
                    name: "x.gsm".into(),
                    data: pattern(100_000, 3),
                    send: 40_000,
                },
            ],
            then,
        })
        .await;
        let (out, took) = call_with_an_impatient_module(&b).await;
        assert_failure(&out, reason);
        assert_eq!(out.put_timeouts, 1, "{then:?}: {out:?}");
        assert!(out.received_files.is_empty());
        assert!(took < Duration::from_secs(8), "{then:?}: {took:?}");
        // The backend was told HANGUP and closed.
        assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
        assert_eq!(b.stats().hangups(), 1, "{then:?}");
    }
}

#[tokio::test]
async fn issue_20_get_of_a_missing_file_carries_no_payload() {
    let b = FakeBackend::start(Behaviour::steps(vec![
        Step::GetFile {
            name: "missing.gsm".into(),
        },
        Step::Command("NOOP".into()),
    ]))
    .await;
    let p = soundfile_proxy(&b).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.commands, ["GET SOUNDFILE missing.gsm", "NOOP"]);
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    let s = &b.stats().sessions()[0];
    assert_eq!(s.replies, ["200 result=-1", "200 result=0"]);
    assert!(s.files.is_empty());
}

#[tokio::test]
async fn issue_20_hangup_from_asterisk_in_the_middle_of_a_put_payload() {
    let data = pattern(50 * 1024, 4);
    let b = FakeBackend::start(Behaviour::Steps {
        steps: vec![
            Step::PutFile {
                name: "x.gsm".into(),
                data: data.clone(),
            },
            Step::Command("NOOP".into()),
        ],
        then: Then::WaitForHangupThenClose,
    })
    .await;
    let p = soundfile_proxy(&b).await;
    let mut rx = p.server.subscribe();
    let out = caller("x", "1.1")
        .hangup_during_put(20_000)
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Hangup, "{out:?}");
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    // The payload went on past the HANGUP and the module stored it.
    assert!(out.received_files[0].1 == data);
    assert_eq!(
        out.commands,
        [format!("PUT SOUNDFILE x.gsm {}", data.len()), "NOOP".into()]
    );
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    // The unsolicited HANGUP reached the backend and was not taken for the
    // final reply; the end-of-session one was dropped.
    assert_eq!(b.stats().hangups(), 1);
    assert_eq!(
        b.stats().sessions()[0].replies,
        ["200 result=0", "200 result=0", "200 result=0"]
    );
    assert!(next_record(&mut rx).await.caller_hung_up);
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

/// An Asterisk that sent its header and read the backend's first command,
/// `expected`, byte for byte; nothing answered yet.
async fn at_first_command(addr: std::net::SocketAddr, expected: &[u8]) -> tokio::net::TcpStream {
    let header = chaos_tests::AgiHeader::realistic("x", &[], "1.1").to_bytes();
    let mut s = FakeAsterisk::raw_session(addr, &header).await.unwrap();
    let mut command = vec![0u8; expected.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut command))
        .await
        .expect("the command within 5 s")
        .unwrap();
    assert_eq!(command, expected);
    s
}

#[tokio::test]
async fn a_finished_session_closes_towards_asterisk_without_waiting_for_its_hangup() {
    // The backend closes after its command was answered: Asterisk owes
    // nothing, so agiproxy closes at once, as a backend connected directly
    // does, instead of half-closing and reading Asterisk's end-of-session
    // HANGUP first (docs/benchmarks.md: 0.95x the CPU a session).
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let mut rx = p.server.subscribe();
    let mut s = at_first_command(p.addr, b"NOOP\n").await;
    s.write_all(b"200 result=0\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("EOF once the backend closed")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    // Over, while this Asterisk has neither sent its HANGUP nor closed.
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, agiproxy::Outcome::Completed);
    assert_eq!(rec.commands, 1);
    assert_eq!(rec.bytes_from_asterisk, 13, "the reply, nothing after it");
    // Its end-of-session HANGUP meets a closed socket: a reset, as from a
    // backend connected directly that has closed.
    s.write_all(b"HANGUP\n").await.unwrap();
    wait_until("the reset", Duration::from_secs(5), || {
        s.take_error().ok().flatten().is_some()
    })
    .await;
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
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
    // Keepalive probes (the shortest there are) do not cut it either: a
    // live Asterisk's kernel answers them.
    let b = FakeBackend::start(Behaviour::script(&["EXEC Dial PJSIP/100", "NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  next_command: 1s\n  first_command: 1s\ntcp_keepalive: { idle: 1s, interval: 1s, probes: 1 }\n",
    ))
    .await;
    let started = Instant::now();
    let out = caller("x", "1.1")
        .exec_takes(Duration::from_secs(5))
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["EXEC Dial PJSIP/100", "NOOP"]);
    assert!(started.elapsed() >= Duration::from_secs(5));
}

/// Asterisk bounds no reply line: `GET FULL VARIABLE ${CURL(...)}` or
/// `${FILE(...)}`, or a variable set through AMI, answers hundreds of KB in
/// one line. Such a line once ended its call (FAILURE and a reset: "Asterisk
/// side sent a line over the limit", audit); it now passes whole, streamed
/// past 8 KiB, and the turn goes on at its end.
#[tokio::test]
async fn a_long_reply_line_reaches_the_backend_whole() {
    let value = "v".repeat(300_000);
    let reply = format!("200 result=1 ({value})");
    let b = FakeBackend::start(Behaviour::script(&[
        "GET FULL VARIABLE ${BIG}",
        "NOOP",
        "GET FULL VARIABLE ${BIG}",
    ]))
    .await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let answer = reply.clone();
    let out = caller("x", "1.1")
        .reply_with(move |c| {
            if c.starts_with("GET FULL VARIABLE") {
                // Written in one go: the proxy reads it in many pieces.
                Reply::line(&answer)
            } else {
                Reply::ok()
            }
        })
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.commands.len(), 3, "{:?}", out.commands);
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    let replies = &b.stats().sessions()[0].replies;
    assert_eq!(replies.len(), 3);
    assert_eq!(replies[0], reply);
    assert_eq!(replies[1], "200 result=0");
    assert_eq!(replies[2], reply);
}

/// `GOSUB` answers `100 result=0 Trying...`, runs the dialplan subroutine
/// (a `Dial` in it may last hours), then `200 result=0 Gosub complete`. The
/// interim answer once put the backend on the clock for its next command:
/// a subroutine longer than `next_command` got the call failed
/// (`next_command_timeout`) and the backend a HANGUP mid-`GOSUB` (audit).
#[tokio::test]
async fn a_gosub_runs_past_next_command_until_its_final_answer() {
    let b = FakeBackend::start(Behaviour::script(&["GOSUB sub s 1", "NOOP"])).await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  next_command: 300ms\n  first_command: 300ms\n",
    ))
    .await;
    let out = caller("x", "1.1")
        .gosub_takes(Duration::from_millis(1500))
        .run(p.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["GOSUB sub s 1", "NOOP"]);
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert!(
        out.elapsed >= Duration::from_millis(1500),
        "{:?}",
        out.elapsed
    );
    assert!(b.stats().wait_completed(1, Duration::from_secs(3)).await);
    // Not cut: the backend ended its script and closed, and was told no HANGUP.
    assert_eq!(b.stats().hangups(), 0);
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

#[tokio::test]
async fn asterisk_resetting_mid_command_is_client_gone() {
    // Asterisk went away while it ran a command (a reset here; keepalive
    // finding a vanished host ends the same way): the backend's connection
    // is closed and the session counts as `client_gone`, not `completed`.
    // So does a close (FIN) with the reply owed and no `HANGUP` before it,
    // which a real Asterisk never does (it sends `HANGUP` before every
    // close): an audit's 7,768 were `completed`. With `HANGUP` first
    // (`AGIEXITONHANGUP=yes`), the session is `completed`.
    let b = FakeBackend::start(Behaviour::script(&["EXEC Dial PJSIP/100", "NOOP"])).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let mut rx = p.server.subscribe();
    for (reset, hangup_first, want) in [
        (true, false, agiproxy::Outcome::ClientGone),
        (false, false, agiproxy::Outcome::ClientGone),
        (false, true, agiproxy::Outcome::Completed),
    ] {
        let mut s = at_first_command(p.addr, b"EXEC Dial PJSIP/100\n").await;
        if hangup_first {
            s.write_all(b"HANGUP\n").await.unwrap();
        }
        if reset {
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(s);
        let rec = next_record(&mut rx).await;
        let case = (reset, hangup_first);
        assert_eq!(rec.outcome, want, "{case:?}");
        assert_eq!(rec.commands, 1, "{case:?}");
        let t0 = Instant::now();
        while b.stats().active() > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the backend's connection stayed open: {case:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A backend for one connection, served by `serve` on a plain socket, for
/// what FakeBackend cannot do: read a reply byte by byte (it reads ahead, so
/// nothing it skips stays unread in the kernel) or ignore a close.
async fn one_connection<F, Fut>(
    serve: F,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Fut::Output>)
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (s, _) = tokio::time::timeout(Duration::from_secs(10), l.accept())
            .await
            .expect("the proxy connects within 10 s")
            .unwrap();
        serve(s).await
    });
    (addr, task)
}

/// Reads the header up to its blank line (the proxy sends nothing behind it
/// until the backend speaks).
async fn skip_header(s: &mut tokio::net::TcpStream) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\n\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the header within 5 s")
            .unwrap();
        assert!(n > 0, "closed inside the header");
        got.extend_from_slice(&buf[..n]);
    }
}

/// A raw route in front of `backend` with `next_command: 300ms`.
fn raw_route(backend: std::net::SocketAddr) -> String {
    format!(
        "timeouts:\n  next_command: 300ms\nroutes:\n  - name: raw\n    mode: raw\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{backend}\" }}\n"
    )
}

/// A proxy with a raw route to `backend`, its records, and a call through
/// it that has read the backend's `NOOP\n`.
async fn raw_call_at_its_noop(
    backend: std::net::SocketAddr,
) -> (
    Proxy,
    tokio::sync::broadcast::Receiver<agiproxy::SessionRecord>,
    tokio::net::TcpStream,
) {
    let p = proxy(&raw_route(backend)).await;
    let rx = p.server.subscribe();
    let s = at_first_command(p.addr, b"NOOP\n").await;
    (p, rx, s)
}

/// Writes until the peer's socket is found closed (a reset answers the
/// writes); `false` if it is still open after 3 s.
async fn closed_by_peer(s: &mut tokio::net::TcpStream, probe: &[u8]) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        if s.write_all(probe).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn regression_a_backend_reset_after_the_caller_hung_up_is_hangup_not_failure() {
    // The caller hangs up right after a reply; the script has read that
    // reply and closes a moment later with the forwarded HANGUP unread, so
    // its kernel sends a reset. Connected directly, Asterisk reports
    // HANGUP; FAILURE would tell the hangup handlers the script failed.
    let (addr, _backend) = one_connection(|mut s| async move {
        skip_header(&mut s).await;
        s.write_all(b"STREAM FILE foo \"\"\n").await.unwrap();
        let mut byte = [0u8];
        while byte[0] != b'\n' {
            s.read_exact(&mut byte).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await;
    let p = proxy(&one_pool(
        "round_robin",
        &[addr],
        "timeouts:\n  next_command: 30s\n",
    ))
    .await;
    let mut rx = p.server.subscribe();
    let out = caller("x", "1.1").hangup_after(1).run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Hangup, "{out:?}");
    assert!(!out.variables.contains_key("AGIPROXY_ERROR"), "{out:?}");
    assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, agiproxy::Outcome::Completed);
    assert!(rec.caller_hung_up);

    // The rule kept without a hang-up (docs/reliability.md): a script that
    // sends its last command and closes after the reply has arrived, with
    // it unread, resets like a backend that lost the connection, and gets
    // FAILURE.
    let (addr, _backend) = one_connection(|mut s| async move {
        skip_header(&mut s).await;
        s.write_all(b"VERBOSE \"bye\" 1\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await;
    let p = proxy(&one_pool(
        "round_robin",
        &[addr],
        "timeouts:\n  next_command: 30s\n",
    ))
    .await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_failure(&out, "backend_reset");
}

#[tokio::test]
async fn regression_a_hangup_after_a_backend_reset_mid_command_is_the_callers() {
    // The backend resets while Asterisk runs its command; then the caller
    // hangs up. That HANGUP is the caller's (Asterisk sends its
    // end-of-session one only after the proxy has closed), so the session
    // ends as a close: no FAILURE to a hung-up channel.
    let b = FakeBackend::start(Behaviour::Steps {
        steps: vec![
            Step::Send(b"EXEC Dial PJSIP/100\n".to_vec()),
            Step::Sleep(Duration::from_millis(100)),
        ],
        then: Then::Reset,
    })
    .await;
    let p = proxy(&one_pool(
        "round_robin",
        &[b.addr()],
        "timeouts:\n  next_command: 30s\n",
    ))
    .await;
    let mut rx = p.server.subscribe();
    let mut s = at_first_command(p.addr, b"EXEC Dial PJSIP/100\n").await;
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
    // The reset has reached the proxy (loopback: well within this).
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"HANGUP\n200 result=-1\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed within 5 s")
        .unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    s.write_all(b"HANGUP\n").await.unwrap();
    drop(s);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.outcome, agiproxy::Outcome::Completed);
    assert_eq!(rec.reason, None);
    assert!(rec.caller_hung_up);
}

#[tokio::test]
async fn regression_raw_mode_ends_a_backend_that_lingers_after_asterisk_closed() {
    // The backend ignores the close passed on to it: the session must not
    // hold its task, sockets and slot for ever, but end `next_command`
    // after Asterisk's close, as in lines mode.
    let (go, probe) = tokio::sync::oneshot::channel::<()>();
    let (addr, backend) = one_connection(|mut s| async move {
        skip_header(&mut s).await;
        s.write_all(b"NOOP\n").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("Asterisk's close passed on within 5 s")
            .unwrap();
        // Silent from here (a write would end the session by itself),
        // until the test has seen the session end.
        let _ = tokio::time::timeout(Duration::from_secs(10), probe).await;
        closed_by_peer(&mut s, b"NOOP\n").await
    })
    .await;
    let (_proxy, mut rx, mut s) = raw_call_at_its_noop(addr).await;
    s.write_all(b"200 result=0\n").await.unwrap();
    drop(s);
    let closed = Instant::now();
    let rec = tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .expect("the session ends within 3 s of Asterisk's close")
        .unwrap();
    let took = closed.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert_eq!(rec.outcome, agiproxy::Outcome::Completed);
    assert_eq!(rec.bytes_from_asterisk, 13);
    let _ = go.send(());
    assert!(
        backend.await.unwrap(),
        "the backend's connection stayed open"
    );
}

#[tokio::test]
async fn regression_raw_mode_ends_an_asterisk_side_that_lingers_after_the_backend_closed() {
    let b = FakeBackend::start(Behaviour::steps(vec![Step::Send(b"NOOP\n".to_vec())])).await;
    let p = proxy(&raw_route(b.addr())).await;
    let mut rx = p.server.subscribe();
    let header = chaos_tests::AgiHeader::realistic("raw/x", &[], "1.1").to_bytes();
    let mut s = FakeAsterisk::raw_session(p.addr, &header).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the backend's close passed on within 5 s")
        .unwrap();
    assert_eq!(got, b"NOOP\n");
    // This peer neither answers nor closes.
    let closed = Instant::now();
    let rec = tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .expect("the session ends within 3 s of the backend's close")
        .unwrap();
    let took = closed.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert_eq!(rec.outcome, agiproxy::Outcome::Completed);
    assert!(
        closed_by_peer(&mut s, b"HANGUP\n").await,
        "Asterisk's connection stayed open"
    );
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn regression_a_backend_reset_first_seen_by_a_write_is_failure() {
    // The backend resets while Asterisk runs its command, and the proxy
    // meets the reset first on writing the reply (here it had stopped
    // reading: the backend pipelined more than it buffers). The write's
    // ECONNRESET used up the socket's error, the next read returned 0, and
    // the reset passed for an orderly close: SUCCESS (an audit found it
    // racing in 11 of 40 calls). A reset is a reset however it is seen.
    let line = format!("VERBOSE \"{}\" 1\n", "x".repeat(7_980));
    let (addr, _backend) = one_connection(move |mut s| async move {
        skip_header(&mut s).await;
        s.write_all(b"EXEC Wait 1\n").await.unwrap();
        for _ in 0..34 {
            // Past the proxy's 256 KiB of held lines: it stops reading.
            s.write_all(line.as_bytes()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    })
    .await;
    let p = proxy(&one_pool(
        "round_robin",
        &[addr],
        "timeouts:\n  next_command: 30s\n",
    ))
    .await;
    let out = caller("x", "1.1")
        .exec_takes(Duration::from_millis(600))
        .run(p.addr)
        .await;
    // (Not `assert_failure`: the outcome holds 270 KB of commands.)
    let error = out.variables.get("AGIPROXY_ERROR").map(String::as_str);
    assert_eq!(
        (out.status, error),
        (AgiStatus::Failure, Some("backend_reset")),
        "{} commands, {:?}",
        out.commands.len(),
        out.violations
    );
    assert!(out.violations.is_empty(), "{:?}", out.violations);
}

/// A `GET SOUNDFILE` payload that stops short of its `size=` (a broken
/// module, or an Asterisk that died mid-transfer) is bounded by
/// `next_command` like any silence: the module has sent all it will and
/// waits for a command, so Asterisk is told FAILURE and the backend, which
/// waits for the rest, is ended politely. Before: the relay waited for the rest
/// with no deadline, and the call hung until a peer closed (audit).
#[tokio::test]
async fn a_get_payload_that_stops_short_ends_in_failure() {
    use tokio::io::AsyncBufReadExt;
    let b = FakeBackend::start(Behaviour::Steps {
        steps: vec![Step::GetFile {
            name: "x.gsm".into(),
        }],
        then: Then::Stall,
    })
    .await;
    let p = soundfile_proxy(&b).await;
    let header = chaos_tests::AgiHeader::realistic("x", &[], "1.1").to_bytes();
    let s = FakeAsterisk::raw_session(p.addr, &header).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "GET SOUNDFILE x.gsm\n");
    // 100 bytes announced, one line of 57 sent.
    let mut reply = b"200 result=0 size=100\n".to_vec();
    reply.extend_from_slice(&chaos_tests::soundfile::encode_lines(&pattern(57, 5)));
    w.write_all(&reply).await.unwrap();
    let started = Instant::now();
    let told = tokio::time::timeout(Duration::from_secs(5), async {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(
            line,
            "SET VARIABLE AGIPROXY_ERROR \"next_command_timeout\"\n"
        );
        w.write_all(b"200 result=1\n").await.unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        line.clone()
    })
    .await
    .expect("told FAILURE within 5 s (next_command is 500 ms)");
    assert_eq!(told, "FAILURE\n");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    // The backend was ended (its `HANGUP` is read as payload by a backend
    // that waits for the rest: valid base64) and closed.
    assert!(b.stats().wait_completed(1, Duration::from_secs(5)).await);
}

/// `VERBOSE "<n × fill>" 1`, without its newline.
fn verbose_of(n: usize, fill: u8) -> Vec<u8> {
    let mut line = b"VERBOSE \"".to_vec();
    line.resize(line.len() + n, fill);
    line
}

/// A backend command line over the relay's 16 KiB bound, however it
/// arrives, ends the session in FAILURE `backend_protocol` at once, and no
/// part of it reaches Asterisk (which would cut it at 8191 bytes and run
/// the rest as a second command). `before` are the commands Asterisk gets
/// first.
async fn assert_over_long_line_refused(steps: Vec<Step>, before: &[&str]) {
    let mut steps = steps;
    steps.push(Step::Sleep(Duration::from_secs(5)));
    let b = FakeBackend::start(Behaviour::steps(steps)).await;
    let p = proxy(&one_pool("round_robin", &[b.addr()], "")).await;
    let out = caller("x", "1.1").run(p.addr).await;
    assert_failure(&out, "backend_protocol");
    let mut expected = before.to_vec();
    expected.extend([
        "SET VARIABLE AGIPROXY_ERROR \"backend_protocol\"",
        "FAILURE",
    ]);
    assert_eq!(out.commands, expected, "no part of the line ran");
    assert!(out.elapsed < Duration::from_secs(2), "{:?}", out.elapsed);
}

#[tokio::test]
async fn an_over_long_command_finished_by_a_later_read_is_refused() {
    // 15,009 bytes (under the bound) buffered, then the 10,004 that end it.
    let mut end = vec![b'y'; 10_000];
    end.extend_from_slice(b"\" 1\n");
    let steps = vec![
        Step::Command("NOOP".into()),
        Step::Send(verbose_of(15_000, b'x')),
        Step::Sleep(Duration::from_millis(300)),
        Step::Send(end),
    ];
    assert_over_long_line_refused(steps, &["NOOP"]).await;
}

#[tokio::test]
async fn an_over_long_command_held_behind_a_reply_is_refused() {
    // Whole, held while Asterisk answers the NOOP written with it.
    let mut bytes = b"NOOP\n".to_vec();
    bytes.extend_from_slice(&verbose_of(100_000, b'z'));
    bytes.extend_from_slice(b"\" 1\n");
    assert_over_long_line_refused(vec![Step::Send(bytes)], &["NOOP"]).await;
}

#[tokio::test]
async fn an_over_long_first_command_is_refused() {
    let mut bytes = verbose_of(19_987, b'w');
    bytes.extend_from_slice(b"\" 1\n");
    assert_eq!(bytes.len(), 20_000);
    assert_over_long_line_refused(vec![Step::Send(bytes)], &[]).await;
}

/// A `PUT SOUNDFILE` payload line over the 64 KiB bound is refused however
/// it arrives: finished by a later read, or sent with its command and held
/// behind the module's "ready" (only a partial line was measured before, so
/// both passed whole). None of it reaches Asterisk; once the module gives
/// up waiting, Asterisk is told FAILURE `backend_protocol`.
#[tokio::test]
async fn an_over_long_payload_line_is_refused_however_it_arrives() {
    let long = "A".repeat(70_000);
    let command = "PUT SOUNDFILE x.gsm 100000\n".to_string();
    let cases = [
        (
            "finished by a later read",
            vec![
                Step::Command("PUT SOUNDFILE x.gsm 100000".into()),
                Step::Send(long.as_bytes()[..40_000].to_vec()),
                Step::Sleep(Duration::from_millis(300)),
                Step::Send(format!("{}\n", &long[40_000..]).into_bytes()),
            ],
        ),
        (
            "held behind the ready reply",
            vec![Step::Send(format!("{command}{long}\n").into_bytes())],
        ),
    ];
    for (what, steps) in cases {
        let b = FakeBackend::start(Behaviour::Steps {
            steps,
            then: Then::Stall,
        })
        .await;
        let (out, took) = call_with_an_impatient_module(&b).await;
        assert_failure(&out, "backend_protocol");
        assert_eq!(out.put_timeouts, 1, "{what}: {out:?}");
        assert!(out.received_files.is_empty(), "{what}");
        assert!(took < Duration::from_secs(8), "{what}: {took:?}");
    }
}

/// A backend that pipelines commands and then stops reading (Asterisk's
/// replies fill its socket and then `MAX_PENDING`) is given up after
/// `next_command` without taking replies: Asterisk is read again, told
/// FAILURE `next_command_timeout`, and the backend is closed. Before, the
/// relay stopped reading Asterisk for good, so no deadline ran and neither
/// FAILURE nor Asterisk's close was ever seen: the call hung until the
/// backend closed (audit).
#[tokio::test]
async fn a_backend_that_stops_taking_replies_is_given_up_at_next_command() {
    use tokio::io::AsyncBufReadExt;
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_addr = backend.local_addr().unwrap();
    let (done, asterisk_done) = tokio::sync::oneshot::channel::<()>();
    let stalled = tokio::spawn(async move {
        let (s, _) = backend.accept().await.unwrap();
        let mut r = tokio::io::BufReader::new(s);
        let mut line = String::new();
        while r.read_line(&mut line).await.unwrap() > 1 {
            line.clear();
        }
        r.get_mut()
            .write_all(&b"GET VARIABLE BIG\n".repeat(2000))
            .await
            .unwrap();
        // Reads nothing until Asterisk's call is over (bounded), then sees
        // the end of what was sent to it.
        let _ = tokio::time::timeout(Duration::from_secs(20), asterisk_done).await;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest))
            .await
            .map(|r| r.is_ok())
    });
    let p = proxy(&one_pool(
        "round_robin",
        &[b_addr],
        "timeouts:\n  next_command: 1s\n",
    ))
    .await;
    let header = chaos_tests::AgiHeader::realistic("x", &[], "1.1").to_bytes();
    let s = FakeAsterisk::raw_session(p.addr, &header).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r);
    // 60 KB replies: the backend's socket is full after a few hundred.
    let mut reply = b"200 result=1 (".to_vec();
    reply.resize(reply.len() + 60_000, b'v');
    reply.extend_from_slice(b")\n");
    let started = Instant::now();
    let (answered, told) = tokio::time::timeout(Duration::from_secs(15), async {
        let mut answered = 0;
        let mut line = String::new();
        loop {
            line.clear();
            assert!(r.read_line(&mut line).await.unwrap() > 0, "closed silently");
            if line == "GET VARIABLE BIG\n" {
                w.write_all(&reply).await.unwrap();
                answered += 1;
                continue;
            }
            assert_eq!(
                line,
                "SET VARIABLE AGIPROXY_ERROR \"next_command_timeout\"\n"
            );
            w.write_all(b"200 result=1\n").await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            return (answered, line);
        }
    })
    .await
    .expect("told FAILURE within 15 s (next_command is 1 s); before, never");
    let _ = done.send(());
    assert_eq!(told, "FAILURE\n");
    assert!(answered > 1 && answered < 2000, "{answered} replies");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // The backend's connection was ended, not left open.
    assert!(
        matches!(stalled.await.unwrap(), Ok(true)),
        "the backend's connection was not closed"
    );
}

/// Raw mode has no deadline while both sides are open, but a backend that
/// stops reading must not hold the session for good: a write it takes
/// nothing of for `next_command` ends the session, so Asterisk's close is
/// seen. Before, the pump towards the backend waited in its write for
/// ever, and the session outlived Asterisk (audit of the lines relay).
#[tokio::test]
async fn raw_mode_ends_a_backend_that_stops_reading() {
    let (go, probe) = tokio::sync::oneshot::channel::<()>();
    let (addr, backend) = one_connection(|mut s| async move {
        skip_header(&mut s).await;
        s.write_all(b"NOOP\n").await.unwrap();
        // Reads nothing more until the test has seen the session end,
        // then finds out whether the proxy closed its connection.
        let _ = tokio::time::timeout(Duration::from_secs(15), probe).await;
        closed_by_peer(&mut s, b"NOOP\n").await
    })
    .await;
    let (_proxy, mut rx, mut s) = raw_call_at_its_noop(addr).await;
    // More than the sockets between us and the backend hold (bounded):
    // the writes stall once they are full, until the session ends and
    // the proxy's close fails them.
    let chunk = vec![b'x'; 64 * 1024];
    let writing = Instant::now();
    let cut_after = tokio::time::timeout(Duration::from_secs(3), async {
        for _ in 0..2_000 {
            if s.write_all(&chunk).await.is_err() {
                return Some(writing.elapsed());
            }
        }
        None
    })
    .await;
    drop(s);
    let rec = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the session ends within 5 s of Asterisk's close (next_command is 300 ms)")
        .unwrap();
    // Raw mode cannot tell which side failed: a peer error is `completed`.
    assert_eq!(rec.outcome, agiproxy::Outcome::Completed, "{rec:?}");
    // Ended by the stalled write, not before its `next_command` (300 ms)
    // was up: the stall cannot have begun before the first write.
    let took = match cut_after {
        Ok(Some(took)) => took,
        Ok(None) => panic!("128 MiB went through a backend that reads nothing"),
        Err(_) => panic!("the session still took Asterisk's bytes after 3 s"),
    };
    assert!(took >= Duration::from_millis(250), "{took:?}");
    let _ = go.send(());
    assert!(
        backend.await.unwrap(),
        "the backend's connection stayed open"
    );
}

/// A backend dripping a `PUT SOUNDFILE` payload after Asterisk has closed
/// (the caller gone) gets `next_command` to close, as any backend that
/// lingers after Asterisk's close: its payload lines no longer push the
/// deadline on. Before, each line did, and a trickle held the session (and
/// its slot) long after the call was over (verification run: 28 s past
/// Asterisk's close).
#[tokio::test]
async fn a_payload_dripping_after_asterisk_closed_does_not_hold_the_session() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, backend) = one_connection(|mut s| async move {
        skip_header(&mut s).await;
        s.write_all(b"PUT SOUNDFILE x.gsm 1000000\n").await.unwrap();
        let mut ready = [0u8; 13];
        s.read_exact(&mut ready).await.unwrap();
        assert_eq!(&ready, b"200 result=0\n");
        // A line every 100 ms until the test has seen the session end
        // (bounded: 15 s), or the proxy closes.
        let line = [b"QUFB".repeat(19), b"\n".to_vec()].concat();
        let drip = async {
            for _ in 0..150 {
                if s.write_all(&line).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! { _ = drip => {}, _ = stopped => {} }
    })
    .await;
    let p = proxy(&one_pool(
        "round_robin",
        &[addr],
        "timeouts:\n  next_command: 500ms\n",
    ))
    .await;
    let mut rx = p.server.subscribe();
    let mut s = at_first_command(p.addr, b"PUT SOUNDFILE x.gsm 1000000\n").await;
    s.write_all(b"200 result=0\n").await.unwrap();
    // Some payload flows (read, as the module does), then the caller is
    // gone: `HANGUP` and a close of Asterisk's side, which reads on.
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut sink = vec![0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(15), r.read(&mut sink)).await
        {
            if n == 0 {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.write_all(b"HANGUP\n").await.unwrap();
    w.shutdown().await.unwrap();
    let closed = Instant::now();
    let rec = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the session ends within 5 s of Asterisk's close (next_command is 500 ms)")
        .unwrap();
    assert!(
        closed.elapsed() < Duration::from_secs(3),
        "{:?}",
        closed.elapsed()
    );
    let _ = stop.send(());
    assert!(rec.caller_hung_up, "{rec:?}");
    backend.await.unwrap();
    reader.await.unwrap();
}
