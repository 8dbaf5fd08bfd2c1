//! Audit (log volume under a failure storm): a failure that ends every call
//! the same way wrote a line per call besides the access log (5,000 calls to
//! a backend resetting after its first command: 5,000 `telling Asterisk
//! FAILURE after commit` lines; to a silent backend, 5,000 `backend sent no
//! first command in time`; over-long lines, from either side, a WARN each).
//! At thousands of calls a second a replica flooded its log pipeline. Each
//! class is now logged 5 times per 10 s, then one line counts the rest;
//! `agiproxy_failures_sent_total` still counts every call.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chaos_tests::{AgiHeader, Behaviour, FakeAsterisk, FakeBackend, Step};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

mod common;
use common::{config_file, free_port, Running};

/// Calls per test: well over the 5 lines a class may log in 10 s.
const CALLS: u64 = 40;

struct Proxy {
    _child: Running,
    addr: SocketAddr,
    control: SocketAddr,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

/// A proxy in front of `backend`, logging at the default level without the
/// access log, its lines sent to `lines`.
async fn start_proxy(backend: SocketAddr) -> Proxy {
    let port = free_port();
    let cport = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let control: SocketAddr = format!("127.0.0.1:{cport}").parse().unwrap();
    let text = format!(
        "version: 1\ncontrol:\n  address: \"{control}\"\nlisteners:\n  - name: asterisk\n    address: \"{addr}\"\ntimeouts: {{ budget: 300ms, first_command: 200ms, next_command: 300ms }}\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{backend}\" }}\n"
    );
    let (dir, path) = config_file(
        "logvolume",
        &format!("agiproxy-logvolume-{port}.yaml"),
        &text,
    );
    let mut child = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_agiproxy"))
            .args(["run", "-c"])
            .arg(&path)
            .args(["--log-level", "info,agiproxy::access=warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let (tx, lines) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "proxy did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Proxy {
        _child: child,
        addr,
        control,
        lines,
        _dir: dir,
    }
}

impl Proxy {
    /// Reads the log until a line containing `summary` (at most 15 s: the
    /// summary comes when the 10 s interval ends); returns how many lines
    /// contained each of `counted`, and the summary.
    fn lines_until(&self, counted: &[&str], summary: &str) -> (Vec<usize>, String) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut counts = vec![0; counted.len()];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{summary}` line within 15 s; counted {counts:?}"));
            for (n, c) in counts.iter_mut().zip(counted) {
                *n += usize::from(line.contains(c));
            }
            if line.contains(summary) {
                return (counts, line);
            }
        }
    }

    /// `agiproxy_failures_sent_total{reason="…"}`.
    async fn failures(&self, reason: &str) -> u64 {
        let metrics = chaos_tests::http::get(self.control, "/metrics")
            .await
            .expect("GET /metrics")
            .body;
        let key = format!("agiproxy_failures_sent_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .unwrap_or_else(|| panic!("no {key}in\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// `CALLS` calls by a well-behaved Asterisk, 10 at a time.
    async fn calls(&self) {
        for _ in 0..CALLS / 10 {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..10 {
                let addr = self.addr;
                set.spawn(async move {
                    let caller = FakeAsterisk::new().header(AgiHeader::realistic(
                        "x",
                        &[],
                        &format!("1.{i}"),
                    ));
                    tokio::time::timeout(Duration::from_secs(5), caller.run(addr)).await
                });
            }
            while let Some(done) = set.join_next().await {
                done.unwrap().expect("a call hung");
            }
        }
    }
}

/// The number at the start of a summary's message: `… INFO target: N more …`.
fn summed(summary: &str, what: &str) -> u64 {
    let before = summary.split(what).next().unwrap();
    before
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {summary}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_resetting_mid_script_logs_five_failure_lines_and_a_count() {
    let backend = FakeBackend::start(Behaviour::ResetAfterCommands(1)).await;
    let proxy = start_proxy(backend.addr()).await;
    proxy.calls().await;
    let (counts, summary) = proxy.lines_until(
        &["telling Asterisk FAILURE after commit"],
        "more sessions told FAILURE after commit",
    );
    assert_eq!(counts, [5], "{summary}");
    assert!(
        summary.contains(&format!(
            "{} more sessions told FAILURE after commit in the last 10 s (backend_reset: {0})",
            CALLS - 5
        )),
        "{summary}"
    );
    assert_eq!(proxy.failures("backend_reset").await, CALLS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_backend_logs_five_first_command_lines_and_a_count() {
    let backend = FakeBackend::start(Behaviour::StallAfterHeader).await;
    let proxy = start_proxy(backend.addr()).await;
    proxy.calls().await;
    let what = "more backends sent no first command in time";
    let (counts, summary) = proxy.lines_until(&["backend sent no first command in time"], what);
    assert_eq!(counts, [5], "{summary}");
    // One line per attempt: a call may try the backend again within its
    // budget.
    assert!(summed(&summary, what) >= CALLS - 5, "{summary}");
    assert_eq!(proxy.failures("first_command_timeout").await, CALLS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_backend_line_per_call_logs_five_warnings_and_a_count() {
    let mut line = b"VERBOSE \"".to_vec();
    line.resize(20_000 - 4, b'w');
    line.extend_from_slice(b"\" 1\n");
    let backend = FakeBackend::start(Behaviour::steps(vec![
        Step::Send(line),
        Step::Sleep(Duration::from_secs(1)),
    ]))
    .await;
    let proxy = start_proxy(backend.addr()).await;
    proxy.calls().await;
    let what = "more sessions ended for a backend line over the limit";
    let (counts, summary) =
        proxy.lines_until(&["backend sent a command line over the limit"], what);
    assert_eq!(counts, [5], "{summary}");
    assert!(
        summary.contains(&format!("{} {what}", CALLS - 5))
            && summary.contains(&format!("(command: {})", CALLS - 5)),
        "{summary}"
    );
    assert_eq!(proxy.failures("backend_protocol").await, CALLS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_asterisk_line_per_call_logs_five_warnings_and_a_count() {
    // The backend waits after its first command: the line over the limit
    // comes while none is due.
    let backend = FakeBackend::start(Behaviour::StallAfterCommands(1)).await;
    let proxy = start_proxy(backend.addr()).await;
    let header = AgiHeader::realistic("x", &[], "1.1").to_bytes();
    for _ in 0..CALLS {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&header).await.unwrap();
        let mut r = BufReader::new(&mut s);
        let mut command = String::new();
        r.read_line(&mut command).await.unwrap();
        assert_eq!(command, "NOOP\n");
        let mut reply = b"200 result=0\n".to_vec();
        reply.resize(reply.len() + 70_000, b'y');
        s.write_all(&reply).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    let what = "more sessions ended for a line from Asterisk";
    let (counts, summary) = proxy.lines_until(&["Asterisk side sent a line over the limit"], what);
    assert_eq!(counts, [5], "{summary}");
    assert!(
        summary.contains(&format!("{} {what}", CALLS - 5))
            && summary.contains(&format!("(over_limit: {})", CALLS - 5)),
        "{summary}"
    );
    assert_eq!(proxy.failures("asterisk_protocol").await, CALLS);
}

/// A count held back when the process stops within its interval is told at
/// exit: its timer would have told it 10 s later, after the process had
/// gone, and the count was lost (review of the throttles).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_held_back_is_told_when_the_process_stops() {
    let backend = FakeBackend::start(Behaviour::ResetAfterCommands(1)).await;
    let mut proxy = start_proxy(backend.addr()).await;
    let started = Instant::now();
    proxy.calls().await;
    let pid = proxy._child.id() as libc::pid_t;
    // SAFETY: a signal to the child this test started and still holds.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut held_back = None;
    // Every line up to the exit (the channel closes with stderr).
    while let Ok(line) = proxy.lines.recv_timeout(Duration::from_secs(8)) {
        if line.contains("more sessions told FAILURE after commit") {
            held_back = Some(line);
        }
    }
    let line = held_back.expect("the count held back was not told at exit");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "told by the interval's timer, not at exit"
    );
    assert!(
        line.contains(&format!("{} more sessions told FAILURE", CALLS - 5)),
        "{line}"
    );
    let status = proxy._child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
