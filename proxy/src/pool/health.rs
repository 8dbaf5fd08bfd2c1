//! Active health checks, and the watcher that keeps a pool's backend states
//! current and logged.
//!
//! Two kinds of check (`health.type`):
//! - `agi` (the default, and the safe one): a synthetic FastAGI session. The
//!   probe sends a whole, well-formed header as a real Asterisk would, for
//!   the configured script, with a channel (`agiproxy/healthcheck`),
//!   context (`agiproxy-healthcheck`) and unique id (`agiproxy-probe-N`) by
//!   which a backend tells a probe from a call; it expects one command line
//!   within the timeout (matching `expect`, when given), answers it
//!   `200 result=0` as Asterisk would, then sends `HANGUP`, closes its side
//!   and reads until the backend closes. A backend that accepts but never
//!   speaks, closes, resets, or sends something that is not an AGI command
//!   (or a `failure` line) fails the check.
//! - `tcp`: a connect, then a close. It kills or wedges fragile FastAGI
//!   servers (`shared/fastagi-protocol.md`): use it only for backends known
//!   to survive a connection closed before the header.
//!
//! Each backend is checked every `interval`, varied by up to `jitter` either
//! way so that replicas do not probe in lock-step; the first check comes
//! within `jitter` of the backend joining the pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use agiproxy_config::{HealthCheck, HealthKind};
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::backend::{BackendLive, CheckEpoch, CheckResult};
use super::hash::stable_hash;
use super::members::Members;
use super::polite_close::close_politely_holding;
use super::state::PoolShared;

/// How often the watcher looks at the pool: state changes that happen by
/// the clock alone (a backoff or a slow start running out) are logged
/// within this, and a new member is checked within this plus `jitter`.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Asterisk reads commands into an 8192-byte buffer: a longer line is not one.
const MAX_LINE: usize = 8191;

/// The channel every probe claims, so backends can tell probes from calls.
pub const PROBE_CHANNEL: &str = "agiproxy/healthcheck";
/// The context every probe claims.
pub const PROBE_CONTEXT: &str = "agiproxy-healthcheck";
/// Every probe's `agi_uniqueid` is this followed by a number.
pub const PROBE_UNIQUEID_PREFIX: &str = "agiproxy-probe-";

/// AGI commands Asterisk knows, by first word (it matches them without
/// regard to case); `GET`/`PUT SOUNDFILE` are agiproxy's file transfer.
const COMMAND_WORDS: &[&str] = &[
    "ANSWER", "ASYNCAGI", "CHANNEL", "CONTROL", "DATABASE", "EXEC", "GET", "GOSUB", "HANGUP",
    "NOOP", "PUT", "RECEIVE", "RECORD", "SAY", "SEND", "SET", "SPEECH", "STREAM", "TDD", "VERBOSE",
    "WAIT",
];

static PROBES: AtomicU64 = AtomicU64::new(0);

/// Keeps a pool's state current while its snapshot runs: starts and stops
/// one check loop per member (when the pool has checks) as the member set
/// changes, and logs state changes that happen by the clock alone.
pub(crate) async fn supervise(pool: Arc<PoolShared>) {
    let name: Arc<str> = Arc::from(pool.name.as_str());
    let check = pool.config.health.clone().map(Arc::new);
    let epoch = pool.check_epoch();
    let mut probes: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    let mut seen: Option<Arc<Members>> = None;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = pool.cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let members = pool.members.load_full();
        if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &members)) {
            if let Some(check) = &check {
                reconcile(&pool, &name, check, &epoch, &members, &mut probes);
            }
            seen = Some(members.clone());
        }
        for b in &members.backends {
            b.live.note(&name, None);
        }
    }
    for token in probes.values() {
        token.cancel();
    }
}

/// The pools without active checks of one snapshot, watched by one task:
/// state changes that happen by the clock alone (a backoff or a slow start
/// running out) are logged within [`WATCH_EVERY`]. A task per pool cost a
/// timer and its wake-ups each: 2,000 such pools kept 1.8 % of a core busy
/// on an idle proxy. Ends when the snapshot retires.
pub(crate) async fn watch_unchecked(mut pools: Vec<Arc<PoolShared>>) {
    let Some(first) = pools.first().map(|p| p.cancel.clone()) else {
        return;
    };
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = first.cancelled() => {}
            _ = tick.tick() => {}
        }
        // A snapshot's pools retire together; each is checked all the same.
        pools.retain(|p| !p.cancel.is_cancelled());
        if pools.is_empty() {
            return;
        }
        for p in &pools {
            for b in &p.members.load().backends {
                b.live.note(&p.name, None);
            }
        }
    }
}

/// One check loop per member: new members get one, removed ones lose theirs.
fn reconcile(
    pool: &PoolShared,
    name: &Arc<str>,
    check: &Arc<HealthCheck>,
    epoch: &CheckEpoch,
    members: &Members,
    probes: &mut HashMap<SocketAddr, CancellationToken>,
) {
    probes.retain(|addr, token| {
        let keep = members.backends.iter().any(|b| b.addr == *addr);
        if !keep {
            token.cancel();
        }
        keep
    });
    for b in &members.backends {
        if probes.contains_key(&b.addr) {
            continue;
        }
        let token = pool.cancel.child_token();
        probes.insert(b.addr, token.clone());
        tokio::spawn(check_loop(
            name.clone(),
            check.clone(),
            b.live.clone(),
            epoch.clone(),
            token,
        ));
    }
}

/// Checks one backend every `interval` ± `jitter` (start to start) until
/// cancelled, or until its `epoch` ends. A check in flight is never cut: it
/// ends politely first (and its result is dropped if the epoch ended). A
/// loop of an epoch that ran before (a reload that kept the checks) goes on
/// with its schedule; a new one checks within `jitter`.
async fn check_loop(
    pool: Arc<str>,
    check: Arc<HealthCheck>,
    live: Arc<BackendLive>,
    epoch: CheckEpoch,
    cancel: CancellationToken,
) {
    let mut next = live.next_check(&epoch).unwrap_or_else(|| {
        tokio::time::Instant::now() + jittered(Duration::ZERO, check.jitter, live.addr)
    });
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let started = tokio::time::Instant::now();
        // Noted before the probe: a loop taking over while it runs waits
        // for the next one instead of probing again.
        next = started + jittered(check.interval, check.jitter, live.addr);
        live.schedule_check(&epoch, next);
        let current = match probe(live.addr, &check).await {
            Ok(result) => live.record_check(result, check.rise, check.fall, &pool, &epoch),
            // The proxy's own shortage says nothing of the backend: held
            // against it, it would take a healthy pool out of rotation
            // backend by backend, and keep it out for `rise` checks after
            // the shortage ends.
            Err(NotRun(e)) => {
                let current = live.record_not_run(&epoch);
                if current && e.kind() != std::io::ErrorKind::WouldBlock {
                    crate::fds::warn("health check", &e);
                }
                current
            }
        };
        if !current {
            // A newer config runs; its own loops (if any) check.
            return;
        }
    }
}

/// `base` plus a pseudo-random offset in [-jitter, +jitter] (never negative).
fn jittered(base: Duration, jitter: Duration, addr: SocketAddr) -> Duration {
    if jitter.is_zero() {
        return base;
    }
    let seed = PROBES.load(Ordering::Relaxed) ^ std::process::id() as u64;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let r = stable_hash(addr.to_string().as_bytes(), seed ^ nanos);
    let span = jitter.as_micros() as u64 * 2 + 1;
    let offset = Duration::from_micros(r % span);
    (base + offset).saturating_sub(jitter)
}

/// A check that could not run because the proxy itself is out of
/// descriptors, socket buffers or memory ([`crate::fds::is_local`]): no
/// verdict on the backend.
#[derive(Debug)]
pub struct NotRun(pub std::io::Error);

/// Why a probe did not pass.
enum Failed {
    /// The backend's doing: a failed check.
    Backend(String),
    /// The proxy's own shortage.
    Local(std::io::Error),
}

impl From<String> for Failed {
    fn from(detail: String) -> Failed {
        Failed::Backend(detail)
    }
}

/// Probes in flight at once, over every pool (a probe's socket is held
/// through its polite close): an eighth of the descriptor limit, at least
/// 16. Past it a check is not run (no verdict, counted in
/// `agiproxy_backend_checks_not_run`): 1,500 silent backends behind one
/// DNS name otherwise took every descriptor below the reserve, and calls on
/// a healthy pool got FAILURE `local_resources` (audit).
fn in_flight() -> &'static Arc<Semaphore> {
    static IN_FLIGHT: OnceLock<Arc<Semaphore>> = OnceLock::new();
    IN_FLIGHT.get_or_init(|| {
        let n = crate::fds::limit().map_or(512, |l| (l / 8).max(16));
        Arc::new(Semaphore::new(n))
    })
}

/// A place among the probes in flight, or why there is none.
fn probe_permit(limit: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, NotRun> {
    limit.clone().try_acquire_owned().map_err(|_| {
        NotRun(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "as many health checks in flight as descriptors allow them",
        ))
    })
}

/// Runs one check against `addr`.
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<CheckResult, NotRun> {
    let permit = probe_permit(in_flight())?;
    let started = Instant::now();
    let run = async {
        match &check.kind {
            HealthKind::Tcp => probe_tcp(addr, check.timeout).await,
            HealthKind::Agi { script, expect } => {
                probe_agi(addr, script, expect.as_ref(), check.timeout, permit).await
            }
        }
    };
    // A panic here (a bug, reached by what a backend sent) would end the
    // backend's check loop for good and freeze its verdict; caught, it is a
    // failed check, and the panic hook has logged and counted it.
    let outcome = match std::panic::AssertUnwindSafe(run).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failed::Backend(
            "the check failed inside agiproxy (a bug: see the ERROR `panic` line)".to_string(),
        )),
    };
    let (ok, detail) = match outcome {
        Ok(d) => (true, d),
        Err(Failed::Backend(d)) => (false, d),
        Err(Failed::Local(e)) => return Err(NotRun(e)),
    };
    Ok(CheckResult {
        ok,
        latency: started.elapsed(),
        at: SystemTime::now(),
        detail,
    })
}

async fn connect(addr: SocketAddr, deadline: tokio::time::Instant) -> Result<TcpStream, Failed> {
    match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if crate::fds::is_local(&e) => Err(Failed::Local(e)),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err("connect refused".to_string().into())
        }
        Ok(Err(e)) => Err(format!("connect failed: {e}").into()),
        Err(_) => Err("connect timed out".to_string().into()),
    }
}

async fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Result<String, Failed> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = connect(addr, deadline).await?;
    drop(stream);
    Ok("connected".to_string())
}

/// The header of probe number `seq`: the variables a real Asterisk sends,
/// in its order, with values that mark it as a probe.
pub fn probe_header(addr: SocketAddr, script: &str, seq: u64) -> Vec<u8> {
    let version = env!("CARGO_PKG_VERSION");
    let vars: [(&str, String); 22] = [
        ("agi_network", "yes".into()),
        ("agi_network_script", script.into()),
        ("agi_request", format!("agi://{addr}/{script}")),
        ("agi_channel", PROBE_CHANNEL.into()),
        ("agi_language", "en".into()),
        ("agi_type", "agiproxy".into()),
        ("agi_uniqueid", format!("{PROBE_UNIQUEID_PREFIX}{seq}")),
        ("agi_version", format!("agiproxy-{version}")),
        ("agi_callerid", "unknown".into()),
        ("agi_calleridname", "agiproxy healthcheck".into()),
        ("agi_callingpres", "0".into()),
        ("agi_callingani2", "0".into()),
        ("agi_callington", "0".into()),
        ("agi_callingtns", "0".into()),
        ("agi_dnid", "unknown".into()),
        ("agi_rdnis", "unknown".into()),
        ("agi_context", PROBE_CONTEXT.into()),
        ("agi_extension", "s".into()),
        ("agi_priority", "1".into()),
        ("agi_enhanced", "0.0".into()),
        ("agi_accountcode", String::new()),
        ("agi_threadid", "0".into()),
    ];
    let mut out = Vec::with_capacity(640);
    for (name, value) in vars {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

async fn probe_agi(
    addr: SocketAddr,
    script: &str,
    expect: Option<&regex::Regex>,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) -> Result<String, Failed> {
    // Held until the backend's socket is closed, polite close included.
    let close_politely = move |stream| close_politely_holding(stream, permit);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = connect(addr, deadline).await?;
    let _ = stream.set_nodelay(true);
    let seq = PROBES.fetch_add(1, Ordering::Relaxed) + 1;
    let header = probe_header(addr, script, seq);
    // A header is far smaller than a socket buffer: this fails only when
    // the backend is already gone.
    if let Err(e) = stream.write_all(&header).await {
        return Err(format!("closed before taking the header: {e}").into());
    }
    let mut buf = Vec::with_capacity(256);
    let line = loop {
        if let Some(end) = memchr::memchr(b'\n', &buf) {
            break buf[..end].to_vec();
        }
        if buf.len() > MAX_LINE {
            close_politely(stream);
            return Err(format!(
                "sent {} bytes without a newline: not an AGI command",
                buf.len()
            )
            .into());
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => {
                close_politely(stream);
                return Err(format!("no command within {}", humantime_ms(timeout)).into());
            }
            Ok(Ok(0)) => {
                close_politely(stream);
                return Err("closed without sending a command".to_string().into());
            }
            Ok(Err(e)) => return Err(format!("connection failed before a command: {e}").into()),
            Ok(Ok(_)) => {}
        }
    };
    let verdict = judge(&line, expect);
    if matches!(verdict, Ok(_) | Err(Judged::Mismatch(_))) {
        // A command: answered as Asterisk would, so the backend's script
        // sees the reply it waits for before it reads the HANGUP.
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            stream.write_all(b"200 result=0\n"),
        )
        .await;
    }
    close_politely(stream);
    match verdict {
        Ok(command) => Ok(format!("first command {command:?}")),
        Err(Judged::Mismatch(m) | Judged::Bad(m)) => Err(m.into()),
    }
}

fn humantime_ms(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

enum Judged {
    /// A command, but not the one `expect` asks for.
    Mismatch(String),
    /// Not a command at all, or a `failure` line.
    Bad(String),
}

/// Whether a backend's first line is a well-formed AGI command (matching
/// `expect` when given). A trailing `\r` is tolerated, as the relay
/// tolerates it for calls.
fn judge(line: &[u8], expect: Option<&regex::Regex>) -> Result<String, Judged> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let shown = || {
        let text = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
        format!("{text:?}")
    };
    let Ok(text) = std::str::from_utf8(line) else {
        return Err(Judged::Bad(format!(
            "sent {} (not text): not an AGI command",
            shown()
        )));
    };
    // Bytes, not `text[..7]`: byte 7 may fall inside a character
    // (`Привет`), and slicing a `str` there panics.
    if line.len() >= 7 && line[..7].eq_ignore_ascii_case(b"failure") {
        return Err(Judged::Bad(format!("answered {}", shown())));
    }
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return Err(Judged::Bad(format!(
            "sent {} (control characters): not an AGI command",
            shown()
        )));
    }
    let first = text.split_ascii_whitespace().next().unwrap_or("");
    if !COMMAND_WORDS.iter().any(|w| w.eq_ignore_ascii_case(first)) {
        return Err(Judged::Bad(format!("sent {}: not an AGI command", shown())));
    }
    if let Some(re) = expect {
        if !re.is_match(text) {
            return Err(Judged::Mismatch(format!(
                "first command {} does not match expect {:?}",
                shown(),
                re.as_str()
            )));
        }
    }
    Ok(text.chars().take(80).collect())
}

#[cfg(test)]
mod tests {
    /// Past the probes-in-flight limit a check is not run (no verdict),
    /// and a place comes back once a probe and its polite close are done.
    #[tokio::test]
    async fn probes_in_flight_are_bounded_and_held_through_the_close() {
        let limit = Arc::new(Semaphore::new(2));
        let a = probe_permit(&limit).unwrap();
        let _b = probe_permit(&limit).unwrap();
        let Err(NotRun(e)) = probe_permit(&limit) else {
            panic!("a third probe ran")
        };
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        // A backend that closes 300 ms after our HANGUP.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        close_politely_holding(stream, a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(probe_permit(&limit).is_err(), "given back before the close");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(probe_permit(&limit).is_ok());
    }

    use super::*;
    use crate::pool::backend::BackendState;

    #[test]
    fn probe_headers_look_like_asterisk_and_say_probe() {
        let h = probe_header("127.0.0.1:4573".parse().unwrap(), "healthz", 7);
        let text = String::from_utf8(h).unwrap();
        assert!(text.starts_with(
            "agi_network: yes\nagi_network_script: healthz\nagi_request: agi://127.0.0.1:4573/healthz\nagi_channel: agiproxy/healthcheck\n"
        ));
        assert!(text.contains("\nagi_uniqueid: agiproxy-probe-7\n"));
        assert!(text.contains("\nagi_context: agiproxy-healthcheck\n"));
        assert!(text.contains("\nagi_accountcode: \n"));
        assert!(text.ends_with("agi_threadid: 0\n\n"));
        assert_eq!(text.matches('\n').count(), 23);
        let v6 = probe_header("[::1]:4573".parse().unwrap(), "h?x=1", 1);
        assert!(String::from_utf8(v6)
            .unwrap()
            .contains("agi_request: agi://[::1]:4573/h?x=1\n"));
    }

    #[test]
    fn first_lines_are_judged() {
        assert_eq!(judge(b"NOOP", None).ok().as_deref(), Some("NOOP"));
        assert!(judge(b"verbose \"ok\" 1\r", None).is_ok());
        assert!(matches!(judge(b"FAILURE", None), Err(Judged::Bad(_))));
        assert!(matches!(
            judge(b"HTTP/1.1 400 Bad Request", None),
            Err(Judged::Bad(_))
        ));
        assert!(matches!(judge(b"\x00\xff\x01", None), Err(Judged::Bad(_))));
        assert!(matches!(judge(b"NOOP\x1b[31m", None), Err(Judged::Bad(_))));
        assert!(matches!(judge(b"", None), Err(Judged::Bad(_))));
        // Text whose byte 7 falls inside a character (a localized banner).
        for banner in ["Привет", "VERBOSÉ x"] {
            assert!(
                matches!(judge(banner.as_bytes(), None), Err(Judged::Bad(_))),
                "{banner}"
            );
        }
        assert!(judge("NOOP 你好".as_bytes(), None).is_ok());
        assert!(judge("VERBOSE \"Grüße\" 1".as_bytes(), None).is_ok());
        let re = regex::Regex::new("^VERBOSE").unwrap();
        assert!(matches!(
            judge(b"NOOP", Some(&re)),
            Err(Judged::Mismatch(_))
        ));
        assert!(judge(b"VERBOSE \"up\" 1", Some(&re)).is_ok());
    }

    /// Starts a pool's checks as a snapshot's activation does.
    fn activate(p: &super::super::PoolState) {
        if p.activate() {
            tokio::spawn(supervise(p.shared().clone()));
        }
    }

    /// The pools without checks share one watcher: a backend whose passive
    /// backoff runs out is noted (and logged) as back within WATCH_EVERY,
    /// and the watcher ends when the pools retire.
    #[tokio::test]
    async fn one_watcher_notes_the_unchecked_pools_and_ends_with_them() {
        let text = "version: 1\npools:\n  - name: a\n    passive: { consecutive_failures: 1, backoff: 300ms }\n    backends: [{ address: \"127.0.0.1:9\" }, { address: \"127.0.0.2:9\" }]\n  - name: b\n    backends: [{ address: \"127.0.0.3:9\" }]\n";
        let cfg = agiproxy_config::from_yaml_str(text).unwrap();
        let pools: Vec<_> = cfg
            .pools
            .iter()
            .map(|p| super::super::PoolState::new(p, None))
            .collect();
        for p in &pools {
            assert!(p.activate());
        }
        let watcher = tokio::spawn(watch_unchecked(
            pools.iter().map(|p| p.shared().clone()).collect(),
        ));
        let live = pools[0].members().backends[0].live.clone();
        assert!(pools[0].passive_failure(&live, "test").is_some());
        live.note("a", Some("test"));
        let reported = || BackendState::from_u8(live.reported.load(Ordering::Relaxed));
        assert_eq!(reported(), BackendState::Ejected);
        // Nobody calls `note` but the watcher.
        let t0 = tokio::time::Instant::now();
        while reported() == BackendState::Ejected {
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "the backoff's end was never noted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let noted = t0.elapsed();
        assert!(
            noted >= Duration::from_millis(250),
            "noted after {noted:?}, before the backoff ran out"
        );
        assert!(!watcher.is_finished());
        for p in &pools {
            p.retire();
        }
        tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .expect("the watcher ends with its pools")
            .unwrap();
    }

    /// Checks start with activation and stop with `retire`; the verdict
    /// lives on in the next snapshot's pool.
    #[tokio::test]
    async fn checks_run_while_active_and_stop_when_retired() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                drop(s);
            }
        });
        let text = format!(
            "version: 1\npools:\n  - name: p\n    health: {{ type: tcp, interval: 50ms, timeout: 40ms, jitter: 5ms }}\n    backends:\n      - {{ address: \"{addr}\" }}\n"
        );
        let cfg = agiproxy_config::from_yaml_str(&text).unwrap();
        let old = super::super::PoolState::new(&cfg.pools[0], None);
        activate(&old);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let n = accepted.load(Ordering::Relaxed);
        assert!(n >= 5, "{n} checks in 600 ms at a 50 ms interval");
        let live = old.members().backends[0].live.clone();
        assert_eq!(live.check_verdict(), Some(true));

        let new = super::super::PoolState::new(&cfg.pools[0], Some(&old));
        old.retire();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after_retire = accepted.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            after_retire,
            "a retired pool still checks"
        );

        activate(&new);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(accepted.load(Ordering::Relaxed) > after_retire);
        assert!(Arc::ptr_eq(&new.members().backends[0].live, &live));
        new.retire();
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let addr = "127.0.0.1:1".parse().unwrap();
        for _ in 0..200 {
            let d = jittered(Duration::from_millis(100), Duration::from_millis(10), addr);
            assert!(
                d >= Duration::from_millis(90) && d <= Duration::from_millis(110),
                "{d:?}"
            );
            let first = jittered(Duration::ZERO, Duration::from_millis(10), addr);
            assert!(first <= Duration::from_millis(10));
        }
    }
}
