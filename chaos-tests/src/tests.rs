//! FakeAsterisk against FakeBackend directly, no proxy in between: the two
//! fakes must agree with each other and with the measured protocol before
//! they can judge a proxy.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::FILLER_COMMAND;
use crate::*;

/// Every test is bounded: a hang is a failure, not a stuck CI job.
async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("test exceeded its 5 s bound")
}

/// Runs one default call against `backend` and waits for the backend to
/// finish its side (it may still be reading the end-of-session HANGUP).
async fn call(asterisk: &FakeAsterisk, backend: &FakeBackend) -> CallOutcome {
    bounded(async {
        let before = backend.stats().sessions_completed();
        let out = asterisk.run(backend.addr()).await;
        assert!(
            backend
                .stats()
                .wait_completed(before + 1, Duration::from_secs(2))
                .await
        );
        out
    })
    .await
}

#[tokio::test]
async fn script_of_three_commands_succeeds_and_header_arrives_byte_exact() {
    let backend =
        FakeBackend::start(Behaviour::script(&["ANSWER", "VERBOSE \"hi\" 1", "NOOP"])).await;
    let out = call(&FakeAsterisk::new(), &backend).await;

    assert_eq!(out.status, AgiStatus::Success);
    assert_eq!(out.commands, ["ANSWER", "VERBOSE \"hi\" 1", "NOOP"]);
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert!(out.time_to_first_command.is_some());
    assert_eq!(
        out.bytes_sent,
        (Fixture::FX.bytes().len() + 3 * 13 + 7) as u64
    );

    let stats = backend.stats();
    assert_eq!(stats.replies(), 3);
    assert_eq!(stats.headers(), [Fixture::FX.bytes().to_vec()]);
    let session = &stats.sessions()[0];
    assert_eq!(session.replies, ["200 result=0"; 3]);
    assert_eq!(session.hangups, 1, "only the end-of-session HANGUP");
}

#[tokio::test]
async fn close_immediately_is_success_as_on_real_asterisk() {
    let backend = FakeBackend::start(Behaviour::CloseImmediately).await;
    let out = call(&FakeAsterisk::new(), &backend).await;
    assert_eq!(out.status, AgiStatus::Success);
    assert!(out.commands.is_empty());
}

#[tokio::test]
async fn resets_are_success_too() {
    for behaviour in [
        Behaviour::ResetImmediately,
        Behaviour::ResetAfterHeader,
        Behaviour::ResetAfterCommands(2),
    ] {
        let backend = FakeBackend::start(behaviour.clone()).await;
        let out = call(&FakeAsterisk::new(), &backend).await;
        assert_eq!(out.status, AgiStatus::Success, "{behaviour:?}");
    }
    let backend = FakeBackend::start(Behaviour::ResetAfterCommands(2)).await;
    let out = call(&FakeAsterisk::new(), &backend).await;
    assert_eq!(out.commands, [FILLER_COMMAND; 2]);
}

#[tokio::test]
async fn failure_line_gives_failure_without_a_reply() {
    let backend = FakeBackend::start(Behaviour::steps(vec![
        Step::Command("SET VARIABLE AGIPROXY_ERROR \"no backend\"".into()),
        Step::Send(b"FAILURE\n".to_vec()),
    ]))
    .await;
    let out = call(&FakeAsterisk::new(), &backend).await;

    assert_eq!(out.status, AgiStatus::Failure);
    assert_eq!(out.variables["AGIPROXY_ERROR"], "no backend");
    let session = &backend.stats().sessions()[0];
    assert_eq!(
        session.replies,
        ["200 result=1"],
        "no reply to the failure line"
    );
    assert_eq!(session.hangups, 1);
}

#[tokio::test]
async fn refused_connect_fails_at_once() {
    let out = bounded(FakeAsterisk::new().run(refused_addr())).await;
    assert_eq!(out.status, AgiStatus::Failure);
    assert!(out.connect_error.is_some());
    assert!(
        out.elapsed < Duration::from_millis(100),
        "{:?}",
        out.elapsed
    );
}

#[tokio::test]
async fn blackholed_connect_fails_after_connect_timeout() {
    let (_hole, addr) = blackholed_listener();
    let asterisk = FakeAsterisk::new().connect_timeout(Duration::from_millis(300));
    let out = bounded(asterisk.run(addr)).await;
    assert_eq!(out.status, AgiStatus::Failure);
    assert!(out
        .connect_error
        .as_deref()
        .unwrap_or_default()
        .contains("timed out"));
    assert!(
        out.elapsed >= Duration::from_millis(300),
        "{:?}",
        out.elapsed
    );
    assert!(
        out.elapsed < Duration::from_millis(1000),
        "{:?}",
        out.elapsed
    );
}

#[tokio::test]
async fn pipelined_commands_are_a_violation() {
    let backend =
        FakeBackend::start(Behaviour::Pipelined(vec!["NOOP".into(), "NOOP".into()])).await;
    let out = call(&FakeAsterisk::new(), &backend).await;
    assert_eq!(out.commands.len(), 2);
    assert!(
        out.violations.iter().any(|v| v.starts_with("pipelining")),
        "{:?}",
        out.violations
    );
    assert_eq!(backend.stats().replies(), 2);
}

#[tokio::test]
async fn split_lines_are_a_violation() {
    let backend =
        FakeBackend::start(Behaviour::SplitLines(vec!["VERBOSE \"split\" 1".into()])).await;
    let out = call(&FakeAsterisk::new(), &backend).await;
    assert_eq!(
        out.commands,
        ["VERBOSE \"split\" 1"],
        "the line is whole in the end"
    );
    assert!(
        out.violations.iter().any(|v| v.starts_with("partial line")),
        "{:?}",
        out.violations
    );
}

#[tokio::test]
async fn crlf_gets_510_and_is_a_violation() {
    let backend = FakeBackend::start(Behaviour::script(&["NOOP\r"])).await;
    let out = call(&FakeAsterisk::new(), &backend).await;
    assert!(
        out.violations.iter().any(|v| v.contains("\\r\\n")),
        "{:?}",
        out.violations
    );
    assert_eq!(
        backend.stats().sessions()[0].replies,
        ["510 Invalid or unknown command"]
    );
}

#[tokio::test]
async fn closing_mid_line_is_a_violation() {
    let backend = FakeBackend::start(Behaviour::Garbage(b"NOOP\nVERB".to_vec())).await;
    let out = call(&FakeAsterisk::new(), &backend).await;
    assert_eq!(out.commands, ["NOOP"]);
    assert!(
        out.violations.iter().any(|v| v.contains("closed inside")),
        "{:?}",
        out.violations
    );
}

#[tokio::test]
async fn hangup_mid_session_sends_two_hangups_and_kills_the_channel() {
    let backend = FakeBackend::start(Behaviour::script(&[
        "NOOP",
        "STREAM FILE beep \"\"",
        "VERBOSE \"bye\" 1",
    ]))
    .await;
    let out = call(&FakeAsterisk::new().hangup_after(1), &backend).await;

    assert_eq!(out.status, AgiStatus::Hangup);
    let stats = backend.stats();
    assert_eq!(stats.hangups(), 2, "unsolicited + end-of-session");
    assert_eq!(
        stats.sessions()[0].replies,
        [
            "200 result=0",
            "511 Command Not Permitted on a dead channel or intercept routine",
            "200 result=0",
        ]
    );
}

#[tokio::test]
async fn hangup_at_start_reaches_a_waiting_backend() {
    let backend = FakeBackend::start(Behaviour::Script {
        commands: vec![],
        then: Then::WaitForHangupThenClose,
    })
    .await;
    let out = call(&FakeAsterisk::new().hangup_at_start(true), &backend).await;
    assert_eq!(out.status, AgiStatus::Hangup);
    assert_eq!(backend.stats().hangups(), 2);
}

#[tokio::test]
async fn put_soundfile_then_get_soundfile_round_trip_as_base64_lines() {
    let data: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let backend = FakeBackend::start(Behaviour::steps(vec![
        Step::PutFile {
            name: "greeting.gsm".into(),
            data: data.clone(),
        },
        Step::GetFile {
            name: "greeting.gsm".into(),
        },
        Step::Command("NOOP".into()),
    ]))
    .await;
    let out = call(&FakeAsterisk::new(), &backend).await;

    assert_eq!(out.status, AgiStatus::Success);
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.received_files.len(), 1);
    assert_eq!(out.received_files[0].0, "greeting.gsm");
    assert!(out.received_files[0].1 == data, "payload differs");
    // Payload lines are not commands.
    assert_eq!(
        out.commands,
        [
            format!("PUT SOUNDFILE greeting.gsm {}", data.len()),
            "GET SOUNDFILE greeting.gsm".into(),
            "NOOP".into()
        ]
    );
    let session = &backend.stats().sessions()[0];
    assert_eq!(
        session.replies,
        [
            "200 result=0",
            "200 result=0",
            "200 result=0 size=1048576",
            "200 result=0"
        ]
    );
    assert!(session.files[0].1 == data, "GET payload differs");
}

#[tokio::test]
async fn put_soundfile_refused_or_unknown_sends_no_payload() {
    let steps = || {
        Behaviour::steps(vec![
            Step::PutFile {
                name: "x.gsm".into(),
                data: vec![1; 1000],
            },
            Step::Command("NOOP".into()),
        ])
    };
    let backend = FakeBackend::start(steps()).await;
    let out = call(&FakeAsterisk::new().put_ready(-10), &backend).await;
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(out.commands.len(), 2, "{:?}", out.commands);
    assert_eq!(
        backend.stats().sessions()[0].replies,
        ["200 result=-10", "200 result=0"]
    );
    let backend = FakeBackend::start(steps()).await;
    let out = call(&FakeAsterisk::new().without_audiotx(), &backend).await;
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(
        backend.stats().sessions()[0].replies,
        ["510 Invalid or unknown command", "200 result=0"]
    );
}

#[tokio::test]
async fn a_stalled_put_payload_times_the_module_out() {
    let backend = FakeBackend::start(Behaviour::Steps {
        steps: vec![Step::PutFileCut {
            name: "x.gsm".into(),
            data: vec![1; 10_000],
            send: 5_000,
        }],
        then: Then::Stall,
    })
    .await;
    let out = call(
        &FakeAsterisk::new()
            .soundfile_timeout(Duration::from_millis(200))
            .call_timeout(Duration::from_secs(2)),
        &backend,
    )
    .await;
    // The module answered -1; then Asterisk waits for a command for ever.
    assert_eq!(out.status, AgiStatus::Hung);
    assert_eq!(out.put_timeouts, 1);
    assert!(out.received_files.is_empty());
}

#[tokio::test]
async fn get_soundfile_payload_reaches_the_backend() {
    let data = vec![7u8; 100_000];
    let backend = FakeBackend::start(Behaviour::steps(vec![
        Step::GetFile {
            name: "prompt".into(),
        },
        Step::GetFile {
            name: "missing".into(),
        },
        Step::Command("NOOP".into()),
    ]))
    .await;
    let out = call(&FakeAsterisk::new().file("prompt", data.clone()), &backend).await;

    assert!(out.violations.is_empty(), "{:?}", out.violations);
    let session = &backend.stats().sessions()[0];
    assert_eq!(
        session.replies,
        ["200 result=0 size=100000", "200 result=-1", "200 result=0"]
    );
    assert_eq!(session.files, [("prompt".to_owned(), data)]);
}

#[tokio::test]
async fn set_variable_is_stored_and_bad_usage_gets_a_520_block() {
    let backend = FakeBackend::start(Behaviour::script(&[
        "SET VARIABLE ROUTE \"ivr main\"",
        "SET VARIABLE EMPTY \"\"",
        "SET VARIABLE ONLYNAME",
    ]))
    .await;
    let out = call(&FakeAsterisk::new(), &backend).await;

    assert_eq!(out.variables["ROUTE"], "ivr main");
    assert_eq!(out.variables["EMPTY"], "");
    assert!(!out.variables.contains_key("ONLYNAME"));
    let replies = &backend.stats().sessions()[0].replies;
    assert_eq!(replies[..2], ["200 result=1", "200 result=1"]);
    assert!(replies[2].starts_with("520-") && replies[2].ends_with("\n520 End of proper usage."));
}

#[tokio::test]
async fn reply_function_and_delay_are_used() {
    let backend = FakeBackend::start(Behaviour::script(&["GET DATA beep 3000 4", "NOOP"])).await;
    let asterisk = FakeAsterisk::new().reply_with(|cmd| {
        if cmd.starts_with("GET DATA") {
            Reply::line("200 result=1234").after(Duration::from_millis(30))
        } else {
            Reply::ok()
        }
    });
    let out = call(&asterisk, &backend).await;
    assert!(out.elapsed >= Duration::from_millis(30));
    assert_eq!(
        backend.stats().sessions()[0].replies,
        ["200 result=1234", "200 result=0"]
    );
}

#[tokio::test]
async fn silent_backend_is_hung_at_call_timeout() {
    let backend = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let asterisk = FakeAsterisk::new().call_timeout(Duration::from_millis(200));
    let out = call(&asterisk, &backend).await;
    assert_eq!(out.status, AgiStatus::Hung);
    assert!(out.elapsed >= Duration::from_millis(200));
    assert_eq!(backend.stats().headers().len(), 1);
}

#[tokio::test]
async fn first_command_delay_is_the_silence_the_caller_hears() {
    let backend = FakeBackend::start(Behaviour::FirstCommandAfter(
        Duration::from_millis(100),
        Box::new(Behaviour::script(&["NOOP"])),
    ))
    .await;
    let out = call(&FakeAsterisk::new(), &backend).await;
    assert_eq!(out.commands, ["NOOP"]);
    assert!(out.time_to_first_command.unwrap_or_default() >= Duration::from_millis(100));
    assert_eq!(backend.stats().headers().len(), 1, "header read once");
}

#[tokio::test]
async fn echo_backend_counts_without_logging() {
    let backend = FakeBackend::start(Behaviour::Echo { commands: 200 }).await;
    let out = call(&FakeAsterisk::new(), &backend).await;
    assert_eq!(out.status, AgiStatus::Success);
    assert_eq!(out.commands.len(), 200);
    let stats = backend.stats();
    assert_eq!(stats.replies(), 200);
    assert_eq!(stats.hangups(), 1);
    assert!(stats.sessions().is_empty() && stats.headers().is_empty());
}

#[tokio::test]
async fn raw_backend_echoes_bytes() {
    let backend = FakeBackend::start(Behaviour::Raw).await;
    bounded(async {
        let mut stream = FakeAsterisk::raw_session(backend.addr(), b"\x00\x01 not agi\r\n")
            .await
            .expect("connect");
        let mut echoed = [0u8; 12];
        stream.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"\x00\x01 not agi\r\n");
        stream.shutdown().await.expect("shutdown");
        assert_eq!(stream.read(&mut echoed).await.expect("eof"), 0);
    })
    .await;
}

#[tokio::test]
async fn stop_closes_live_sessions_and_refuses_then_restart_serves_again() {
    let backend = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let asterisk = FakeAsterisk::new();
    let call_in_flight = tokio::spawn({
        let asterisk = asterisk.clone();
        let addr = backend.addr();
        async move { asterisk.run(addr).await }
    });
    bounded(async {
        while backend.stats().headers().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        backend.stop().await;
        let out = call_in_flight.await.expect("call task");
        assert_eq!(out.status, AgiStatus::Success, "server closed");
        assert_eq!(backend.stats().active(), 0);

        let started = Instant::now();
        let out = asterisk.run(backend.addr()).await;
        assert_eq!(out.status, AgiStatus::Failure);
        assert!(started.elapsed() < Duration::from_millis(100));

        backend.restart().await.expect("restart on the same port");
        backend.set_behaviour(Behaviour::script(&["NOOP"]));
        let out = asterisk.run(backend.addr()).await;
        assert_eq!(out.status, AgiStatus::Success);
        assert_eq!(out.commands, ["NOOP"]);
        assert_eq!(backend.stats().accepted(), 2, "stats survive a restart");
    })
    .await;
}

#[tokio::test]
async fn every_fixture_header_reaches_the_backend_unchanged() {
    let backend = FakeBackend::start(Behaviour::CloseAfterHeader).await;
    for fixture in Fixture::ALL {
        let asterisk = FakeAsterisk::new().header(AgiHeader::fixture(fixture));
        assert_eq!(call(&asterisk, &backend).await.status, AgiStatus::Success);
    }
    let expected: Vec<Vec<u8>> = Fixture::ALL.iter().map(|f| f.bytes().to_vec()).collect();
    assert_eq!(backend.stats().headers(), expected);
}

/// A clean server must never be reported: no false violations under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clean_calls_record_no_violations() {
    let backend = FakeBackend::start(Behaviour::script(&[
        "ANSWER",
        "VERBOSE \"x\" 1",
        "SET VARIABLE A b",
        "NOOP",
    ]))
    .await;
    let asterisk = FakeAsterisk::new();
    let outcomes = bounded(async {
        let calls: Vec<_> = (0..200)
            .map(|_| {
                let (asterisk, addr) = (asterisk.clone(), backend.addr());
                tokio::spawn(async move { asterisk.run(addr).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.expect("call task"));
        }
        outcomes
    })
    .await;
    for out in &outcomes {
        assert_eq!(out.status, AgiStatus::Success);
        assert_eq!(out.commands.len(), 4);
        assert!(out.violations.is_empty(), "{:?}", out.violations);
    }
    assert!(
        backend
            .stats()
            .wait_completed(200, Duration::from_secs(2))
            .await
    );
    assert_eq!(backend.stats().replies(), 800);
}
