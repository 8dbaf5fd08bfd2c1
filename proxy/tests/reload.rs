//! Config changes on the real binary: a ConfigMap-style symlink swap picked
//! up by the file watcher, invalid configs through the file, SIGHUP and the
//! API all refused with the old config kept, `If-Match` with a stale
//! generation, and `ctl --cluster` across three replicas found through a
//! DNS server on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chaos_tests::dns::FakeDns;
use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};

mod common;
use common::Running;

const TOKEN: &str = "reload-test-token";

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn free_port(ip: &str) -> u16 {
    chaos_tests::ports::free_port(ip)
}

fn config(control: &str, route_pool: &str, a: SocketAddr, b: SocketAddr) -> String {
    format!(
        "version: 1\ncontrol:\n{control}\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: all\n    pool: {route_pool}\npools:\n  - name: a\n    backends: [{{ address: \"{a}\" }}]\n  - name: b\n    backends: [{{ address: \"{b}\" }}]\n"
    )
}

/// A directory laid out like a mounted Kubernetes ConfigMap; removed on drop.
struct ConfigMap {
    dir: tempfile::TempDir,
    version: u32,
}

impl ConfigMap {
    fn new(text: &str) -> ConfigMap {
        let dir = tempfile::Builder::new()
            .prefix("agiproxy-cm-")
            .tempdir()
            .unwrap();
        let mut cm = ConfigMap { dir, version: 0 };
        cm.update(text);
        std::os::unix::fs::symlink("..data/agiproxy.yaml", cm.path()).unwrap();
        cm
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("agiproxy.yaml")
    }

    /// What the kubelet does: write a new timestamped directory, point a
    /// temporary symlink at it, and rename it over `..data` atomically.
    fn update(&mut self, text: &str) {
        self.version += 1;
        let data = format!("..v{}", self.version);
        let dir = self.dir.path();
        std::fs::create_dir_all(dir.join(&data)).unwrap();
        std::fs::write(dir.join(&data).join("agiproxy.yaml"), text).unwrap();
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&data, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    }
}

fn start(config: &Path) -> Running {
    Running::spawn(
        Command::new(env!("CARGO_BIN_EXE_agiproxy"))
            .args(["run", "--log-level", "warn", "-c"])
            .arg(config)
            .env("AGIPROXY_TOKEN", TOKEN)
            .stdout(Stdio::null()),
    )
}

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agiproxy"))
        .arg("ctl")
        .args(args)
        .env("AGIPROXY_TOKEN", TOKEN)
        .output()
        .unwrap()
}

/// `agiproxy ctl --url API config apply -f FILE [--if-match GENERATION]`.
fn apply(api: &str, file: &Path, if_match: Option<&str>) -> Output {
    let mut args = vec![
        "--url",
        api,
        "config",
        "apply",
        "-f",
        file.to_str().unwrap(),
    ];
    if let Some(g) = if_match {
        args.extend(["--if-match", g]);
    }
    ctl(&args)
}

fn status(api: &str) -> Option<serde_json::Value> {
    let out = ctl(&["--url", api, "--output", "json", "status"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    doc["replicas"][0]["body"]
        .as_object()
        .map(|o| serde_json::Value::Object(o.clone()))
}

/// Waits until the replica's generation is `g` (or the time runs out).
fn wait_generation(api: &str, g: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let now = status(api)
            .and_then(|s| s["generation"].as_u64())
            .unwrap_or(0);
        if now == g || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(api: &str, needle: &str) -> u64 {
    let addr = api.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Places one call through the replica whose control API is `api`.
async fn call_through(api: &str) {
    let st = status(api).unwrap();
    let addr: SocketAddr = st["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let b = FakeAsterisk::new().header(AgiHeader::realistic("ivr/main", &[], "1.1"));
    let out = b.run(addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
}

/// A replica run from a plain config file in a directory of its own, its
/// one route to pool `a`; two NOOP backends. The proxy is killed before
/// the directory is removed (field order).
struct PlainFile {
    _proxy: Running,
    dir: tempfile::TempDir,
    file: PathBuf,
    api: String,
    control: String,
    a: FakeBackend,
    b: FakeBackend,
}

impl PlainFile {
    async fn start(prefix: &str) -> PlainFile {
        let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
        let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
        let port = free_port("127.0.0.1");
        let api = format!("http://127.0.0.1:{port}");
        let control = format!("  address: \"127.0.0.1:{port}\"\n  token_env: AGIPROXY_TOKEN");
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let file = dir.path().join("agiproxy.yaml");
        std::fs::write(&file, config(&control, "a", a.addr(), b.addr())).unwrap();
        let proxy = start(&file);
        assert_eq!(wait_generation(&api, 1, Duration::from_secs(10)), 1);
        PlainFile {
            _proxy: proxy,
            dir,
            file,
            api,
            control,
            a,
            b,
        }
    }

    /// The config text routing to `pool`.
    fn text(&self, pool: &str) -> String {
        config(&self.control, pool, self.a.addr(), self.b.addr())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_watch_sighup_and_api_refuse_invalid_configs() {
    let a = FakeBackend::start(Behaviour::script(&["VERBOSE \"from a\" 1"])).await;
    let b = FakeBackend::start(Behaviour::script(&["VERBOSE \"from b\" 1"])).await;
    let port = free_port("127.0.0.1");
    let api = format!("http://127.0.0.1:{port}");
    let control = format!("  address: \"127.0.0.1:{port}\"\n  token_env: AGIPROXY_TOKEN");
    let mut cm = ConfigMap::new(&config(&control, "a", a.addr(), b.addr()));
    let _proxy = start(&cm.path());
    assert_eq!(wait_generation(&api, 1, Duration::from_secs(10)), 1);
    call_through(&api).await;
    assert_eq!(a.stats().accepted(), 1);

    // A ConfigMap update (atomic symlink swap) is picked up by the watcher.
    cm.update(&config(&control, "b", a.addr(), b.addr()));
    assert_eq!(wait_generation(&api, 2, Duration::from_secs(5)), 2);
    call_through(&api).await;
    assert_eq!(b.stats().accepted(), 1);

    // An invalid file: refused, generation 2 keeps serving.
    let invalid = config(&control, "nope", a.addr(), b.addr());
    cm.update(&invalid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&api, "agiproxy_config_reloads_total{result=\"invalid\"}") < 1 {
        assert!(Instant::now() < deadline, "the invalid file was not seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status(&api).unwrap()["generation"], 2);
    assert_eq!(status(&api).unwrap()["differs_from_file"], true);

    // SIGHUP re-reads the (still invalid) file: refused again.
    let pid = _proxy.id() as i32;
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&api, "agiproxy_config_reloads_total{result=\"invalid\"}") < 2 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status(&api).unwrap()["generation"], 2);

    // The API: refused with every error and its path, non-zero exit. Its
    // files are kept out of the watched directory.
    let files = tempfile::Builder::new()
        .prefix("agiproxy-apply-")
        .tempdir()
        .unwrap();
    let bad = files.path().join(format!("agiproxy-bad-{port}.yaml"));
    std::fs::write(&bad, &invalid).unwrap();
    let out = apply(&api, &bad, None);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("routes[0].pool: unknown pool \"nope\""),
        "{stdout}"
    );
    assert_eq!(status(&api).unwrap()["generation"], 2);
    call_through(&api).await;
    assert_eq!(b.stats().accepted(), 2, "the old config kept serving");

    // If-Match with a stale generation: 412, nothing changes.
    let good = files.path().join(format!("agiproxy-good-{port}.yaml"));
    std::fs::write(&good, config(&control, "a", a.addr(), b.addr())).unwrap();
    let out = apply(&api, &good, Some("1"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("412"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = apply(&api, &good, Some("2"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(status(&api).unwrap()["generation"], 3);
}

/// Three replicas on 127.0.0.1-3, one control port, found by `ctl` as
/// `dns:agiproxy.test:PORT` (`cluster`) through a fake DNS (`dns_server`).
struct Cluster {
    ips: [&'static str; 3],
    port: u16,
    cluster: String,
    dns_server: String,
    _dns: FakeDns,
    _dirs: Vec<ConfigMap>,
    _replicas: Vec<Running>,
}

impl Cluster {
    /// Replica `i` runs `text(i, its control block)`.
    async fn start(text: impl Fn(usize, &str) -> String) -> Cluster {
        let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];
        // One port free on all three addresses.
        let port = loop {
            let p = free_port("127.0.0.1");
            if ips
                .iter()
                .all(|ip| std::net::TcpListener::bind((*ip, p)).is_ok())
            {
                break p;
            }
        };
        let dns = FakeDns::start().await;
        dns.set_addrs("agiproxy.test.", &ips.map(|ip| ip.parse().unwrap()), 5);
        let mut dirs = Vec::new();
        let mut replicas = Vec::new();
        // `PEER_LIST` in a text: every replica's control API, for `judge.peers`.
        let peers = ips.map(|ip| format!("\"{ip}:{port}\"")).join(", ");
        for (i, ip) in ips.iter().enumerate() {
            let control = format!("  address: \"{ip}:{port}\"\n  token_env: AGIPROXY_TOKEN");
            let cm = ConfigMap::new(&text(i, &control).replace("PEER_LIST", &peers));
            replicas.push(start(&cm.path()));
            dirs.push(cm);
        }
        for ip in ips {
            assert_eq!(
                wait_generation(&format!("http://{ip}:{port}"), 1, Duration::from_secs(10)),
                1
            );
        }
        Cluster {
            ips,
            port,
            cluster: format!("dns:agiproxy.test:{port}"),
            dns_server: dns.addr().to_string(),
            _dns: dns,
            _dirs: dirs,
            _replicas: replicas,
        }
    }

    /// Replica `i`'s control API.
    fn api(&self, i: usize) -> String {
        format!("http://{}:{}", self.ips[i], self.port)
    }

    /// Replica `i`'s Asterisk listener.
    fn listener(&self, i: usize) -> SocketAddr {
        status(&self.api(i)).unwrap()["listeners"][0]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Stops replica `i` and starts it again on its file, as a pod's
    /// container restarts; returns how long it took to answer.
    fn restart(&mut self, i: usize) -> Duration {
        let old = &mut self._replicas[i];
        let _ = old.kill();
        let _ = old.wait();
        let started = Instant::now();
        self._replicas[i] = start(&self._dirs[i].path());
        assert_eq!(wait_generation(&self.api(i), 1, Duration::from_secs(10)), 1);
        started.elapsed()
    }

    /// `agiproxy ctl --cluster ... ARGS`.
    fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["--cluster", &self.cluster, "--dns-server", &self.dns_server];
        all.extend_from_slice(args);
        ctl(&all)
    }

    /// [`Cluster::ctl`]'s exit code and stdout.
    fn ctl_text(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = self.ctl(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), stdout)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_cluster_applies_to_every_replica_and_reports_refusals() {
    let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    // The third replica takes small request bodies only: it will refuse a big config.
    let c = Cluster::start(|i, control| {
        let limit = if i == 2 {
            "\n  max_body_bytes: 1024"
        } else {
            ""
        };
        config(&format!("{control}{limit}"), "a", a.addr(), b.addr())
    })
    .await;
    let (ips, port) = (c.ips, c.port);
    let mut c = c;
    // The control block is per replica; the applied config must keep each
    // one's own, so apply a config without the control block (defaults),
    // which the replicas all accept: control changes need a restart anyway.
    let files = tempfile::Builder::new()
        .prefix("agiproxy-cluster-")
        .tempdir()
        .unwrap();
    let new = files.path().join(format!("agiproxy-cluster-{port}.yaml"));
    std::fs::write(
        &new,
        config("  enabled: true", "b", a.addr(), b.addr())
            .replace("control:\n  enabled: true\n", ""),
    )
    .unwrap();
    let out = c.ctl(&["config", "apply", "-f", new.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("converged: all 3 replicas"), "{stdout}");
    for ip in ips {
        assert_eq!(
            status(&format!("http://{ip}:{port}")).unwrap()["generation"],
            2
        );
    }

    // A config over the third replica's body limit: it refuses (413); ctl
    // says so, reports that the replicas did not converge, and fails.
    let padded = format!(
        "{}# {}\n",
        std::fs::read_to_string(&new)
            .unwrap()
            .replace("pool: b", "pool: a"),
        "x".repeat(2000)
    );
    std::fs::write(&new, padded).unwrap();
    let out = c.ctl(&[
        "--output",
        "json",
        "config",
        "apply",
        "-f",
        new.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let refused: Vec<&str> = doc["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == false)
        .map(|r| r["replica"].as_str().unwrap())
        .collect();
    assert_eq!(refused, vec![format!("http://127.0.0.3:{port}")], "{doc}");
    assert_eq!(doc["replicas"][2]["status"], 413);
    assert_eq!(doc["converged"], false);
    // The two that took it run it; the third kept the config it had.
    for (ip, generation) in ips.iter().zip([3, 3, 2]) {
        assert_eq!(
            status(&format!("http://{ip}:{port}")).unwrap()["generation"],
            generation,
            "{ip}"
        );
    }

    // Draining the whole cluster takes an explicit --all-replicas: without
    // it ctl refuses, and every replica stays ready.
    let drain = |all: bool| {
        let mut a = vec!["drain-replica"];
        if all {
            a.push("--all-replicas");
        }
        c.ctl(&a)
    };
    let out = drain(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("would drain all 3 replicas at once"),
        "{stderr}"
    );
    for ip in ips {
        assert_eq!(
            status(&format!("http://{ip}:{port}")).unwrap()["draining"],
            false
        );
    }
    let out = drain(true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, ip) in ips.iter().enumerate() {
        // Draining, or already drained and gone (no sessions to wait for):
        // gone means exited with 0, not crashed.
        match status(&format!("http://{ip}:{port}")) {
            Some(s) => assert_eq!(s["draining"], true, "{s}"),
            None => {
                let exit = c._replicas[i].wait().unwrap();
                assert!(exit.success(), "{ip}: {exit:?}");
            }
        }
    }
    drop(c);
}

/// After `ctl rollout ACTION`, replicas converge when their rollouts agree:
/// on bare metal each replica's file has its own control address, so the
/// config hashes never match, and every action ended `NOT CONVERGED` with
/// exit 1 although all three took it, as a refusal does (audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_rollout_actions_converge_on_the_rollout_when_the_configs_differ() {
    let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let now = now_ms();
    let start = agiproxy_config::format_ms(now - 60_000);
    let text = |control: &str, key: &str| {
        config(control, "a", a.addr(), b.addr()).replace(
            "  - name: all\n    pool: a\n",
            &format!("  - name: ivr\n    split_key: {key}\n    rollout:\n      from: a\n      to: b\n      steps: [10, 50]\n      step_duration: 1h\n      start: \"{start}\"\n"),
        )
    };
    let c = Cluster::start(|_, control| text(control, "agi_uniqueid")).await;
    let (code, stdout) = c.ctl_text(&["rollout", "pause", "ivr"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("converged: all 3 replicas run rollout ivr ")
            && stdout.contains("overrides: pause in force from ")
            && stdout.contains("their config texts differ otherwise"),
        "{stdout}"
    );
    // Their texts differ (each its own control block): status says so.
    let (code, stdout) = c.ctl_text(&["status"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("configs: 3 different among the 3 of 3 replicas that answered"),
        "{stdout}"
    );
    // Refused by all three (no such route): their errors, no convergence.
    let (code, stdout) = c.ctl_text(&["rollout", "pause", "nope"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert_eq!(stdout.matches("ERROR (404)").count(), 3, "{stdout}");
    assert!(!stdout.contains("CONVERGED"), "{stdout}");
    let out = c.ctl(&["--output", "json", "rollout", "resume", "ivr"]);
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["converged"], true, "{doc}");
    let states: Vec<&str> = doc["rollouts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rollout"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 3, "{doc}");
    assert!(states.iter().all(|s| *s == states[0]), "{doc}");
    assert!(states[0].contains(", resume in force from "), "{doc}");
    // Without DNS, `--url` again and again names the replicas: one time
    // for all of them, and convergence checked (walkthrough: only one
    // `--url` was taken, and an action per replica wrote a time each).
    let urls: Vec<String> = (0..3).map(|i| c.api(i)).collect();
    let out = ctl(&[
        "--url", &urls[0], "--url", &urls[1], "--url", &urls[2], "rollout", "pause", "ivr",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("converged: all 3 replicas run rollout ivr "),
        "{stdout}"
    );
    // One config among those that answered is no difference.
    let out = ctl(&["--url", &urls[0], "--url", "http://127.0.0.1:1", "status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("configs: the 1 of 2 replicas that answered run ")
            && stdout.contains("; 1 did not answer"),
        "{stdout}"
    );
    // Its own file sent whole through the API (`ctl config apply`) drops
    // the overrides written through `ctl rollout`, where a reload from the
    // file keeps them: taken, but said on stderr, naming each (before,
    // nothing said that a rollback had just been undone).
    let own = tempfile::NamedTempFile::new().unwrap();
    let control0 = format!(
        "  address: \"{}:{}\"\n  token_env: AGIPROXY_TOKEN",
        c.ips[0], c.port
    );
    std::fs::write(own.path(), text(&control0, "agi_uniqueid")).unwrap();
    let file = own.path().to_str().unwrap();
    let api0 = c.api(0);
    // A dry run in JSON (what scripts read) first, then the change.
    for (dry, json) in [(true, true), (true, false), (false, false)] {
        let mut args = vec!["--url", &api0];
        if json {
            args.extend(["--output", "json"]);
        }
        args.extend(["config", "apply", "-f", file]);
        if dry {
            args.push("--dry-run");
        }
        let out = ctl(&args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
        let said = if dry { "would drop" } else { "dropped" };
        let printed = match (dry, json) {
            (_, true) => "{",
            (true, false) => "valid (dry run",
            (false, false) => "applied: ",
        };
        assert!(stdout.starts_with(printed), "{stdout}");
        for action in ["pause", "resume"] {
            assert!(
                stderr.lines().any(|l| l.starts_with("warning: ")
                    && l.contains(&format!("{}:{}: this config {said} ", c.ips[0], c.port))
                    && l.contains(&format!("(route ivr: {{ action: {action}, at: \""))),
                "{action}: {stderr}"
            );
        }
    }
    let st = status(&api0).unwrap();
    assert_eq!(st["source"], "api", "{st}");
    assert!(st.get("rollouts_differ").is_none(), "{st}");
    // One replica stopped: it does not answer, and that is no convergence.
    let mut c = c;
    drop(c._replicas.remove(0));
    let (code, stdout) = c.ctl_text(&["rollout", "pause", "ivr"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("NOT CONVERGED (rollout ivr):") && stdout.contains("  (no answer: "),
        "{stdout}"
    );
    drop(c);

    // One replica has no such rollout: its 404 is said as such, not as
    // "(no answer)" (walkthrough: a replica that answered looked down).
    let c = Cluster::start(|i, control| {
        if i == 1 {
            config(control, "a", a.addr(), b.addr())
        } else {
            text(control, "agi_uniqueid")
        }
    })
    .await;
    let (code, stdout) = c.ctl_text(&["rollout", "pause", "ivr"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("NOT CONVERGED (rollout ivr):")
            && stdout.contains("  (HTTP 404: no rollout on route \"ivr\"")
            && !stdout.contains("(no answer"),
        "{stdout}"
    );
    drop(c);

    // The same rollout split by another key on one replica (a refused
    // split_key change comes back when a replica restarts with its file):
    // the same call gets another colour there, so that is no convergence.
    let c = Cluster::start(|i, control| {
        text(control, if i == 1 { "agi_arg_1" } else { "agi_uniqueid" })
    })
    .await;
    let (code, stdout) = c.ctl_text(&["rollout", "pause", "ivr"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("NOT CONVERGED (rollout ivr):")
            && stdout.contains("split_key agi_arg_1 overrides: pause")
            && stdout.contains("split_key agi_uniqueid overrides: pause"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_api_changes_last_until_the_file_changes() {
    // With a plain config file, the watcher once reacted to its own reads
    // (and to any event in the directory) and undid API changes within
    // 250 ms. An API change must last until the file's content changes.
    let p = PlainFile::start("agiproxy-plain-").await;
    let api = &p.api;
    let change = p.dir.path().join("change.yaml");
    std::fs::write(&change, p.text("b")).unwrap();
    let out = apply(api, &change, None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Status calls read the file; another file in the directory changes.
    for i in 0..10 {
        std::fs::write(p.dir.path().join("unrelated.txt"), format!("{i}")).unwrap();
        let st = status(api).unwrap();
        assert_eq!(
            (st["generation"].as_u64(), st["source"].as_str()),
            (Some(2), Some("api")),
            "{st}"
        );
        assert_eq!(st["differs_from_file"], true);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Editing the file itself is a change: the watcher applies it.
    std::fs::write(&p.file, p.text("a").replace("name: all", "name: all2")).unwrap();
    assert_eq!(wait_generation(api, 3, Duration::from_secs(5)), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_beside_the_config_does_not_hold_back_its_changes() {
    // A log written next to the config (`agiproxy run -c agiproxy.yaml
    // 2>>agiproxy.log`) changes the directory every few milliseconds under
    // traffic. The watcher waited for the directory to be quiet, so an edit
    // of the config was never applied while the log was being written.
    let p = PlainFile::start("agiproxy-busy-").await;
    let (api, file, text) = (&p.api, &p.file, p.text("a"));

    // The log: a line every 20 ms until the test ends (bounded: 30 s).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, log) = (stop.clone(), p.dir.path().join("agiproxy.log"));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(log).unwrap();
            let until = Instant::now() + Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                writeln!(f, "a session").unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // Replaced atomically, as the docs ask, then edited in place.
    let tmp = p.dir.path().join(".agiproxy.yaml.new");
    std::fs::write(&tmp, text.replace("name: all", "name: all2")).unwrap();
    std::fs::rename(&tmp, file).unwrap();
    let replaced = wait_generation(api, 2, Duration::from_secs(5));
    std::fs::write(file, text.replace("name: all", "name: all3")).unwrap();
    let edited = wait_generation(api, 3, Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!((replaced, edited), (2, 3));
}

/// Route `ivr` as replica `api` runs its rollout (`GET /v1/rollouts/ivr`).
fn rollout_view(api: &str) -> serde_json::Value {
    let out = ctl(&["--url", api, "--output", "json", "rollout", "status", "ivr"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    doc["replicas"][0]["body"].clone()
}

/// An override written through `ctl` lives in the replicas' running
/// configs, not in the file: a replica that restarted ran the file's
/// schedule while the others kept a rollback (green got calls again
/// there). It now starts with the overrides of the same rollout that its
/// peers (`judge.peers`) run; a replica whose file declares another
/// rollout takes none; with no peer answering it starts on its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_starts_with_the_rollout_overrides_its_peers_run() {
    let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let now = now_ms();
    let text = |control: &str, start_ms: i64| {
        config(control, "a", a.addr(), b.addr()).replace(
            "  - name: all\n    pool: a\n",
            &format!(
                "  - name: ivr\n    rollout:\n      from: a\n      to: b\n      steps: [50, 100]\n      step_duration: 1h\n      start: \"{}\"\n      judge: {{ interval: 1m, peers: [PEER_LIST] }}\n",
                agiproxy_config::format_ms(start_ms)
            ),
        )
    };
    let start = now - 60_000;
    let mut c = Cluster::start(|_, control| text(control, start)).await;
    let (code, stdout) = c.ctl_text(&["rollout", "pause", "ivr"]);
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout) = c.ctl_text(&["rollout", "rollback", "ivr"]);
    assert_eq!(code, Some(0), "{stdout}");
    let overrides = |c: &Cluster, i: usize| rollout_view(&c.api(i))["overrides"].clone();
    let written = overrides(&c, 0);
    assert_eq!(written.as_array().map(Vec::len), Some(2), "{written}");

    // Restarted on its file, which has no override: it runs the peers' two,
    // and says that the file lacks them. Its own address is in the list
    // and is not asked (it would not answer before the start is over, and
    // hold it for the whole budget).
    let took = c.restart(1);
    assert!(took < Duration::from_secs(3), "{took:?}");
    let view = rollout_view(&c.api(1));
    assert_eq!(view["overrides"], written, "{view}");
    let note = view["differs_from_file"].as_str().unwrap_or("");
    assert!(
        note.contains("rollback") && note.contains("pause"),
        "{view}"
    );
    assert_eq!(overrides(&c, 2), written);
    // Once the rollback is in force, no new call goes to green there (at
    // the file's 50 %, without the peers' overrides, half of them did).
    let deadline = Instant::now() + Duration::from_secs(10);
    while rollout_view(&c.api(1))["state"] != "rolled_back" {
        assert!(Instant::now() < deadline, "{}", rollout_view(&c.api(1)));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Keys carry whole seconds: a call of the second the rollback took
    // effect in was created before it, and keeps the weight of then.
    std::thread::sleep(Duration::from_millis(1100));
    let green_before = b.stats().accepted();
    let to = c.listener(1);
    for n in 0..30 {
        let uid = format!("pbx-{}.{n}", now_ms() / 1000);
        let out = FakeAsterisk::new()
            .header(AgiHeader::realistic("ivr/menu", &[], &uid))
            .run(to)
            .await;
        assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    }
    assert_eq!(b.stats().accepted(), green_before, "calls reached green");
    // A reload of the same file (SIGHUP) keeps them, and finds the text it
    // runs: unchanged, no new generation.
    let api1 = c.api(1);
    let unchanged = || metric(&api1, "agiproxy_config_reloads_total{result=\"unchanged\"}");
    let before = unchanged();
    // SAFETY: kill(2) on our own child.
    assert_eq!(
        unsafe { libc::kill(c._replicas[1].id() as i32, libc::SIGHUP) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while unchanged() == before {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload: {:?}",
            status(&api1)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status(&api1).unwrap()["generation"], 1);
    assert_eq!(status(&api1).unwrap()["differs_from_file"], true);
    assert_eq!(overrides(&c, 1), written);

    // Its file declares another rollout (a new start): nothing is taken.
    let control2 = format!(
        "  address: \"{}:{}\"\n  token_env: AGIPROXY_TOKEN",
        c.ips[2], c.port
    );
    let peers = c.ips.map(|ip| format!("\"{ip}:{}\"", c.port)).join(", ");
    c._dirs[2].update(&text(&control2, now - 30_000).replace("PEER_LIST", &peers));
    c.restart(2);
    assert_eq!(overrides(&c, 2), serde_json::json!([]));

    // A peer that takes the connection and never answers (a listener
    // nobody accepts on) holds a start for the budget (3 s), no longer, and
    // what the others said is still taken.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let control1 = format!(
        "  address: \"{}:{}\"\n  token_env: AGIPROXY_TOKEN",
        c.ips[1], c.port
    );
    let with_hung = format!("{peers}, \"{}\"", hung.local_addr().unwrap());
    c._dirs[1].update(&text(&control1, start).replace("PEER_LIST", &with_hung));
    let took = c.restart(1);
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(overrides(&c, 1), written);
    drop(hung);

    // No peer answers (both stopped): it starts on its file, at once.
    for i in [0, 2] {
        let _ = c._replicas[i].kill();
        let _ = c._replicas[i].wait();
    }
    let took = c.restart(1);
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(overrides(&c, 1), serde_json::json!([]));
}

/// A judged rollback lives in the replicas' memory only: a replica that
/// restarted sent calls to green until its judgement had read a peer (a
/// moment after the start, or up to an eighth of `judge.interval` when the
/// start falls early in a tick). It now knows the rollback before its first
/// call, from its peers' `GET /v1/rollouts` (`source` says `at start`;
/// without it, judgement adopts it just after the start, as `adopted from
/// PEER`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_knows_its_peers_judged_rollback_before_its_first_call() {
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let good = Behaviour::script(&["NOOP"]);
    let green = FakeBackend::start(Behaviour::closing_early_one_in(5, good)).await;
    let now = now_ms();
    let start = agiproxy_config::format_ms(now - 100);
    let mut c = Cluster::start(|_, control| {
        config(control, "a", blue.addr(), green.addr()).replace(
            "  - name: all\n    pool: a\n",
            &format!("  - name: ivr\n    match: {{ script: {{ prefix: ivr/ }} }}\n    rollout:\n      from: a\n      to: b\n      steps: [50, 100]\n      step_duration: 10m\n      start: \"{start}\"\n      judge: {{ interval: 10s, min_sessions: 15, peers: [PEER_LIST] }}\n"),
        )
    })
    .await;
    let addrs: Vec<SocketAddr> = (0..3).map(|i| c.listener(i)).collect();
    // Calls (keyed with their creation time, as Asterisk's are) to every
    // replica, until the first tick (10 s after the start) has judged them.
    let decided = |c: &Cluster, i: usize| rollout_view(&c.api(i))["decision"].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while (0..3).any(|i| decided(&c, i).is_null()) {
        assert!(
            Instant::now() < deadline,
            "no rollback judged: {}",
            rollout_view(&c.api(0))
        );
        for &addr in &addrs {
            n += 1;
            let uid = format!("pbx-{}.{n}", now_ms() / 1000);
            let _ = FakeAsterisk::new()
                .header(AgiHeader::realistic("ivr/menu", &[], &uid))
                .run(addr)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let judged = decided(&c, 0);
    assert!(
        judged["reason"]
            .as_str()
            .unwrap()
            .starts_with("early closes: green"),
        "{judged}"
    );

    let took = c.restart(1);
    let d = decided(&c, 1);
    assert_eq!(d["at_ms"], judged["at_ms"], "{d}");
    let source = d["source"].as_str().unwrap_or("");
    assert!(
        source.starts_with("adopted from 127.0.0.") && source.ends_with(" at start"),
        "{d} (restarted in {took:?})"
    );
    // It takes effect half an interval after its tick, on all alike.
    assert_eq!(
        rollout_view(&c.api(1))["next_step_at"],
        rollout_view(&c.api(0))["next_step_at"]
    );
}

/// `config(control, pool, a, b)` with `n` more routes ahead of `all`, none
/// of which a call to `ivr/main` (no arguments) matches: about 80 bytes
/// each, a regex each; at 30,000, 2.4 MB and a parse of 2 s in a debug
/// build.
fn many_routes(control: &str, pool: &str, a: SocketAddr, b: SocketAddr, n: usize) -> String {
    let mut routes = String::with_capacity(n * 80);
    for i in 0..n {
        routes.push_str(&format!(
            "  - {{ name: r{i}, match: {{ args: {{ \"1\": \"^\\\\w+(?:a|b)+r{i}$\" }} }}, pool: a }}\n"
        ));
    }
    config(control, pool, a, b).replace("routes:\n", &format!("routes:\n{routes}"))
}

/// Replaces `file` with `text` atomically (a temporary file renamed over it).
fn replace(file: &Path, text: &str) {
    let tmp = file.with_extension("yaml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_change_made_while_the_process_starts_is_applied() {
    // The file is read at the top of `run`; the watch was set up only after
    // the parse, the listeners and the control API, its last content the
    // one read at start: a ConfigMap swap meanwhile was never seen
    // (`differs_from_file` false, the old routes served for good).
    let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let port = free_port("127.0.0.1");
    let api = format!("http://127.0.0.1:{port}");
    let control = format!("  address: \"127.0.0.1:{port}\"\n  token_env: AGIPROXY_TOKEN");
    let dir = tempfile::Builder::new()
        .prefix("agiproxy-starting-")
        .tempdir()
        .unwrap();
    let file = dir.path().join("agiproxy.yaml");
    let text = many_routes(&control, "a", a.addr(), b.addr(), 30_000);
    std::fs::write(&file, &text).unwrap();
    let _proxy = start(&file);
    std::thread::sleep(Duration::from_millis(120));
    replace(&file, &text.replace("pool: a\npools:", "pool: b\npools:"));
    // The start (a parse of seconds), then the file as it is now.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&api).is_none() {
        assert!(Instant::now() < deadline, "not started");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Generation 2 (or 1, had the start been slow enough to read the new
    // file): the calls say which config runs.
    wait_generation(&api, 2, Duration::from_secs(10));
    let st = status(&api).unwrap();
    assert_eq!(st["differs_from_file"], false, "{st}");
    call_through(&api).await;
    assert_eq!((a.stats().accepted(), b.stats().accepted()), (0, 1));
}

/// A proxy serving the config `etc/agiproxy.yaml` under a temporary root:
/// pool `a` of two backends, a control API on a free port (generation 1).
struct EtcDir {
    a: FakeBackend,
    b: FakeBackend,
    api: String,
    /// The config's `control:` block.
    control: String,
    root: tempfile::TempDir,
    etc: PathBuf,
    file: PathBuf,
    proxy: Running,
}

impl EtcDir {
    async fn serve(prefix: &str) -> EtcDir {
        let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
        let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
        let port = free_port("127.0.0.1");
        let api = format!("http://127.0.0.1:{port}");
        let control = format!("  address: \"127.0.0.1:{port}\"\n  token_env: AGIPROXY_TOKEN");
        let root = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let file = etc.join("agiproxy.yaml");
        std::fs::write(&file, config(&control, "a", a.addr(), b.addr())).unwrap();
        let proxy = start(&file);
        assert_eq!(wait_generation(&api, 1, Duration::from_secs(10)), 1);
        EtcDir {
            a,
            b,
            api,
            control,
            root,
            etc,
            file,
            proxy,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_the_watch_follows_its_directory_removed_and_put_back() {
    // inotify follows the directory's inode: after `rm -rf etc && mv
    // etc.new etc` the watch was on a removed directory, and no later edit
    // was seen (no WARN, no metric).
    let EtcDir {
        a,
        b,
        api,
        control,
        root,
        etc,
        file,
        proxy: _proxy,
    } = EtcDir::serve("agiproxy-etc-").await;
    let text = |pool: &str, route: &str| {
        config(&control, pool, a.addr(), b.addr()).replace("name: all", route)
    };

    let new = root.path().join("etc.new");
    std::fs::create_dir(&new).unwrap();
    std::fs::write(new.join("agiproxy.yaml"), text("b", "name: all")).unwrap();
    std::fs::remove_dir_all(&etc).unwrap();
    std::fs::rename(&new, &etc).unwrap();
    assert_eq!(wait_generation(&api, 2, Duration::from_secs(5)), 2);
    // Later edits, in place and by rename, are seen at once.
    std::fs::write(&file, text("a", "name: all2")).unwrap();
    assert_eq!(wait_generation(&api, 3, Duration::from_secs(5)), 3);
    replace(&file, &text("b", "name: all3"));
    assert_eq!(wait_generation(&api, 4, Duration::from_secs(5)), 4);
    // Said and counted.
    assert_eq!(
        metric(
            &api,
            "agiproxy_config_watch_losses_total{reason=\"directory\"}"
        ),
        1
    );
    assert_eq!(metric(&api, "agiproxy_config_watch_up"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_relative_config_path_is_watched() {
    // `-c agiproxy.yaml` and `-c etc/agiproxy.yaml`: notify reports events
    // with absolute paths, so a relative directory removed or replaced was
    // never recognised in them, and edits after it waited for the 30 s look
    // (review).
    let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    for relative in ["agiproxy.yaml", "etc/agiproxy.yaml"] {
        let port = free_port("127.0.0.1");
        let api = format!("http://127.0.0.1:{port}");
        let control = format!("  address: \"127.0.0.1:{port}\"\n  token_env: AGIPROXY_TOKEN");
        let root = tempfile::Builder::new()
            .prefix("agiproxy-relative-")
            .tempdir()
            .unwrap();
        let file = root.path().join(relative);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, config(&control, "a", a.addr(), b.addr())).unwrap();
        let _proxy = Running::spawn(
            Command::new(env!("CARGO_BIN_EXE_agiproxy"))
                .args(["run", "--log-level", "warn", "-c", relative])
                .current_dir(root.path())
                .env("AGIPROXY_TOKEN", TOKEN)
                .stdout(Stdio::null()),
        );
        assert_eq!(wait_generation(&api, 1, Duration::from_secs(10)), 1);
        // In place, then by rename: each seen well before the look.
        std::fs::write(&file, config(&control, "b", a.addr(), b.addr())).unwrap();
        assert_eq!(
            wait_generation(&api, 2, Duration::from_secs(5)),
            2,
            "{relative}: an edit in place"
        );
        replace(&file, &config(&control, "a", a.addr(), b.addr()));
        assert_eq!(
            wait_generation(&api, 3, Duration::from_secs(5)),
            3,
            "{relative}: a rename over it"
        );
        assert_eq!(metric(&api, "agiproxy_config_watch_up"), 1, "{relative}");
        let Some(etc) = Some(file.parent().unwrap()).filter(|d| *d != root.path()) else {
            continue;
        };
        // The directory replaced (`rm -rf etc && mv etc.new etc`), then
        // edited in place.
        let new = root.path().join("etc.new");
        std::fs::create_dir(&new).unwrap();
        std::fs::write(
            new.join("agiproxy.yaml"),
            config(&control, "b", a.addr(), b.addr()),
        )
        .unwrap();
        std::fs::remove_dir_all(etc).unwrap();
        std::fs::rename(&new, etc).unwrap();
        assert_eq!(wait_generation(&api, 4, Duration::from_secs(5)), 4);
        std::fs::write(&file, config(&control, "a", a.addr(), b.addr())).unwrap();
        assert_eq!(
            wait_generation(&api, 5, Duration::from_secs(5)),
            5,
            "{relative}: an edit once the directory was replaced"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_directory_missing_for_a_while_is_watched_when_it_is_back() {
    // The directory removed, and made again only later (a deploy tool that
    // deletes, then copies): the watch is off meanwhile (said, counted,
    // `config_watch_up` 0), is tried again with a backoff, and the file
    // written into the new directory is applied without waiting for the
    // 30 s look; later edits are seen at once.
    let EtcDir {
        a,
        b,
        api,
        control,
        root: _root,
        etc,
        file,
        proxy: _proxy,
    } = EtcDir::serve("agiproxy-gone-").await;

    std::fs::remove_dir_all(&etc).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&api, "agiproxy_config_watch_up") != 0 {
        assert!(Instant::now() < deadline, "the lost watch was not said");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Missing for a few retries (1 s, then 2 s, ...).
    std::thread::sleep(Duration::from_millis(2500));
    let st = status(&api).unwrap();
    assert_eq!(st["generation"].as_u64(), Some(1), "{st}");
    std::fs::create_dir(&etc).unwrap();
    std::fs::write(&file, config(&control, "b", a.addr(), b.addr())).unwrap();
    assert_eq!(wait_generation(&api, 2, Duration::from_secs(10)), 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&api, "agiproxy_config_watch_up") != 1 {
        assert!(Instant::now() < deadline, "the watch did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&file, config(&control, "a", a.addr(), b.addr())).unwrap();
    assert_eq!(wait_generation(&api, 3, Duration::from_secs(5)), 3);
    assert!(
        metric(
            &api,
            "agiproxy_config_watch_losses_total{reason=\"directory\"}"
        ) >= 1
    );
    call_through(&api).await;
    assert_eq!((a.stats().accepted(), b.stats().accepted()), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_file_moved_away_and_back_unchanged_keeps_an_api_change() {
    // A failed read (the file moved away for a moment) forgot the file's
    // content: the same file back counted as a change and was applied,
    // undoing `ctl config apply`.
    let p = PlainFile::start("agiproxy-away-").await;
    let api = &p.api;
    let files = tempfile::Builder::new()
        .prefix("agiproxy-hold-")
        .tempdir()
        .unwrap();
    let change = files.path().join("change.yaml");
    std::fs::write(&change, p.text("b")).unwrap();
    let out = apply(api, &change, None);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let hold = files.path().join("hold.yaml");
    std::fs::rename(&p.file, &hold).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(api, "agiproxy_config_reloads_total{result=\"error\"}") < 1 {
        assert!(Instant::now() < deadline, "the missing file was not seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::rename(&hold, &p.file).unwrap();
    // Read again (the rename is an event), found unchanged.
    std::thread::sleep(Duration::from_millis(1000));
    let st = status(api).unwrap();
    assert_eq!(
        (st["generation"].as_u64(), st["source"].as_str()),
        (Some(2), Some("api")),
        "{st}"
    );
    call_through(api).await;
    assert_eq!((p.a.stats().accepted(), p.b.stats().accepted()), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_watch_that_cannot_be_set_up_does_not_end_a_serving_proxy() {
    // inotify exhausted (fs.inotify.max_user_instances), seen here as too
    // few descriptors: the watch failed after the listeners accepted calls,
    // and the process exited 1 (its calls closed: SUCCESS to Asterisk).
    use std::os::unix::process::CommandExt;
    let a = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let (dir, file) = common::config_file(
        "fds",
        "agiproxy.yaml",
        &config(
            "  address: \"127.0.0.1:0\"\n  token_env: AGIPROXY_TOKEN",
            "a",
            a.addr(),
            a.addr(),
        ),
    );
    let mut off = None;
    for limit in 8..64u64 {
        let log = dir.path().join(format!("run-{limit}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agiproxy"));
        cmd.args(["run", "--log-level", "info", "-c"])
            .arg(&file)
            .env("AGIPROXY_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // SAFETY: setrlimit(2) only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut proxy = Running::spawn(&mut cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        let (exited, text) = loop {
            let exited = proxy.try_wait().unwrap();
            let text = std::fs::read_to_string(&log).unwrap();
            let settled =
                text.contains("watching the config file") || text.contains("file watch off");
            if exited.is_some() || Instant::now() > deadline {
                break (exited, text);
            }
            if settled {
                // Still running a moment after.
                std::thread::sleep(Duration::from_millis(300));
                let exited = proxy.try_wait().unwrap();
                break (exited, std::fs::read_to_string(&log).unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(status) = exited {
            assert!(
                !text.contains("listening for Asterisk"),
                "exited ({status}) after accepting calls with {limit} descriptors:\n{text}"
            );
            continue;
        }
        if text.contains("file watch off") {
            assert!(text.contains("listening for Asterisk"), "{text}");
            off = Some(limit);
        }
        if text.contains("watching the config file") {
            break;
        }
    }
    assert!(
        off.is_some(),
        "no descriptor limit left the proxy serving without a watch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_reload_on_sighup_does_not_hold_back_a_stop() {
    // SIGHUP's reload ran inside the signal loop: while it parsed (or
    // waited for its turn), SIGTERM was not acted on and the listeners kept
    // accepting calls, seconds late.
    let p = PlainFile::start("agiproxy-hup-").await;
    let listener: SocketAddr = status(&p.api).unwrap()["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pid = p._proxy.id() as i32;
    replace(
        &p.file,
        &many_routes(&p.control, "b", p.a.addr(), p.b.addr(), 30_000),
    );
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let sent = Instant::now();
    let deadline = sent + Duration::from_secs(30);
    while std::net::TcpStream::connect(listener).is_ok() {
        assert!(Instant::now() < deadline, "never stopped accepting");
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = sent.elapsed();
    assert!(
        took < Duration::from_millis(1000),
        "stopped accepting {took:?} after SIGTERM"
    );
}
