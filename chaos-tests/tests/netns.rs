//! Faults made by the kernel, on test hosts in network namespaces.
//!
//! Topology (all of it created here, deleted on drop; the root namespace
//! is never touched):
//!
//! ```text
//!  clients ns 198.51.100.2 ── 198.51.100.1  proxy ns  192.0.2.(4i+1) ── 192.0.2.(4i+2) backend ns i
//! ```
//!
//! The proxy is the real binary (`agiproxy run -c FILE` under `ip netns
//! exec`), so its descriptors and RSS are its own; the FakeAsterisk clients
//! and FakeBackends are tasks of runtimes whose threads live in their
//! namespaces. Each scenario asserts every call's AGISTATUS (as Asterisk
//! computes it) and the proxy's metrics, and prints one row of the table in
//! docs/reliability.md. `CHAOS_FULL=1` runs the full sizes (1,000 calls).
//!
//! Needs root, `ip`, `iptables` and `tc` (`.ci/run` installs them); without
//! them each test prints why and passes.

#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chaos_tests::delay::{DelayRelay, Toxics};
use chaos_tests::netns::{self, Netns};
use chaos_tests::{
    AgiHeader, AgiStatus, Behaviour, CallOutcome, FakeAsterisk, FakeBackend, FakeDns, Step,
};
use tokio::runtime::Runtime;

const PROXY_IP: &str = "198.51.100.1";
const CLIENT_IP: &str = "198.51.100.2";
const PORT: u16 = 4573;
const CONTROL: &str = "127.0.0.1:9090";
const TOKEN: &str = "netns-chaos-token";
/// The proxy's deadlines in these scenarios (the config below).
const BUDGET: Duration = Duration::from_millis(1500);
const NEXT_COMMAND: Duration = Duration::from_secs(3);
const FIRST_COMMAND: Duration = Duration::from_secs(3);
/// How long each backend session pauses between its commands: long enough
/// for a fault to land mid-session.
const HOLD: Duration = Duration::from_millis(800);
/// Slack on every time bound, for a loaded 2-core CI machine.
const SLACK: Duration = Duration::from_secs(4);

/// Namespace scenarios one at a time: each starts a proxy and many calls,
/// and time bounds are asserted.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn full() -> bool {
    std::env::var_os("CHAOS_FULL").is_some()
}

/// The proxy binary: `AGIPROXY_BIN`, or the one cargo built next to this
/// test (`cargo test --workspace` builds it; for this target alone, run
/// `cargo build -p agiproxy` first).
fn proxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AGIPROXY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("agiproxy"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p agiproxy` first (or set AGIPROXY_BIN)",
        bin.display()
    );
    bin
}

/// Skips (with the reason printed) where namespaces cannot be made.
fn skip_reason() -> Option<String> {
    let reason = netns::unsupported();
    if let Some(r) = &reason {
        eprintln!("SKIPPED: namespace scenarios need root and iproute2/iptables: {r}");
    }
    reason
}

/// Why the kernel refuses `fault` here (a module or match missing), tried
/// on two scratch namespaces; `None` when it works.
fn kernel_refuses(fault: Fault) -> Option<String> {
    let try_it = || -> std::io::Result<()> {
        let a = Netns::create("probea")?;
        let b = Netns::create("probeb")?;
        a.link("p0", "192.0.2.253/30", &b, "eth0", "192.0.2.254/30")?;
        let ipt = |args: &[&str]| b.exec("iptables", args).map(drop);
        match fault {
            Fault::SynDrop => ipt(&["-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP"]),
            Fault::RstOnConnect => ipt(&[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--syn",
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ]),
            Fault::Blackhole => ipt(&["-A", "OUTPUT", "-p", "tcp", "-j", "DROP"]),
            Fault::Loss(_) => ipt(&[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.2",
                "-j",
                "DROP",
            ]),
            Fault::Bandwidth(_) => b
                .exec(
                    "tc",
                    &[
                        "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "16kbit", "burst",
                        "1600", "latency", "5s",
                    ],
                )
                .map(drop),
            Fault::LinkDown => a.ip(&["link", "set", "p0", "down"]).map(drop),
            Fault::AddressMoved => {
                let c = Netns::create("probec")?;
                b.ip(&["link", "set", "eth0", "netns", c.name()]).map(drop)
            }
            Fault::Vanish => a.ip(&["link", "del", "p0"]).map(drop),
            Fault::Delay => Ok(()),
        }
    };
    try_it().err().map(|e| e.to_string())
}

/// One backend host.
struct Host {
    ns: Netns,
    /// Keeps the host's sockets served.
    _rt: Runtime,
    /// The proxy's end of the link (in the proxy namespace).
    link: String,
    ip: IpAddr,
    backend: Option<FakeBackend>,
    /// The delay relay in front of the backend, when the scenario has one.
    relay: Option<DelayRelay>,
}

impl Host {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, PORT)
    }

    /// iptables in this host's namespace.
    fn iptables(&self, args: &[&str]) {
        self.ns
            .exec("iptables", args)
            .unwrap_or_else(|e| panic!("iptables {args:?}: {e}"));
    }

    fn clear_faults(&self) {
        self.iptables(&["-F", "INPUT"]);
        self.iptables(&["-F", "OUTPUT"]);
        let _ = self.ns.exec("tc", &["qdisc", "del", "dev", "eth0", "root"]);
    }
}

/// The kernel faults of the issue, per backend host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SYNs dropped: a black-holed host.
    SynDrop,
    /// Connects answered with RST.
    RstOnConnect,
    /// Everything dropped, established traffic too, both directions.
    Blackhole,
    /// A share of packets dropped both ways (per cent).
    Loss(u8),
    /// `tc tbf` on the host's egress, kbit/s.
    Bandwidth(u32),
    /// The proxy's end of the link set down.
    LinkDown,
    /// The host's link and address moved to a new namespace (a pod
    /// rescheduled): its old sockets are gone, a new backend answers.
    AddressMoved,
    /// The userspace delay relay: latency, jitter, 1-byte writes, slow close.
    Delay,
    /// The host vanishes: its link deleted (no FIN, no RST ever comes).
    Vanish,
}

impl Fault {
    fn label(self) -> String {
        match self {
            Fault::SynDrop => "SYN drop".into(),
            Fault::RstOnConnect => "RST on connect".into(),
            Fault::Blackhole => "black hole (both ways)".into(),
            Fault::Loss(p) => format!("{p} % packet loss"),
            Fault::Bandwidth(k) => format!("tbf {k} kbit/s"),
            Fault::LinkDown => "link down".into(),
            Fault::AddressMoved => "address moved".into(),
            Fault::Delay => "delay relay 80±40 ms, 1-byte writes, slow close".into(),
            Fault::Vanish => "host vanishes (link deleted)".into(),
        }
    }
}

struct Lab {
    proxy_ns: Netns,
    proxy_rt: Runtime,
    _client_ns: Netns,
    client_rt: Runtime,
    hosts: Vec<Host>,
    /// Namespaces a moved address went to (kept alive for the test).
    spare: Vec<Host>,
    proxy: Option<Child>,
    /// The proxy's config, token and log; removed after `drop` has ended
    /// the proxy.
    dir: tempfile::TempDir,
    dns: Option<FakeDns>,
    /// More top-level config, written after `timeouts:`.
    extra: String,
}

fn script(host: usize) -> Behaviour {
    Behaviour::steps(vec![
        Step::Command(format!("SET VARIABLE BACKEND b{host}")),
        Step::Sleep(HOLD),
        Step::Command("STREAM FILE tt-monkeys \"\"".into()),
        Step::Sleep(HOLD),
        Step::Command("SET VARIABLE DONE 1".into()),
    ])
}

impl Lab {
    /// `delay`: host 0's backend sits behind a delay relay (toxics off).
    fn new(name: &str, backends: usize, delay: bool) -> Lab {
        let proxy_ns = Netns::create("proxy").expect("proxy namespace");
        let client_ns = Netns::create("clients").expect("client namespace");
        proxy_ns
            .link(
                "c0",
                &format!("{PROXY_IP}/24"),
                &client_ns,
                "eth0",
                &format!("{CLIENT_IP}/24"),
            )
            .expect("client link");
        let proxy_rt = proxy_ns.runtime(1).expect("proxy-side runtime");
        let client_rt = client_ns.runtime(2).expect("client runtime");
        let dir = tempfile::Builder::new()
            .prefix(&format!("agx-{name}-"))
            .tempdir()
            .expect("scenario dir");
        let mut lab = Lab {
            proxy_ns,
            proxy_rt,
            _client_ns: client_ns,
            client_rt,
            hosts: Vec::new(),
            spare: Vec::new(),
            proxy: None,
            dir,
            dns: None,
            extra: String::new(),
        };
        for i in 0..backends {
            let host = lab.host(i, Some(script(i)), delay && i == 0);
            lab.hosts.push(host);
        }
        lab
    }

    /// Backend host `i`, linked to the proxy, with a FakeBackend on it.
    fn host(&self, i: usize, behaviour: Option<Behaviour>, delay: bool) -> Host {
        let ns = Netns::create(&format!("b{i}")).expect("backend namespace");
        let link = format!("b{i}");
        let base = 4 * i as u8;
        self.proxy_ns
            .link(
                &link,
                &format!("192.0.2.{}/30", base + 1),
                &ns,
                "eth0",
                &format!("192.0.2.{}/30", base + 2),
            )
            .expect("backend link");
        let rt = ns.runtime(1).expect("backend runtime");
        let ip: IpAddr = format!("192.0.2.{}", base + 2).parse().expect("ip");
        let public = SocketAddr::new(ip, PORT);
        let (backend, relay) = if delay {
            // The backend on the host's loopback, the relay on its address.
            let inner: SocketAddr = ([127, 0, 0, 1], PORT).into();
            let b = behaviour.map(|b| start_backend(&rt, inner, b, i));
            let relay = rt
                .block_on(rt.spawn(DelayRelay::start(public, inner, Toxics::default())))
                .expect("relay task")
                .expect("relay binds");
            (b, Some(relay))
        } else {
            (behaviour.map(|b| start_backend(&rt, public, b, i)), None)
        };
        Host {
            ns,
            _rt: rt,
            link,
            ip,
            backend,
            relay,
        }
    }

    fn start_proxy(&mut self, pool: &str, passive: &str) {
        let dns = self
            .dns
            .as_ref()
            .map(|d| {
                format!(
                    "dns: {{ nameservers: [\"{}\"], min_ttl: 200ms, max_ttl: 1s, timeout: 500ms }}\n",
                    d.addr()
                )
            })
            .unwrap_or_default();
        let token = self.dir.path().join("token");
        std::fs::write(&token, TOKEN).expect("token file");
        let config = format!(
            "version: 1\n\
             listeners:\n  - {{ name: asterisk, address: \"{PROXY_IP}:{PORT}\" }}\n\
             {dns}timeouts: {{ header: 5s, budget: 1500ms, connect: 250ms, first_command: 3s, next_command: 3s, drain: 2s }}\n\
             {extra}\
             routes:\n  - {{ name: all, pool: p }}\n\
             pools:\n  - name: p\n    balance: round_robin\n{passive}    backends:\n{pool}\
             control:\n  address: \"{CONTROL}\"\n  token_file: {}\n",
            token.display(),
            extra = self.extra,
        );
        let file = self.dir.path().join("agiproxy.yaml");
        std::fs::write(&file, &config).expect("config file");
        let log = std::fs::File::create(self.dir.path().join("proxy.log")).expect("log file");
        let child = self
            .proxy_ns
            .command(proxy_bin().to_str().expect("utf-8 path"))
            .args(["run", "-c"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the proxy");
        self.proxy = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .scrape("/readyz")
            .is_none_or(|r| !r.starts_with("HTTP/1.1 200"))
        {
            assert!(
                Instant::now() < deadline,
                "proxy not ready within 30 s; log: {}\nconfig:\n{config}",
                std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn static_pool(&self) -> String {
        self.hosts
            .iter()
            .map(|h| format!("      - {{ address: \"{}\" }}\n", h.addr()))
            .collect()
    }

    fn pid(&self) -> u32 {
        self.proxy.as_ref().expect("proxy started").id()
    }

    /// An HTTP GET to the control API, from inside the proxy namespace.
    fn scrape(&self, path: &str) -> Option<String> {
        let path = path.to_string();
        let fut = async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(CONTROL),
            )
            .await
            .ok()?
            .ok()?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.ok()?;
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
                .await
                .ok()?
                .ok()?;
            Some(out)
        };
        self.proxy_rt
            .block_on(self.proxy_rt.spawn(fut))
            .ok()
            .flatten()
    }

    /// Sum of a metric's samples whose labels contain `filter`.
    fn metric(&self, name: &str, filter: &str) -> f64 {
        let text = self.scrape("/metrics").unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter(|l| l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The proxy's open descriptors and resident memory (KiB).
    fn resources(&self) -> (usize, u64) {
        let pid = self.pid();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        (fds, rss)
    }

    /// Starts `n` calls, at most `concurrency` at once, each `spacing`
    /// after the previous one; returns at once.
    fn calls(
        &self,
        n: usize,
        concurrency: usize,
        spacing: Duration,
    ) -> tokio::task::JoinHandle<Vec<Call>> {
        static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let first = NEXT_ID.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let target = SocketAddr::new(PROXY_IP.parse().expect("ip"), PORT);
        self.client_rt.spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let mut tasks = Vec::with_capacity(n);
            for i in first..first + n {
                let permit = sem.clone().acquire_owned().await.expect("semaphore");
                let uid = format!("17.{i}");
                let caller = FakeAsterisk::new()
                    .header(AgiHeader::realistic("ivr/main", &["a1"], &uid))
                    .connect_timeout(Duration::from_secs(5))
                    .call_timeout(Duration::from_secs(30));
                tasks.push(tokio::spawn(async move {
                    let out = caller.run(target).await;
                    drop(permit);
                    Call { uid, out }
                }));
                tokio::time::sleep(spacing).await;
            }
            let mut outs = Vec::with_capacity(n);
            for t in tasks {
                outs.push(t.await.expect("call task"));
            }
            outs
        })
    }

    fn wait(&self, calls: tokio::task::JoinHandle<Vec<Call>>) -> Vec<Call> {
        self.client_rt.block_on(calls).expect("calls")
    }

    /// Which host received each call's header (by `agi_uniqueid`).
    fn hosts_by_call(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        for h in self.hosts.iter().chain(&self.spare) {
            let Some(b) = &h.backend else { continue };
            for raw in b.stats().headers() {
                let uid =
                    AgiHeader::parse(&raw).and_then(|x| x.get("agi_uniqueid").map(str::to_string));
                if let Some(uid) = uid {
                    map.insert(uid, b.name().to_string());
                }
            }
        }
        map
    }

    /// Switches `fault` on for host `i`.
    fn fault_on(&mut self, i: usize, fault: Fault) {
        let h = &self.hosts[i];
        let port = PORT.to_string();
        match fault {
            Fault::SynDrop => h.iptables(&[
                "-A", "INPUT", "-p", "tcp", "--syn", "--dport", &port, "-j", "DROP",
            ]),
            Fault::RstOnConnect => h.iptables(&[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--syn",
                "--dport",
                &port,
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ]),
            Fault::Blackhole => {
                h.iptables(&["-A", "INPUT", "-p", "tcp", "-j", "DROP"]);
                h.iptables(&["-A", "OUTPUT", "-p", "tcp", "-j", "DROP"]);
            }
            Fault::Loss(p) => {
                let prob = format!("{:.2}", p as f64 / 100.0);
                for chain in ["INPUT", "OUTPUT"] {
                    h.iptables(&[
                        "-A",
                        chain,
                        "-p",
                        "tcp",
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &prob,
                        "-j",
                        "DROP",
                    ]);
                }
            }
            Fault::Bandwidth(kbit) => {
                // Both directions: the host's egress and the proxy's towards it.
                let rate = format!("{kbit}kbit");
                let tbf = |dev: &str| -> Vec<String> {
                    [
                        "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", "1600",
                        "latency", "5s",
                    ]
                    .map(String::from)
                    .to_vec()
                };
                let args = tbf("eth0");
                h.ns.exec("tc", &args.iter().map(String::as_str).collect::<Vec<_>>())
                    .expect("tc tbf");
                let args = tbf(&h.link);
                self.proxy_ns
                    .exec("tc", &args.iter().map(String::as_str).collect::<Vec<_>>())
                    .expect("tc tbf");
            }
            Fault::LinkDown => {
                self.proxy_ns
                    .ip(&["link", "set", &h.link, "down"])
                    .expect("link down");
            }
            Fault::AddressMoved => {
                // The pod is rescheduled: a new namespace takes the link
                // (and so the address), with a new backend on it; the old
                // host keeps its sockets, now cut off.
                let new_ns = Netns::create(&format!("b{i}moved")).expect("namespace");
                let ip = h.ip;
                h.ns.ip(&["link", "set", "eth0", "netns", new_ns.name()])
                    .expect("move link");
                new_ns
                    .ip(&["addr", "add", &format!("{ip}/30"), "dev", "eth0"])
                    .expect("address");
                new_ns.ip(&["link", "set", "eth0", "up"]).expect("up");
                let rt = new_ns.runtime(1).expect("runtime");
                let backend = Some(start_backend(&rt, SocketAddr::new(ip, PORT), script(i), i));
                let link = h.link.clone();
                let old = std::mem::replace(
                    &mut self.hosts[i],
                    Host {
                        ns: new_ns,
                        _rt: rt,
                        link,
                        ip,
                        backend,
                        relay: None,
                    },
                );
                self.spare.push(old);
            }
            Fault::Delay => h.relay.as_ref().expect("host 0 has a relay").set(Toxics {
                latency: Duration::from_millis(80),
                jitter: Duration::from_millis(40),
                slice: Some(Duration::from_micros(300)),
                slow_close: Duration::from_millis(500),
            }),
            Fault::Vanish => {
                self.proxy_ns
                    .ip(&["link", "del", &h.link])
                    .expect("link del");
            }
        }
    }

    /// How often `fault` acted on host `i` so far, where a call's outcome
    /// may not show it (audit: the loss and bandwidth scenarios never
    /// checked that the fault took effect): packets its iptables rules
    /// dropped, or packets tbf held back or dropped (both ways).
    fn bitten(&self, i: usize, fault: Fault) -> u64 {
        let h = &self.hosts[i];
        let text = |out: std::io::Result<std::process::Output>| {
            String::from_utf8_lossy(&out.expect("fault counters").stdout).into_owned()
        };
        // `(dropped D, overlimits O requeues R)` of `tc -s qdisc show`.
        let held = |text: &str| -> u64 {
            ["dropped ", "overlimits "]
                .iter()
                .filter_map(|key| {
                    let at = text.find(key)? + key.len();
                    let n: String = text[at..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    n.parse::<u64>().ok()
                })
                .sum()
        };
        match fault {
            Fault::Loss(_) => ["INPUT", "OUTPUT"]
                .iter()
                .map(|chain| {
                    text(h.ns.exec("iptables", &["-L", chain, "-v", "-x", "-n"]))
                        .lines()
                        .filter(|l| l.contains("DROP"))
                        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                        .sum::<u64>()
                })
                .sum(),
            Fault::Bandwidth(_) => {
                held(&text(
                    h.ns.exec("tc", &["-s", "qdisc", "show", "dev", "eth0"]),
                )) + held(&text(
                    self.proxy_ns
                        .exec("tc", &["-s", "qdisc", "show", "dev", &h.link]),
                ))
            }
            _ => 0,
        }
    }

    fn fault_off(&mut self, i: usize, fault: Fault) {
        match fault {
            Fault::LinkDown => {
                let h = &self.hosts[i];
                self.proxy_ns
                    .ip(&["link", "set", &h.link, "up"])
                    .expect("link up");
                // The backend's end: its address is back once the link is.
                let _ = h.ns.ip(&["link", "set", "eth0", "up"]);
            }
            Fault::Delay => self.hosts[i]
                .relay
                .as_ref()
                .expect("host 0 has a relay")
                .set(Toxics::default()),
            Fault::AddressMoved | Fault::Vanish => {}
            Fault::Bandwidth(_) => {
                self.hosts[i].clear_faults();
                let link = self.hosts[i].link.clone();
                let _ = self
                    .proxy_ns
                    .exec("tc", &["qdisc", "del", "dev", &link, "root"]);
            }
            _ => self.hosts[i].clear_faults(),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.proxy.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_backend(rt: &Runtime, addr: SocketAddr, behaviour: Behaviour, i: usize) -> FakeBackend {
    rt.block_on(rt.spawn(async move {
        FakeBackend::start_on(addr, behaviour)
            .await
            .map(|b| b.with_name(format!("b{i}")))
    }))
    .expect("backend task")
    .expect("backend binds")
}

/// One call: its `agi_uniqueid` and what Asterisk saw.
struct Call {
    uid: String,
    out: CallOutcome,
}

/// What a scenario allows and what it saw.
struct Verdict {
    calls: usize,
    completed: usize,
    failures: usize,
    /// FAILUREs after waiting for a first command past the budget.
    first_command_waits: usize,
    hung: usize,
    worst_failure: Option<Duration>,
    before: (usize, u64),
    after: (usize, u64),
}

/// Before-commit reasons: the proxy found no backend. They are allowed only
/// where no healthy backend existed.
const BEFORE_COMMIT: [&str; 5] = [
    "no_backend",
    "connect_failed",
    "budget_exhausted",
    "pool_full",
    "overloaded",
];

/// What a scenario allows.
struct Expect<'a> {
    /// Hosts whose sessions may fail after commit (the faulted ones).
    faulted: &'a [&'a str],
    /// No healthy backend existed: before-commit FAILUREs are right.
    no_alternative: bool,
    /// Sessions the proxy ran before (the warm-up), already checked.
    warm: usize,
}

/// Checks every call: none hung or lost, no silent SUCCESS, FAILUREs only
/// where allowed and within their deadline; the metrics agree; descriptors
/// and RSS back to the baseline. Prints the scenario's table row.
fn judge(
    lab: &Lab,
    name: &str,
    outs: &[Call],
    n: usize,
    before: (usize, u64),
    x: Expect,
) -> Verdict {
    assert_eq!(outs.len(), n, "{name}: calls lost");
    let mut v = Verdict {
        calls: n,
        completed: 0,
        failures: 0,
        first_command_waits: 0,
        hung: 0,
        worst_failure: None,
        before,
        after: (0, 0),
    };
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let hosts = lab.hosts_by_call();
    for (i, Call { uid, out: o }) in outs.iter().enumerate() {
        let var = |k: &str| o.variables.get(k).map(String::as_str);
        assert!(
            o.violations.is_empty(),
            "{name}: call {i}: {:?}",
            o.violations
        );
        match o.status {
            AgiStatus::Success => {
                assert_eq!(
                    var("DONE"),
                    Some("1"),
                    "{name}: call {i} ended in a silent SUCCESS: {o:?}"
                );
                v.completed += 1;
            }
            AgiStatus::Failure => {
                let reason = var("AGIPROXY_ERROR").unwrap_or("none");
                *reasons.entry(reason.to_string()).or_default() += 1;
                assert!(
                    o.connect_error.is_none(),
                    "{name}: the proxy refused a call: {o:?}"
                );
                let waited_first_command = o.elapsed >= FIRST_COMMAND
                    && matches!(reason, "budget_exhausted" | "first_command_timeout");
                if waited_first_command && !x.faulted.is_empty() {
                    // Known gap (docs/reliability.md): a host that goes dark
                    // between connect and first command holds the call for
                    // first_command (3 s), past the budget (1.5 s), so no
                    // other backend is tried. Counted, reported, allowed.
                    v.first_command_waits += 1;
                } else if BEFORE_COMMIT.contains(&reason) {
                    assert!(
                        x.no_alternative,
                        "{name}: call {i} failed before commit ({reason}) with healthy backends left: {o:?}"
                    );
                    assert!(
                        o.elapsed <= BUDGET + SLACK,
                        "{name}: call {i} took {:?}",
                        o.elapsed
                    );
                } else {
                    // After commit: only on a faulted host, by its deadline.
                    let host = hosts.get(uid).map_or("none", String::as_str);
                    assert!(
                        x.faulted.contains(&host),
                        "{name}: call {i} failed ({reason}) on healthy host {host}"
                    );
                    assert!(
                        o.elapsed <= 2 * HOLD + NEXT_COMMAND + SLACK,
                        "{name}: call {i} failed only after {:?}",
                        o.elapsed
                    );
                }
                v.failures += 1;
                v.worst_failure = v.worst_failure.max(Some(o.elapsed));
            }
            AgiStatus::Hung => v.hung += 1,
            AgiStatus::Hangup => panic!("{name}: call {i} saw HANGUP: {o:?}"),
        }
    }
    assert_eq!(v.hung, 0, "{name}: calls hung");
    // The proxy counted every session, and as many FAILUREs as Asterisk saw.
    let expected = n + x.warm;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sessions = lab.metric("agiproxy_sessions_total", "") as usize;
        let active = lab.metric("agiproxy_active_sessions", "");
        if sessions >= expected && active == 0.0 {
            assert_eq!(sessions, expected, "{name}: sessions_total");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: proxy shows {sessions} sessions ended, {active} active, of {expected}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = lab.metric("agiproxy_failures_sent_total", "") as usize;
    assert_eq!(
        sent, v.failures,
        "{name}: failures_sent_total vs FAILUREs seen {reasons:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        v.after = lab.resources();
        if v.after.0 <= v.before.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: proxy holds {} descriptors, {} before",
            v.after.0,
            v.before.0
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        v.after.1 <= v.before.1 + 16 * 1024,
        "{name}: RSS grew from {} to {} KiB",
        v.before.1,
        v.after.1
    );
    println!(
        "ROW | {name} | {} | {} | {} ({} first-command waits) | 0 | {} | {} | {} / {} | {} / {} | {reasons:?}",
        v.calls,
        v.completed,
        v.failures,
        v.first_command_waits,
        v.hung,
        v.worst_failure
            .map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
        v.before.0,
        v.after.0,
        v.before.1,
        v.after.1
    );
    v
}

/// Warms the proxy (one call per backend) and takes its baseline.
fn baseline(lab: &Lab) -> (usize, u64) {
    let n = lab.hosts.len();
    let outs = lab.wait(lab.calls(n, n, Duration::ZERO));
    for c in &outs {
        assert_eq!(c.out.status, AgiStatus::Success, "warm-up: {:?}", c.out);
    }
    std::thread::sleep(Duration::from_millis(300));
    lab.resources()
}

fn tag(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect()
}

/// Calls over a fault on host 0 of three: before commit (on before the
/// calls start, off after) or after commit (on once the sessions are under
/// way, off a few seconds later).
fn fault_scenario(fault: Fault, after_commit: bool) -> Option<Verdict> {
    let _g = serial();
    if skip_reason().is_some() {
        return None;
    }
    let name = format!(
        "{}, {}",
        fault.label(),
        if after_commit {
            "after commit"
        } else {
            "before commit"
        }
    );
    if let Some(why) = kernel_refuses(fault) {
        eprintln!("SKIPPED {name}: the kernel refuses it here: {why}");
        return None;
    }
    let mut lab = Lab::new(
        &tag(&format!("{fault:?}{after_commit}")),
        3,
        fault == Fault::Delay,
    );
    lab.start_proxy(&lab.static_pool(), "");
    let n = if full() { 300 } else { 30 };
    let before = baseline(&lab);
    let mut bitten = 0;
    if !after_commit {
        lab.fault_on(0, fault);
    }
    // Spread over 1.2 s: after commit, the later calls connect while the
    // fault is on.
    let calls = lab.calls(n, n, Duration::from_millis(1200 / n as u64));
    if after_commit {
        // The sessions are in their first pause: fault on, later off.
        std::thread::sleep(HOLD / 2 + Duration::from_millis(200));
        lab.fault_on(0, fault);
        std::thread::sleep(NEXT_COMMAND + HOLD);
        bitten = lab.bitten(0, fault);
        lab.fault_off(0, fault);
    }
    let outs = lab.wait(calls);
    if !after_commit {
        bitten = lab.bitten(0, fault);
        lab.fault_off(0, fault);
    }
    let x = Expect {
        faulted: &["b0"],
        no_alternative: false,
        warm: lab.hosts.len(),
    };
    let v = judge(&lab, &name, &outs, n, before, x);
    // The fault must have bitten, or the scenario proves nothing.
    let attempts = lab.metric("agiproxy_connect_attempts_total", "");
    let connected = lab.metric("agiproxy_connect_attempts_total", "result=\"connected\"");
    match fault {
        Fault::SynDrop | Fault::RstOnConnect => {
            assert!(attempts > connected, "{name}: no connect attempt failed")
        }
        Fault::Blackhole | Fault::LinkDown if !after_commit => {
            assert!(attempts > connected, "{name}: no connect attempt failed")
        }
        Fault::AddressMoved if !after_commit => {
            // The new host took the address: it served calls.
            let b = lab.hosts[0].backend.as_ref().expect("backend");
            assert!(
                b.stats().accepted() > 0,
                "{name}: the moved address served nothing"
            )
        }
        Fault::Blackhole | Fault::LinkDown | Fault::AddressMoved | Fault::Vanish => {
            assert!(v.failures > 0, "{name}: no session was caught by the fault")
        }
        Fault::Delay => {
            let relay = lab.hosts[0].relay.as_ref().expect("relay");
            assert!(
                relay.delayed_chunks() > 0,
                "{name}: the relay delayed nothing"
            )
        }
        Fault::Loss(_) | Fault::Bandwidth(_) => {
            assert!(bitten > 0, "{name}: the fault dropped or held back nothing")
        }
    }
    Some(v)
}

macro_rules! fault_tests {
    ($($name:ident: $fault:expr, $after:expr;)*) => {$(
        #[test]
        fn $name() {
            fault_scenario($fault, $after);
        }
    )*};
}

fault_tests! {
    syn_drop_before_commit: Fault::SynDrop, false;
    syn_drop_after_commit: Fault::SynDrop, true;
    rst_on_connect_before_commit: Fault::RstOnConnect, false;
    rst_on_connect_after_commit: Fault::RstOnConnect, true;
    blackhole_before_commit: Fault::Blackhole, false;
    blackhole_after_commit: Fault::Blackhole, true;
    packet_loss_before_commit: Fault::Loss(20), false;
    packet_loss_after_commit: Fault::Loss(20), true;
    bandwidth_before_commit: Fault::Bandwidth(16), false;
    bandwidth_after_commit: Fault::Bandwidth(16), true;
    link_down_before_commit: Fault::LinkDown, false;
    link_down_after_commit: Fault::LinkDown, true;
    address_moved_before_commit: Fault::AddressMoved, false;
    address_moved_after_commit: Fault::AddressMoved, true;
    delay_relay_before_commit: Fault::Delay, false;
    delay_relay_after_commit: Fault::Delay, true;
    host_vanishes_mid_session: Fault::Vanish, true;
}

/// Half the pool black-holed (both ways) while calls run: the sessions on
/// those hosts fail by their deadline, every other call completes, the
/// new ones skip the dead hosts.
#[test]
fn half_the_pool_blackholed_under_load() {
    let _g = serial();
    if skip_reason().is_some() {
        return;
    }
    if let Some(why) = kernel_refuses(Fault::Blackhole) {
        eprintln!("SKIPPED half the pool black-holed: the kernel refuses it here: {why}");
        return;
    }
    let mut lab = Lab::new("half", 4, false);
    lab.start_proxy(
        &lab.static_pool(),
        "    passive: { consecutive_failures: 2, backoff: 2s }\n",
    );
    let (n, concurrency, spacing) = if full() {
        (1000, 200, Duration::from_millis(4))
    } else {
        (200, 60, Duration::from_millis(10))
    };
    let before = baseline(&lab);
    let calls = lab.calls(n, concurrency, spacing);
    let span = spacing * n as u32;
    std::thread::sleep(span / 4);
    lab.fault_on(0, Fault::Blackhole);
    lab.fault_on(1, Fault::Blackhole);
    // Longer than the next-command deadline: the sessions caught in it
    // cannot be saved by TCP's retransmissions once it lifts.
    std::thread::sleep((span / 2).max(NEXT_COMMAND + 2 * HOLD));
    lab.fault_off(0, Fault::Blackhole);
    lab.fault_off(1, Fault::Blackhole);
    let outs = lab.wait(calls);
    let x = Expect {
        faulted: &["b0", "b1"],
        no_alternative: false,
        warm: 4,
    };
    let v = judge(&lab, "half the pool black-holed", &outs, n, before, x);
    assert!(
        v.failures > 0,
        "the black hole caught no session: the test proves nothing"
    );
}

/// DNS answers with a black-holed host (SYNs dropped) next to a healthy
/// one: every call completes. Then it answers with the black-holed host
/// only: every call gets FAILURE within the budget (no alternative).
#[test]
fn dns_answers_with_a_blackholed_host() {
    let _g = serial();
    if skip_reason().is_some() {
        return;
    }
    if let Some(why) = kernel_refuses(Fault::SynDrop) {
        eprintln!("SKIPPED DNS with a black-holed host: the kernel refuses it here: {why}");
        return;
    }
    let mut lab = Lab::new("dns", 2, false);
    let dns = lab
        .proxy_rt
        .block_on(lab.proxy_rt.spawn(FakeDns::start()))
        .expect("dns task");
    let ips: Vec<IpAddr> = lab.hosts.iter().map(|h| h.ip).collect();
    dns.set_addrs("ivr.test", &ips, 1);
    lab.dns = Some(dns);
    lab.start_proxy(&format!("      - {{ address: \"ivr.test:{PORT}\" }}\n"), "");
    // Discovery fills the pool shortly after start.
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab
        .scrape("/v1/pools/p")
        .is_none_or(|p| !p.contains(&ips[1].to_string()))
    {
        assert!(Instant::now() < deadline, "DNS members never appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = baseline(&lab);
    lab.fault_on(0, Fault::SynDrop);
    let n = if full() { 200 } else { 20 };
    let outs = lab.wait(lab.calls(n, n, Duration::from_millis(20)));
    let x = Expect {
        faulted: &[],
        no_alternative: false,
        warm: 2,
    };
    judge(&lab, "DNS: black-holed + healthy host", &outs, n, before, x);

    lab.dns
        .as_ref()
        .expect("dns")
        .set_addrs("ivr.test", &ips[..1], 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab
        .scrape("/v1/pools/p")
        .is_none_or(|p| p.contains(&ips[1].to_string()))
    {
        assert!(Instant::now() < deadline, "the healthy member never left");
        std::thread::sleep(Duration::from_millis(100));
    }
    let outs = lab.wait(lab.calls(n, n, Duration::from_millis(20)));
    let x = Expect {
        faulted: &[],
        no_alternative: true,
        warm: 2 + n,
    };
    let v = judge(&lab, "DNS: black-holed host only", &outs, n, before, x);
    assert_eq!(
        v.failures, n,
        "with only a black-holed host, every call fails"
    );
}

/// The Asterisk host goes silent (every packet dropped, no FIN, no RST)
/// while its call sits in a long command (`EXEC Dial`): TCP keepalive finds
/// it, the session ends and the backend's connection is closed, within
/// `idle + interval × probes`. Without keepalive both would wait for ever.
#[test]
fn an_asterisk_host_that_goes_silent_mid_command_is_found_by_keepalive() {
    let _g = serial();
    if skip_reason().is_some() {
        return;
    }
    let mut lab = Lab::new("keepalive", 0, false);
    let host = lab.host(
        0,
        Some(Behaviour::script(&["EXEC Dial PJSIP/alice,30"])),
        false,
    );
    lab.hosts.push(host);
    lab.extra = "tcp_keepalive: { idle: 2s, interval: 1s, probes: 2 }\n".into();
    lab.start_proxy(&lab.static_pool(), "");
    let bound = Duration::from_secs(2 + 2);

    // A call that gets its `EXEC Dial` and holds it, as Asterisk does while
    // the far end rings and talks.
    let target = SocketAddr::new(PROXY_IP.parse().expect("ip"), PORT);
    let header = AgiHeader::realistic("ivr/main", &[], "17.1").to_bytes();
    let held = lab.client_rt.block_on(lab.client_rt.spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = FakeAsterisk::raw_session(target, &header)
            .await
            .expect("connect");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the command in time")
                .expect("read");
            assert!(n > 0, "closed before the command");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"EXEC Dial PJSIP/alice,30\n");
        s
    }));
    let held = held.expect("client task");
    let backend = lab.hosts[0].backend.as_ref().expect("backend").stats();
    assert_eq!((backend.accepted(), backend.active()), (1, 1));
    assert_eq!(lab.metric("agiproxy_active_sessions", ""), 1.0);

    // Once the command has run for idle/2, both of the session's sockets
    // probe (and only then: a short session never pays for it).
    let keepalive_sockets = || {
        let out = lab
            .proxy_ns
            .exec("ss", &["-tnoH", "state", "established"])
            .expect("ss");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("timer:(keepalive"))
            .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_string())
            .collect::<Vec<String>>()
    };
    assert_eq!(
        keepalive_sockets(),
        Vec::<String>::new(),
        "keepalive before idle/2"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let probing = keepalive_sockets();
    let asterisk_side = probing
        .iter()
        .filter(|l| **l == format!("{PROXY_IP}:{PORT}"))
        .count();
    let backend_side = probing
        .iter()
        .filter(|l| l.starts_with("192.0.2.1:"))
        .count();
    assert_eq!(
        (probing.len(), asterisk_side, backend_side),
        (2, 1, 1),
        "sockets with keepalive, by local address: {probing:?}"
    );

    // The host goes silent.
    let drop_all = |op: &str| {
        for chain in ["INPUT", "OUTPUT"] {
            lab._client_ns
                .exec("iptables", &[op, chain, "-j", "DROP"])
                .expect("iptables in the client namespace");
        }
    };
    drop_all("-A");
    let silent = Instant::now();
    // Keepalive arms after idle/2 of the command, then idle/2 more to the
    // first probe: the bound counts from the command, so from before now.
    let deadline = silent + bound + SLACK;
    while lab.metric("agiproxy_active_sessions", "") > 0.0 || backend.active() > 0 {
        assert!(
            Instant::now() < deadline,
            "the session outlived keepalive's bound ({bound:?} + {SLACK:?}): active {} at the proxy, {} at the backend",
            lab.metric("agiproxy_active_sessions", ""),
            backend.active()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let found = silent.elapsed();
    assert_eq!(
        lab.metric("agiproxy_sessions_total", "outcome=\"client_gone\""),
        1.0,
        "counted as Asterisk gone"
    );
    drop_all("-D");
    drop(held);
    assert!(
        found >= Duration::from_secs(1),
        "ended after {found:?}: before keepalive could have found anything"
    );
    println!("| Asterisk host silent mid-command (keepalive 2s/1s×2) | session ended after {:.1} s, backend closed | keepalive |", found.as_secs_f64());
}
