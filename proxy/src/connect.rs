//! The connector: try a pool's backends in policy order, each connect with
//! its own timeout, all inside one per-session budget. Before commit the
//! header is replayable, so a backend that refuses, resets, closes or stays
//! silent is abandoned (politely) and the next one gets the same header.

use std::io;
use std::time::{Duration, Instant};

use agiproxy_config::Timeouts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::balancer::{Candidates, Lease, PoolState};
use crate::metrics::Metrics;
use crate::outcome::Reason;

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
    FirstByte,
    Closed,
    Reset,
    Timeout,
    ClientGone,
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
    } = *plan;
    let deadline = started + t.budget;
    let mut attempts = 0;
    let mut reason = Reason::NoBackend;
    for &i in &candidates.order {
        let now = Instant::now();
        if now >= deadline {
            reason = Reason::BudgetExhausted;
            break;
        }
        let Some(lease) = pool.lease(&candidates.members.backends[i]) else {
            reason = Reason::PoolFull;
            continue;
        };
        attempts += 1;
        let backend = lease.backend.clone();
        let limit = t.connect.min(deadline - now);
        let stream = match tokio::time::timeout(limit, TcpStream::connect(backend.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                metrics
                    .connect_attempts
                    .with_label_values(&[connect_error_label(&e)])
                    .inc();
                let wait = pool.passive_failure(&backend, "connect failed");
                tracing::debug!(backend = %backend.addr, pool = %pool.name, error = %e, backoff = ?wait, "connect failed");
                reason = Reason::ConnectFailed;
                continue;
            }
            Err(_) if limit < t.connect => {
                // The budget ran out mid-connect: not the backend's fault.
                metrics
                    .connect_attempts
                    .with_label_values(&["timeout"])
                    .inc();
                reason = Reason::BudgetExhausted;
                continue;
            }
            Err(_) => {
                metrics
                    .connect_attempts
                    .with_label_values(&["timeout"])
                    .inc();
                let wait = pool.passive_failure(&backend, "connect timed out");
                tracing::debug!(backend = %backend.addr, pool = %pool.name, backoff = ?wait, "connect timed out");
                reason = Reason::ConnectFailed;
                continue;
            }
        };
        metrics
            .connect_attempts
            .with_label_values(&["connected"])
            .inc();
        let connect_time = started.elapsed();
        let _ = stream.set_nodelay(true);
        // The header is far smaller than a socket buffer, so this completes
        // at once unless the backend is already gone.
        let mut stream = stream;
        if let Err(e) = stream.write_all(header).await {
            tracing::debug!(backend = %backend.addr, error = %e, "backend closed before taking the header");
            pool.passive_failure(&backend, "closed before taking the header");
            reason = Reason::BackendClosed;
            continue;
        }
        let first_deadline = tokio::time::Instant::now() + t.first_command;
        match wait_first_byte(&mut stream, asterisk, early, first_deadline, raw).await {
            Wait::FirstByte => {
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
                });
            }
            Wait::ClientGone => {
                close_politely(stream);
                return Err(AttachError::ClientGone { attempts });
            }
            Wait::Closed | Wait::Reset => {
                tracing::debug!(backend = %backend.addr, pool = %pool.name, "backend closed before its first command");
                pool.passive_failure(&backend, "closed before its first command");
                reason = Reason::BackendClosed;
            }
            Wait::Timeout => {
                tracing::info!(backend = %backend.addr, pool = %pool.name, timeout = ?t.first_command, "backend sent no first command in time");
                pool.passive_failure(&backend, "no first command in time");
                close_politely(stream);
                reason = Reason::FirstCommandTimeout;
            }
        }
    }
    Err(AttachError::Failed { reason, attempts })
}

fn connect_error_label(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset => "reset",
        _ => "error",
    }
}

/// Bytes from Asterisk kept while no backend is attached; beyond this we
/// stop reading (only a raw-mode client sends more than a `HANGUP`).
const MAX_EARLY: usize = 64 * 1024;

/// Waits for the backend's first byte without consuming it (the relay reads
/// it), while still reading Asterisk promptly: it may hang up meanwhile.
/// In raw mode a half-close from the client is legitimate, not a hang-up.
async fn wait_first_byte(
    backend: &mut TcpStream,
    asterisk: &mut TcpStream,
    early: &mut Vec<u8>,
    deadline: tokio::time::Instant,
    raw: bool,
) -> Wait {
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    let mut asterisk_eof = false;
    loop {
        let mut one = [0u8; 1];
        tokio::select! {
            r = backend.peek(&mut one) => return match r {
                Ok(0) => Wait::Closed,
                Ok(_) => Wait::FirstByte,
                Err(_) => Wait::Reset,
            },
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
        }
    }
}

/// How long an abandoned backend gets to close after our `HANGUP`.
const POLITE_CLOSE: Duration = Duration::from_secs(2);

/// Ends a backend connection the way Asterisk would: it already has the
/// whole header; send `HANGUP`, close our side, and read what it sends until
/// it closes. Fragile FastAGI servers crash on anything ruder.
pub fn close_politely(mut stream: TcpStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(POLITE_CLOSE, async {
            let _ = stream.write_all(b"HANGUP\n").await;
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 512];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    });
}
