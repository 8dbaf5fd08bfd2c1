//! The relay: bytes both ways after commit.
//!
//! Towards Asterisk it paces what the backend writes, because a real
//! Asterisk busy-spins on a partial line and stalls on a pipelined command
//! (see `shared/fastagi-protocol.md`): whole lines only, one command at a
//! time, the next held until Asterisk has replied. Asterisk is always read
//! promptly (it truncates a line it cannot write within 100 ms). Binary
//! payloads of `PUT SOUNDFILE` / `GET SOUNDFILE` pass by their announced
//! size. Nothing is rewritten (a CRLF command is the one exception: Asterisk
//! would reject it, so it goes out with LF and is counted).
//!
//! The relay reads into a stack buffer and writes straight through; heap
//! buffers are used only for bytes that must wait (a held command, a
//! partial line, a full socket), so a quiet session holds none.

use std::io;
use std::time::Duration;

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::failure;
use super::outcome::Reason;
use super::turn::{AsteriskLine, BackendLine, Turn};
use crate::drain::Cut;

/// Bytes read per syscall. Lives on the stack for the length of one read.
const READ_CHUNK: usize = 16 * 1024;
/// A backend line longer than this can never be a valid AGI command
/// (Asterisk cuts lines at 8191 bytes).
const MAX_COMMAND_LINE: usize = 16 * 1024;
/// Bytes that may wait for a slow peer before we stop reading the other side.
const MAX_PENDING: usize = 256 * 1024;
/// A stash bigger than this is freed when it empties, so quiet sessions
/// don't keep burst-sized buffers.
const KEEP_CAPACITY: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub struct RelayOptions {
    /// When the backend's first command is due (counted from the header).
    pub first_command_deadline: Instant,
    pub next_command: Duration,
    /// Forward Asterisk's unsolicited `HANGUP` to the backend.
    pub forward_hangup: bool,
}

/// What the relay waits for in one turn.
#[derive(Clone, Copy)]
struct Wants {
    read_a: bool,
    write_a: bool,
    write_b: bool,
    read_b: bool,
    deadline: bool,
}

/// What woke the relay (`false`: the socket reported an error).
enum Event {
    Cancelled,
    ReadA(bool),
    WriteA(bool),
    WriteB(bool),
    ReadB(bool),
    Deadline,
}

/// How the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed in order.
    Closed,
    /// Asterisk was sent FAILURE for this reason.
    Failed(Reason),
    /// A peer vanished (reset, write error) mid-session.
    PeerError,
    /// Cut by shutdown.
    Aborted,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RelayStats {
    pub bytes_from_asterisk: u64,
    pub bytes_to_asterisk: u64,
    pub commands: u64,
    /// Asterisk reported the channel hung up during the session.
    pub caller_hung_up: bool,
    pub crlf_fixed: u64,
}

pub struct Relay<'s> {
    a: &'s mut TcpStream,
    b: &'s mut TcpStream,
    opts: RelayOptions,
    turn: Turn,
    /// Backend bytes not yet released to Asterisk (held command, partial line).
    held: Vec<u8>,
    /// Bytes released to Asterisk that its socket has not taken yet.
    a_out: Vec<u8>,
    /// Asterisk's incomplete line.
    a_partial: Vec<u8>,
    /// Bytes for the backend that its socket has not taken yet.
    b_out: Vec<u8>,
    a_eof: bool,
    a_dead: bool,
    b_eof: bool,
    /// The backend reset: tell Asterisk FAILURE as soon as it waits for a command.
    b_dead: bool,
    /// We closed our side towards Asterisk (after the backend closed).
    a_shut: bool,
    /// Asterisk sent its end-of-session `HANGUP` after the backend closed
    /// and we half-closed towards it: nothing more can pass either way.
    a_done: bool,
    b_shut: bool,
    protocol_error: bool,
    deadline: Option<Instant>,
    pub stats: RelayStats,
}

impl<'s> Relay<'s> {
    pub fn new(a: &'s mut TcpStream, b: &'s mut TcpStream, opts: RelayOptions) -> Relay<'s> {
        Relay {
            a,
            b,
            opts,
            turn: Turn::default(),
            held: Vec::new(),
            a_out: Vec::new(),
            a_partial: Vec::new(),
            b_out: Vec::new(),
            a_eof: false,
            a_dead: false,
            b_eof: false,
            b_dead: false,
            a_shut: false,
            a_done: false,
            b_shut: false,
            protocol_error: false,
            deadline: Some(opts.first_command_deadline),
            stats: RelayStats::default(),
        }
    }

    /// Takes what was read while the backend was attached: `early`, bytes
    /// Asterisk sent meanwhile, and `first`, the backend's first bytes. (Not
    /// part of `run`: the caller's buffers are freed before the session
    /// settles into its long wait.)
    pub fn begin(&mut self, early: &[u8], first: &[u8]) {
        if !early.is_empty() {
            self.ingest_asterisk(early);
        }
        if !first.is_empty() {
            self.stats.bytes_to_asterisk += first.len() as u64;
            self.ingest_backend(first);
        }
    }

    /// Runs the session to its end.
    pub async fn run(&mut self, cut: &Cut) -> RelayEnd {
        let sleep = tokio::time::sleep_until(self.deadline.unwrap_or_else(far_future));
        tokio::pin!(sleep);
        // Made once: a new watch each turn would register and drop a waiter
        // under a lock every time.
        let cancelled = cut.watch();
        tokio::pin!(cancelled);
        // The timer is armed lazily: a reply pushes the deadline later, and
        // re-arming it for every command (a timer-wheel removal and insert)
        // would cost more than the rest of the turn. It is moved earlier at
        // once, later only when it fires early.
        let mut armed_at = self.deadline.unwrap_or_else(far_future);
        loop {
            if let Some(end) = self.finished() {
                return end;
            }
            if let Some(reason) = self.failure_due() {
                return Box::pin(self.fail(reason)).await;
            }
            let deadline = self.active_deadline();
            if let Some(d) = deadline.filter(|d| *d < armed_at) {
                sleep.as_mut().reset(d);
                armed_at = d;
            }
            // One hand-written poll over the sockets' readiness instead of a
            // `select!` of readiness futures: nothing is built, registered
            // and dropped per turn, and the future stays small.
            let want = Wants {
                read_a: self.want_read_a(),
                write_a: !self.a_out.is_empty() && !self.a_dead,
                write_b: !self.b_out.is_empty() && !self.b_shut,
                read_b: self.want_read_b(),
                deadline: deadline.is_some(),
            };
            let (a, b) = (&*self.a, &*self.b);
            let event = std::future::poll_fn(|cx| {
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Cancelled);
                }
                if want.read_a {
                    if let Poll::Ready(r) = a.poll_read_ready(cx) {
                        return Poll::Ready(Event::ReadA(r.is_ok()));
                    }
                }
                if want.write_a {
                    if let Poll::Ready(r) = a.poll_write_ready(cx) {
                        return Poll::Ready(Event::WriteA(r.is_ok()));
                    }
                }
                if want.write_b {
                    if let Poll::Ready(r) = b.poll_write_ready(cx) {
                        return Poll::Ready(Event::WriteB(r.is_ok()));
                    }
                }
                if want.read_b {
                    if let Poll::Ready(r) = b.poll_read_ready(cx) {
                        return Poll::Ready(Event::ReadB(r.is_ok()));
                    }
                }
                if want.deadline && sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Deadline);
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Cancelled => return Box::pin(self.abort()).await,
                Event::ReadA(true) => self.on_asterisk_readable(),
                Event::ReadA(false) | Event::WriteA(false) => self.a_dead = true,
                Event::WriteA(true) => self.flush_a(),
                Event::WriteB(true) => self.flush_b(),
                Event::WriteB(false) => self.b_write_failed(),
                Event::ReadB(true) => self.on_backend_readable(),
                Event::ReadB(false) => self.backend_reset(),
                Event::Deadline => {
                    if let Some(d) = deadline.filter(|d| *d > Instant::now()) {
                        // Fired at an older, earlier deadline: re-arm.
                        sleep.as_mut().reset(d);
                        armed_at = d;
                        continue;
                    }
                    if self.turn.backend_owes_command() && !self.b_eof && !self.a_eof {
                        return Box::pin(self.fail(Reason::NextCommandTimeout)).await;
                    }
                    // Asterisk closed and the backend lingers: stop waiting.
                    return RelayEnd::Closed;
                }
            }
        }
    }

    fn want_read_a(&self) -> bool {
        !self.a_eof && !self.a_dead && self.b_out.len() < MAX_PENDING
    }

    fn want_read_b(&self) -> bool {
        !self.b_eof && self.held.len() < MAX_PENDING && self.a_out.is_empty() && !self.a_dead
    }

    /// The deadline in force: the backend's (first or next) command while it
    /// owes one; none while Asterisk executes a command (`EXEC Dial` may run
    /// for hours); after Asterisk closed, a bound on the backend's linger.
    fn active_deadline(&self) -> Option<Instant> {
        if self.a_eof {
            return self.deadline;
        }
        if self.turn.backend_owes_command() && !self.b_eof {
            self.deadline
        } else {
            None
        }
    }

    fn finished(&mut self) -> Option<RelayEnd> {
        if self.a_dead {
            self.shut_backend();
            return Some(RelayEnd::PeerError);
        }
        if (self.a_eof || self.a_done) && self.b_eof && self.a_out.is_empty() {
            // After the end-of-session `HANGUP`, Asterisk's close is all
            // that is left: no need to wait for it (and read it) first.
            return Some(RelayEnd::Closed);
        }
        if self.a_eof && self.b_out.is_empty() && !self.b_shut {
            self.shut_backend();
            self.deadline = Some(Instant::now() + self.opts.next_command);
        }
        if self.b_eof
            && !self.a_shut
            && self.held.is_empty()
            && self.a_out.is_empty()
            && !self.turn.in_payload()
            && !self.b_dead
        {
            self.a_shut = true;
            shutdown_write(self.a);
        }
        None
    }

    fn failure_due(&self) -> Option<Reason> {
        if !self.turn.backend_owes_command() || self.a_eof || self.a_shut || !self.a_out.is_empty()
        {
            return None;
        }
        if self.protocol_error {
            Some(Reason::BackendProtocol)
        } else if self.b_dead {
            Some(Reason::BackendReset)
        } else {
            None
        }
    }

    /// Asterisk waits for a command: tell it FAILURE, end the backend politely.
    async fn fail(&mut self, reason: Reason) -> RelayEnd {
        tracing::info!(
            reason = reason.as_str(),
            "telling Asterisk FAILURE after commit"
        );
        self.close_backend_politely().await;
        let _ = failure::tell_failure(self.a, reason).await;
        RelayEnd::Failed(reason)
    }

    async fn abort(&mut self) -> RelayEnd {
        if self.turn.backend_owes_command() && !self.a_eof && !self.a_shut && self.a_out.is_empty()
        {
            return self.fail(Reason::ShuttingDown).await;
        }
        self.shut_backend();
        RelayEnd::Aborted
    }

    async fn close_backend_politely(&mut self) {
        if self.b_dead || self.b_shut {
            return;
        }
        let _ =
            tokio::time::timeout(Duration::from_millis(200), self.b.write_all(b"HANGUP\n")).await;
        self.shut_backend();
    }

    fn shut_backend(&mut self) {
        if !self.b_shut {
            self.b_shut = true;
            shutdown_write(self.b);
        }
    }

    // ---- backend -> Asterisk ----

    fn on_backend_readable(&mut self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut buf);
        match read_now(self.b, &mut buf) {
            Some(Ok(0)) => self.backend_eof(),
            Some(Ok(n)) => {
                self.stats.bytes_to_asterisk += n as u64;
                self.ingest_backend(buf.filled());
            }
            None => {}
            Some(Err(_)) => self.backend_reset(),
        }
    }

    fn backend_eof(&mut self) {
        self.b_eof = true;
        // A last command without its newline: complete it rather than make
        // Asterisk spin on a partial line.
        if !self.held.is_empty() && !self.turn.in_payload() && self.held.last() != Some(&b'\n') {
            self.held.push(b'\n');
            self.release_held();
        }
    }

    fn backend_reset(&mut self) {
        self.b_eof = true;
        self.b_dead = true;
        self.b_shut = true;
        self.held = Vec::new();
        self.b_out = Vec::new();
    }

    fn b_write_failed(&mut self) {
        // The backend closed its read side: nothing more can reach it.
        self.b_shut = true;
        self.b_out = Vec::new();
    }

    fn ingest_backend(&mut self, data: &[u8]) {
        if self.held.is_empty() {
            let used = self.release(data);
            if used < data.len() {
                self.held.extend_from_slice(&data[used..]);
            }
        } else {
            self.held.extend_from_slice(data);
            self.release_held();
        }
        if !self.turn.in_payload()
            && self.turn.backend_owes_command()
            && self.held.len() > MAX_COMMAND_LINE
        {
            self.protocol_error = true;
            self.held = Vec::new();
        }
    }

    fn release_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        let used = self.release(&held);
        self.held = held;
        self.held.drain(..used);
        if self.held.is_empty() && self.held.capacity() > KEEP_CAPACITY {
            self.held = Vec::new();
        }
    }

    /// Releases to Asterisk what the turn allows; returns the bytes used.
    fn release(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        while pos < data.len() {
            if let Some(n) = self.turn.payload_remaining() {
                let k = (n as usize).min(data.len() - pos);
                self.send_a(&data[pos..pos + k]);
                self.turn.payload_sent(k as u64);
                pos += k;
                continue;
            }
            if !self.turn.backend_owes_command() {
                break;
            }
            let Some(nl) = memchr::memchr(b'\n', &data[pos..]) else {
                break;
            };
            let line = &data[pos..pos + nl + 1];
            pos += nl + 1;
            match self.turn.on_backend_line(line) {
                BackendLine::Crlf => {
                    self.stats.crlf_fixed += 1;
                    self.stats.commands += 1;
                    self.send_a_parts(&line[..line.len() - 2], b"\n");
                }
                BackendLine::Command => {
                    self.stats.commands += 1;
                    self.send_a(line);
                }
            }
        }
        pos
    }

    fn send_a(&mut self, bytes: &[u8]) {
        if self.a_dead {
            return;
        }
        if self.a_out.is_empty() {
            match self.a.try_write(bytes) {
                Ok(n) if n == bytes.len() => {}
                Ok(n) => self.a_out.extend_from_slice(&bytes[n..]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.a_out.extend_from_slice(bytes)
                }
                Err(_) => self.a_dead = true,
            }
        } else {
            self.a_out.extend_from_slice(bytes);
        }
    }

    /// One line from two pieces, written with one syscall.
    fn send_a_parts(&mut self, head: &[u8], tail: &[u8]) {
        let mut line = Vec::with_capacity(head.len() + tail.len());
        line.extend_from_slice(head);
        line.extend_from_slice(tail);
        self.send_a(&line);
    }

    fn flush_a(&mut self) {
        match self.a.try_write(&self.a_out) {
            Ok(n) => {
                self.a_out.drain(..n);
                if self.a_out.is_empty() && self.a_out.capacity() > KEEP_CAPACITY {
                    self.a_out = Vec::new();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.a_dead = true,
        }
    }

    // ---- Asterisk -> backend ----

    fn on_asterisk_readable(&mut self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut buf);
        match read_now(self.a, &mut buf) {
            Some(Ok(0)) => {
                self.a_eof = true;
                if !self.a_partial.is_empty() {
                    let rest = std::mem::take(&mut self.a_partial);
                    self.send_b(&rest);
                }
            }
            Some(Ok(n)) => {
                self.stats.bytes_from_asterisk += n as u64;
                self.ingest_asterisk(buf.filled());
            }
            None => {}
            Some(Err(_)) => self.a_dead = true,
        }
    }

    fn ingest_asterisk(&mut self, data: &[u8]) {
        if self.a_partial.is_empty() {
            let used = self.observe_asterisk(data);
            if used < data.len() {
                self.a_partial.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.a_partial);
            buf.extend_from_slice(data);
            let used = self.observe_asterisk(&buf);
            buf.drain(..used);
            self.a_partial = buf;
        }
    }

    /// Forwards Asterisk's complete lines (and payload bytes) to the backend,
    /// advancing the turn; returns the bytes used.
    fn observe_asterisk(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        let mut seg = 0; // start of bytes not yet forwarded
        while pos < data.len() {
            if let Some(n) = self.turn.reply_payload_remaining() {
                let k = (n as usize).min(data.len() - pos);
                pos += k;
                if self.turn.reply_payload_read(k as u64) {
                    self.reply_done();
                }
                continue;
            }
            let Some(nl) = memchr::memchr(b'\n', &data[pos..]) else {
                break;
            };
            let line = &data[pos..pos + nl + 1];
            let start = pos;
            pos += nl + 1;
            match self.turn.on_asterisk_line(line) {
                AsteriskLine::Hangup => {
                    // After the backend closed, this is Asterisk's
                    // end-of-session HANGUP: expected, dropped quietly.
                    let end_of_session = self.a_shut || self.b_eof || self.turn.ended();
                    if !end_of_session {
                        self.stats.caller_hung_up = true;
                    }
                    if self.a_shut && self.b_eof {
                        self.a_done = true;
                    }
                    if end_of_session || !self.opts.forward_hangup {
                        self.send_b(&data[seg..start]);
                        seg = pos;
                    }
                }
                AsteriskLine::ReplyDone => self.reply_done_after(&data[seg..pos], &mut seg, pos),
                AsteriskLine::Other => {}
            }
        }
        self.send_b(&data[seg..pos]);
        pos
    }

    /// A reply is complete: forward it first, then let the next command go.
    fn reply_done_after(&mut self, fwd: &[u8], seg: &mut usize, pos: usize) {
        self.send_b(fwd);
        *seg = pos;
        self.reply_done();
    }

    fn reply_done(&mut self) {
        self.deadline = Some(Instant::now() + self.opts.next_command);
        if !self.held.is_empty() {
            self.release_held();
        }
    }

    fn send_b(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.b_shut {
            return;
        }
        if self.b_out.is_empty() {
            match self.b.try_write(bytes) {
                Ok(n) if n == bytes.len() => {}
                Ok(n) => self.b_out.extend_from_slice(&bytes[n..]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.b_out.extend_from_slice(bytes)
                }
                Err(_) => self.b_write_failed(),
            }
        } else {
            self.b_out.extend_from_slice(bytes);
        }
    }

    fn flush_b(&mut self) {
        match self.b.try_write(&self.b_out) {
            Ok(n) => {
                self.b_out.drain(..n);
                if self.b_out.is_empty() && self.b_out.capacity() > KEEP_CAPACITY {
                    self.b_out = Vec::new();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.b_write_failed(),
        }
    }
}

/// One read, now: `Some(Ok(n))` bytes read (0 at EOF), `None` when nothing
/// is there. Goes through `poll_read` rather than `try_read` because tokio
/// then clears the socket's readiness after a short read: the next turn
/// waits for epoll instead of paying a `recvfrom` that returns EAGAIN. The
/// buffer is uninitialised stack memory: nothing is zeroed per read.
pub(crate) fn read_now(stream: &mut TcpStream, buf: &mut ReadBuf<'_>) -> Option<io::Result<usize>> {
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(stream).poll_read(&mut cx, buf) {
        Poll::Ready(Ok(())) => Some(Ok(buf.filled().len())),
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Pending => None,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

/// Half-closes a shared socket (`shutdown(SHUT_WR)`): the peer reads EOF
/// but may still send.
fn shutdown_write(s: &TcpStream) {
    let sock = socket2::SockRef::from(s);
    let _ = sock.shutdown(std::net::Shutdown::Write);
}

/// Raw mode: everything passes untouched both ways, no pacing, no deadlines.
pub async fn relay_raw(
    a: &mut TcpStream,
    b: &mut TcpStream,
    early: &[u8],
    first: &[u8],
    cut: &Cut,
) -> (RelayEnd, RelayStats) {
    let mut stats = RelayStats::default();
    if !first.is_empty() {
        if a.write_all(first).await.is_err() {
            return (RelayEnd::PeerError, stats);
        }
        stats.bytes_to_asterisk += first.len() as u64;
    }
    if !early.is_empty() {
        if b.write_all(early).await.is_err() {
            return (RelayEnd::PeerError, stats);
        }
        stats.bytes_from_asterisk += early.len() as u64;
    }
    tokio::select! {
        r = tokio::io::copy_bidirectional(a, b) => match r {
            Ok((up, down)) => {
                stats.bytes_from_asterisk += up;
                stats.bytes_to_asterisk += down;
                (RelayEnd::Closed, stats)
            }
            Err(_) => (RelayEnd::PeerError, stats),
        },
        _ = cut.watch() => (RelayEnd::Aborted, stats),
    }
}
