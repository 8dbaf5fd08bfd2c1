//! One structured access-log line per session, as JSON with --log-format json.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};

mod common;
use common::{config_file, free_port, Running};

/// Runs `agiproxy run --log-format json` with `flags` on a config of one
/// listener on `port`, routes `routes` to a pool of `backend`, and `control`;
/// stderr piped. Returns once the listener accepts, with the directory of
/// the config (removed on drop: keep it while the proxy runs).
async fn start(
    port: u16,
    control: &str,
    routes: &str,
    backend: std::net::SocketAddr,
    flags: &[&str],
) -> (Running, tempfile::TempDir) {
    let text = format!(
        "version: 1\ncontrol: {control}\nlisteners:\n  - name: pbx\n    address: \"127.0.0.1:{port}\"\nroutes:\n{routes}pools:\n  - name: p\n    backends: [{{ address: \"{backend}\" }}]\n"
    );
    let (dir, path) = config_file("log", &format!("agiproxy-log-{port}.yaml"), &text);
    let child = Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_agiproxy"))
            .args(["run", "--log-format", "json"])
            .args(flags)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return (child, dir);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("agiproxy did not start listening on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_line_per_session() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP", "NOOP"])).await;
    let port = free_port();
    let routes = "  - name: ivr\n    match: { script: { prefix: ivr/ } }\n    pool: p\n";
    let (mut child, _dir) = start(port, "{ enabled: false }", routes, b.addr(), &[]).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let out = FakeAsterisk::new()
        .header(AgiHeader::realistic("ivr/main?lang=de", &["7"], "1.1"))
        .run(addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success);
    let out = FakeAsterisk::new()
        .header(AgiHeader::realistic("billing", &[], "1.2"))
        .run(addr)
        .await;
    assert_eq!(out.status, AgiStatus::Failure);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stderr = child.stderr.take().unwrap();
    let lines: Vec<serde_json::Value> = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(child.wait().unwrap().success());
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "agiproxy::access")
        .collect();
    assert_eq!(access.len(), 2, "{lines:?}");
    // A line is written when its session ends: the first call's can come
    // second (it ends after Asterisk's HANGUP, the second fails at once).
    let by_script = |script: &str| {
        *access
            .iter()
            .find(|l| l["script"] == script)
            .unwrap_or_else(|| panic!("no access line for {script}: {access:?}"))
    };
    let ok = by_script("ivr/main?lang=de");
    assert_eq!(ok["listener"], "pbx");
    assert_eq!(ok["script"], "ivr/main?lang=de");
    assert_eq!(ok["route"], "ivr");
    assert_eq!(ok["pool"], "p");
    assert_eq!(ok["backend"], b.addr().to_string());
    assert_eq!(ok["outcome"], "completed");
    assert_eq!(ok["commands"], 2);
    assert_eq!(ok["attempts"], 1);
    for field in [
        "peer",
        "connect_ms",
        "first_command_ms",
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "generation",
    ] {
        assert!(ok.get(field).is_some(), "missing {field}: {ok}");
    }
    let failed = by_script("billing");
    assert_eq!(
        (failed["outcome"].as_str(), failed["reason"].as_str()),
        (Some("failed"), Some("no_route"))
    );
}

/// A log reader that stops reading (a container runtime's full pipe, a
/// frozen terminal) costs log lines, counted, and never a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_costs_log_lines_not_calls() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let (port, cport) = (free_port(), free_port());
    // stderr is a pipe nobody reads until the end: it fills at 64 KiB,
    // about 200 access lines.
    let control = format!("{{ address: \"127.0.0.1:{cport}\" }}");
    let routes = "  - name: ivr\n    pool: p\n";
    let flags = ["--log-buffer-lines", "16"];
    let (mut child, _dir) = start(port, &control, routes, b.addr(), &flags).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // 1,000 calls, 8 at a time, each bounded: a proxy blocked on its log
    // pipe would time them out.
    const CALLS: usize = 1000;
    let mut done = 0;
    for batch in 0..CALLS / 8 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..8 {
            let uid = format!("9.{}", batch * 8 + i);
            calls.spawn(async move {
                let caller =
                    FakeAsterisk::new().header(AgiHeader::realistic("ivr/main", &[], &uid));
                tokio::time::timeout(Duration::from_secs(5), caller.run(addr)).await
            });
        }
        while let Some(out) = calls.join_next().await {
            let out = out.unwrap().expect("a call hung behind the log");
            assert_eq!(out.status, AgiStatus::Success);
            done += 1;
        }
    }
    assert_eq!(done, CALLS);
    let metrics = chaos_tests::http::get(format!("127.0.0.1:{cport}").parse().unwrap(), "/metrics")
        .await
        .expect("GET /metrics")
        .body;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("agiproxy_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no dropped-lines counter in\n{metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(dropped > 0, "{metrics}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // What got through is whole lines of JSON: the writer drops lines,
    // never parts of them.
    let stderr = child.stderr.take().unwrap();
    let access = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(&l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .filter(|l| l["target"] == "agiproxy::access")
        .count();
    assert!(child.wait().unwrap().success());
    assert!(
        access > 0 && access < CALLS,
        "{access} access lines, {dropped} dropped"
    );
}
