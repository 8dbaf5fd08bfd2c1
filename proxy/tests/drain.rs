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
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = format!(
        "version: 1\ncontrol:\n  enabled: false\nlisteners:\n  - name: asterisk\n    address: \"{addr}\"\ntimeouts:\n  drain: {drain}\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{backend}\" }}\n"
    );
    let (dir, path) = config_file("drain", &format!("agiproxy-drain-{port}.yaml"), &text);
    let child = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_agiproxy"))
            .args(["run", "-c"])
            .arg(&path)
            .args(["--log-level", "warn"])
            .env("AGIPROXY_WORKERS", workers)
            .stdout(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "proxy did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, addr, dir)
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
    let calls: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                FakeAsterisk::new()
                    .header(chaos_tests::AgiHeader::realistic(
                        "ivr/main",
                        &[],
                        &format!("5.{i}"),
                    ))
                    .exec_takes(Duration::from_millis(1500))
                    .run(addr)
                    .await
            })
        })
        .collect();
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
    let call = tokio::spawn(async move {
        FakeAsterisk::new()
            .reply_with(|_| Reply::ok().after(Duration::from_secs(30)))
            .call_timeout(Duration::from_secs(40))
            .run(addr)
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.stats().accepted() < 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal only drains"
    );
    let t = Instant::now();
    signal(&child, libc::SIGINT);
    wait_exit(&mut child, Duration::from_secs(5));
    assert!(t.elapsed() < Duration::from_secs(3));
    call.abort();
}
