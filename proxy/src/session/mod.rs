//! One session from accept to close: read the header, route, pick a pool,
//! attach a backend within the budget, relay, and write one access-log line.
//! Every failure before commit is spoken to Asterisk as FAILURE.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures_util::FutureExt;
use tokio::net::TcpStream;

use agiproxy_config::{Mode, Route};

use crate::pool::NoBackend;
use crate::snapshot::Snapshot;
use crate::throttle::Throttle;

pub mod connect;
pub mod failure;
pub mod header;
pub mod keepalive;
pub mod outcome;
pub mod proxy_protocol;
pub mod record;
pub mod relay;
pub mod rewrite;
pub mod rollout;
pub mod router;
mod script_regex;
pub mod shared;
pub mod throttled;
pub mod turn;

use connect::{attach, AttachError, AttachPlan, Attached};
use failure::{tell_failure_when, AsteriskReads, LastKnown};
use header::{discard_rest, read_header, Discarded, HeaderError, HeaderLimits, ReadSoFar};
use outcome::{Outcome, Reason};
pub use record::SessionRecord;
use relay::raw::relay_raw;
use relay::{Relay, RelayEnd, RelayOptions};
use rewrite::{backend_header, TemplateContext};
pub use shared::{ActiveGuard, HeaderSlot, Refusal, Shared};

/// How long a refused connection (over `max_sessions`, or in the descriptor
/// reserve) may take to send its header before it is closed.
pub const REFUSAL_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

fn header_limits(cfg: &agiproxy_config::Config) -> HeaderLimits {
    HeaderLimits {
        max_bytes: cfg.limits.max_header_bytes,
        max_lines: cfg.limits.max_header_lines,
        timeout: cfg.timeouts.header,
        max_memory: cfg.limits.max_header_memory,
    }
}

/// Serves one accepted connection from Asterisk.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    listener: Arc<str>,
    mut a: TcpStream,
    peer: SocketAddr,
    proxied: bool,
    mut admission: Admission,
) {
    let started = Instant::now();
    let mut rec = SessionRecord::new(peer, listener, snap.meta.generation);
    // What Asterisk reads next, kept by the relay outside `run`'s future:
    // the guard below still knows it once that future has unwound.
    let reads = LastKnown::default();
    let ran = AssertUnwindSafe(run(
        &shared,
        &snap,
        &mut a,
        proxied,
        &mut rec,
        &mut admission,
        &reads,
    ))
    .catch_unwind()
    .await;
    if ran.is_err() {
        // A bug (the panic hook has logged and counted it). The task would
        // have closed Asterisk's connection, which reads as SUCCESS: tell
        // FAILURE as the relay would have at that point (a `failure` line
        // while Asterisk runs a command, after the sound-file module's
        // answer inside a payload). What `run` held (the backend's socket,
        // the header) is already dropped. Only part of a command line sent
        // (its rest lost with the relay) leaves nothing to tell: a close.
        let reads = reads.get();
        Box::pin(fail_when(&mut a, &mut rec, Reason::Internal, reads)).await;
    }
    rec.duration = started.elapsed();
    // A refused header is no session of a call: not timed.
    let timed = rec.header_error.is_none();
    // Out of the rollout's in-flight count before the record is published,
    // as before the count had a guard: whoever sees the record sees it.
    admission.rollout = None;
    finish(&shared, rec, timed);
    drop(admission);
}

/// What an admitted session holds: its place among the sessions, and among
/// its peer's connections still sending their header (given back once the
/// header is in).
pub struct Admission {
    pub active: ActiveGuard,
    pub header: Option<HeaderSlot>,
    /// On a rollout's route, its place among the sessions of its colour.
    pub rollout: Option<rollout::InFlight>,
}

/// Counts, logs and publishes a finished session; `timed`: its duration
/// goes into `session_seconds` (not for refused headers and overload
/// rejections, as documented: an audit found both in it).
fn finish(shared: &Shared, rec: SessionRecord, timed: bool) {
    if let Some((live, pick)) = &rec.rollout {
        live.session_ended(
            pick,
            rec.outcome,
            rec.reason,
            rec.first_command_time.map(|d| d.as_millis() as u64),
        );
    }
    let m = &shared.metrics;
    // A connection that closed without a byte (a port probe) is counted in
    // `header_errors_total{reason="closed"}` and gets no access line; as a
    // `bad_header` session it swelled `sessions_total` past the access log
    // with every load balancer's TCP check (audit).
    if rec.header_error != Some("closed") {
        m.session(
            rec.route.as_deref().unwrap_or("-"),
            rec.pool.as_deref().unwrap_or("-"),
            rec.live_backend.as_ref().map_or("-", |b| &b.label),
            rec.outcome,
        );
    }
    if let (Outcome::Failed, Some(r)) = (rec.outcome, rec.reason) {
        m.failure(r).inc();
    }
    m.bytes_from_asterisk.inc_by(rec.bytes_from_asterisk);
    m.bytes_to_asterisk.inc_by(rec.bytes_to_asterisk);
    if timed {
        m.session_seconds.observe(rec.duration.as_secs_f64());
    }
    rec.log();
    shared.publish(rec);
}

async fn run(
    shared: &Shared,
    snap: &Snapshot,
    a: &mut TcpStream,
    proxied: bool,
    rec: &mut SessionRecord,
    admission: &mut Admission,
    reads: &LastKnown,
) {
    // Two phases, the first boxed: reading the header and searching for a
    // backend hold far more state than relaying, and a session spends its
    // life relaying (an `EXEC Dial` may last hours). Boxed, that state is
    // freed when the backend is found instead of sizing every session's
    // task: one allocation per session buys about 0.6 KiB less per idle
    // session (see docs/benchmarks.md).
    let found = find_backend(shared, snap, a, proxied, rec, admission);
    let Some((at, route)) = Box::pin(found).await else {
        return;
    };
    relay(shared, route, snap.config.tcp_keepalive, a, rec, at, reads).await;
}

/// Reads the header, routes it and attaches a backend; `None` when the
/// session ended on the way (FAILURE told, header refused, caller gone).
async fn find_backend<'s>(
    shared: &Shared,
    snap: &'s Snapshot,
    a: &mut TcpStream,
    proxied: bool,
    rec: &mut SessionRecord,
    admission: &mut Admission,
) -> Option<(Attached, &'s Route)> {
    let cfg = &snap.config;
    let limits = header_limits(cfg);
    let read = read_header(a, &limits, &shared.header_memory, proxied).await;
    admission.header = None;
    // A large header's memory stays counted for as long as it is kept: to
    // the end of the backend search.
    let (header, _held) = match read {
        Ok((h, caller, held)) => {
            rec.called_by(caller);
            (h, held)
        }
        Err(e) => {
            Box::pin(bad_header(shared, a, rec, e, &limits)).await;
            return None;
        }
    };
    let header_done = Instant::now();
    rec.script = header.get("agi_network_script").unwrap_or("").to_string();
    #[cfg(test)]
    tests::panic_if_asked(&rec.script, "before-backend");

    let Some(ri) = snap.router.route(&header, rec.peer.ip()) else {
        Box::pin(fail(a, rec, Reason::NoRoute)).await;
        return None;
    };
    let compiled = &snap.router.routes()[ri];
    let route = &compiled.route;
    rec.route = Some(compiled.name.clone());
    let (pi, pick) = snap
        .router
        .pool_for(ri, &header, rec.peer.ip(), rollout::now_ms());
    if let (Some(pick), Some(ro)) = (pick, &compiled.rollout) {
        admission.rollout = Some(ro.live.session_started(&pick));
        rec.rollout = Some((ro.live.clone(), pick));
    }
    let pool = &snap.pools[pi];
    rec.pool = Some(pool.name.clone());
    let candidates = match pool.candidates(pool.hash_key().and_then(|k| header.get(k))) {
        Ok(o) => o,
        Err(e) => {
            let reason = match e {
                NoBackend::AllEjected => Reason::NoBackend,
                NoBackend::Full => Reason::PoolFull,
            };
            Box::pin(fail(a, rec, reason)).await;
            return None;
        }
    };

    // A `getsockname` per session, only when a template can use it.
    let local = if route.set.is_empty() {
        rec.peer
    } else {
        a.local_addr().unwrap_or(rec.peer)
    };
    let ctx = TemplateContext {
        remote: rec.peer,
        local,
        route: &route.name,
        listener: &rec.listener,
        pool: &pool.name,
    };
    let replay = backend_header(&header, route.rewrite.as_ref(), &route.set, &ctx);
    let mut early = header.trailing().to_vec();
    let t = &route.timeouts;
    let plan = AttachPlan {
        pool,
        candidates: &candidates,
        header: &replay,
        timeouts: t,
        started: header_done,
        raw: route.mode == Mode::Raw,
        metrics: &shared.metrics,
        cut: &shared.drain.force,
    };
    let at = match attach(&plan, a, &mut early).await {
        Ok(at) => at,
        Err(AttachError::Failed { reason, attempts }) => {
            rec.attempts = attempts;
            rec.caller_hung_up = hung_up(&early);
            Box::pin(fail(a, rec, reason)).await;
            return None;
        }
        Err(AttachError::ClientGone { attempts }) => {
            rec.attempts = attempts;
            rec.caller_hung_up = hung_up(&early);
            rec.outcome = Outcome::ClientGone;
            return None;
        }
    };
    rec.attempts = at.attempts;
    rec.backend = Some(at.lease.backend.addr);
    rec.live_backend = Some(at.lease.backend.clone());
    rec.connect_time = Some(at.connect_time);
    rec.first_command_time = Some(at.first_byte_time);
    shared
        .metrics
        .connect_seconds
        .observe(at.connect_time.as_secs_f64());
    shared
        .metrics
        .first_command_seconds
        .observe(at.first_byte_time.as_secs_f64());
    Some((at, route))
}

/// Asterisk reported a hang-up in what it sent while a backend was sought
/// (the relay, which tells it otherwise, never ran: audit).
fn hung_up(early: &[u8]) -> bool {
    early
        .split(|&b| b == b'\n')
        .any(|l| l.strip_suffix(b"\r").unwrap_or(l) == b"HANGUP")
}

/// Relays the committed session to its end.
async fn relay(
    shared: &Shared,
    route: &Route,
    keepalive: Option<agiproxy_config::Keepalive>,
    a: &mut TcpStream,
    rec: &mut SessionRecord,
    mut at: Attached,
    reads: &LastKnown,
) {
    #[cfg(test)]
    tests::panic_if_asked(&rec.script, "after-attach");
    let t = &route.timeouts;
    let (end, stats) = match route.mode {
        Mode::Raw => {
            // Raw bytes cannot tell a long command from a quiet moment.
            if let Some(k) = &keepalive {
                let _ = keepalive::apply_now(a, k);
                let _ = keepalive::apply_now(&at.stream, k);
            }
            relay_raw(
                a,
                &mut at.stream,
                &at.early,
                &at.first,
                &shared.drain.force,
                t.next_command,
            )
            .await
        }
        Mode::Lines => {
            let opts = RelayOptions {
                first_command_deadline: at.first_command_deadline,
                next_command: t.next_command,
                forward_hangup: route.forward_hangup,
                keepalive,
                #[cfg(test)]
                panic_at: ["command-sent", "command-runs"]
                    .into_iter()
                    .find(|at| rec.script.strip_prefix("panic-") == Some(at)),
            };
            let mut relay = Relay::new(a, &mut at.stream, opts);
            relay.watched_by(reads);
            relay.begin(
                &std::mem::take(&mut at.early),
                &std::mem::take(&mut at.first),
            );
            let end = relay.run(&shared.drain.force).await;
            (end, relay.stats)
        }
    };
    rec.bytes_from_asterisk = stats.bytes_from_asterisk;
    rec.bytes_to_asterisk = stats.bytes_to_asterisk;
    rec.commands = stats.commands;
    rec.caller_hung_up = stats.caller_hung_up;
    if stats.crlf_fixed > 0 {
        shared.metrics.crlf_fixed.inc_by(stats.crlf_fixed);
    }
    match end {
        RelayEnd::Closed if stats.asterisk_left_owing_reply => rec.outcome = Outcome::ClientGone,
        RelayEnd::Closed => rec.outcome = Outcome::Completed,
        // Lines mode: Asterisk's side failed (a reset, or keepalive found
        // it gone). Raw mode cannot tell which side it was.
        RelayEnd::PeerError if route.mode == Mode::Lines => rec.outcome = Outcome::ClientGone,
        RelayEnd::PeerError => rec.outcome = Outcome::Completed,
        RelayEnd::Failed(r) => {
            rec.outcome = Outcome::Failed;
            rec.reason = Some(r);
        }
        RelayEnd::Aborted => rec.outcome = Outcome::Aborted,
    }
}

async fn fail(a: &mut TcpStream, rec: &mut SessionRecord, reason: Reason) {
    // Before commit Asterisk waits for its first command.
    fail_when(a, rec, reason, AsteriskReads::Command).await
}

/// Tells Asterisk FAILURE as `reads` allows (see [`AsteriskReads`]).
async fn fail_when(
    a: &mut TcpStream,
    rec: &mut SessionRecord,
    reason: Reason,
    reads: AsteriskReads,
) {
    rec.outcome = Outcome::Failed;
    rec.reason = Some(reason);
    if reads == AsteriskReads::RestOfLine {
        tracing::warn!(
            peer = %rec.peer,
            reason = reason.as_str(),
            "part of a command line had gone to Asterisk and its rest is lost: FAILURE cannot be told, closing"
        );
    }
    if let Err(e) = tell_failure_when(a, reason, reads).await {
        tracing::debug!(peer = %rec.peer, error = %e, "Asterisk went away while told FAILURE");
        if matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        ) {
            // Asterisk had gone (its caller hung up with AGIEXITONHANGUP, or
            // it closed during the search): nobody heard a FAILURE, so none
            // is counted, and a rollout does not hold it against its pool.
            rec.outcome = Outcome::ClientGone;
            rec.reason = None;
        }
    }
}

/// Refused headers come in floods (2,000 slow connections: 20,000 lines,
/// 10 MB, in 50 s): the first few of each [`HEADER_WARN_EVERY`] are logged,
/// the rest summed up in one line (`header_errors_total` counts them all).
pub(crate) static HEADER_WARNINGS: Throttle = Throttle::new(
    HEADER_WARN_EVERY,
    5,
    &[
        "timeout",
        "malformed",
        "too_large",
        "too_many_lines",
        "no_memory",
        "proxy_missing",
        "proxy_invalid",
        "proxy_untrusted",
    ],
    Some(|total, by_kind| {
        tracing::warn!(
            count = total,
            "{total} more Asterisk headers refused in the last {} s ({by_kind}); see agiproxy_header_errors_total",
            HEADER_WARN_EVERY.as_secs()
        )
    }),
);
const HEADER_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

async fn bad_header(
    shared: &Shared,
    a: &mut TcpStream,
    rec: &mut SessionRecord,
    e: HeaderError,
    limits: &HeaderLimits,
) {
    rec.outcome = Outcome::BadHeader;
    rec.header_error = Some(e.reason());
    shared
        .metrics
        .header_errors
        .with_label_values(&[e.reason()])
        .inc();
    match e {
        HeaderError::Closed | HeaderError::Truncated | HeaderError::Io(_) => {
            tracing::debug!(peer = %rec.peer, error = %e, "connection ended before a header")
        }
        _ if HEADER_WARNINGS.admit(e.reason()) => tracing::warn!(
            peer = %rec.peer,
            listener = %rec.listener,
            error = %e,
            "refused Asterisk header"
        ),
        _ => {}
    }
    // A real Asterisk with an oversized header is waiting for a command (or
    // will be once its write is done: told FAILURE even when the discard hit
    // its bound, and what it still sends is read while it is told, so that
    // the close is not a reset): its dialplan deserves the fallback, not a
    // silent SUCCESS.
    let Some(reason) = e.failure() else { return };
    let read = e.read_so_far();
    if read == ReadSoFar::BlankLine
        || discard_rest(a, limits.timeout, read).await != Discarded::Gone
    {
        // As any FAILURE: one that met a closed socket was heard by
        // nobody, and is `client_gone` (audit: counted as sent).
        fail(a, rec, reason).await;
    }
}

/// Over `limits.max_sessions` (`overloaded`), or into the descriptor
/// reserve (`local_resources`): read the header and answer FAILURE, so the
/// dialplan falls back at once (refusing to read would hang the call).
pub async fn reject(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    listener: Arc<str>,
    mut a: TcpStream,
    peer: SocketAddr,
    proxied: bool,
    refusal: Refusal,
) {
    let reason = refusal.reason;
    let started = Instant::now();
    let mut rec = SessionRecord::new(peer, listener, snap.meta.generation);
    let cfg = &snap.config;
    let mut limits = header_limits(cfg);
    // A real Asterisk sends its header within a round trip or two: a
    // refusal does not wait the full header timeout on a slow peer.
    limits.timeout = limits.timeout.min(REFUSAL_HEADER_TIMEOUT);
    match read_header(&mut a, &limits, &shared.header_memory, proxied).await {
        Ok((h, caller, _held)) => {
            rec.called_by(caller);
            rec.script = h.get("agi_network_script").unwrap_or("").to_string();
            fail(&mut a, &mut rec, reason).await;
        }
        Err(e) => bad_header(&shared, &mut a, &mut rec, e, &limits).await,
    }
    rec.duration = started.elapsed();
    finish(&shared, rec, false);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use crate::server::Server;

    /// Panics where a session of the script `panic-<at>` reaches `at`: the
    /// only way to reach the guard, since no input is known to panic.
    pub(super) fn panic_if_asked(script: &str, at: &str) {
        if script.strip_prefix("panic-") == Some(at) {
            panic!("deliberately, for the test, at {at}");
        }
    }

    /// A proxy (its listener's address) in front of one backend, whose
    /// listener the test accepts on.
    async fn one_backend() -> (TcpListener, Server, std::net::SocketAddr) {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = agiproxy_config::from_yaml_str(&format!(
            "version: 1\nlisteners:\n  - {{ name: a, address: \"127.0.0.1:0\" }}\n\
             routes: [{{ name: all, pool: p }}]\n\
             pools: [{{ name: p, backends: [{{ address: \"{}\" }}] }}]\n",
            backend.local_addr().unwrap()
        ))
        .unwrap();
        let server = Server::start(config).await.unwrap();
        let proxy = server.local_addrs()[0];
        (backend, server, proxy)
    }

    /// A call whose script, `panic-{at}`, has its session panic at `at`
    /// (see `panic_if_asked` and `RelayOptions::panic_at`): its header sent.
    async fn panicking_call(
        proxy: std::net::SocketAddr,
        at: &str,
    ) -> BufReader<tokio::net::TcpStream> {
        let mut a = BufReader::new(tokio::net::TcpStream::connect(proxy).await.unwrap());
        a.get_mut()
            .write_all(
                format!("agi_network: yes\nagi_network_script: panic-{at}\nagi_request: agi://x/panic-{at}\n\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        a
    }

    /// A session whose task panics tells Asterisk FAILURE, before a backend
    /// is found and after one is attached (before the guard, the task's end
    /// closed Asterisk's connection: SUCCESS, the dialplan's fallback never
    /// ran), and the backend's connection is closed.
    #[tokio::test]
    async fn a_session_that_panics_tells_asterisk_failure() {
        let (backend, server, proxy) = one_backend().await;
        // The backend sends its first command and then reads to the end.
        let served = tokio::spawn(async move {
            let (s, _) = backend.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut line = String::new();
            while s.read_line(&mut line).await.unwrap() > 0 && !line.ends_with("\n\n") {}
            s.get_mut().write_all(b"ANSWER\n").await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            rest
        });
        for at in ["before-backend", "after-attach"] {
            let mut a = panicking_call(proxy, at).await;
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(5), a.read_line(&mut line));
            assert!(
                read.await.unwrap().unwrap() > 0,
                "{at}: closed, read as SUCCESS"
            );
            assert_eq!(line, "SET VARIABLE AGIPROXY_ERROR \"internal\"\n", "{at}");
            a.get_mut().write_all(b"200 result=1\n").await.unwrap();
            line.clear();
            a.read_line(&mut line).await.unwrap();
            assert_eq!(line, "FAILURE\n", "{at}");
            a.get_mut().write_all(b"HANGUP\n").await.unwrap();
        }
        // The second session had reached the backend, whose command was
        // never relayed.
        let rest = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the backend's connection is closed")
            .unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        let failures = server.metrics().failure(super::Reason::Internal);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while failures.get() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(failures.get(), 2);
    }

    /// A session that panics while Asterisk runs a command (an `EXEC Dial`)
    /// leaves a `failure` line, which Asterisk reads when the command
    /// returns: AGISTATUS=FAILURE. The guard wrote `SET VARIABLE` at once,
    /// in the middle of the command: Asterisk ran it as the next command,
    /// and the Dial's reply was read as its answer.
    #[tokio::test]
    async fn a_session_that_panics_while_a_command_runs_fails_after_it() {
        let (backend, server, proxy) = one_backend().await;
        let points = ["command-sent", "command-runs"];
        // The backend sends an `EXEC Dial` and then reads to the end.
        let served = tokio::spawn(async move {
            for _ in points {
                let (s, _) = backend.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    let mut line = String::new();
                    while s.read_line(&mut line).await.unwrap() > 0 && !line.ends_with("\n\n") {}
                    s.get_mut()
                        .write_all(b"EXEC Dial PJSIP/100\n")
                        .await
                        .unwrap();
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                });
            }
        });
        for at in points {
            let mut a = panicking_call(proxy, at).await;
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(5), a.read_line(&mut line));
            read.await.unwrap().unwrap();
            assert_eq!(line, "EXEC Dial PJSIP/100\n", "{at}");
            // The Dial runs for a while (Asterisk reads nothing meanwhile),
            // then answers, and reads the next command.
            tokio::time::sleep(Duration::from_millis(1000)).await;
            a.get_mut().write_all(b"200 result=0\n").await.unwrap();
            line.clear();
            let read = tokio::time::timeout(Duration::from_secs(5), a.read_line(&mut line));
            assert!(
                read.await.expect("never hung").unwrap() > 0,
                "{at}: closed, read as SUCCESS"
            );
            assert!(
                line.to_ascii_lowercase().starts_with("failure"),
                "{at}: Asterisk's next command is {line:?}, not a failure line"
            );
            // As Asterisk: HANGUP and a close; nothing more comes.
            let _ = a.get_mut().write_all(b"HANGUP\n").await;
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), a.read_to_end(&mut rest));
            let _ = read.await.expect("closed");
            assert!(
                rest.is_empty(),
                "{at}: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
        served.await.unwrap();
        let failures = server.metrics().failure(super::Reason::Internal);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while failures.get() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(failures.get(), 2);
    }
}
