//! Hostile config text and hostile config files (issue 12), on the real
//! binary: an alias bomb and deep nesting refused quickly and in bounded
//! memory by `agiproxy check` and by `PUT /v1/config`, a small change
//! queued behind a hostile one still applied, and the watched file replaced
//! by `/dev/zero`, a FIFO or an oversized file with the old config kept and
//! calls, `/healthz` and `/v1/status` answering; a file written in two
//! steps is not applied half-written; a config with very many mistakes
//! gets a bounded report and log line.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};
use common::{free_port, Running};

const TOKEN: &str = "hostile-config-token";

/// Peak memory a child may reach before the kernel refuses it more: a
/// regression must fail the test, not take the machine down.
const ADDRESS_SPACE: u64 = 6 << 30;

/// `x: &a [a, a, … items]` then `y: [*a, … aliases]`: items × aliases
/// values once expanded, from a text of about 3 × items bytes.
fn alias_bomb(items: usize, aliases: usize) -> String {
    format!(
        "x: &a [{}]\ny: [{}]\n",
        vec!["a"; items].join(", "),
        vec!["*a"; aliases].join(", ")
    )
}

/// `x: {a: {a: …` `levels` deep, never closed.
fn deep_nesting(levels: usize) -> String {
    format!("x: {}", "{a: ".repeat(levels))
}

/// A fresh directory, removed with what it holds when dropped.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("agiproxy-hostile-{name}-"))
        .tempdir()
        .unwrap()
}

/// Starts `agiproxy` with `args`, its address space limited.
fn spawn(args: &[&str], config: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agiproxy"));
    cmd.args(args)
        .arg(config)
        .env("AGIPROXY_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: ADDRESS_SPACE,
                rlim_max: ADDRESS_SPACE,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Waits for `child` up to `within` (killing it then); returns its exit
/// code, stderr, time taken and peak resident memory in KiB.
fn wait_with_peak(mut child: Child, within: Duration) -> (Option<i32>, String, Duration, i64) {
    let started = Instant::now();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: a plain C struct, all zeroes is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // Reaped here rather than by `Child::wait`, for its rusage.
        // SAFETY: wait4 on our own child with valid pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            // SAFETY: as above.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (
        code,
        reader.join().unwrap(),
        started.elapsed(),
        usage.ru_maxrss,
    )
}

#[test]
fn check_refuses_an_alias_bomb_and_deep_nesting_quickly_in_bounded_memory() {
    let dir = temp_dir("check");
    for (name, text, says) in [
        // 200,000,000 values once expanded (it took 3.4 GB).
        ("bomb.yaml", alias_bomb(100_000, 2_000), "alias *a"),
        // 100,000 levels (it took 120 s of CPU).
        ("deep.yaml", deep_nesting(100_000), "nest more than 64 deep"),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let child = spawn(&["check", "-c"], &file);
        let (code, stderr, took, peak_kib) = wait_with_peak(child, Duration::from_secs(20));
        eprintln!("check {name}: {took:?}, peak {peak_kib} KiB");
        assert_eq!(code, Some(2), "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
        assert!(stderr.contains("(line "), "{name}: {stderr}");
        assert!(took < Duration::from_secs(10), "{name}: {took:?}");
        assert!(peak_kib < 100 * 1024, "{name}: peak {peak_kib} KiB");
    }
}

/// A proxy run from a config file in a directory of its own.
struct Proxy {
    child: Running,
    api: SocketAddr,
    /// Dropped (removed) after `child`, which ends the process.
    dir: tempfile::TempDir,
}

fn config(api: SocketAddr, backend: SocketAddr, extra: &str) -> String {
    format!(
        "version: 1\ncontrol:\n  address: \"{api}\"\n  token_env: AGIPROXY_TOKEN\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: all\n    pool: a\npools:\n  - name: a\n    backends: [{{ address: \"{backend}\" }}]\n{extra}"
    )
}

impl Proxy {
    fn start(name: &str, backend: SocketAddr, extra: &str) -> Proxy {
        // Nothing reads the log: send it nowhere rather than let it fill.
        Proxy::start_logged(name, backend, extra).0
    }

    /// As [`Proxy::start`], with what the proxy logs (at warn) from now on,
    /// read by a thread of its own.
    fn start_logged(
        name: &str,
        backend: SocketAddr,
        extra: &str,
    ) -> (Proxy, std::sync::Arc<std::sync::Mutex<String>>) {
        let dir = temp_dir(name);
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let file = dir.path().join("agiproxy.yaml");
        std::fs::write(&file, config(api, backend, extra)).unwrap();
        let mut child = Running::from(spawn(&["run", "--log-level", "warn", "-c"], &file));
        drop(child.stdout.take());
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let into = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                into.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let p = Proxy { child, api, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.http("GET", "/healthz", b"").map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "the proxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (p, log)
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("agiproxy.yaml")
    }

    /// Replaces the config file atomically by `make(tmp)`'s result.
    fn replace_file(&self, make: impl FnOnce(&Path)) {
        let tmp = self.dir.path().join(".agiproxy.yaml.tmp");
        let _ = std::fs::remove_file(&tmp);
        make(&tmp);
        std::fs::rename(&tmp, self.file()).unwrap();
    }

    /// One HTTP request to the control API (with the token); None when it
    /// gets no answer within 30 s.
    fn http(&self, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect(self.api).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .ok()?;
        s.write_all(body).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Some((code, body.to_string()))
    }

    fn status(&self) -> serde_json::Value {
        let (code, body) = self.http("GET", "/v1/status", b"").expect("status answers");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn metric(&self, needle: &str) -> u64 {
        let (_, text) = self.http("GET", "/metrics", b"").expect("metrics answer");
        text.lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A line of /proc/PID/status, in KiB (VmRSS, VmHWM).
    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    /// One call through the proxy's listener.
    async fn call_through(&self) {
        let addr: SocketAddr = self.status()["listeners"][0]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let out = FakeAsterisk::new()
            .header(AgiHeader::realistic("ivr/main", &[], "1.1"))
            .run(addr)
            .await;
        assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    }

    /// Waits until `needle`'s counter reaches `n`.
    fn wait_metric(&self, needle: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.metric(needle) < n {
            assert!(Instant::now() < deadline, "{needle} never reached {n}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

const REFUSED_READS: &str = "agiproxy_config_reloads_total{result=\"error\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_hostile_configs_quickly_and_applies_a_change_queued_behind_them() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = Proxy::start("api", b.addr(), "");
    for (name, text, says) in [
        // 5,000,000 values once expanded: hundreds of MB before the fix.
        ("bomb", alias_bomb(5_000, 1_000), "alias *a"),
        ("deep", deep_nesting(100_000), "nest more than 64 deep"),
    ] {
        let started = Instant::now();
        let (code, body) = p
            .http("PUT", "/v1/config?dry_run=true", text.as_bytes())
            .expect("an answer");
        let took = started.elapsed();
        eprintln!("dry run {name}: {code} in {took:?}");
        assert_eq!(code, 400, "{name}: {body}");
        assert!(body.contains(says), "{name}: {body}");
        assert!(took < Duration::from_secs(5), "{name}: {took:?}");
    }
    let peak = p.memory_kib("VmHWM");
    eprintln!("proxy peak RSS after the hostile dry runs: {peak} KiB");
    assert!(peak < 100 * 1024, "peak {peak} KiB");

    // A hostile change, then a small one while it is parsed: the small one
    // is applied, the hostile one refused, neither waits for the other.
    let small = config(p.api, b.addr(), "limits:\n  max_sessions: 999\n");
    std::thread::scope(|s| {
        let hostile = s.spawn(|| p.http("PUT", "/v1/config", deep_nesting(100_000).as_bytes()));
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let (code, body) = p
            .http("PUT", "/v1/config", small.as_bytes())
            .expect("an answer");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"generation\":2"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let (code, body) = hostile.join().unwrap().expect("an answer");
        assert_eq!(code, 400, "{body}");
    });
    assert_eq!(p.status()["generation"], 2);
    p.call_through().await;
}

/// `version: 1` and `keys` unknown top-level keys: one error each.
fn many_unknown_keys(keys: usize) -> String {
    let mut text = String::from("version: 1\n");
    for i in 0..keys {
        text.push_str(&format!("k{i}: 1\n"));
    }
    text
}

/// A config with 100,000 mistakes (300,000 once gave 42 MB of errors): `check`
/// prints the first 100 and how many more there were; the API answers as
/// much; the proxy logs its one WARN line, which the log writer used to drop
/// as over its bound (8 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_very_many_errors_gets_a_bounded_report_and_log_line() {
    let text = many_unknown_keys(100_000);
    let more = "… and 99,900 more errors";
    let dir = temp_dir("many");
    let file = dir.path().join("many.yaml");
    std::fs::write(&file, &text).unwrap();
    let child = spawn(&["check", "-c"], &file);
    let (code, stderr, _, _) = wait_with_peak(child, Duration::from_secs(60));
    assert_eq!(code, Some(2), "{}", &stderr[..stderr.len().min(2000)]);
    assert!(
        stderr.len() < 64 * 1024,
        "check printed {} bytes",
        stderr.len()
    );
    assert!(stderr.trim_end().ends_with(more), "{stderr}");
    assert!(
        stderr.contains(": over 100 errors, the first 100 shown:\n"),
        "{stderr}"
    );

    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let (p, log) = Proxy::start_logged("many", b.addr(), "");
    let (code, body) = p
        .http("PUT", "/v1/config", text.as_bytes())
        .expect("an answer");
    assert_eq!(code, 400, "{}", &body[..body.len().min(2000)]);
    assert!(body.len() < 64 * 1024, "a body of {} bytes", body.len());
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let errors = body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 101);
    assert_eq!(errors[100]["message"], more);

    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = log.lock().unwrap().clone();
        if let Some(line) = log.lines().find(|l| l.contains("config change refused")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no refusal logged: {log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(line.len() < 80 * 1024, "a line of {} bytes", line.len());
    assert!(
        line.contains("unknown field `k0`") && line.contains(more),
        "{line}"
    );
    assert_eq!(p.status()["generation"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_file_replaced_by_dev_zero_a_fifo_or_a_huge_file_keeps_the_old_config() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = Proxy::start("file", b.addr(), "limits:\n  max_config_bytes: 65536\n");
    p.call_through().await;
    let rss_before = p.memory_kib("VmRSS");
    let still_serving = |what: &str, refused: u64| {
        p.wait_metric(REFUSED_READS, refused);
        let st = p.status();
        assert_eq!(st["generation"], 1, "{what}: {st}");
        assert_eq!(st["differs_from_file"], true, "{what}: {st}");
        assert_eq!(p.http("GET", "/healthz", b"").map(|r| r.0), Some(200));
        let rss = p.memory_kib("VmRSS");
        eprintln!("{what}: RSS {rss_before} -> {rss} KiB");
        assert!(rss < rss_before + 64 * 1024, "{what}: RSS {rss} KiB");
    };

    // An endless device (it took 2 GB in 3 s).
    p.replace_file(|tmp| std::os::unix::fs::symlink("/dev/zero", tmp).unwrap());
    still_serving("/dev/zero", 1);
    p.call_through().await;

    // A FIFO (it froze every call and the API until a writer came).
    p.replace_file(|tmp| {
        let c = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    });
    still_serving("FIFO", 2);
    p.call_through().await;
    // SIGHUP reads the file too.
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGHUP) }, 0);
    still_serving("FIFO, SIGHUP", 3);

    // A valid config over limits.max_config_bytes.
    let huge =
        config(p.api, b.addr(), "limits:\n  max_sessions: 999\n") + &"# padding\n".repeat(10_000);
    p.replace_file(|tmp| std::fs::write(tmp, &huge).unwrap());
    still_serving("oversized file", 4);
    p.call_through().await;

    // The watch lives on: a good file is applied.
    let good = config(p.api, b.addr(), "limits:\n  max_sessions: 999\n");
    p.replace_file(|tmp| std::fs::write(tmp, &good).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.status()["generation"] != 2 {
        assert!(Instant::now() < deadline, "the good file was not applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(p.status()["differs_from_file"], false);
    p.call_through().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_in_two_steps_is_not_applied_half_written() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = Proxy::start("steps", b.addr(), "limits:\n  max_sessions: 500\n");
    // Written in place: a valid prefix (the same config with fewer
    // limits), a pause, then the rest.
    let full = config(p.api, b.addr(), "limits:\n  max_sessions: 999\n");
    let prefix = config(p.api, b.addr(), "");
    assert!(full.starts_with(&prefix));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(p.file())
        .unwrap();
    f.write_all(prefix.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let st = p.status();
    assert_eq!(st["generation"], 1, "the prefix was applied: {st}");
    f.write_all(&full.as_bytes()[prefix.len()..]).unwrap();
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.status()["generation"] != 2 {
        assert!(Instant::now() < deadline, "the file was not applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, cfg) = p.http("GET", "/v1/config", b"").unwrap();
    assert!(cfg.contains("max_sessions: 999"), "{cfg}");
    // Only the whole file was applied.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(p.status()["generation"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_given_back_when_a_large_config_is_replaced_by_a_small_one() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let p = Proxy::start("memory", b.addr(), "");
    let start = p.memory_kib("VmRSS");
    // 8,000 routes, each with a regex: a few hundred MB once compiled.
    let routes: String = (0..8_000)
        .map(|i| {
            format!(
                "  - {{ name: r{i}, match: {{ script: {{ exact: \"s{i}\" }}, args: {{ \"1\": \"^x{i}$\" }} }}, pool: a }}\n"
            )
        })
        .collect();
    let large = config(p.api, b.addr(), "").replace("routes:\n", &format!("routes:\n{routes}"));
    for round in 0..3 {
        let (code, body) = p
            .http("PUT", "/v1/config", large.as_bytes())
            .expect("an answer");
        assert_eq!(code, 200, "{body}");
        let large_rss = p.memory_kib("VmRSS");
        let small = config(p.api, b.addr(), &format!("# round {round}\n"));
        let (code, body) = p
            .http("PUT", "/v1/config", small.as_bytes())
            .expect("an answer");
        assert_eq!(code, 200, "{body}");
        // The replaced config is freed on a blocking thread, then trimmed.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut rss = p.memory_kib("VmRSS");
        while rss > start + 48 * 1024 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            rss = p.memory_kib("VmRSS");
        }
        eprintln!("round {round}: RSS {start} -> {large_rss} (large) -> {rss} KiB (small)");
        assert!(rss <= start + 48 * 1024, "round {round}: {rss} KiB kept");
    }
    p.call_through().await;
}
