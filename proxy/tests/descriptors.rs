//! Issue 12, item 5: running out of descriptors is the proxy's own fault.
//! Before the fix, connects to a healthy backend failed with EMFILE and
//! were counted as the backend's failures (1,603 calls got `no_backend`).
//! Now calls get FAILURE `local_resources`, the backend keeps its record,
//! a reserve of descriptors keeps the control API answering, and service
//! is back as soon as descriptors are free. The proxy runs as a process
//! with a low `RLIMIT_NOFILE`, set between fork and exec.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chaos_tests::{
    still_open, AgiHeader, AgiStatus, Behaviour, CallOutcome, FakeAsterisk, FakeBackend,
};
use tokio::net::TcpStream;

mod common;
use common::{config_file, free_port, Running};

/// The proxy's descriptor limit in the exhaustion test.
const LIMIT: u64 = 64;

struct Proxy {
    child: Running,
    addr: SocketAddr,
    control: SocketAddr,
    /// Holds the config; dropped (removed) after `child`, which ends the process.
    _dir: tempfile::TempDir,
}

async fn start_proxy(backends: &[SocketAddr], nofile: Option<u64>) -> Proxy {
    start_proxy_with(backends, nofile, "").await
}

/// `pool_extra`: more of the pool's keys, indented as `passive:` is.
async fn start_proxy_with(backends: &[SocketAddr], nofile: Option<u64>, pool_extra: &str) -> Proxy {
    let list: String = backends
        .iter()
        .map(|b| format!("      - {{ address: \"{b}\" }}\n"))
        .collect();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let control: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // One failure in a row would eject a backend (passive ejection never
    // empties a pool, so two of them): any misattributed local error shows
    // in `backend_ejections`.
    let text = format!(
        "version: 1\ncontrol:\n  address: \"{control}\"\nlisteners:\n  - name: asterisk\n    address: \"{addr}\"\ntimeouts:\n  header: 60s\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    passive:\n      consecutive_failures: 1\n{pool_extra}    backends:\n{list}"
    );
    let (dir, path) = config_file("fds", &format!("agiproxy-fds-{port}.yaml"), &text);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agiproxy"));
    cmd.args(["run", "-c"])
        .arg(&path)
        .args(["--log-level", "error"])
        .stdout(Stdio::null());
    if let Some(n) = nofile {
        // SAFETY: only setrlimit(2), async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Hard limit too: the proxy raises its soft limit to the hard one.
                rl.rlim_cur = n;
                rl.rlim_max = n;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = Running::spawn(&mut cmd);
    let proxy = Proxy {
        child,
        addr,
        control,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(control).await.is_err() || TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "proxy did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy
}

/// The proxy's open descriptors numbered below `LIMIT` (one it inherited
/// from the test harness may sit above its limit, and is never reused).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .filter(|n| *n < LIMIT)
            .count()
    })
}

fn all_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A plain `GET` on the control API: status code and body.
/// A connection to the control API from the `i`th of `n` loopback
/// addresses (127.0.0.2 on): one address holds only its share of the
/// control API's connections (`MAX_CONNECTIONS_PER_PEER`).
async fn connect_from(i: usize, n: usize, control: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(format!("127.0.0.{}:0", 2 + i % n).parse().unwrap())?;
    sock.connect(control).await
}

async fn get(control: SocketAddr, path: &str) -> Option<(u16, String)> {
    chaos_tests::http::get(control, path)
        .await
        .map(|r| (r.status, r.body))
}

/// Opens idle connections to the AGI listener until the proxy holds
/// `target` descriptors.
async fn hold(pid: u32, addr: SocketAddr, idle: &mut Vec<TcpStream>, target: usize) {
    while open_fds(pid) < target {
        assert!(idle.len() < 200, "descriptor count does not grow");
        let before = open_fds(pid);
        idle.push(TcpStream::connect(addr).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(1);
        while open_fds(pid) <= before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn caller() -> FakeAsterisk {
    FakeAsterisk::new()
        .header(AgiHeader::realistic("x", &[], "3.1"))
        .call_timeout(Duration::from_secs(10))
}

fn error_of(out: &CallOutcome) -> Option<&str> {
    out.variables.get("AGIPROXY_ERROR").map(String::as_str)
}

/// The value of the sample whose line starts with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_descriptor_exhaustion_gives_local_resources_and_ejects_nobody() {
    let backend = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let other = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let proxy = start_proxy(&[backend.addr(), other.addr()], Some(LIMIT)).await;
    let pid = proxy.child.id();
    let out = caller().run(proxy.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");

    // Hold descriptors: idle connections that never send a header (the
    // proxy waits up to `timeouts.header` for it). The kernel hands out the
    // lowest free number, so with `n` open the next one is numbered `n`.
    let mut idle = Vec::new();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // `fds::reserve(64)` is 16 (a unit test pins it); a literal here so
    // that the test also builds, and fails, without the reserve.
    let reserve_from = LIMIT as usize - 16;
    // One below the reserve: the call's own connection fits, its backend
    // socket would not. The connect path refuses it, blaming nobody.
    hold(pid, proxy.addr, &mut idle, reserve_from - 1).await;
    let out = caller().run(proxy.addr).await;
    assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
    assert_eq!(error_of(&out), Some("local_resources"), "{out:?}");
    let (_, metrics) = get(proxy.control, "/metrics").await.expect("/metrics");
    let connect = sample(
        &metrics,
        "agiproxy_local_resource_errors_total{op=\"connect\"}",
    );
    assert_eq!(connect, Some(1.0));
    // Deeper, into the reserve: the accept path refuses calls. (Refused
    // connections there are closed within 1 s if their header does not
    // come, and at most half the reserve are held: see the flood test.)
    hold(pid, proxy.addr, &mut idle, reserve_from + 4).await;
    let held = open_fds(pid);

    // Calls now: FAILURE local_resources, at once, not a hang.
    for _ in 0..5 {
        let out = caller().run(proxy.addr).await;
        assert_eq!(out.status, AgiStatus::Failure, "{out:?}");
        assert_eq!(error_of(&out), Some("local_resources"), "{out:?}");
        assert!(out.elapsed < Duration::from_secs(3), "{:?}", out.elapsed);
    }
    // The control API answers at the limit (the reserve).
    let (code, _) = get(proxy.control, "/healthz")
        .await
        .expect("/healthz answers at the limit");
    assert_eq!(code, 200);
    let (_, metrics) = get(proxy.control, "/metrics").await.expect("/metrics");
    // Each call was refused at the accept (in the reserve) or at the
    // connect (its backend socket would have been), blaming nobody.
    let errors = sample(
        &metrics,
        "agiproxy_local_resource_errors_total{op=\"accept\"}",
    )
    .zip(sample(
        &metrics,
        "agiproxy_local_resource_errors_total{op=\"connect\"}",
    ))
    .map(|(a, c)| a + c);
    assert!(errors.is_some_and(|n| n >= 6.0), "{errors:?}");
    let failures = sample(
        &metrics,
        "agiproxy_failures_sent_total{reason=\"local_resources\"}",
    );
    assert_eq!(failures, Some(6.0));
    let ejections: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("agiproxy_backend_ejections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(ejections, [0.0, 0.0], "a backend was ejected");

    // Descriptors free again: service is back at once (nobody ejected).
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > 20 {
        assert!(Instant::now() < deadline, "{} descriptors", open_fds(pid));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = caller().run(proxy.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    eprintln!(
        "limit {LIMIT}: held at {held} descriptors; 5 calls got local_resources; /healthz 200; ejections 0; SUCCESS after release"
    );
}

/// A flood of connections that send nothing, kept up as the proxy closes
/// them, must not take the reserve: before, each refused one held its
/// descriptor for the whole header timeout, the reserve filled, the
/// control API's accepts failed with EMFILE and `/healthz` went silent
/// (an audit: every probe failed for 8 s at a limit of 256), so the
/// kubelet would restart the replica. Now a refused connection gets 1 s
/// for its header and at most half the reserve is held by refusals; the
/// rest are closed at once, unanswered, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_leaves_the_control_api_its_reserve() {
    let backend = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let proxy = start_proxy(&[backend.addr()], Some(LIMIT)).await;
    let addr = proxy.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn({
        let stop = stop.clone();
        async move {
            // 100 silent connections (more than the limit), each replaced
            // as soon as the proxy closes it; bounded to 6 s.
            let started = Instant::now();
            let mut held: Vec<TcpStream> = Vec::new();
            let mut opened = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(6)
            {
                held.retain(still_open);
                while held.len() < 100 {
                    match tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(addr))
                        .await
                    {
                        Ok(Ok(s)) => {
                            held.push(s);
                            opened += 1;
                        }
                        _ => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            opened
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Probes for 3 s, every 100 ms, each within 1 s.
    let mut answered = 0;
    for _ in 0..30 {
        let probe =
            tokio::time::timeout(Duration::from_secs(1), get(proxy.control, "/healthz")).await;
        if let Ok(Some((200, _))) = probe {
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = flood.await.unwrap();
    let (_, metrics) = get(proxy.control, "/metrics").await.expect("/metrics");
    let dropped = sample(
        &metrics,
        "agiproxy_refusals_dropped_total{reason=\"local_resources\"}",
    );
    eprintln!("{opened} silent connections opened; /healthz answered {answered} of 30; refusals dropped: {dropped:?}");
    assert_eq!(answered, 30, "/healthz failed during the flood");
    assert!(dropped.is_some_and(|n| n > 0.0), "{dropped:?}");
    // And calls are served again once it ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = caller().run(proxy.addr).await;
        if out.status == AgiStatus::Success {
            break;
        }
        assert!(Instant::now() < deadline, "{out:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// With fewer descriptors than the control API's connection cap, held
/// connections make its accepts fail (EMFILE): they are counted
/// (`accept_failed`) and paused on, doubling, where a fixed 50 ms pause
/// wrote 20 WARN lines a second with no metric (audit); and the API
/// answers again once they are let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_control_accepts_are_counted_and_the_api_comes_back() {
    let backend = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let proxy = start_proxy(&[backend.addr()], Some(48)).await;
    // 96 from six addresses: 16 each, within an address's share.
    let mut held = Vec::new();
    for i in 0..96 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(500),
            connect_from(i, 6, proxy.control),
        )
        .await
        {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        let m = get(proxy.control, "/metrics").await.map(|r| r.1);
        let n = m.as_deref().and_then(|m| {
            sample(
                m,
                "agiproxy_control_connections_refused_total{reason=\"accept_failed\"}",
            )
        });
        match n {
            Some(n) if n > 0.0 => break n,
            _ if Instant::now() > deadline => panic!("failed accepts not counted: {m:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    eprintln!("control accepts failed at 48 descriptors: {failed}");
    let (code, _) = get(proxy.control, "/healthz").await.expect("/healthz");
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_idle_control_connections_are_capped() {
    let backend = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let proxy = start_proxy(&[backend.addr()], None).await;
    let pid = proxy.child.id();
    let base = all_fds(pid);
    // From ten addresses, so that their shares add up to the whole cap.
    let mut idle = Vec::new();
    for i in 0..300 {
        idle.push(connect_from(i, 10, proxy.control).await.unwrap());
    }
    // Let the proxy accept (and close) what it will.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = all_fds(pid);
    let out = caller().run(proxy.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    eprintln!("300 idle control connections: proxy descriptors {base} -> {during}");
    assert!(
        // `control::server::MAX_CONNECTIONS` is 64.
        during <= base + 64 + 8,
        "{base} -> {during} descriptors"
    );
    // Each connection past the cap, or past its address's share, is
    // counted as refused (or, at the cap, one of a greedier address's, as
    // evicted).
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let m = get(proxy.control, "/metrics").await.map(|r| r.1);
        let count = |reason: &str| {
            let series =
                format!("agiproxy_control_connections_refused_total{{reason=\"{reason}\"}} ");
            m.as_deref().and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix(&series)?.parse::<u64>().ok())
            })
        };
        let n = count("connection_cap")
            .zip(count("peer_cap"))
            .zip(count("evicted"))
            .map(|((a, b), c)| a + b + c);
        match n {
            Some(n) if n >= 300 - 64 => break n,
            _ if Instant::now() > deadline => panic!("refused connections not counted: {m:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    eprintln!("connections refused at the cap or an address's share: {refused}");
}

/// Health checks that find the proxy out of descriptors give no verdict:
/// before, a probe's own `EMFILE` failed the check ("connect failed: Too
/// many open files"), so a replica at its limit marked every backend
/// unhealthy and then answered `no_backend` until `rise` checks had passed
/// after the shortage. Now such a check is counted as not run
/// (`agiproxy_backend_checks_not_run`), and the backends are healthy the
/// moment descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_at_the_descriptor_limit_blame_no_backend() {
    let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    // One failed check makes a backend unhealthy, and it takes 50 passing
    // ones (5 s) to come back: a misattributed check shows for long.
    let health = "    health: { interval: 100ms, timeout: 90ms, jitter: 1ms, rise: 50, fall: 1 }\n";
    let proxy = start_proxy_with(&[a.addr(), b.addr()], Some(LIMIT), health).await;
    let pid = proxy.child.id();
    // From /metrics (open; /v1/pools takes a token).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = get(proxy.control, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        if healthy_up(&m) == (2, 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backends not checked healthy:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every descriptor taken: idle calls up to the reserve, then idle
    // control connections (capped at 64, more than the reserve) into it.
    let mut idle = Vec::new();
    hold(pid, proxy.addr, &mut idle, LIMIT as usize - 17).await;
    let mut control = Vec::new();
    for i in 0..40 {
        if let Ok(s) = connect_from(i, 3, proxy.control).await {
            control.push(s);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) < LIMIT as usize - 1 {
        assert!(Instant::now() < deadline, "{} descriptors", open_fds(pid));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Ten check intervals at the limit.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_limit = open_fds(pid);
    drop(control);
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > 20 {
        assert!(Instant::now() < deadline, "{} descriptors", open_fds(pid));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Well inside the 5 s a wrongly failed backend would need.
    let (_, metrics) = get(proxy.control, "/metrics").await.expect("/metrics");
    assert_eq!(
        healthy_up(&metrics),
        (2, 2),
        "a backend was blamed:\n{metrics}"
    );
    let not_run: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("agiproxy_backend_checks_not_run{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(not_run >= 2.0, "no check met the limit: {not_run}");
    let out = caller().run(proxy.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    eprintln!(
        "limit {LIMIT}: {at_limit} descriptors held for 1 s; {not_run} checks not run; both backends healthy after"
    );
}

/// Backends in state `healthy`, and backends whose last check passed.
fn healthy_up(metrics: &str) -> (usize, usize) {
    let ones = |prefix: &str, must: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(must) && l.ends_with(" 1"))
            .count()
    };
    (
        ones("agiproxy_backend_state{", "state=\"healthy\""),
        ones("agiproxy_backend_check_up{", ""),
    )
}
