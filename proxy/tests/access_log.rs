//! One structured access-log line per session, as JSON with --log-format json.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_line_per_session() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP", "NOOP"])).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = format!(
        "version: 1\ncontrol: {{ enabled: false }}\nlisteners:\n  - name: pbx\n    address: \"127.0.0.1:{port}\"\nroutes:\n  - name: ivr\n    match: {{ script: {{ prefix: ivr/ }} }}\n    pool: p\npools:\n  - name: p\n    backends: [{{ address: \"{}\" }}]\n",
        b.addr()
    );
    let path = std::env::temp_dir().join(format!("agiproxy-log-{port}.yaml"));
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_agiproxy"))
        .args(["run", "--log-format", "json", "-c"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut started = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started);
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
    let ok = access[0];
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
    let failed = access[1];
    assert_eq!(
        (failed["outcome"].as_str(), failed["reason"].as_str()),
        (Some("failed"), Some("no_route"))
    );
}
