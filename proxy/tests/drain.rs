//! Drain and shutdown of the real binary: SIGTERM closes the listeners at
//! once (new connects are refused), sessions in flight finish, exit 0; a
//! second signal stops at once.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chaos_tests::{AgiStatus, Behaviour, FakeAsterisk, FakeBackend, Reply};

mod common;
use common::{config_file, free_port, Running};

/// `workers`: the `AGIPROXY_WORKERS` the proxy runs with ("1": everything
/// on one thread, a current-thread runtime). The directory of its config is
/// removed when the returned `TempDir` drops: keep it while the proxy runs.
async fn start_proxy(
    backend: SocketAddr,
    drain: &str,
    workers: &str,
) -> (Running, SocketAddr, tempfile::TempDir) {
    let body = format!(
        "timeouts:\n  drain: {drain}\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{backend}\" }}\n"
    );
    spawn_proxy(&body, workers, "warn", Stdio::inherit()).await
}

/// The proxy with `body` (everything after its listener) as its config.
async fn spawn_proxy(
    body: &str,
    workers: &str,
    log_level: &str,
    stderr: Stdio,
) -> (Running, SocketAddr, tempfile::TempDir) {
    spawn_proxy_with(body, workers, log_level, stderr, &[]).await
}

/// The same, with more arguments for `run`.
async fn spawn_proxy_with(
    body: &str,
    workers: &str,
    log_level: &str,
    stderr: Stdio,
    args: &[&str],
) -> (Running, SocketAddr, tempfile::TempDir) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let control = if body.starts_with("control:") {
        ""
    } else {
        "control:\n  enabled: false\n"
    };
    let text = format!(
        "version: 1\n{control}listeners:\n  - name: asterisk\n    address: \"{addr}\"\n{body}"
    );
    let (dir, path) = config_file("drain", &format!("agiproxy-drain-{port}.yaml"), &text);
    let child = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_agiproxy"))
            .args(["run", "-c"])
            .arg(&path)
            .args(["--log-level", log_level])
            .args(args)
            .env("AGIPROXY_WORKERS", workers)
            .stdout(Stdio::null())
            .stderr(stderr),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "proxy did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, addr, dir)
}

/// `n` calls to `addr` at once, to `ivr/main` with unique ids `PREFIX.i`,
/// each shaped by `shape`.
fn spawn_calls(
    addr: SocketAddr,
    n: usize,
    prefix: &str,
    shape: fn(FakeAsterisk) -> FakeAsterisk,
) -> Vec<tokio::task::JoinHandle<chaos_tests::CallOutcome>> {
    (0..n)
        .map(|i| {
            let uid = format!("{prefix}.{i}");
            tokio::spawn(async move {
                shape(FakeAsterisk::new())
                    .header(chaos_tests::AgiHeader::realistic("ivr/main", &[], &uid))
                    .run(addr)
                    .await
            })
        })
        .collect()
}

/// A call whose command Asterisk runs for 30 s, once it is on `backend`.
async fn one_long_command(
    addr: SocketAddr,
    backend: &FakeBackend,
) -> tokio::task::JoinHandle<chaos_tests::CallOutcome> {
    a_command_of(addr, backend, Duration::from_secs(30)).await
}

/// A call whose command Asterisk runs for `runs`, once it is on `backend`.
async fn a_command_of(
    addr: SocketAddr,
    backend: &FakeBackend,
    runs: Duration,
) -> tokio::task::JoinHandle<chaos_tests::CallOutcome> {
    let call = tokio::spawn(async move {
        FakeAsterisk::new()
            .reply_with(move |_| Reply::ok().after(runs))
            .call_timeout(runs + Duration::from_secs(10))
            .run(addr)
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.stats().accepted() < 1 {
        assert!(Instant::now() < deadline, "the call reached no backend");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call
}

/// A proxy with a 1 s drain and one route to `backend` with `timeouts`;
/// one call, and SIGTERM 300 ms into it (the signal's time is the return).
async fn one_call_then_sigterm(
    backend: SocketAddr,
    timeouts: &str,
) -> (
    Running,
    tokio::task::JoinHandle<chaos_tests::CallOutcome>,
    tempfile::TempDir,
) {
    let body = format!(
        "timeouts:\n  drain: 1s\nroutes:\n  - name: all\n    pool: p\n    timeouts: {{ {timeouts} }}\npools:\n  - name: p\n    backends:\n      - {{ address: \"{backend}\" }}\n"
    );
    let (child, addr, dir) = spawn_proxy(&body, "2", "warn", Stdio::inherit()).await;
    let call = tokio::spawn(async move {
        FakeAsterisk::new()
            .call_timeout(Duration::from_secs(30))
            .run(addr)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, libc::SIGTERM);
    (child, call, dir)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("proxy did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_calls_and_lets_50_finish() {
    sigterm_drains_50("2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_50_on_one_worker_thread() {
    sigterm_drains_50("1").await;
}

async fn sigterm_drains_50(workers: &str) {
    let b = FakeBackend::start(Behaviour::script(&["EXEC Playback hello", "NOOP"])).await;
    let (mut child, addr, _dir) = start_proxy(b.addr(), "30s", workers).await;
    let calls = spawn_calls(addr, 50, "5", |c| c.exec_takes(Duration::from_millis(1500)));
    // All 50 are inside their EXEC when the signal arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.stats().accepted() < 50 {
        assert!(
            Instant::now() < deadline,
            "only {} sessions started",
            b.stats().accepted()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a new connect must be refused while draining"
    );
    assert!(t.elapsed() < Duration::from_millis(100));
    for c in calls {
        let out = c.await.unwrap();
        assert_eq!(out.status, AgiStatus::Success, "{out:?}");
        assert_eq!(out.commands, vec!["EXEC Playback hello", "NOOP"]);
    }
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    let b = FakeBackend::start(Behaviour::script(&["EXEC Dial PJSIP/100"])).await;
    let (mut child, addr, _dir) = start_proxy(b.addr(), "5m", "1").await;
    let call = one_long_command(addr, &b).await;
    signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal only drains"
    );
    let t = Instant::now();
    signal(&child, libc::SIGINT);
    // 0, as documented (operations: exit codes), within the bound.
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
    call.abort();
}

/// Calls the kernel queued while the proxy was not running (stopped, or
/// descheduled), with no session in flight, when SIGTERM comes in the same
/// wake-up: the drain found no session and the process exited before its
/// accept loop had served the queue, so the kernel reset them (audit:
/// SUCCESS to Asterisk, 8 rounds in 8 on one worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_queued_at_sigterm_are_served_with_no_session_in_flight() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    for round in 0..3 {
        let (mut child, addr, _dir) = start_proxy(b.addr(), "30s", "1").await;
        signal(&child, libc::SIGSTOP);
        let calls = spawn_calls(addr, 10, &format!("7{round}"), |c| {
            c.call_timeout(Duration::from_secs(20))
        });
        // Connected and headers sent: the kernel holds them for the proxy.
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal(&child, libc::SIGTERM);
        signal(&child, libc::SIGCONT);
        for c in calls {
            let out = c.await.unwrap();
            assert_eq!(out.commands, vec!["NOOP"], "round {round}: {out:?}");
            assert_eq!(out.status, AgiStatus::Success, "round {round}: {out:?}");
            assert!(out.violations.is_empty(), "round {round}: {out:?}");
        }
        assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    }
}

/// A call still connecting to its backend when the drain deadline cuts
/// hears FAILURE `shutting_down`. The connect was not watched for the cut:
/// with `connect` longer than the 5 s the drain waits after it, the
/// process exited under the call, which Asterisk read as SUCCESS (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_connecting_at_the_deadline_hears_failure() {
    let (_hole, blackholed) = chaos_tests::blackholed_listener();
    let (mut child, call, _dir) =
        one_call_then_sigterm(blackholed, "connect: 20s, budget: 20s").await;
    let t = Instant::now();
    let out = call.await.unwrap();
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    assert_eq!(
        out.variables.get("AGIPROXY_ERROR").map(String::as_str),
        Some("shutting_down"),
        "{out:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

/// A log reader that stalls (stderr a pipe nobody reads) costs log lines,
/// never the exit: the process waited for ever for its log writer, blocked
/// in `write`, and ignored further signals (audit: only SIGKILL ended it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_does_not_hold_up_the_exit() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let body = format!(
        "routes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\" }}\n",
        b.addr()
    );
    // Piped and never read: the pipe's 64 KiB fill with access lines.
    let (mut child, addr, _dir) = spawn_proxy(&body, "2", "info", Stdio::piped()).await;
    for round in 0..30 {
        let calls = spawn_calls(addr, 10, &format!("8{round}"), |c| c);
        for c in calls {
            assert_eq!(c.await.unwrap().commands, vec!["NOOP"]);
        }
    }
    // Let the writer block on the full pipe.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// A backend abandoned at the drain deadline is closed politely, as
/// Asterisk would, before the process exits: it gets `HANGUP`, may write
/// its cleanup lines and sees the end of the stream. The exit cut the
/// polite close short, and its second line met a reset (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_abandoned_at_the_deadline_is_closed_politely_before_the_exit() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    // Takes the header, never sends a first command; after HANGUP, three
    // cleanup lines 200 ms apart, then reads to the end.
    let server = tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let mut conn = BufReader::new(conn);
        let mut line = String::new();
        loop {
            line.clear();
            conn.read_line(&mut line).await.unwrap();
            if line == "\n" {
                break;
            }
        }
        line.clear();
        conn.read_line(&mut line).await.unwrap();
        assert_eq!(line, "HANGUP\n");
        let mut conn = conn.into_inner();
        // A write after the peer's socket is gone draws a reset, and the
        // one after that fails: three lines tell an orderly close.
        for l in [
            "VERBOSE \"cleaning up\" 1\n",
            "VERBOSE \"more\" 1\n",
            "VERBOSE \"done\" 1\n",
        ] {
            conn.write_all(l.as_bytes()).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.map(|_| ())
    });
    let (mut child, call, _dir) =
        one_call_then_sigterm(backend, "first_command: 20s, budget: 20s").await;
    let out = call.await.unwrap();
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    // Waiting for its first command: told why (audit: only the status was
    // checked).
    assert_eq!(
        out.variables.get("AGIPROXY_ERROR").map(String::as_str),
        Some("shutting_down"),
        "{out:?}"
    );
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    let closed = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the backend's session ends")
        .unwrap();
    assert!(
        closed.is_ok(),
        "the backend saw {closed:?}, not an orderly close"
    );
}

/// While a drain waits for calls, `/metrics` says when it will cut them, so
/// that an alert sees the cut coming: the cut's own counters change moments
/// before the exit, where no scrape sees them (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_publishes_its_deadline() {
    let b = FakeBackend::start(Behaviour::script(&["EXEC Dial PJSIP/100"])).await;
    let control: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let body = format!(
        "control:\n  address: \"{control}\"\ntimeouts:\n  drain: 40s\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\" }}\n",
        b.addr()
    );
    let (mut child, addr, _dir) = spawn_proxy(&body, "2", "warn", Stdio::inherit()).await;
    let deadline_gauge = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("agiproxy_drain_deadline_timestamp_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let metrics = chaos_tests::http::get(control, "/metrics")
        .await
        .unwrap()
        .body;
    assert_eq!(deadline_gauge(&metrics), Some(0.0), "not draining yet");
    let call = one_long_command(addr, &b).await;
    signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let metrics = chaos_tests::http::get(control, "/metrics")
        .await
        .unwrap()
        .body;
    let at = deadline_gauge(&metrics).expect("the gauge is published");
    assert!((now + 37.0..now + 41.0).contains(&at), "{at} vs now {now}");
    assert!(
        metrics.contains("\nagiproxy_active_sessions 1\n"),
        "{metrics}"
    );
    signal(&child, libc::SIGINT);
    wait_exit(&mut child, Duration::from_secs(5));
    call.abort();
}

/// `run --shutdown-delay`: at SIGTERM `/readyz` fails at once while calls
/// are still served, for the delay; then the listeners close. `--max-drain`:
/// a drain longer than it (a reload may bring one the pod's grace period
/// was not planned for) ends at it, the cut call told FAILURE, not killed
/// with the process (chart audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_delay_serves_unready_and_max_drain_bounds_the_drain() {
    let b = FakeBackend::start(Behaviour::script(&["EXEC Dial PJSIP/100"])).await;
    let control: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let body = format!(
        "control:\n  address: \"{control}\"\ntimeouts:\n  drain: 30s\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\" }}\n",
        b.addr()
    );
    let (mut child, addr, _dir) = spawn_proxy_with(
        &body,
        "2",
        "warn",
        Stdio::inherit(),
        &["--shutdown-delay", "1500ms", "--max-drain", "1s"],
    )
    .await;
    let ready = || async {
        chaos_tests::http::get(control, "/readyz")
            .await
            .map(|r| r.status)
    };
    assert_eq!(ready().await, Some(200));
    // Dial runs 4 s: past the delay and the drain.
    let long = a_command_of(addr, &b, Duration::from_secs(4)).await;
    let t = Instant::now();
    signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ready().await, Some(503), "not ready once stopping");
    // Still served during the delay.
    let during = FakeAsterisk::new()
        .reply_with(|_| Reply::ok())
        .call_timeout(Duration::from_secs(5))
        .run(addr)
        .await;
    assert_eq!(during.status, AgiStatus::Success, "{during:?}");
    assert_eq!(during.commands, vec!["EXEC Dial PJSIP/100"], "{during:?}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    // Then refused.
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(t.elapsed() < Duration::from_secs(4), "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    // The drain lasts --max-drain (1 s), not the config's 30 s: the long
    // call is cut while Dial runs, FAILURE once it returns.
    let out = long.await.unwrap();
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// A drain asked through the API, then the pod's SIGTERM (Kubernetes sends
/// one when the drained pod is deleted): it drains on; only another signal
/// stops at once (review: the SIGTERM ended every call in flight at once,
/// which Asterisk reads as SUCCESS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_signal_after_an_api_drain_drains_on() {
    let b = FakeBackend::start(Behaviour::script(&["EXEC Dial PJSIP/100"])).await;
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("control.sock");
    let body = format!(
        "control:\n  socket: \"{}\"\ntimeouts:\n  drain: 30s\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{}\" }}\n",
        socket.display(),
        b.addr()
    );
    let (mut child, addr, _dir) = spawn_proxy(&body, "2", "warn", Stdio::inherit()).await;
    // Dial runs 2 s.
    let call = a_command_of(addr, &b, Duration::from_secs(2)).await;
    let drained = Command::new(env!("CARGO_BIN_EXE_agiproxy"))
        .args(["ctl", "--socket"])
        .arg(&socket)
        .arg("drain-replica")
        .output()
        .unwrap();
    assert!(drained.status.success(), "{drained:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the SIGTERM after the API's drain stopped the process"
    );
    let out = call.await.unwrap();
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(out.violations.is_empty(), "{out:?}");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}
