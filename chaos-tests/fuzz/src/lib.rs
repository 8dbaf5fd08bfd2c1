//! The properties the fuzz targets check, one function per target. Each
//! takes the fuzzer's bytes, decodes them into a case, runs the code under
//! test and panics when a property fails (not only on a crash). The same
//! file is compiled by the stable test `chaos-tests/tests/fuzz_corpus.rs`,
//! which replays the committed corpora and regressions in CI.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agiproxy::drain::Cut;
use agiproxy::session::header::{Header, HeaderError, ReadSoFar, Scan};
use agiproxy::session::relay::{Relay, RelayEnd, RelayOptions};
use agiproxy::session::rewrite::{backend_header, TemplateContext};
use agiproxy_control::api::{
    Applied, BackendView, ConfigView, ErrorBody, FieldError, PoolView, RolloutTick, RolloutView,
    SplitWeight, Status,
};
use agiproxy_control::{ControlError, ControlPlane};
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

/// Reads the fuzzer's bytes as a stream of small decisions; past the end
/// every decision is 0, so any input decodes to a case.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

// ---------------------------------------------------------------- header

/// How a scan ended, with what does not depend on read sizes.
#[derive(Debug, PartialEq, Eq)]
enum Scanned {
    Header(usize),
    /// How far the header had come (`ReadSoFar`) is left out: it depends
    /// on how much had arrived.
    Error(&'static str),
    Eof,
}

/// Runs the scanner the way `read_header` does, the bytes arriving in reads
/// of the given sizes (cycled). Returns the outcome and the bytes read.
fn scan_in_reads(
    data: &[u8],
    sizes: &[u8],
    max_bytes: usize,
    max_lines: usize,
) -> (Result<Header, HeaderError>, usize) {
    let mut buf = Vec::new();
    let mut scan = Scan::new();
    let mut fed = 0;
    let mut i = 0;
    loop {
        if buf.len() >= max_bytes {
            return (
                Err(HeaderError::TooLarge(max_bytes, ReadSoFar::of(&buf))),
                fed,
            );
        }
        let want = max_bytes - buf.len();
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(4096, |s| *s as usize + 1);
        i += 1;
        let n = size.min(want).min(data.len() - fed);
        if n == 0 {
            let e = if buf.is_empty() {
                HeaderError::Closed
            } else {
                HeaderError::Truncated
            };
            return (Err(e), fed);
        }
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
        match scan.advance(&buf, max_lines) {
            Err(e) => return (Err(e), fed),
            Ok(Some(len)) => return (Ok(scan.finish(buf, len)), fed),
            Ok(None) => {}
        }
    }
}

fn summary(r: &Result<Header, HeaderError>) -> Scanned {
    match r {
        Ok(h) => Scanned::Header(h.raw().len()),
        Err(HeaderError::Closed | HeaderError::Truncated) => Scanned::Eof,
        Err(e) => Scanned::Error(e.reason()),
    }
}

fn route_with_rewrite() -> &'static agiproxy_config::Route {
    static CONFIG: OnceLock<agiproxy_config::Config> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        agiproxy_config::from_yaml_str(
            "version: 1\nlisteners:\n  - { name: a, address: \"127.0.0.1:0\" }\n\
             routes:\n  - name: r\n    pool: p\n    rewrite: { strip_prefix: \"ivr/\" }\n\
             \x20   set: { agi_x_route: \"${route}\", agi_x_forwarded_for: \"spoof-proof\" }\n\
             pools:\n  - name: p\n    backends:\n      - { address: \"127.0.0.1:9\" }\n",
        )
        .expect("the fuzzer's own config is valid")
    });
    &config.routes[0]
}

/// Header scanner: `[max_lines, max_bytes/16, n, n read sizes..., bytes...]`.
/// Properties: the outcome does not depend on read sizes; an accepted
/// header is exactly the bytes received up to the blank line (what is
/// replayed to a backend unchanged), the rest kept as trailing bytes; a
/// rewritten header is again a valid header with every variable in order.
pub fn header(data: &[u8]) {
    let mut input = Input { data };
    let max_lines = input.byte() as usize % 64 + 1;
    let max_bytes = (input.byte() as usize + 1) * 16;
    let n = input.byte() as usize % 16;
    let sizes = input.bytes(n).to_vec();
    let bytes = input.rest();

    let (chunked, fed) = scan_in_reads(bytes, &sizes, max_bytes, max_lines);
    let (whole, _) = scan_in_reads(bytes, &[], max_bytes, max_lines);
    assert_eq!(
        summary(&chunked),
        summary(&whole),
        "read sizes {sizes:?} changed the outcome"
    );
    let Ok(h) = chunked else { return };
    let len = h.raw().len();
    assert_eq!(
        h.raw(),
        &bytes[..len],
        "header bytes differ from those received"
    );
    assert_eq!(h.trailing(), &bytes[len..fed], "trailing bytes lost");
    assert!(h.raw().ends_with(b"\n\n"), "header without its blank line");
    assert!(len <= max_bytes && h.line_count() <= max_lines);
    assert_eq!(
        h.raw().iter().filter(|b| **b == b'\n').count(),
        h.line_count() + 1
    );
    for (name, value) in h.raw_vars() {
        assert!(name.starts_with("agi_"), "{name:?}");
        assert!(!value.contains(&b'\n'));
    }
    assert_eq!(h.vars().count(), h.line_count());
    let _ = (h.script_path(), h.script_query(), h.query_param("lang"));

    let ctx = TemplateContext {
        remote: "192.0.2.7:40000".parse().expect("addr"),
        local: "192.0.2.1:4573".parse().expect("addr"),
        route: "r",
        listener: "a",
        pool: "p",
    };
    let plain = backend_header(&h, None, &[], &ctx);
    assert!(
        matches!(plain, Cow::Borrowed(_)),
        "an unrewritten header is copied"
    );
    assert_eq!(
        &*plain,
        h.raw(),
        "replayed header differs from the received one"
    );

    let route = route_with_rewrite();
    let rewritten = backend_header(&h, route.rewrite.as_ref(), &route.set, &ctx).into_owned();
    let again = Header::parse(rewritten.clone(), usize::MAX)
        .unwrap_or_else(|e| panic!("rewritten header does not parse ({e}): {rewritten:?}"));
    let names: Vec<&str> = again.raw_vars().map(|(n, _)| n).collect();
    let mut expected: Vec<&str> = h.raw_vars().map(|(n, _)| n).collect();
    for (name, _) in &route.set {
        if h.get(name).is_none() {
            expected.push(name);
        }
    }
    assert_eq!(
        names, expected,
        "variables lost or reordered by the rewrite"
    );
    for ((name, before), (_, after)) in h.raw_vars().zip(again.raw_vars()) {
        let touched = matches!(name, "agi_network_script" | "agi_request")
            || route.set.iter().any(|(n, _)| n == name);
        if !touched {
            assert_eq!(before, after, "{name} changed");
        }
    }
    assert_eq!(again.get("agi_x_forwarded_for"), Some("spoof-proof"));
}

// ----------------------------------------------------------------- relay

/// One command and its reply, as both ends expect to see them.
struct Exchange {
    /// What the backend writes.
    command: Vec<u8>,
    /// What Asterisk must receive (a CRLF command goes out with LF).
    to_asterisk: Vec<u8>,
    crlf: bool,
    /// What Asterisk writes and the backend must receive unchanged.
    reply: Vec<u8>,
    /// A command of its own (false for a `PUT SOUNDFILE` payload, which
    /// the backend sends after Asterisk's "ready" and which has the
    /// command's second reply).
    counted: bool,
}

/// Standard base64 with padding, in lines of 76 characters (57 bytes) as
/// the sound-file transfer sends them (`shared/fastagi-protocol.md`).
fn base64_lines(data: &[u8]) -> Vec<u8> {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    for line in data.chunks(57) {
        for c in line.chunks(3) {
            let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
                out.push(if i <= c.len() {
                    ABC[(n >> shift & 63) as usize]
                } else {
                    b'='
                });
            }
        }
        out.push(b'\n');
    }
    out
}

fn starts_with_ci(s: &[u8], p: &[u8]) -> bool {
    s.len() >= p.len() && s[..p.len()].eq_ignore_ascii_case(p)
}

/// A line of fuzzed bytes without `\n`, never a command with a meaning of
/// its own (`failure`, sound-file transfers: those have their own kinds).
fn plain_command(input: &mut Input) -> Vec<u8> {
    let n = input.byte() as usize % 48;
    let mut line: Vec<u8> = input
        .bytes(n)
        .iter()
        .map(|b| if *b == b'\n' { b' ' } else { *b })
        .collect();
    let special = [&b"failure"[..], b"put soundfile ", b"get soundfile "];
    let trimmed: Vec<u8> = line.iter().copied().filter(|b| *b != b'\r').collect();
    if trimmed.is_empty() || special.iter().any(|p| starts_with_ci(&line, p)) {
        line.splice(0..0, b"NOOP ".iter().copied());
    }
    line
}

/// A reply line Asterisk could send: not `HANGUP`, not a `520-` block.
fn plain_reply(input: &mut Input) -> Vec<u8> {
    let n = input.byte() as usize % 32;
    let mut line: Vec<u8> = b"200 result=".to_vec();
    line.extend(
        input
            .bytes(n)
            .iter()
            .map(|b| if *b == b'\n' { b'.' } else { *b }),
    );
    line.push(b'\n');
    line
}

fn exchanges(input: &mut Input) -> Vec<Exchange> {
    let count = input.byte() as usize % 6 + 1;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = input.byte();
        let mut reply = Vec::new();
        if kind & 0x10 != 0 {
            // An unsolicited HANGUP before the reply: forwarded, not a reply.
            reply.extend_from_slice(b"HANGUP\n");
        }
        let mut command = match kind % 4 {
            1 => {
                // PUT SOUNDFILE: Asterisk's "ready", then the payload as
                // base64 lines, then its second reply.
                let n = input.byte() as usize % 300 + 1;
                let mut payload = input.bytes(n).to_vec();
                payload.resize(n, 0);
                let c = format!("PUT SOUNDFILE f {n}\n").into_bytes();
                reply.extend_from_slice(b"200 result=0\n");
                out.push(Exchange {
                    to_asterisk: c.clone(),
                    command: c,
                    crlf: false,
                    reply,
                    counted: true,
                });
                let lines = base64_lines(&payload);
                out.push(Exchange {
                    to_asterisk: lines.clone(),
                    command: lines,
                    crlf: false,
                    reply: b"200 result=0\n".to_vec(),
                    counted: false,
                });
                continue;
            }
            2 => {
                // GET SOUNDFILE: `size=N`, then N bytes as base64 lines,
                // no final line.
                let n = input.byte() as usize % 300 + 1;
                let mut payload = input.bytes(n).to_vec();
                payload.resize(n, 0);
                reply.extend_from_slice(format!("200 result=0 size={n}\n").as_bytes());
                reply.extend(base64_lines(&payload));
                b"GET SOUNDFILE f".to_vec()
            }
            3 => {
                reply.extend_from_slice(b"520-Invalid command syntax.  Proper usage follows:\n");
                for _ in 0..input.byte() % 4 {
                    let mut l = plain_reply(input);
                    l.drain(..4);
                    reply.extend_from_slice(&l);
                }
                reply.extend_from_slice(b"520 End of proper usage.\n");
                plain_command(input)
            }
            _ => {
                reply.extend(plain_reply(input));
                plain_command(input)
            }
        };
        let crlf_written = kind & 0x20 != 0;
        command.extend_from_slice(if crlf_written { b"\r\n" } else { b"\n" });
        let crlf = command.ends_with(b"\r\n");
        let mut to_asterisk = command.clone();
        if crlf {
            to_asterisk.truncate(to_asterisk.len() - 2);
            to_asterisk.push(b'\n');
        }
        out.push(Exchange {
            command,
            to_asterisk,
            crlf,
            reply,
            counted: true,
        });
    }
    out
}

/// Writes `bytes` in slices whose sizes come from the input.
async fn write_sliced(s: &mut TcpStream, bytes: &[u8], sizes: &[u8], at: &mut usize) {
    let mut pos = 0;
    while pos < bytes.len() {
        let size = sizes
            .get(*at % sizes.len().max(1))
            .map_or(bytes.len(), |s| *s as usize + 1);
        *at += 1;
        let end = (pos + size).min(bytes.len());
        s.write_all(&bytes[pos..end]).await.expect("write");
        pos = end;
        if sizes.len() > 1 {
            tokio::task::yield_now().await;
        }
    }
}

async fn read_exactly(s: &mut TcpStream, n: usize, what: &str) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("relay hung: {what} never arrived"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    buf
}

fn loopback_pair(listener: &std::net::TcpListener) -> (TcpStream, TcpStream) {
    let client =
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    for s in [&client, &server] {
        s.set_nonblocking(true).expect("nonblocking");
        s.set_nodelay(true).expect("nodelay");
    }
    (
        TcpStream::from_std(client).expect("tokio stream"),
        TcpStream::from_std(server).expect("tokio stream"),
    )
}

/// Relay framing: `[n, n write sizes..., pipelining, exchanges...]`. A
/// backend and an Asterisk talk through the real relay over loopback:
/// every command reaches Asterisk whole and unchanged (CRLF made LF), every
/// reply and sound-file payload reaches the backend unchanged, pipelined
/// commands wait for the reply, and the relay's counters match the bytes.
pub fn relay(data: &[u8]) {
    static LISTENER: OnceLock<std::net::TcpListener> = OnceLock::new();
    let mut input = Input { data };
    let n = input.byte() as usize % 8;
    let sizes = input.bytes(n).to_vec();
    let pipelined = input.byte() % 2 == 1;
    let script = exchanges(&mut input);
    runtime().block_on(async {
        let listener = LISTENER
            .get_or_init(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback"));
        let (mut asterisk, a) = loopback_pair(listener);
        let (b, mut backend) = loopback_pair(listener);
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let opts = RelayOptions {
            first_command_deadline: far,
            next_command: Duration::from_secs(3600),
            forward_hangup: true,
            keepalive: None,
        };
        let relay = tokio::spawn(async move {
            let (mut a, mut b) = (a, b);
            let cut = Cut::default();
            let mut relay = Relay::new(&mut a, &mut b, opts);
            let end = relay.run(&cut).await;
            (end, relay.stats)
        });
        let (mut wa, mut wb) = (0, 0);
        let mut sent = vec![false; script.len()];
        for (i, ex) in script.iter().enumerate() {
            if !sent[i] {
                write_sliced(&mut backend, &ex.command, &sizes, &mut wb).await;
                sent[i] = true;
            }
            if pipelined {
                // Sent before the reply: the relay must hold it. (Never a
                // payload: a backend sends it only after "ready".)
                if let Some(next) = script.get(i + 1).filter(|n| n.counted) {
                    write_sliced(&mut backend, &next.command, &sizes, &mut wb).await;
                    sent[i + 1] = true;
                }
            }
            let got = read_exactly(&mut asterisk, ex.to_asterisk.len(), "command").await;
            assert_eq!(got, ex.to_asterisk, "command {i} reached Asterisk changed");
            write_sliced(&mut asterisk, &ex.reply, &sizes, &mut wa).await;
            let got = read_exactly(&mut backend, ex.reply.len(), "reply").await;
            assert_eq!(got, ex.reply, "reply {i} reached the backend changed");
        }
        backend.shutdown().await.expect("backend close");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), asterisk.read_to_end(&mut rest))
            .await
            .expect("relay hung: no EOF towards Asterisk after the backend closed")
            .expect("read to EOF");
        assert!(rest.is_empty(), "Asterisk got extra bytes {rest:?}");
        asterisk.write_all(b"HANGUP\n").await.expect("hangup");
        drop(asterisk);
        let (end, stats) = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("relay hung after both sides closed")
            .expect("relay task");
        assert_eq!(end, RelayEnd::Closed);
        let commands: usize = script.iter().filter(|e| e.counted).count();
        assert_eq!(stats.commands as usize, commands, "commands counted");
        let crlf = script.iter().filter(|e| e.crlf).count();
        assert_eq!(stats.crlf_fixed as usize, crlf, "CRLF commands counted");
        // Counted as relayed: a CRLF command reaches Asterisk without its CR.
        let to_a: usize = script.iter().map(|e| e.command.len()).sum::<usize>() - crlf;
        assert_eq!(
            stats.bytes_to_asterisk as usize, to_a,
            "bytes from the backend"
        );
        // The end-of-session HANGUP is not read: Asterisk owed nothing when
        // the backend closed, so the relay closed at once (see `finished`).
        let from_a: usize = script.iter().map(|e| e.reply.len()).sum();
        assert_eq!(
            stats.bytes_from_asterisk as usize, from_a,
            "bytes from Asterisk"
        );
        assert!(stats.caller_hung_up == script.iter().any(|e| e.reply.starts_with(b"HANGUP")));
    });
}

// ------------------------------------------------------- control API

const TOKEN: &str = "fuzz-token-0123456789";
const MAX_BODY: usize = 64 * 1024;

/// A ControlPlane with no proxy behind it: configs go through the real
/// parse and validation; every state-changing call that reaches it is
/// counted, whether it then succeeds or not.
#[derive(Default)]
pub struct FakePlane {
    state: Mutex<(u64, String)>,
    changes: AtomicU64,
    /// The longest config text the router handed over.
    longest_config: AtomicU64,
}

impl FakePlane {
    fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }
}

fn backend_view(address: &str, draining: bool) -> BackendView {
    BackendView {
        address: address.to_string(),
        source: "static".into(),
        state: if draining { "draining" } else { "healthy" }.into(),
        weight: 1,
        max_sessions: None,
        active_sessions: 0,
        total_sessions: 0,
        consecutive_failures: 0,
        ejections: 0,
        draining,
        ejected_for_seconds: None,
        slow_start_share: None,
        last_check: None,
    }
}

impl ControlPlane for FakePlane {
    fn status(&self) -> Status {
        Status {
            version: "fuzz".into(),
            uptime_seconds: 1.0,
            generation: self.state.lock().expect("lock").0,
            hash: "0".into(),
            source: "api".into(),
            differs_from_file: false,
            listeners: vec![],
            active_sessions: 0,
            draining: false,
            rollouts_differ: Vec::new(),
        }
    }
    fn ready(&self) -> bool {
        true
    }
    fn metrics_text(&self) -> String {
        "agiproxy_up 1\n".into()
    }
    fn config(&self) -> ConfigView {
        let s = self.state.lock().expect("lock");
        ConfigView {
            generation: s.0,
            hash: "0".into(),
            source: "api".into(),
            text: s.1.clone(),
        }
    }
    async fn apply_config(
        &self,
        text: String,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> Result<Applied, ControlError> {
        self.longest_config
            .fetch_max(text.len() as u64, Ordering::SeqCst);
        if !dry_run {
            self.changes.fetch_add(1, Ordering::SeqCst);
        }
        agiproxy_config::from_yaml_str(&text).map_err(|errs| {
            ControlError::Invalid(
                errs.0
                    .iter()
                    .map(|e| FieldError {
                        path: e.path.clone(),
                        message: e.message.clone(),
                    })
                    .collect(),
            )
        })?;
        let mut s = self.state.lock().expect("lock");
        if if_match.is_some_and(|g| g != s.0) {
            return Err(ControlError::Stale {
                current: s.0,
                if_match: true,
            });
        }
        if !dry_run {
            s.0 += 1;
            s.1 = text;
        }
        Ok(Applied {
            generation: s.0,
            hash: "0".into(),
            dry_run,
            changed: !dry_run,
            reason: None,
            dropped_overrides: Vec::new(),
        })
    }
    async fn reload_file(&self) -> Result<Applied, ControlError> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        Err(ControlError::Unavailable("no config file".into()))
    }
    fn pools(&self) -> Vec<PoolView> {
        vec![PoolView {
            name: "p".into(),
            balance: "round_robin".into(),
            active_sessions: 0,
            panic: false,
            backends: vec![backend_view("192.0.2.10:4573", false)],
            discovery: vec![],
        }]
    }
    fn set_backend_draining(
        &self,
        pool: &str,
        backend: &str,
        draining: bool,
    ) -> Result<BackendView, ControlError> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        if pool != "p" || backend != "192.0.2.10:4573" {
            return Err(ControlError::NotFound(format!(
                "no backend {backend} in {pool}"
            )));
        }
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(backend_view(backend, draining))
    }
    async fn set_split(
        &self,
        route: &str,
        _split: Vec<SplitWeight>,
        _if_match: Option<u64>,
    ) -> Result<Applied, ControlError> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        Err(ControlError::NotFound(format!("no split route {route}")))
    }
    fn rollouts(&self) -> Vec<RolloutView> {
        Vec::new()
    }
    fn rollout_tick(&self, route: &str, _tick: i64) -> Result<RolloutTick, ControlError> {
        Err(ControlError::NotFound(format!(
            "no rollout on route {route}"
        )))
    }
    async fn rollout_override(
        &self,
        route: &str,
        _action: &str,
        _req: agiproxy_control::api::RolloutOverrideRequest,
    ) -> Result<Applied, ControlError> {
        self.changes.fetch_add(1, Ordering::SeqCst);
        Err(ControlError::NotFound(format!(
            "no rollout on route {route}"
        )))
    }
    fn drain(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }
    fn observe_request(&self, _endpoint: &str, _status: u16) {}
}

fn control_router(plane: &Arc<FakePlane>) -> axum::Router {
    agiproxy_control::server::router(
        plane.clone(),
        Some(TOKEN.to_string()),
        MAX_BODY,
        Duration::from_secs(30),
    )
}

async fn call(
    app: axum::Router,
    method: Method,
    uri: &str,
    auth: Option<&str>,
    headers: &[(&str, &[u8])],
    body: Vec<u8>,
) -> Option<(StatusCode, Vec<u8>)> {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    // A URI or header value the HTTP parser would refuse never reaches the router.
    let req = req.body(Body::from(body)).ok()?;
    let resp = app.oneshot(req).await.expect("the router is infallible");
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes()
        .to_vec();
    Some((status, body))
}

/// Every error answer is the one JSON shape clients parse.
fn assert_error_shape(status: StatusCode, body: &[u8], what: &str) {
    if status.is_client_error() || status.is_server_error() {
        let e: ErrorBody = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{what}: {status} body is not an ErrorBody ({e}): {:?}",
                String::from_utf8_lossy(body)
            )
        });
        assert!(!e.error.is_empty(), "{what}: empty error message");
    }
}

/// Config path: UTF-8 text → `from_yaml_str` (parse, validation). A config
/// accepted there is accepted by `PUT /v1/config` and comes back byte for
/// byte from `GET /v1/config`, compiling to the same config again.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = agiproxy_config::from_yaml_str(text);
    let second = agiproxy_config::from_yaml_str(text);
    assert_eq!(
        format!("{first:?}"),
        format!("{second:?}"),
        "compiling is not deterministic"
    );
    let config = match first {
        Err(errs) => {
            assert!(!errs.0.is_empty(), "refused with no error");
            for e in &errs.0 {
                assert!(
                    !e.message.is_empty(),
                    "an error without a message at {:?}",
                    e.path
                );
            }
            return;
        }
        Ok(c) => c,
    };
    for route in &config.routes {
        let _ = route.describe(&config.pools);
    }
    if text.len() > MAX_BODY {
        return;
    }
    let plane = Arc::new(FakePlane::default());
    let bearer = format!("Bearer {TOKEN}");
    runtime().block_on(async {
        let app = control_router(&plane);
        let (status, body) = call(
            app.clone(),
            Method::PUT,
            "/v1/config",
            Some(&bearer),
            &[],
            text.as_bytes().to_vec(),
        )
        .await
        .expect("a plain request");
        assert_eq!(
            status,
            StatusCode::OK,
            "accepted by check, refused by PUT: {}",
            String::from_utf8_lossy(&body)
        );
        let (status, body) = call(app, Method::GET, "/v1/config", Some(&bearer), &[], vec![])
            .await
            .expect("a plain request");
        assert_eq!(status, StatusCode::OK);
        let view: ConfigView = serde_json::from_slice(&body).expect("GET /v1/config is JSON");
        assert_eq!(view.text, text, "the config text did not round-trip");
        let again =
            agiproxy_config::from_yaml_str(&view.text).expect("round-tripped text compiles");
        assert_eq!(format!("{again:?}"), format!("{config:?}"));
    });
}

const PATHS: [&str; 12] = [
    "/v1/status",
    "/v1/config",
    "/v1/reload",
    "/v1/pools",
    "/v1/pools/p",
    "/v1/pools/p/backends/192.0.2.10:4573/drain",
    "/v1/pools/p/backends/192.0.2.10:4573/enable",
    "/v1/routes/r/split",
    "/v1/drain",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// Control API: `[method, path choice, auth, flags, path/query bytes..., 0, header value, 0, body...]`.
/// Properties: no request changes state without the token; every error is
/// a JSON ErrorBody; a config over the body limit never reaches the plane
/// and no PUT over it succeeds; no 500.
pub fn control_api(data: &[u8]) {
    let mut input = Input { data };
    let method = [
        Method::GET,
        Method::PUT,
        Method::POST,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
    ][input.byte() as usize % 6]
        .clone();
    let choice = input.byte() as usize;
    let auth_kind = input.byte() % 4;
    let flags = input.byte();
    let rest = input.rest();
    let mut parts = rest.splitn(3, |b| *b == 0);
    let suffix = parts.next().unwrap_or_default();
    let header_value = parts.next().unwrap_or_default();
    let mut body = parts.next().unwrap_or_default().to_vec();
    // 96..128: the rollout endpoints (added after the first runs; the
    // other choices keep the meaning they had in the corpus).
    const ROLLOUT: [&str; 3] = [
        "/v1/rollouts/r",
        "/v1/rollouts/r/counts?tick=3",
        "/v1/rollouts/r/pause",
    ];
    let base = if (96..128).contains(&choice) {
        ROLLOUT[choice % ROLLOUT.len()]
    } else {
        PATHS[choice % PATHS.len()]
    };
    let uri = if choice >= 128 {
        String::from_utf8_lossy(suffix).into_owned()
    } else {
        format!("{base}{}", String::from_utf8_lossy(suffix))
    };
    if flags & 1 != 0 {
        body.resize(MAX_BODY + 1 + (flags as usize >> 4), b'#');
    }
    let over_limit = body.len() > MAX_BODY;
    let bearer = format!("Bearer {TOKEN}");
    let auth = match auth_kind {
        0 => None,
        1 => Some(bearer.as_str()),
        2 => Some("Bearer wrong"),
        _ => Some(std::str::from_utf8(header_value).unwrap_or("Bearer")),
    };
    let authorised = auth_kind == 1;
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    if flags & 2 != 0 {
        headers.push(("if-match", header_value));
    }
    if flags & 4 != 0 {
        headers.push(("content-type", b"application/json"));
    }
    if flags & 8 != 0 {
        headers.push(("accept", b"application/yaml"));
    }
    let plane = Arc::new(FakePlane::default());
    runtime().block_on(async {
        let app = control_router(&plane);
        let is_head = method == Method::HEAD;
        let is_put = method == Method::PUT;
        let Some((status, resp)) = call(app, method, &uri, auth, &headers, body).await else {
            return;
        };
        if !authorised {
            assert_eq!(
                plane.changes(),
                0,
                "{uri}: state changed without the token ({status})"
            );
        }
        // (An endpoint that takes no body ignores one of any size: it is
        // never buffered. A regression input of the first run says so.)
        let longest = plane.longest_config.load(Ordering::SeqCst) as usize;
        assert!(
            longest <= MAX_BODY,
            "{uri}: a {longest}-byte config passed the {MAX_BODY}-byte limit"
        );
        if over_limit && is_put && authorised {
            assert!(
                !status.is_success(),
                "{uri}: a body over the limit accepted"
            );
        }
        if !is_head {
            assert_error_shape(status, &resp, &uri);
        }
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{uri}: 500");
    });
}

// ------------------------------------------------------ PROXY protocol

/// The PROXY header reader (`session::proxy_protocol::parse`), on bytes
/// that arrive in any cut. Properties: what a buffer reads as does not
/// contradict what any prefix of it read as (a prefix is `Partial`, or
/// already what the whole is); a `Done` header is exactly `len` bytes,
/// whatever follows it; `Partial` is bounded (v1's 107 bytes, v2's 16 plus
/// its 16-bit length), so a peer cannot keep it partial for ever.
pub fn proxy_protocol(data: &[u8]) {
    use agiproxy::session::proxy_protocol::{parse, Preamble};
    let whole = parse(data);
    if let Ok(Preamble::Partial) = whole {
        assert!(data.len() < 16 + 65_535, "partial at {} bytes", data.len());
        if data.starts_with(b"PROXY ") {
            assert!(data.len() < 107, "v1 partial at {} bytes", data.len());
        }
    }
    // Every short prefix, and a few long ones (all of them is quadratic).
    let n = data.len();
    let cuts = (0..n.min(128)).chain([n / 3, n / 2, n.saturating_sub(1)]);
    for cut in cuts.filter(|c| *c < n) {
        let part = parse(&data[..cut]);
        let consistent = matches!(part, Ok(Preamble::Partial)) || part == whole;
        assert!(
            consistent,
            "{cut} of {n} bytes read as {part:?}, all of them as {whole:?}"
        );
    }
    if let Ok(Preamble::Done { len, caller }) = whole {
        assert!(len > 0 && len <= n, "{len} of {n}");
        if let Some(declared) = agiproxy::session::proxy_protocol::v2_declared_len(data) {
            assert_eq!(declared, len, "a v2 header's declared length");
        }
        assert_eq!(
            parse(&data[..len]),
            whole,
            "the header alone reads otherwise"
        );
        let mut more = data[..len].to_vec();
        more.extend_from_slice(b"agi_network: yes\n\n");
        assert_eq!(
            parse(&more),
            Ok(Preamble::Done { len, caller }),
            "what follows the header changed it"
        );
    }
}
