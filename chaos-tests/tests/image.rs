//! The container image built from `Containerfile`, run by podman: a FastAGI
//! call through it reaches a backend on loopback and back; it runs as
//! 65532 with a read-only root filesystem; SIGTERM drains and exits 0.
//!
//! Needs `AGIPROXY_IMAGE` (the image to run) and podman: `.ci/image-test.sh`
//! builds the image and runs this file with both. Without `AGIPROXY_IMAGE`
//! the test says so and returns (a plain `cargo test` has no image).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};

fn free_port() -> u16 {
    chaos_tests::ports::free_port("127.0.0.1")
}

fn podman() -> String {
    std::env::var("PODMAN").unwrap_or_else(|_| "podman".into())
}

fn run(args: &[&str]) -> Output {
    Command::new(podman())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run podman {args:?}: {e}"))
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "podman {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The container, removed (with its logs printed) when the test ends; then
/// the directory it mounted.
struct Container {
    name: String,
    _dir: tempfile::TempDir,
}

impl Container {
    fn logs(&self) -> String {
        let out = run(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The container's main process as the host sees it.
    fn host_pid(&self) -> u32 {
        let pid = run_ok(&["inspect", "--format", "{{.State.Pid}}", &self.name]);
        pid.parse()
            .unwrap_or_else(|_| panic!("no pid for {}: {pid:?}", self.name))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- container log ---\n{}", self.logs());
        }
        let _ = run(&["rm", "--force", "--time", "0", &self.name]);
    }
}

fn write_config(dir: &Path, agi: SocketAddr, control: SocketAddr, backend: SocketAddr) {
    use std::os::unix::fs::PermissionsExt;
    // The container's user (65532) must read the mounted directory (a
    // `TempDir` is made 0700).
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = format!(
        "version: 1\nlisteners:\n  - name: asterisk\n    address: \"{agi}\"\ncontrol:\n  address: \"{control}\"\ntimeouts:\n  drain: 30s\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{backend}\" }}\n"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn caller(uniqueid: &str, exec_delay: Duration) -> FakeAsterisk {
    FakeAsterisk::new()
        .header(AgiHeader::realistic("ivr/main", &["a1"], uniqueid))
        .exec_takes(exec_delay)
        .call_timeout(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_proxies_a_call_as_non_root_read_only_and_drains_on_sigterm() {
    let Ok(image) = std::env::var("AGIPROXY_IMAGE") else {
        eprintln!("image test skipped: AGIPROXY_IMAGE is not set (.ci/image-test.sh sets it)");
        return;
    };

    // What the image says about itself.
    let user = run_ok(&["image", "inspect", "--format", "{{.Config.User}}", &image]);
    assert_eq!(user, "65532:65532");
    let entry = run_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}}",
        &image,
    ]);
    assert_eq!(
        entry,
        r#"["/agiproxy"] ["run","-c","/etc/agiproxy/config.yaml"]"#
    );
    let licence = run_ok(&[
        "image",
        "inspect",
        "--format",
        r#"{{index .Config.Labels "org.opencontainers.image.licenses"}}"#,
        &image,
    ]);
    assert_eq!(licence, "Apache-2.0");

    let backend =
        FakeBackend::start(Behaviour::script(&["EXEC Playback hello-world", "NOOP"])).await;
    let agi: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let control: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let name = format!("agiproxy-image-test-{}", std::process::id());
    let dir = tempfile::Builder::new()
        .prefix("agiproxy-image-test-")
        .tempdir()
        .unwrap();
    write_config(dir.path(), agi, control, backend.addr());

    // The image's own CMD reads /etc/agiproxy/config.yaml. The host's network
    // (loopback only is used): the backend and the caller are this process.
    let mount = format!("{}:/etc/agiproxy:ro", dir.path().display());
    let _ = run(&["rm", "--force", "--time", "0", &name]);
    run_ok(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--volume",
        &mount,
        &image,
    ]);
    let container = Container { name, _dir: dir };

    let deadline = Instant::now() + Duration::from_secs(60);
    while chaos_tests::http::get(control, "/readyz")
        .await
        .map(|r| r.status)
        != Some(200)
    {
        assert!(
            Instant::now() < deadline,
            "the container's /readyz is not 200 within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A call through the container reaches the backend, and the backend's
    // commands reach the caller.
    let out = caller("1.1", Duration::ZERO).run(agi).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["EXEC Playback hello-world", "NOOP"]);
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    assert_eq!(backend.stats().accepted(), 1);

    // Non-root, read-only root: read off the running process itself.
    let pid = container.host_pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<&str> = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("no {field} in {status}"))
            .split_whitespace()
            .collect();
        assert_eq!(ids, ["65532"; 4], "{field} of the container's process");
    }
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    // Fields: id parent major:minor root mount-point options ...
    let root_options = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .rfind(|f| f.len() > 5 && f[4] == "/")
        .map(|f| f[5].to_owned())
        .unwrap_or_else(|| panic!("no / in the container's mountinfo:\n{mountinfo}"));
    assert!(
        root_options.split(',').any(|o| o == "ro"),
        "root filesystem mounted {root_options}"
    );

    // SIGTERM during a call: no new connects, the call finishes, exit 0.
    let call = tokio::spawn(async move { caller("1.2", Duration::from_secs(2)).run(agi).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while backend.stats().accepted() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second call never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run_ok(&["kill", "--signal", "TERM", &container.name]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(agi).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the listener still accepts 20 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = call.await.unwrap();
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(out.commands, vec!["EXEC Playback hello-world", "NOOP"]);
    let code = run_ok(&["wait", &container.name]);
    assert_eq!(code, "0", "exit code after SIGTERM");
    let logs = container.logs();
    assert!(
        logs.contains("drained"),
        "no \"drained\" in the log:\n{logs}"
    );
}
