//! The FastAGI server side of the benchmark: as cheap per command as the
//! generator, so that between the two only the proxy under test is
//! measured.
//!
//! Per session: read the header, send `commands` commands one at a time
//! (each after the previous reply, as a FastAGI server must), then close
//! the way the well-behaved backends do (FIN, then read until the peer
//! closes, counting the end-of-session `HANGUP`). A session whose script's
//! last path segment is `idle` instead sends one long command
//! (`EXEC Dial ...`) and waits for its reply without any time limit, as a
//! real backend does while a call is bridged.
//!
//! One task and one fixed buffer per session, commands pre-serialised,
//! counters kept per session and added to the shared ones once at its end.
//! [`chaos_tests::Behaviour::Echo`](crate::Behaviour::Echo) does the same
//! job but records per-session logs and has no idle variant.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::lines::Lines;

/// Which sessions hold a long command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendMode {
    /// Idle when the script's last path segment is `idle` (`bench/idle`).
    #[default]
    Auto,
    Load,
    Idle,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Commands per load session.
    pub commands: usize,
    /// The load command, without its newline.
    pub command: String,
    /// The command an idle session holds, without its newline.
    pub idle_command: String,
    pub mode: BackendMode,
    /// Pause before each command: a backend's "think time" (0: none).
    pub think: Duration,
    /// How long to wait for the peer to close after our FIN.
    pub linger: Duration,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            commands: 10,
            command: "NOOP".to_owned(),
            idle_command: "EXEC Dial PJSIP/x".to_owned(),
            mode: BackendMode::Auto,
            think: Duration::ZERO,
            linger: Duration::from_secs(30),
        }
    }
}

/// What the backend saw, all sessions together.
#[derive(Debug, Default)]
pub struct BackendStats {
    accepted: AtomicU64,
    completed: AtomicU64,
    idle: AtomicU64,
    commands: AtomicU64,
    replies: AtomicU64,
    hangups: AtomicU64,
    header_eof: AtomicU64,
    short: AtomicU64,
    io_errors: AtomicU64,
    linger_timeouts: AtomicU64,
}

/// A snapshot of [`BackendStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCounts {
    pub accepted: u64,
    /// Sessions finished, however they ended.
    pub completed: u64,
    /// Sessions that held the idle command.
    pub idle: u64,
    pub commands: u64,
    pub replies: u64,
    /// `HANGUP` lines received (normally one per session, at its end).
    pub hangups: u64,
    /// The peer closed before the header's blank line.
    pub header_eof: u64,
    /// The peer closed before replying to a command.
    pub short: u64,
    pub io_errors: u64,
    /// The peer did not close within the linger bound after our FIN.
    pub linger_timeouts: u64,
}

impl BackendStats {
    pub fn snapshot(&self) -> BackendCounts {
        BackendCounts {
            accepted: self.accepted.load(Relaxed),
            completed: self.completed.load(Relaxed),
            idle: self.idle.load(Relaxed),
            commands: self.commands.load(Relaxed),
            replies: self.replies.load(Relaxed),
            hangups: self.hangups.load(Relaxed),
            header_eof: self.header_eof.load(Relaxed),
            short: self.short.load(Relaxed),
            io_errors: self.io_errors.load(Relaxed),
            linger_timeouts: self.linger_timeouts.load(Relaxed),
        }
    }

    fn add(&self, c: &BackendCounts) {
        for (slot, n) in [
            (&self.idle, c.idle),
            (&self.commands, c.commands),
            (&self.replies, c.replies),
            (&self.hangups, c.hangups),
            (&self.header_eof, c.header_eof),
            (&self.short, c.short),
            (&self.io_errors, c.io_errors),
            (&self.linger_timeouts, c.linger_timeouts),
        ] {
            if n > 0 {
                slot.fetch_add(n, Relaxed);
            }
        }
        self.completed.fetch_add(1, Relaxed);
    }
}

/// A running benchmark backend. Dropping it stops its listeners and
/// sessions.
pub struct Backend {
    addrs: Vec<SocketAddr>,
    stats: Arc<BackendStats>,
    tasks: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Listens on every address (port 0 picks a free one) and serves.
    pub async fn start(addrs: &[SocketAddr], cfg: BackendConfig) -> io::Result<Backend> {
        let cfg = Arc::new(Prepared::new(cfg));
        let stats = Arc::<BackendStats>::default();
        let mut bound = Vec::new();
        let mut tasks = Vec::new();
        for addr in addrs {
            let listener = listen(*addr)?;
            bound.push(listener.local_addr()?);
            tasks.push(tokio::spawn(accept_loop(
                listener,
                Arc::clone(&cfg),
                Arc::clone(&stats),
            )));
        }
        Ok(Backend {
            addrs: bound,
            stats,
            tasks,
        })
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A listener with a backlog large enough for thousands of idle sessions
/// connecting at once through a proxy.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// The config with its command lines serialised once.
struct Prepared {
    cfg: BackendConfig,
    command: Vec<u8>,
    idle_command: Vec<u8>,
}

impl Prepared {
    fn new(cfg: BackendConfig) -> Self {
        let line = |c: &str| format!("{c}\n").into_bytes();
        Self {
            command: line(&cfg.command),
            idle_command: line(&cfg.idle_command),
            cfg,
        }
    }
}

async fn accept_loop(listener: TcpListener, cfg: Arc<Prepared>, stats: Arc<BackendStats>) {
    // Owning the sessions here means aborting this loop ends them too.
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    stats.accepted.fetch_add(1, Relaxed);
                    let cfg = Arc::clone(&cfg);
                    let stats = Arc::clone(&stats);
                    sessions.spawn(async move {
                        let mut counts = BackendCounts::default();
                        serve(stream, &cfg, &mut counts).await;
                        stats.add(&counts);
                    });
                }
                // Out of descriptors and the like: back off, keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

enum Fault {
    HeaderEof,
    Short,
    Io,
}

impl From<io::Error> for Fault {
    fn from(_: io::Error) -> Self {
        Fault::Io
    }
}

async fn serve(mut s: TcpStream, cfg: &Prepared, c: &mut BackendCounts) {
    let _ = s.set_nodelay(true);
    let mut lines = Lines::new();
    match session(&mut s, &mut lines, cfg, c).await {
        Ok(()) => {}
        Err(Fault::HeaderEof) => c.header_eof += 1,
        Err(Fault::Short) => c.short += 1,
        Err(Fault::Io) => c.io_errors += 1,
    }
}

async fn session(
    s: &mut TcpStream,
    lines: &mut Lines,
    cfg: &Prepared,
    c: &mut BackendCounts,
) -> Result<(), Fault> {
    let idle = read_header(s, lines, cfg.cfg.mode).await?;
    let (command, n) = if idle {
        c.idle += 1;
        (&cfg.idle_command, 1)
    } else {
        (&cfg.command, cfg.cfg.commands)
    };
    for _ in 0..n {
        if !cfg.cfg.think.is_zero() {
            tokio::time::sleep(cfg.cfg.think).await;
        }
        s.write_all(command).await?;
        c.commands += 1;
        read_reply(s, lines, c).await?;
        c.replies += 1;
    }
    // FIN, then read until the peer closes: an orderly close that sees the
    // end-of-session HANGUP (and never resets over unread bytes).
    s.shutdown().await?;
    let drained = tokio::time::timeout(cfg.cfg.linger, async {
        loop {
            while let Some(line) = lines.next_line() {
                if lines.get(line) == b"HANGUP" {
                    c.hangups += 1;
                }
            }
            if lines.fill(s).await? == 0 {
                return Ok::<(), io::Error>(());
            }
        }
    })
    .await;
    match drained {
        Ok(r) => r.map_err(Fault::from),
        Err(_) => {
            c.linger_timeouts += 1;
            Ok(())
        }
    }
}

/// Reads up to the blank line; true when this is an idle session.
async fn read_header(
    s: &mut TcpStream,
    lines: &mut Lines,
    mode: BackendMode,
) -> Result<bool, Fault> {
    let mut idle = mode == BackendMode::Idle;
    loop {
        while let Some(line) = lines.next_line() {
            let line = lines.get(line);
            if line.is_empty() {
                return Ok(idle);
            }
            if mode == BackendMode::Auto {
                if let Some(script) = line.strip_prefix(b"agi_network_script: ") {
                    idle = is_idle_script(script);
                }
            }
        }
        if lines.fill(s).await? == 0 {
            return Err(Fault::HeaderEof);
        }
    }
}

/// `bench/idle`, `idle`, `x/idle?a=b`: the last path segment, query cut.
fn is_idle_script(script: &[u8]) -> bool {
    let path = script.split(|&b| b == b'?').next().unwrap_or_default();
    path.rsplit(|&b| b == b'/').next() == Some(b"idle")
}

/// Reads one reply line; `HANGUP` lines are counted, not taken as replies.
async fn read_reply(
    s: &mut TcpStream,
    lines: &mut Lines,
    c: &mut BackendCounts,
) -> Result<(), Fault> {
    loop {
        while let Some(line) = lines.next_line() {
            if lines.get(line) == b"HANGUP" {
                c.hangups += 1;
            } else {
                return Ok(());
            }
        }
        if lines.fill(s).await? == 0 {
            return Err(Fault::Short);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_the_last_path_segment() {
        assert!(is_idle_script(b"bench/idle"));
        assert!(is_idle_script(b"idle"));
        assert!(is_idle_script(b"a/b/idle?x=1"));
        assert!(!is_idle_script(b"bench/load"));
        assert!(!is_idle_script(b"idle/load"));
        assert!(!is_idle_script(b"bench/idler"));
    }
}
