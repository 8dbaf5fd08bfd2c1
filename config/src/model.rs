//! The typed, validated config the proxy runs on. Everything here has been checked:
//! names resolved to indices, regexes checked (see [`crate::Pattern`]), addresses parsed, defaults applied.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::pattern::Pattern;
use crate::template::Template;

/// Asterisk's FastAGI port, used when an `agi://` URL gives none.
pub const DEFAULT_PORT: u16 = 4573;

/// The header variable a split (and `balance: hash`) hashes by default: one value per call,
/// so every AGI of a call lands on the same side.
pub const DEFAULT_SPLIT_KEY: &str = "agi_uniqueid";

#[derive(Debug, Clone)]
pub struct Config {
    /// Always 1.
    pub version: u32,
    /// Never empty. Absent in the file: one listener `asterisk` on 0.0.0.0:4573.
    pub listeners: Vec<Listener>,
    /// The global defaults; each route carries its own merged copy in [`Route::timeouts`].
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// First match wins. May be empty: then every call gets FAILURE (no route).
    pub routes: Vec<Route>,
    /// Referenced by index from [`RouteTarget`]. Pools no route uses are allowed.
    pub pools: Vec<Pool>,
    /// The control API: off unless the file has a `control:` block.
    pub control: Control,
    /// TCP keepalive for a call whose command runs long (both of its
    /// sockets; see `tcp_keepalive` in docs/configuration.md); `None` when off.
    pub tcp_keepalive: Option<Keepalive>,
}

/// TCP keepalive: a peer that vanished (host down, a firewall or load
/// balancer that forgot the flow) is found while a call sits in a long
/// command, and idle flows stay known to middleboxes that time them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time before the first probe (`TCP_KEEPIDLE`).
    pub idle: Duration,
    /// Between unanswered probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes before the connection is given up (`TCP_KEEPCNT`).
    pub probes: u32,
}

impl Keepalive {
    /// Whole seconds, as the kernel counts them: 1 s to 32,767 s.
    pub const SECONDS: std::ops::RangeInclusive<u64> = 1..=32_767;
    pub const PROBES: std::ops::RangeInclusive<u32> = 1..=127;

    /// How long a vanished peer can go unnoticed: `idle + interval × probes`.
    pub fn detection(&self) -> Duration {
        self.idle + self.interval * self.probes
    }
}

impl Default for Keepalive {
    /// A dead peer is found within 2 minutes; a flow is never quiet for
    /// more than 60 s (AWS NLB forgets one after 350 s, Azure's load
    /// balancer after 4 minutes by default).
    fn default() -> Self {
        Keepalive {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            probes: 6,
        }
    }
}

/// The control API: an HTTP listener of its own and/or a Unix socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    /// On when the file has a `control:` block (unless it says
    /// `enabled: false`); off without one, so no port is opened unasked.
    pub enabled: bool,
    /// The HTTP listener. No default port: the operator picks it (two
    /// replicas on one host, or Prometheus's 9090, would clash with any
    /// fixed default).
    pub address: Option<SocketAddr>,
    /// A Unix socket (mode 0600) that accepts every endpoint without a
    /// token: its file permissions are the credential.
    pub socket: Option<PathBuf>,
    /// Bearer token for every endpoint beyond the open, read-only ones
    /// (`/healthz`, `/readyz`, `/metrics`, `GET /v1/status`). Without one,
    /// those endpoints answer 403 on `address` (the socket still works).
    pub token: Option<TokenSource>,
    pub tls: Option<ControlTls>,
    /// Largest request body accepted (413 beyond). Default: `limits.max_config_bytes`.
    pub max_body_bytes: usize,
    /// Whole-request deadline. Default 10 s.
    pub request_timeout: Duration,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            enabled: false,
            address: None,
            socket: None,
            token: None,
            tls: None,
            max_body_bytes: Limits::DEFAULT_MAX_CONFIG_BYTES,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Where the control API's bearer token comes from: read at start; a file is
/// followed while running (see `agiproxy_control::token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(std::path::PathBuf),
    Env(String),
}

/// TLS for the control API (PEM files); `client_ca` turns on client-certificate auth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
    /// How rollout judgement reads the other replicas' control APIs, which
    /// serve TLS as this one does. Defaults resolved: see [`PeerTls`].
    pub peers: PeerTls,
}

/// The client side of reading peers over TLS, defaults already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// The CA that signed the peers' certificates: `peers.ca`, else
    /// `client_ca` (one fleet CA signs replicas and operators alike). None:
    /// peers cannot be verified, so they are not read.
    pub ca: Option<std::path::PathBuf>,
    /// The certificate and key presented to peers: `peers.cert`/`peers.key`,
    /// else, when `client_ca` asks callers for one, this replica's own.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The name the peers' certificates must carry; None: the peer's IP
    /// address (the certificates then need IP SANs).
    pub server_name: Option<String>,
}

impl Config {
    /// The index of the pool called `name`, as used in [`RouteTarget`].
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique; `[A-Za-z0-9_.-]+`.
    pub name: String,
    /// Unique (except port 0, which asks the OS for a free port each time).
    pub address: SocketAddr,
    /// Load balancers in front that announce each caller with a PROXY
    /// protocol header; `None`: every peer is the Asterisk itself.
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl Listener {
    /// The listener used when the file has no `listeners:` key.
    pub fn default_listener() -> Listener {
        Listener {
            name: "asterisk".to_string(),
            address: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            proxy_protocol: None,
        }
    }
}

/// `listeners[].proxy_protocol`: which peers must begin with a PROXY
/// protocol header (v1 or v2). Others connect as Asterisk does, directly.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyProtocol {
    /// Never empty. Only these peers may name another caller's address.
    pub from: Vec<ipnet::IpNet>,
}

impl ProxyProtocol {
    /// Whether a connection from `peer` must start with a PROXY header.
    pub fn expected_from(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.from.iter().any(|net| net.contains(&peer))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// The whole header from Asterisk.
    pub header: Duration,
    /// Finding a backend, all attempts together. Always >= `connect`.
    pub budget: Duration,
    /// One connect attempt.
    pub connect: Duration,
    /// The backend's first command after the header.
    pub first_command: Duration,
    /// The backend's next command after a reply.
    pub next_command: Duration,
    /// Sessions in flight at shutdown.
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(5),
            budget: Duration::from_millis(1500),
            connect: Duration::from_millis(250),
            first_command: Duration::from_secs(3),
            next_command: Duration::from_secs(60),
            drain: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions at once, over all listeners; 1..=1_000_000, default 20000.
    pub max_sessions: usize,
    /// Header size from Asterisk; 512..=1 MiB, default 16384.
    pub max_header_bytes: usize,
    /// Header lines from Asterisk; 8..=4096, default 512.
    pub max_header_lines: usize,
    /// Connections from one address (an IPv6 /64) still sending their header at once, once the
    /// replica is half full (`max_sessions / 2` sessions); 1..=1_000_000, default 1024. A real
    /// Asterisk sends its header in a round trip, so only a flood of slow connections reaches
    /// it; beyond it a connection is refused (`overloaded`) instead of taking a session slot and
    /// a header buffer.
    pub max_headers_per_peer: usize,
    /// Bytes of header buffers grown past their first 2 KiB, across every connection still
    /// sending its header or looking for a backend; 1 MiB..=64 GiB, default 64 MiB. Asterisk's headers fit in 2 KiB, so
    /// only a flood of large, slow headers reaches it; beyond it a connection whose header
    /// needs more is refused (`overloaded`) instead of growing the replica's memory towards
    /// `max_sessions` x `max_header_bytes`.
    pub max_header_memory: usize,
    /// Size of a config text (file or API body); 65536..=64 MiB, default 4 MiB. Nothing larger
    /// is read or parsed: a replacement is held to the running config's limit.
    pub max_config_bytes: usize,
}

impl Limits {
    pub const MAX_SESSIONS: std::ops::RangeInclusive<usize> = 1..=1_000_000;
    pub const MAX_HEADER_BYTES: std::ops::RangeInclusive<usize> = 512..=1024 * 1024;
    pub const MAX_HEADER_LINES: std::ops::RangeInclusive<usize> = 8..=4096;
    pub const MAX_HEADERS_PER_PEER: std::ops::RangeInclusive<usize> = 1..=1_000_000;
    pub const MAX_HEADER_MEMORY: std::ops::RangeInclusive<usize> = 1 << 20..=64 << 30;
    pub const MAX_CONFIG_BYTES: std::ops::RangeInclusive<usize> = 65_536..=64 << 20;
    /// `max_config_bytes` when not set (and the API's body limit when `control.max_body_bytes`
    /// is not set).
    pub const DEFAULT_MAX_CONFIG_BYTES: usize = 4 << 20;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 20_000,
            max_header_bytes: 16_384,
            max_header_lines: 512,
            max_headers_per_peer: 1024,
            max_header_memory: 64 << 20,
            max_config_bytes: Limits::DEFAULT_MAX_CONFIG_BYTES,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Unique; `[A-Za-z0-9_.-]+`.
    pub name: String,
    pub matcher: RouteMatch,
    pub target: RouteTarget,
    /// The header variable a `split:` hashes (default `agi_uniqueid`). Set but unused for
    /// `pool:` targets, so a split can be promoted to one pool without touching it.
    pub split_key: String,
    pub rewrite: Option<Rewrite>,
    /// Header variables added, in file order. Keys are new `agi_*` names (never ones Asterisk sends).
    pub set: Vec<(String, Template)>,
    pub mode: Mode,
    /// Forward Asterisk's unsolicited `HANGUP` to the backend (default true). `false` protects
    /// backends that mistake it for a reply or crash on it.
    pub forward_hangup: bool,
    /// The global timeouts with this route's `timeouts:` overrides applied.
    pub timeouts: Timeouts,
    /// A declared blue-green rollout; `target` is then `Pool(rollout.from)`. Boxed: it is
    /// rare and large, and a table holds up to 100,000 routes (see `RawRoute`).
    pub rollout: Option<Box<Rollout>>,
}

/// What a call must look like for a route to take it. Every listed criterion must hold;
/// an empty matcher takes every call.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// Against the script path: `agi_network_script` up to any `?`, without a leading `/`
    /// (see [`script_path`]).
    pub script: Option<ScriptMatch>,
    /// Query parameters that must be present and equal, stored as written; the proxy compares
    /// after percent-decoding the call's query.
    pub query: Vec<(String, String)>,
    /// `agi_arg_N` (N in 1..=127) against a regex (unanchored: add `^`/`$` as needed).
    pub args: Vec<(usize, Pattern)>,
    /// Any `agi_*` header variable against a regex (unanchored).
    pub vars: Vec<(String, Pattern)>,
    /// Asterisk's address must be in one of these networks (empty: any address).
    pub source: Vec<ipnet::IpNet>,
}

impl RouteMatch {
    /// True when the matcher has no criteria and so takes every call.
    pub fn is_catch_all(&self) -> bool {
        self.script.is_none()
            && self.query.is_empty()
            && self.args.is_empty()
            && self.vars.is_empty()
            && self.source.is_empty()
    }
}

/// How a route matches the script. Matching is against the path part only: what Asterisk
/// sends in `agi_network_script` before any `?`, without a leading `/` (real Asterisk sends
/// none; the config may write one, which is removed at load: `/ivr/` means `ivr/`, and a
/// regex starting `^/` becomes `^/?`).
#[derive(Debug, Clone)]
pub enum ScriptMatch {
    Exact(String),
    Prefix(String),
    /// Checked at load, compiled on first use alone: the proxy matches script regexes as sets.
    Regex(Pattern),
}

impl ScriptMatch {
    /// `path` as returned by [`script_path`].
    pub fn matches(&self, path: &str) -> bool {
        match self {
            ScriptMatch::Exact(s) => path == s,
            ScriptMatch::Prefix(p) => path.starts_with(p.as_str()),
            ScriptMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// The path routes match against: `agi_network_script` without its query and without one
/// leading `/` (which Asterisk never sends, but other clients might).
pub fn script_path(network_script: &str) -> &str {
    let path = network_script
        .split_once('?')
        .map_or(network_script, |(p, _)| p);
    path.strip_prefix('/').unwrap_or(path)
}

#[derive(Debug, Clone)]
pub enum RouteTarget {
    /// Index into [`Config::pools`].
    Pool(usize),
    /// Weighted split by a hash of [`Route::split_key`]. Pools distinct, weights sum > 0.
    Split(Vec<SplitTarget>),
}

#[derive(Debug, Clone)]
pub struct SplitTarget {
    /// Index into [`Config::pools`].
    pub pool: usize,
    /// 0..=10000; 0 keeps the pool listed but sends it nothing.
    pub weight: u32,
}

/// A change to the script path before the header goes to the backend. Prefixes carry no
/// leading `/` (removed at load, as for script matches).
#[derive(Debug, Clone)]
pub enum Rewrite {
    StripPrefix(String),
    ReplacePrefix { from: String, to: String },
}

impl Rewrite {
    /// Applies the rewrite to `agi_network_script` (a leading `/` and the query are kept as
    /// they are); unchanged when the path does not start with the prefix. On bytes: Asterisk's
    /// value need not be UTF-8 (a Latin-1 caller name in the query), and routing matches its
    /// valid UTF-8 start, which holds the (UTF-8) prefix whenever the bytes do; the rest is
    /// kept byte for byte.
    pub fn apply<'a>(&self, network_script: &'a [u8]) -> Cow<'a, [u8]> {
        let (slash, rest): (&[u8], &[u8]) = match network_script.strip_prefix(b"/") {
            Some(rest) => (b"/", rest),
            None => (b"", network_script),
        };
        let path_len = rest.iter().position(|&c| c == b'?').unwrap_or(rest.len());
        let (from, to) = match self {
            Rewrite::StripPrefix(p) => (p.as_str(), ""),
            Rewrite::ReplacePrefix { from, to } => (from.as_str(), to.as_str()),
        };
        // A prefix never holds `?` (refused at load): it is in the path or nowhere.
        if !rest[..path_len].starts_with(from.as_bytes()) {
            return Cow::Borrowed(network_script);
        }
        let tail = &rest[from.len()..];
        let mut out = Vec::with_capacity(slash.len() + to.len() + tail.len());
        out.extend_from_slice(slash);
        out.extend_from_slice(to.as_bytes());
        out.extend_from_slice(tail);
        Cow::Owned(out)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Paced: whole lines, one command at a time, towards Asterisk.
    Lines,
    /// Bytes pass untouched both ways.
    Raw,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Lines => "lines",
            Mode::Raw => "raw",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Pool {
    /// Unique; `[A-Za-z0-9_.-]+`.
    pub name: String,
    pub balance: Balance,
    /// Never empty; static addresses, DNS names and SRV names each distinct.
    pub backends: Vec<Backend>,
    /// Sessions at once over the whole pool.
    pub max_sessions: Option<u32>,
    /// Passive ejection after connect failures.
    pub backoff: Backoff,
    /// Consecutive passive failures (connect failed, closed or reset before the first byte,
    /// first-command deadline missed) that eject a backend; 1..=100, default 5.
    pub eject_after: u32,
    /// At most this share of the pool's backends (percent, 0..=100, default 50) is ever treated
    /// as ejected, at least one, and never every backend that passes its checks: passive ejection
    /// alone never empties a pool, even of one backend (only 100 allows it, an explicit opt-in).
    /// Beyond it, the least-bad ejected backends stay in rotation ("panic"), with a warning.
    pub max_ejection_percent: u32,
    /// Active health checks; none by default.
    pub health: Option<HealthCheck>,
    /// A backend that comes back (healthy again, readmitted after ejection, or newly found in
    /// DNS) gets a share of new sessions rising from 10% to 100% over this window. Off by default.
    pub slow_start: Option<Duration>,
    /// How the pool's DNS names are resolved (the top-level `dns:` with the pool's overrides).
    pub dns: Dns,
}

impl Pool {
    /// Entries in `backends:` at most.
    pub const MAX_BACKENDS: usize = 1000;
    /// Addresses a pool offers at once, DNS answers included; past it the
    /// rest are left out (with a warning). Each call orders its tier, so
    /// this bounds a call's work and a member set's rebuild.
    pub const MAX_MEMBERS: usize = 4096;

    /// True when some backend is a DNS or SRV name, to be resolved at run time.
    pub fn has_dns(&self) -> bool {
        self.backends
            .iter()
            .any(|b| !matches!(b.target, BackendTarget::Static(_)))
    }
}

/// Active health checks of every backend of a pool.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// Time between two checks of one backend (each interval varied by up to `jitter`).
    /// Default 2s.
    pub interval: Duration,
    /// One check, connect included. Default 1s; never longer than `interval`.
    pub timeout: Duration,
    /// Random variation of each interval, up to this much either way, so replicas do not probe
    /// in lock-step. Default a tenth of `interval`; less than `interval`.
    pub jitter: Duration,
    /// Consecutive passing checks that make an unhealthy backend healthy; 1..=100, default 2.
    pub rise: u32,
    /// Consecutive failing checks that make a healthy backend unhealthy; 1..=100, default 3.
    pub fall: u32,
}

#[derive(Debug, Clone)]
pub enum HealthKind {
    /// A synthetic FastAGI session: a whole header for `script`, one command expected (and
    /// matched against `expect`, when given), answered `200 result=0`, then `HANGUP` and an
    /// orderly close. Safe for every FastAGI framework.
    Agi {
        /// `agi_network_script` of the probe, without a leading `/` (default `healthz`).
        script: String,
        /// The backend's first command must match (unanchored).
        expect: Option<regex::Regex>,
    },
    /// A connect, then a close. Unsafe for fragile frameworks (see the docs).
    Tcp,
}

/// Equal checks judge a backend alike: a reload that keeps them keeps their
/// schedule and counts (regexes compare by their text).
impl PartialEq for HealthCheck {
    fn eq(&self, other: &HealthCheck) -> bool {
        self.interval == other.interval
            && self.timeout == other.timeout
            && self.jitter == other.jitter
            && self.rise == other.rise
            && self.fall == other.fall
            && match (&self.kind, &other.kind) {
                (HealthKind::Tcp, HealthKind::Tcp) => true,
                (
                    HealthKind::Agi { script, expect },
                    HealthKind::Agi {
                        script: s,
                        expect: e,
                    },
                ) => {
                    script == s
                        && expect.as_ref().map(|r| r.as_str()) == e.as_ref().map(|r| r.as_str())
                }
                _ => false,
            }
    }
}

impl HealthKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthKind::Agi { .. } => "agi",
            HealthKind::Tcp => "tcp",
        }
    }
}

/// How DNS backend names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// Nameservers to ask (port 53 when not given); empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Search domains; empty: the system's when `nameservers` is empty too, else none.
    pub search: Vec<String>,
    /// Re-resolve no sooner than this after a lookup, whatever the TTL (default 1s); also the
    /// wait before retrying a failed lookup.
    pub min_ttl: Duration,
    /// Re-resolve at least this often, whatever the TTL (default 300s).
    pub max_ttl: Duration,
    /// One lookup (default 2s).
    pub timeout: Duration,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            nameservers: Vec::new(),
            search: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    Weighted,
    LeastSessions,
    /// By a hash of this header variable's value (`hash_key`, default `agi_uniqueid`).
    Hash {
        key: String,
    },
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Balance::RoundRobin => f.write_str("round_robin"),
            Balance::Weighted => f.write_str("weighted"),
            Balance::LeastSessions => f.write_str("least_sessions"),
            Balance::Hash { key } => write!(f, "hash {key}"),
        }
    }
}

/// Backoff for a backend ejected after connect failures: `base`, doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    /// Always >= `base`.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub target: BackendTarget,
    /// 1..=1000, default 1. For an SRV name, each record's own weight is used instead.
    pub weight: u32,
    /// Sessions at once on this backend (on each address a name resolves to).
    pub max_sessions: Option<u32>,
}

/// Where a backend entry points.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendTarget {
    /// `address: "10.1.0.5:4573"`.
    Static(SocketAddr),
    /// `address: "ivr.backends.svc.cluster.local:4573"`: every A/AAAA address is a backend.
    Host { name: String, port: u16 },
    /// `srv: "_agi._tcp.ivr.backends.svc.cluster.local"`: every SRV record is a backend, with
    /// its port, priority and weight.
    Srv { name: String },
}

impl BackendTarget {
    /// The static address, if this is one.
    pub fn static_addr(&self) -> Option<SocketAddr> {
        match self {
            BackendTarget::Static(a) => Some(*a),
            _ => None,
        }
    }
}

impl fmt::Display for BackendTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendTarget::Static(a) => write!(f, "{a}"),
            BackendTarget::Host { name, port } => write!(f, "{name}:{port}"),
            BackendTarget::Srv { name } => write!(f, "srv {name}"),
        }
    }
}

// ---- rollouts
// A declared blue-green rollout on a route: the validated model. The
// schedule, stickiness and judgement that run on it live in the proxy
// (`proxy/src/rollout/`); this is data only, identical on every replica
// that reads the same file.

/// Steps at most; each has its own counters on every replica.
pub const MAX_ROLLOUT_STEPS: usize = 20;

#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index into `Config::pools`: the running colour (blue).
    pub from: usize,
    /// Index into `Config::pools`: the new colour (green).
    pub to: usize,
    /// Green's share at each step, in basis points (1..=10000), strictly rising.
    pub steps: Vec<u32>,
    pub step_duration: Duration,
    /// When step 0 begins, Unix milliseconds (UTC).
    pub start_ms: i64,
    /// `start` as written (RFC 3339).
    pub start_text: String,
    /// Clock difference tolerated between Asterisk and the proxies (and
    /// between proxies): an override takes effect this long after the time
    /// `ctl` gives it, so every replica knows it before calls that late exist.
    pub skew: Duration,
    /// Calls matching any criterion go to `to` at every step, 0 % included.
    pub canary: RouteMatch,
    pub judge: Judge,
    /// Operator decisions kept in the file (GitOps), sorted by time.
    pub overrides: Vec<Override>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Judge {
    pub enabled: bool,
    /// Ticks at `start + k * interval`; a bad verdict takes effect at
    /// `tick + interval / 2`.
    pub interval: Duration,
    /// Sessions each colour needs in the step, over all replicas, before a verdict.
    pub min_sessions: u64,
    /// How much worse green may be than blue, in basis points of the
    /// session count (100 = one percentage point).
    pub max_failures_bp: u32,
    pub max_connect_errors_bp: u32,
    pub max_early_closes_bp: u32,
    pub max_deadlines_bp: u32,
    /// How much later green's p95 time to first command may be.
    pub max_first_command_p95: Duration,
    pub peers: Peers,
}

/// Where a replica finds the others to read their counters.
#[derive(Debug, Clone, PartialEq)]
pub enum Peers {
    /// Judge on this replica's counters alone (one replica).
    None,
    /// Fixed control API addresses (this replica may be among them).
    Static(Vec<SocketAddr>),
    /// The name `ctl --cluster dns:...` uses, resolved with `dns`.
    Dns { target: BackendTarget, dns: Dns },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Override {
    pub action: OverrideAction,
    /// Unix milliseconds at which it takes effect (`skew` already added).
    pub at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideAction {
    /// Hold the current step (its weight stays) until `resume`.
    Pause,
    Resume,
    /// Green takes every new call.
    Promote,
    /// Blue takes every new call; calls already on green finish there.
    Rollback,
}

impl OverrideAction {
    pub const ALL: [OverrideAction; 4] = [
        OverrideAction::Pause,
        OverrideAction::Resume,
        OverrideAction::Promote,
        OverrideAction::Rollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OverrideAction::Pause => "pause",
            OverrideAction::Resume => "resume",
            OverrideAction::Promote => "promote",
            OverrideAction::Rollback => "rollback",
        }
    }

    pub fn parse(s: &str) -> Option<OverrideAction> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

impl fmt::Display for OverrideAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last instant RFC 3339 can write, 9999-12-31T23:59:59.999Z.
pub const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

/// Unix milliseconds as RFC 3339 UTC (`2026-12-06T01:00:00.000Z`), within
/// 1970 to year 9999: a time beyond (an override at the end of 9999 plus
/// the rollout's skew) is written as the last one RFC 3339 has, where the
/// formatter's error used to panic every status and rollout request.
pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.clamp(0, MAX_RFC3339_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// RFC 3339 UTC (`2026-12-06T01:00:00Z`, fractions allowed) to Unix milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339(text.trim()).map_err(|e| {
        format!("{text:?} is not an RFC 3339 UTC time ({e}); write e.g. \"2026-12-06T01:00:00Z\"")
    })?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?;
    Ok(d.as_millis() as i64)
}

#[cfg(test)]
mod rollout_tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        let ms = parse_time("2026-12-06T01:00:00.250Z").unwrap();
        assert_eq!(ms, 1_796_518_800_250);
        assert_eq!(format_ms(ms), "2026-12-06T01:00:00.250Z");
        assert!(parse_time("yesterday").is_err());
    }

    /// An override at the end of 9999 plus the skew (accepted by the
    /// check) made every status and rollout request panic in the
    /// formatter (audit).
    #[test]
    fn times_past_year_9999_are_written_as_its_end() {
        let end = parse_time("9999-12-31T23:59:59.999Z").unwrap();
        assert_eq!(end, MAX_RFC3339_MS);
        let week = 7 * 86_400_000;
        assert_eq!(format_ms(end + week), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_ms(-5), "1970-01-01T00:00:00.000Z");
    }
}
