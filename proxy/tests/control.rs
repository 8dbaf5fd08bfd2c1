//! Issue 17 on the real binary: the control API opens nothing unasked (two
//! replicas with default settings both start), refuses state changes with
//! no token configured (`ctl` prints how to set one), says at start which
//! endpoints are open and which are refused, and takes changes through
//! `ctl --socket` without a token.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};

mod common;
use common::{free_port, Running};

/// A running `agiproxy run`, its stderr collected by a thread.
struct Replica {
    child: Running,
    /// The FastAGI listener.
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    /// Its config and the tests' other files; dropped (removed) after
    /// `child`, which ends the process.
    dir: tempfile::TempDir,
}

impl Replica {
    /// Starts a replica whose config is one listener on a free port,
    /// `control` (a YAML block, or "" for none) and one pool of `backend`;
    /// returns once the listener accepts and the control API is up.
    async fn start(name: &str, control: &str, backend: SocketAddr) -> Replica {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = tempfile::Builder::new()
            .prefix(&format!("agiproxy-control-{name}-{port}-"))
            .tempdir()
            .unwrap();
        let file = dir.path().join("agiproxy.yaml");
        std::fs::write(&file, config(addr, control, backend, "all")).unwrap();
        let mut child = Running::spawn(
            Command::new(env!("CARGO_BIN_EXE_agiproxy"))
                .args(["run", "-c"])
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        // The control API is set up after the listeners; its start line
        // (or the one saying it is off) comes once it is bound.
        let control_up = |log: &str| {
            ["control API off", "control API: open", "control socket"]
                .iter()
                .any(|l| log.contains(l))
        };
        while tokio::net::TcpStream::connect(addr).await.is_err()
            || !control_up(&log.lock().unwrap())
        {
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "{name} exited ({status}) instead of serving:\n{}",
                    log.lock().unwrap()
                );
            }
            assert!(Instant::now() < deadline, "{name} did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Replica {
            child,
            addr,
            log,
            dir,
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    async fn call_succeeds(&self, uniqueid: &str) -> bool {
        let out = FakeAsterisk::new()
            .header(AgiHeader::realistic("ivr/main", &[], uniqueid))
            .run(self.addr)
            .await;
        out.status == AgiStatus::Success
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// TCP sockets this process listens on (its /proc view).
    fn listening_tcp(&self) -> usize {
        listening_tcp_sockets(self.child.id())
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn config(addr: SocketAddr, control: &str, backend: SocketAddr, route: &str) -> String {
    format!(
        "version: 1\n{control}\nlisteners:\n  - name: asterisk\n    address: \"{addr}\"\nroutes:\n  - name: {route}\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ address: \"{backend}\" }}\n"
    )
}

/// Listening TCP sockets held by `pid`: its socket descriptors matched
/// against the LISTEN entries (state 0A) of its /proc/net/tcp{,6}.
fn listening_tcp_sockets(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 9 && cols[3] == "0A" && inodes.iter().any(|i| i == cols[9])
        })
        .count()
}

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agiproxy"))
        .arg("ctl")
        .args(args)
        .env_remove("AGIPROXY_TOKEN")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Issue 17: with default control settings (no `control:` block) a replica
/// opens no control port, so a second one on the same host starts too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_17_two_replicas_with_default_control_settings_both_start() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let mut one = Replica::start("one", "", b.addr()).await;
    let mut two = Replica::start("two", "", b.addr()).await;
    for (r, uid) in [(&mut one, "1.1"), (&mut two, "2.1")] {
        assert!(r.running(), "{}", r.log());
        assert!(r.call_succeeds(uid).await, "{}", r.log());
        // The FastAGI listener and nothing else.
        assert_eq!(r.listening_tcp(), 1, "{}", r.log());
        assert!(
            r.log().contains("control API off"),
            "the start says so: {}",
            r.log()
        );
    }
}

/// Two replicas given the same control.address: the second fails at start
/// and says what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_17_a_taken_control_port_fails_with_what_to_change() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let cport = free_port();
    let control = format!("control: {{ address: \"127.0.0.1:{cport}\" }}");
    let one = Replica::start("first", &control, b.addr()).await;
    let file = one.dir.path().join("second.yaml");
    let second = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(&file, config(second, &control, b.addr(), "all")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agiproxy"))
        .args(["run", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "control.address: cannot listen on 127.0.0.1:{cport}"
        )) && err.contains("give each replica its own control.address port"),
        "{err}"
    );
}

/// Issue 17: a control API with no token refuses every state change (403),
/// `ctl` prints how to configure a token, the replica keeps its config and
/// serves on; the start log lists what is open and what is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_17_without_a_token_ctl_is_refused_and_says_how_to_set_one() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let cport = free_port();
    let control = format!("control: {{ address: \"127.0.0.1:{cport}\" }}");
    let mut r = Replica::start("notoken", &control, b.addr()).await;
    let url = format!("http://127.0.0.1:{cport}");
    let changed = r.dir.path().join("changed.yaml");
    std::fs::write(&changed, config(r.addr, &control, b.addr(), "other")).unwrap();
    let backend = b.addr().to_string();
    let changes: [&[&str]; 6] = [
        &["config", "apply", "-f", changed.to_str().unwrap()],
        &["reload"],
        &["drain", "p", &backend],
        &["enable", "p", &backend],
        &["split", "all", "p=1"],
        &["drain-replica"],
    ];
    for change in changes {
        let out = ctl(&[&["--url", url.as_str()], change].concat());
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{change:?}: {said}");
        assert!(
            said.contains("ERROR (403)")
                && said.contains("set control.token_file (or control.token_env)"),
            "{change:?}: {said}"
        );
    }
    // Nothing changed; still serving.
    let out = ctl(&["--url", &url, "--output", "json", "status"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["replicas"][0]["body"]["generation"], 1);
    assert_eq!(status["replicas"][0]["body"]["draining"], false);
    assert!(r.running());
    assert!(r.call_succeeds("3.1").await);
    let log = r.log();
    let line = log
        .lines()
        .find(|l| l.contains("refused with 403"))
        .unwrap_or_else(|| panic!("no start line on access: {log}"));
    assert!(
        line.contains("GET /metrics") && line.contains("POST /v1/drain"),
        "{line}"
    );
    assert_eq!(log.matches("refused with 403").count(), 1, "once: {log}");
}

/// Issue 17: `ctl --socket` changes state without a token; the socket is
/// 0600 and the proxy's; no TCP port is opened for control; the socket is
/// removed when the replica exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_17_ctl_over_the_control_socket_needs_no_token() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let dir = tempfile::Builder::new()
        .prefix("agiproxy-ctlsock-")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("control.sock");
    let control = format!("control: {{ socket: {} }}", sock.display());
    let mut r = Replica::start("socket", &control, b.addr()).await;
    let s = sock.to_str().unwrap();
    assert_mode_and_owner(&sock);
    assert_eq!(r.listening_tcp(), 1, "no control port: {}", r.log());

    let out = ctl(&["--socket", s, "--output", "json", "status"]);
    assert!(out.status.success(), "{}", text(&out));
    let changed = dir.path().join("changed.yaml");
    std::fs::write(&changed, config(r.addr, &control, b.addr(), "other")).unwrap();
    let out = ctl(&[
        "--socket",
        s,
        "config",
        "apply",
        "-f",
        changed.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("applied: generation 2"),
        "{}",
        text(&out)
    );
    // A backend drained and enabled again: its row of the pools table.
    let backend = b.addr().to_string();
    for (cmd, state) in [("drain", "draining"), ("enable", "healthy")] {
        let out = ctl(&["--socket", s, cmd, "p", &backend]);
        assert!(out.status.success(), "{}", text(&out));
        let said = text(&out);
        let row: Vec<&str> = said
            .lines()
            .find(|l| l.contains(&backend))
            .unwrap_or_else(|| panic!("{cmd}: no row for {backend}: {said}"))
            .split_whitespace()
            .collect();
        assert_eq!(&row[..3], ["p", backend.as_str(), state], "{cmd}: {said}");
        assert!(said.starts_with("POOL "), "{cmd}: {said}");
    }
    let out = ctl(&["--socket", s, "drain-replica"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("draining: listeners closed"),
        "{}",
        text(&out)
    );
    assert!(
        r.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        r.log()
    );
    assert!(!sock.exists(), "the socket is removed at exit");
}

fn assert_mode_and_owner(path: &Path) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(path).unwrap();
    assert!(m.file_type().is_socket());
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    assert_eq!((m.mode() & 0o777, m.uid()), (0o600, me));
}

/// A rotated token file (a Kubernetes Secret updated in place) is taken up
/// without a restart: at once on SIGHUP (else within 30 s), the new token
/// works, the old one keeps working for its grace (10 minutes, so `ctl`
/// users and the other replicas can follow), and a file made empty is
/// refused and counted while the last good token stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_is_taken_up_and_the_old_token_works_for_its_grace() {
    use chaos_tests::http::get_with;
    let backend = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let secrets = tempfile::TempDir::with_prefix("agiproxy-token-").unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "first-secret\n").unwrap();
    let control_port = free_port();
    let control = SocketAddr::from(([127, 0, 0, 1], control_port));
    let r = Replica::start(
        "token-rotation",
        &format!(
            "control:\n  address: \"{control}\"\n  token_file: {}\n",
            token_file.display()
        ),
        backend.addr(),
    )
    .await;
    let status = |token: &'static str| async move {
        get_with(control, "/v1/config", Some(token))
            .await
            .map(|r| r.status)
    };
    let metric = |result: &'static str| async move {
        let m = chaos_tests::http::get(control, "/metrics").await?.body;
        let line =
            format!("agiproxy_credential_reloads_total{{files=\"token\",result=\"{result}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(status("first-secret").await, Some(200));
    assert_eq!(status("second-secret").await, Some(401));
    assert_eq!(metric("reloaded").await, Some(0));

    // Rotated as the kubelet does: a new file renamed over the old.
    let swap = |text: &str| {
        let tmp = secrets.path().join("token.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &token_file).unwrap();
    };
    swap("second-secret\n");
    let sighup = || {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(r.child.id() as i32, libc::SIGHUP) }, 0);
    };
    sighup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status("second-secret").await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the new token was not taken up:\n{}",
            r.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status("first-secret").await,
        Some(200),
        "the old token's grace"
    );
    assert_eq!(status("third-secret").await, Some(401));
    assert_eq!(metric("reloaded").await, Some(1));

    // Emptied by mistake: refused, counted, the last good token stays.
    swap("\n");
    sighup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric("refused").await != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the empty file was not refused:\n{}",
            r.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status("second-secret").await, Some(200));
    // Logged too (the log is written out by a thread of its own, in batches).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.log().contains("the token is empty") {
        assert!(Instant::now() < deadline, "not logged:\n{}", r.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reload that adds a listener on the control API's port (its new file
/// moving the control API, which waits for a restart) is refused naming
/// the control API, not "another process" (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_on_the_running_control_apis_port_is_refused_naming_it() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let dir = tempfile::Builder::new()
        .prefix("agiproxy-ctlport-")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("control.sock");
    let cport = free_port();
    let control = format!(
        "control: {{ socket: {}, address: \"127.0.0.1:{cport}\" }}",
        sock.display()
    );
    let r = Replica::start("ctlport", &control, b.addr()).await;
    let moved = format!(
        "control: {{ socket: {}, address: \"127.0.0.1:{}\" }}",
        sock.display(),
        free_port()
    );
    let changed = dir.path().join("changed.yaml");
    let text_of = config(r.addr, &moved, b.addr(), "all").replace(
        "listeners:\n",
        &format!("listeners:\n  - name: extra\n    address: \"127.0.0.1:{cport}\"\n"),
    );
    std::fs::write(&changed, text_of).unwrap();
    let out = ctl(&[
        "--socket",
        sock.to_str().unwrap(),
        "config",
        "apply",
        "-f",
        changed.to_str().unwrap(),
    ]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("this replica's own control API"), "{said}");
    assert!(!said.contains("another process"), "{said}");
}

/// A CA and a server certificate for `name` only (a DNS name, no IP), PEM
/// files in `dir`: the CA's path, and the `tls:` block that serves the
/// certificate.
fn certificate_for(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let write = |file: &str, pem: String| {
        let p = dir.join(file);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let ca_pem = write("ca.pem", ca.pem());
    let tls = format!(
        "tls: {{ cert: {}, key: {} }}",
        write("server.pem", cert.pem()).display(),
        write("server.key", key.serialize_pem()).display()
    );
    (ca_pem, tls)
}

/// `ctl --server-name NAME` checks the certificate against NAME (and sends
/// it as SNI) while connecting to the URL's address: one replica reached at
/// 127.0.0.1 (as through `kubectl port-forward`) whose certificate carries
/// only `control.test`, and two behind `--cluster`, where every request of
/// the fan-out (the reload, then the convergence check) uses it. Without
/// it, or with another name, the certificate is refused; a name that is not
/// one, or on plain http, is bad usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_server_name_checks_the_certificate_against_that_name() {
    use chaos_tests::dns::FakeDns;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let dir = tempfile::Builder::new()
        .prefix("agiproxy-servername-")
        .tempdir()
        .unwrap();
    let (ca, tls) = certificate_for(dir.path(), "control.test");
    let token = dir.path().join("token");
    std::fs::write(&token, "server-name-secret\n").unwrap();
    let ips = ["127.0.0.1", "127.0.0.2"];
    // One control port free on both addresses.
    let cport = loop {
        let p = free_port();
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, p)).is_ok())
        {
            break p;
        }
    };
    let mut running = Vec::new();
    for ip in ips {
        let control = format!(
            "control: {{ address: \"{ip}:{cport}\", token_file: {}, {tls} }}",
            token.display()
        );
        running.push(Replica::start(&format!("servername-{ip}"), &control, b.addr()).await);
    }
    let url = format!("https://127.0.0.1:{cport}");
    let ca = ca.to_str().unwrap();
    let one = |extra: &[&str]| {
        ctl(&[
            &["--url", url.as_str(), "--ca", ca, "--output", "json"],
            extra,
            &["status"],
        ]
        .concat())
    };

    let out = one(&["--server-name", "control.test"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["replicas"][0]["body"]["generation"], 1, "{status}");

    // The URL's host, 127.0.0.1, or another name: not in the certificate.
    for (extra, name) in [
        (&[][..], "127.0.0.1"),
        (&["--server-name", "other.test"][..], "other.test"),
    ] {
        let out = one(extra);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {said}");
        assert!(
            said.contains("invalid peer certificate")
                && said.contains(&format!("not valid for name \\\"{name}\\\"")),
            "{extra:?}: {said}"
        );
    }

    // Every replica behind a name, each request of the fan-out: the reload,
    // then the status of each for the convergence check. (Each replica's
    // control block has its own address, so their hashes differ and ctl
    // reports them as not converged: exit 1 either way.)
    let dns = FakeDns::start().await;
    dns.set_addrs("agiproxy.test.", &ips.map(|ip| ip.parse().unwrap()), 5);
    let cluster = format!("dns:agiproxy.test:{cport}");
    let dns_server = dns.addr().to_string();
    let token = token.to_str().unwrap();
    let fleet = |extra: &[&str]| {
        let out = ctl(&[
            &[
                "--cluster",
                cluster.as_str(),
                "--dns-server",
                dns_server.as_str(),
                "--https",
                "--ca",
                ca,
                "--token-file",
                token,
                "--output",
                "json",
                "reload",
            ],
            extra,
        ]
        .concat());
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        doc
    };
    let doc = fleet(&["--server-name", "control.test"]);
    let replicas = doc["replicas"].as_array().unwrap();
    let hashes = doc["hashes"].as_array().unwrap();
    assert_eq!((replicas.len(), hashes.len()), (2, 2), "{doc}");
    assert!(replicas.iter().all(|r| r["ok"] == true), "{doc}");
    assert!(hashes.iter().all(|h| h["hash"].is_string()), "{doc}");
    // Checked against agiproxy.test, the name of --cluster: every request refused.
    let doc = fleet(&[]);
    let replicas = doc["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{doc}");
    assert!(
        replicas.iter().all(|r| r["ok"] == false
            && r["error"]
                .as_str()
                .unwrap()
                .contains("not valid for name \"agiproxy.test\"")),
        "{doc}"
    );
    assert!(
        doc["hashes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["hash"].is_null()),
        "{doc}"
    );

    // Bad usage, before any request.
    let out = one(&["--server-name", "not a name"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--server-name <NAME>") && said.contains("not a DNS name or an IP address"),
        "{said}"
    );
    let out = ctl(&[
        "--url",
        &format!("http://127.0.0.1:{cport}"),
        "--server-name",
        "control.test",
        "status",
    ]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--server-name control.test: only for https"),
        "{said}"
    );
    for r in &mut running {
        assert!(r.running(), "{}", r.log());
    }
}

/// The peak resident memory of `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap();
    kb * 1024
}

/// Sends `body` as a dry-run `PUT /v1/config` from the loopback address
/// `source` and returns the answer's status code (0: no answer).
fn put_config_from(source: std::net::Ipv4Addr, control: SocketAddr, body: &[u8]) -> u16 {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket.connect(&control.into()).unwrap();
    let mut s = std::net::TcpStream::from(socket);
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "PUT /v1/config?dry_run=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // A body refused unread may meet a closed socket.
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    std::str::from_utf8(answer.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Concurrent large config bodies are held within the body budget (three
/// times `limits.max_config_bytes`): 60 dry-run PUTs of 4 MB at once, from
/// four addresses (one may hold 16 connections), grow the peak RSS by far
/// less than 25 bodies. Before: every body was read at once and copied
/// about three times before its parse: 18 → 596 MB in a debug build (937 MB
/// in the audit's release run, past the chart's 512Mi limit); after: 56 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_config_puts_stay_within_the_body_budget() {
    let backend = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let secrets = tempfile::TempDir::with_prefix("agiproxy-budget-").unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "secret\n").unwrap();
    let control = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let block = format!(
        "control:\n  address: \"{control}\"\n  token_file: {}\n",
        token_file.display()
    );
    let r = Replica::start("body-budget", &block, backend.addr()).await;
    // A valid config, made 4 MB (under the default 4 MiB) by comments:
    // cheap to parse, so that what is held is the bodies.
    let mut body = config(r.addr, &block, backend.addr(), "all").into_bytes();
    let line = format!("#{}\n", "x".repeat(98));
    while body.len() + line.len() <= 4_000_000 {
        body.extend_from_slice(line.as_bytes());
    }
    let pid = r.child.id();
    let before = peak_rss(pid);
    let codes: Vec<u16> = tokio::task::spawn_blocking(move || {
        std::thread::scope(|s| {
            let puts: Vec<_> = (0..60u8)
                .map(|i| {
                    let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + i % 4);
                    let body = &body;
                    s.spawn(move || put_config_from(source, control, body))
                })
                .collect();
            puts.into_iter().map(|p| p.join().unwrap()).collect()
        })
    })
    .await
    .unwrap();
    let grown = peak_rss(pid).saturating_sub(before);
    // Waiting for the budget longer than half the request timeout is a
    // 503; on a loaded machine some may be.
    assert!(
        codes.iter().all(|c| *c == 200 || *c == 503),
        "{codes:?}\n{}",
        r.log()
    );
    assert!(codes.contains(&200), "{codes:?}");
    assert!(
        grown < 25 * 4_000_000,
        "peak RSS grew by {} MB for 60 bodies of 4 MB",
        grown / 1_000_000
    );
}
