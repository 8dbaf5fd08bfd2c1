//! The connector: try a pool's backends in policy order, each connect with
//! its own timeout, all inside one per-session budget. Before commit the
//! header is replayable, so a backend that refuses, resets, closes or stays
//! silent is abandoned (politely) and the next one gets the same header.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::ReadBuf;

use agiproxy_config::Timeouts;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::outcome::Reason;
use super::relay::{read_now, MAX_COMMAND_LINE};
use super::throttled;
use crate::drain::Cut;
use crate::fds;
use crate::metrics::{ConnectResult, Metrics};
use crate::pool::polite_close::close_politely;
use crate::pool::{Candidates, Lease, PoolState};

/// A backend that has sent its first byte: the session commits on it.
pub struct Attached {
    pub lease: Lease,
    pub stream: TcpStream,
    pub attempts: u32,
    pub connect_time: Duration,
    pub first_byte_time: Duration,
    /// When the committed backend's first command is due: the attempt's own
    /// deadline (a slow earlier attempt does not shorten it).
    pub first_command_deadline: tokio::time::Instant,
    /// Bytes Asterisk sent while we searched (normally none; a `HANGUP`).
    pub early: Vec<u8>,
    /// The backend's first bytes (its first command, normally), already
    /// read: the relay starts with them.
    pub first: Vec<u8>,
}

pub enum AttachError {
    Failed {
        reason: Reason,
        attempts: u32,
    },
    /// Asterisk closed while we searched; nobody is left to tell.
    ClientGone {
        attempts: u32,
    },
}

enum Wait {
    FirstBytes(Vec<u8>),
    Closed,
    Reset,
    Timeout,
    ClientGone,
    /// The drain deadline passed.
    Cut,
}

/// What the connector needs to know about one call.
pub struct AttachPlan<'a> {
    pub pool: &'a PoolState,
    /// The backends in the order the balancer chose.
    pub candidates: &'a Candidates,
    /// The header to replay to each backend tried.
    pub header: &'a [u8],
    pub timeouts: &'a Timeouts,
    /// When the header was complete; the budget counts from here.
    pub started: Instant,
    /// Raw-mode route: a client half-close is not a hang-up.
    pub raw: bool,
    pub metrics: &'a Metrics,
    /// Fired at the drain deadline: the call is told FAILURE
    /// `shutting_down` rather than left to the process's exit (a close,
    /// which Asterisk reads as SUCCESS).
    pub cut: &'a Cut,
}

/// Finds a backend for the call, reading Asterisk meanwhile (bytes it sends
/// land in `early`).
pub async fn attach(
    plan: &AttachPlan<'_>,
    asterisk: &mut TcpStream,
    early: &mut Vec<u8>,
) -> Result<Attached, AttachError> {
    let AttachPlan {
        pool,
        candidates,
        header,
        timeouts: t,
        started,
        raw,
        metrics,
        cut,
    } = *plan;
    let deadline = started + t.budget;
    let mut attempts = 0;
    let mut reason = Reason::NoBackend;
    for &i in &candidates.order {
        if cut.is_fired() {
            reason = Reason::ShuttingDown;
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            // A first-command wait is not cut by the budget: when it used
            // the budget up, it is why the call failed (and what an alert
            // on hung backends looks for).
            if reason != Reason::FirstCommandTimeout {
                reason = Reason::BudgetExhausted;
            }
            break;
        }
        let Some(lease) = pool.lease(&candidates.members.backends[i]) else {
            reason = Reason::PoolFull;
            continue;
        };
        attempts += 1;
        let backend = lease.backend.clone();
        let limit = t.connect.min(deadline - now);
        // Raced with the drain's cut: a connect may take up to `connect`
        // (7 days at most), and a session still in it when the process
        // exited was closed without a word (audit: SUCCESS to Asterisk).
        let connecting = tokio::time::timeout(limit, connect_with_header(backend.addr, header));
        let connected = tokio::select! {
            biased;
            r = connecting => r,
            () = cut.watch() => {
                reason = Reason::ShuttingDown;
                break;
            }
        };
        let stream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(Opened::Local(e))) => {
                // Out of descriptors or memory here: not the backend's
                // fault (no passive failure), and every other backend would
                // fail the same way.
                metrics
                    .local_resource_errors
                    .with_label_values(&["connect"])
                    .inc();
                fds::warn("connect", &e);
                reason = Reason::LocalResources;
                break;
            }
            Ok(Err(Opened::ConnectFailed(e))) => {
                metrics.connect_result(connect_result_of(&e)).inc();
                let wait = pool.lease_failed(&lease, "connect failed");
                tracing::debug!(backend = %backend.addr, pool = %pool.name, error = %e, backoff = ?wait, "connect failed");
                reason = Reason::ConnectFailed;
                continue;
            }
            Ok(Err(Opened::HeaderRefused(e))) => {
                metrics.connect_result(ConnectResult::Connected).inc();
                tracing::debug!(backend = %backend.addr, error = %e, "backend closed before taking the header");
                pool.lease_failed(&lease, "closed before taking the header");
                reason = Reason::BackendClosed;
                continue;
            }
            Err(_) if limit < t.connect => {
                // The budget ran out mid-connect: not the backend's fault.
                metrics.connect_result(ConnectResult::Timeout).inc();
                reason = Reason::BudgetExhausted;
                continue;
            }
            Err(_) => {
                metrics.connect_result(ConnectResult::Timeout).inc();
                let wait = pool.lease_failed(&lease, "connect timed out");
                tracing::debug!(backend = %backend.addr, pool = %pool.name, backoff = ?wait, "connect timed out");
                reason = Reason::ConnectFailed;
                continue;
            }
        };
        metrics.connect_result(ConnectResult::Connected).inc();
        let connect_time = started.elapsed();
        let mut stream = stream;
        let first_deadline = tokio::time::Instant::now() + t.first_command;
        match wait_first_byte(&mut stream, asterisk, early, first_deadline, raw, cut).await {
            Wait::FirstBytes(first) => {
                pool.passive_success(&backend);
                backend
                    .total
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(Attached {
                    lease,
                    stream,
                    attempts,
                    connect_time,
                    first_byte_time: started.elapsed(),
                    first_command_deadline: first_deadline,
                    early: std::mem::take(early),
                    first,
                });
            }
            Wait::ClientGone => {
                close_politely(stream);
                return Err(AttachError::ClientGone { attempts });
            }
            Wait::Closed | Wait::Reset => {
                tracing::debug!(backend = %backend.addr, pool = %pool.name, "backend closed before its first command");
                pool.lease_failed(&lease, "closed before its first command");
                reason = Reason::BackendClosed;
            }
            Wait::Timeout => {
                if throttled::NO_FIRST_COMMAND.admit("") {
                    tracing::info!(backend = %backend.addr, pool = %pool.name, timeout = ?t.first_command, "backend sent no first command in time");
                }
                pool.lease_failed(&lease, "no first command in time");
                close_politely(stream);
                reason = Reason::FirstCommandTimeout;
            }
            Wait::Cut => {
                // Not the backend's fault: no passive failure.
                close_politely(stream);
                reason = Reason::ShuttingDown;
                break;
            }
        }
    }
    Err(AttachError::Failed { reason, attempts })
}

fn connect_result_of(e: &io::Error) -> ConnectResult {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectResult::Refused,
        io::ErrorKind::ConnectionReset => ConnectResult::Reset,
        _ => ConnectResult::Error,
    }
}

/// Bytes from Asterisk kept while no backend is attached; beyond this we
/// stop reading (only a raw-mode client sends more than a `HANGUP`).
const MAX_EARLY: usize = 64 * 1024;

/// Waits for the backend's first command line (in raw mode, its first
/// bytes) and returns what was read, while still reading Asterisk promptly:
/// it may hang up meanwhile. (Reading rather than peeking saves a system
/// call per session; the relay starts with them.) The call commits on a
/// whole line, or on a piece of one followed by the backend's close (the
/// relay completes it, as a directly connected Asterisk runs what it read
/// before the end of file): nothing reaches Asterisk before that, so a
/// backend that resets or stalls mid-line is failed over like one that
/// said nothing. A line past the relay's bound commits too, for the relay
/// to refuse. In raw mode a half-close from the client is legitimate, not
/// a hang-up.
async fn wait_first_byte(
    backend: &mut TcpStream,
    asterisk: &mut TcpStream,
    early: &mut Vec<u8>,
    deadline: tokio::time::Instant,
    raw: bool,
    cut: &Cut,
) -> Wait {
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    let cut = cut.watch();
    tokio::pin!(cut);
    let mut asterisk_eof = false;
    // A first line that came in pieces (normally it comes whole).
    let mut partial = Vec::new();
    loop {
        tokio::select! {
            r = backend.readable() => {
                if r.is_err() {
                    return Wait::Reset;
                }
                let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
                let mut buf = ReadBuf::uninit(&mut buf);
                match read_now(backend, &mut buf) {
                    Some(Ok(0)) if partial.is_empty() => return Wait::Closed,
                    Some(Ok(0)) => return Wait::FirstBytes(partial),
                    Some(Ok(_)) => {
                        let got = buf.filled();
                        let line_ends = memchr::memchr(b'\n', got).is_some();
                        if partial.is_empty() && (raw || line_ends) {
                            return Wait::FirstBytes(got.to_vec());
                        }
                        partial.extend_from_slice(got);
                        if line_ends || partial.len() >= MAX_COMMAND_LINE {
                            return Wait::FirstBytes(partial);
                        }
                    }
                    // A piece of a line read before is dropped: Asterisk
                    // never saw it.
                    Some(Err(_)) => return Wait::Reset,
                    None => {}
                }
            }
            r = asterisk.readable(), if !asterisk_eof && early.len() < MAX_EARLY => {
                if r.is_err() {
                    return Wait::ClientGone;
                }
                let mut buf = [0u8; 4096];
                match asterisk.try_read(&mut buf) {
                    Ok(0) if raw => asterisk_eof = true,
                    Ok(0) => return Wait::ClientGone,
                    Ok(n) => early.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Wait::ClientGone,
                }
            }
            _ = &mut sleep => return Wait::Timeout,
            _ = &mut cut => return Wait::Cut,
        }
    }
}

/// Why a backend could not be opened with the header sent.
enum Opened {
    /// The proxy is out of descriptors, socket buffers or memory, or the
    /// socket would have used the descriptor reserve (see `fds`).
    Local(io::Error),
    ConnectFailed(io::Error),
    HeaderRefused(io::Error),
}

/// Connects and sends the header at once, the way HAProxy does: on
/// loopback and fast networks the handshake has finished by the time
/// `connect` returns `EINPROGRESS`, so the header goes out without waiting
/// for writability and asking `SO_ERROR` (one wake-up and one system call
/// fewer per session). Otherwise it waits for the connect like any client.
async fn connect_with_header(addr: SocketAddr, header: &[u8]) -> Result<TcpStream, Opened> {
    let fail = |e: io::Error| {
        if fds::is_local(&e) {
            Opened::Local(e)
        } else {
            Opened::ConnectFailed(e)
        }
    };
    // Non-blocking from birth (no fcntl).
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(fail)?;
    if fds::in_reserve(std::os::fd::AsRawFd::as_raw_fd(&socket)) {
        // Dropped (closed) on return: the reserve stays free.
        return Err(Opened::Local(fds::reserve_error()));
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(fail(e)),
    }
    // Straight on the socket, before tokio knows it: tokio's `try_write`
    // on a socket it has not yet seen writable would not even try.
    let sent = match socket.send_with_flags(header, libc::MSG_NOSIGNAL) {
        Ok(n) => Some(n),
        // Still connecting.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        // Refused, reset, unreachable: the connect failed.
        Err(e) => return Err(fail(e)),
    };
    let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket)).map_err(fail)?;
    let sent = match sent {
        Some(n) => n,
        None => {
            stream.writable().await.map_err(fail)?;
            if let Some(e) = stream.take_error().map_err(fail)? {
                return Err(fail(e));
            }
            0
        }
    };
    // NODELAY once the backend has taken the header's first bytes, not
    // before the connect: a pool that refuses (thousands of FAILUREs a
    // second) skips the call. Nagle never holds a first segment, so the
    // header did not wait for it.
    stream.set_nodelay(true).map_err(fail)?;
    // The rest (normally all of it is gone by now: the header is far
    // smaller than a socket buffer).
    stream
        .write_all(&header[sent..])
        .await
        .map_err(Opened::HeaderRefused)?;
    Ok(stream)
}
