//! `FakeAsterisk`: one Asterisk channel running `AGI(agi://addr/...)`.
//!
//! It behaves as `shared/fastagi-protocol.md` measured a real Asterisk 23 to
//! behave (how AGISTATUS is decided, the unsolicited and end-of-session
//! `HANGUP`, dead-channel replies, one header line per `write()`), and it
//! records every protocol violation a proxy in front of it must never cause:
//! pipelined commands, partial lines, `\r\n`. It speaks the sound-file
//! transfer of `asterisk-agi-audiotx` as the protocol file describes it
//! (base64 lines, two replies to `PUT SOUNDFILE`).

mod args;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, timeout_at};

use crate::framing::ReadBuf;
use crate::header::AgiHeader;
use crate::soundfile;

/// Asterisk's `MAX_AGI_CONNECT`: each address gets this long to connect.
pub const MAX_AGI_CONNECT: Duration = Duration::from_millis(2000);

/// Asterisk reads commands into an 8192-byte buffer: longer lines are cut.
pub const MAX_LINE: usize = 8191;

/// How long the sound-file module waits for the next payload line of a
/// `PUT SOUNDFILE` before it gives up (`200 result=-1`).
pub const SOUNDFILE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest base64 payload line the module takes.
const MAX_PAYLOAD_LINE: usize = 64 * 1024;

/// How long bytes may sit without their `\n` before it counts as a partial
/// line. A whole line written in one `write()` arrives in one piece on
/// loopback, so any visible gap means the writer split it; the bound only
/// has to be well under [`crate::backend::SPLIT_LINE_PAUSE`] so that a proxy
/// forwarding a split line as it comes is caught.
pub const PARTIAL_LINE_GRACE: Duration = Duration::from_millis(20);

/// The AGISTATUS the dialplan would see after `AGI()` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgiStatus {
    /// The server closed (FIN or RST) with the channel up; the dialplan
    /// continues as if the script had worked.
    Success,
    /// Connect failed, or the server sent a line starting with `failure`.
    Failure,
    /// The caller hung up during the session.
    Hangup,
    /// `call_timeout` ran out while Asterisk was still waiting. A real
    /// Asterisk would wait for ever: tests treat this as a bug.
    Hung,
}

impl fmt::Display for AgiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgiStatus::Success => "SUCCESS",
            AgiStatus::Failure => "FAILURE",
            AgiStatus::Hangup => "HANGUP",
            AgiStatus::Hung => "HUNG",
        })
    }
}

/// Asterisk's answer to one command, and how long the command "runs".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Time before the reply is written (a command executing).
    pub delay: Duration,
    /// The bytes written, usually one `200 result=N\n` line.
    pub bytes: Vec<u8>,
    /// Further parts, each written after its delay: `GOSUB`'s final answer
    /// after its interim one.
    pub later: Vec<(Duration, Vec<u8>)>,
}

impl Reply {
    /// `200 result=0\n`, at once.
    pub fn ok() -> Self {
        Self::result(0)
    }

    /// `200 result=<n>\n`, at once.
    pub fn result(n: i64) -> Self {
        Self::line(&format!("200 result={n}"))
    }

    /// One line, `\n` appended when missing.
    pub fn line(line: &str) -> Self {
        let mut bytes = line.as_bytes().to_vec();
        if !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        Self {
            delay: Duration::ZERO,
            bytes,
            later: Vec::new(),
        }
    }

    /// Exactly these bytes (a `520-` block, a broken reply, ...).
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            delay: Duration::ZERO,
            bytes: bytes.into(),
            later: Vec::new(),
        }
    }

    /// The same reply, written after `delay`.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Then `line` (`\n` appended when missing), `after` the parts before.
    pub fn then(mut self, after: Duration, line: &str) -> Self {
        let mut bytes = line.as_bytes().to_vec();
        if !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        self.later.push((after, bytes));
        self
    }

    fn usage(usage: &str) -> Self {
        Self::raw(format!(
            "520-Invalid command syntax.  Proper usage follows:\n{usage}\n520 End of proper usage.\n"
        ))
    }
}

/// Decides the reply to each ordinary command line (without its `\n`).
pub type ReplyFn = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// What one `AGI()` call saw.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    /// AGISTATUS after the call.
    pub status: AgiStatus,
    /// Every line received from the server, without `\n`, in order.
    pub commands: Vec<String>,
    /// Channel variables set with `SET VARIABLE`.
    pub variables: HashMap<String, String>,
    /// Files stored with `PUT SOUNDFILE <name> <size>` (whole payloads only).
    pub received_files: Vec<(String, Vec<u8>)>,
    /// `PUT SOUNDFILE` payloads the module gave up on (too slow, cut).
    pub put_timeouts: usize,
    /// Why the connect failed, when it did.
    pub connect_error: Option<String>,
    /// Protocol violations by the server; a correct proxy causes none.
    pub violations: Vec<String>,
    /// Time inside `AGI()`, connect included.
    pub elapsed: Duration,
    /// From the start of the call (connect included) to the first command:
    /// the silence the caller hears.
    pub time_to_first_command: Option<Duration>,
    /// Bytes written to the server: header, replies, `HANGUP`s.
    pub bytes_sent: u64,
    /// Bytes read from the server.
    pub bytes_received: u64,
}

impl CallOutcome {
    fn new() -> Self {
        Self {
            status: AgiStatus::Hung,
            commands: Vec::new(),
            variables: HashMap::new(),
            received_files: Vec::new(),
            put_timeouts: 0,
            connect_error: None,
            violations: Vec::new(),
            elapsed: Duration::ZERO,
            time_to_first_command: None,
            bytes_sent: 0,
            bytes_received: 0,
        }
    }
}

/// A simulated Asterisk channel, configured builder-style and run against an
/// address with [`run`](Self::run). Cloning is cheap; one value can run many
/// calls concurrently.
#[derive(Clone)]
pub struct FakeAsterisk {
    header: AgiHeader,
    connect_timeout: Duration,
    /// Source address for the connect (a loopback alias such as
    /// 127.0.0.7), to exercise routing by the Asterisk's address.
    source: Option<std::net::IpAddr>,
    /// Bytes a load balancer in front writes before the header (a PROXY
    /// protocol header), in one `write()`.
    preamble: Option<Arc<[u8]>>,
    call_timeout: Duration,
    partial_line_grace: Duration,
    reply: ReplyFn,
    hangup_after: Option<usize>,
    hangup_at_start: bool,
    files: Arc<HashMap<String, Vec<u8>>>,
    /// `res_agi_audiotx` loaded (otherwise its commands get 510).
    audiotx: bool,
    /// The first reply to `PUT SOUNDFILE` (0: ready).
    put_ready: i64,
    soundfile_timeout: Duration,
    /// The caller hangs up once this many bytes of a `PUT SOUNDFILE`
    /// payload have arrived.
    hangup_during_put: Option<usize>,
}

impl fmt::Debug for FakeAsterisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeAsterisk")
            .field("header", &self.header)
            .field("connect_timeout", &self.connect_timeout)
            .field("call_timeout", &self.call_timeout)
            .field("partial_line_grace", &self.partial_line_grace)
            .field("hangup_after", &self.hangup_after)
            .field("hangup_at_start", &self.hangup_at_start)
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for FakeAsterisk {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeAsterisk {
    /// The [`Fixture::FX`](crate::Fixture::FX) header, a 2000 ms connect
    /// timeout, a 30 s call bound, `200 result=0` to every command, no hangup.
    pub fn new() -> Self {
        Self {
            header: AgiHeader::default(),
            connect_timeout: MAX_AGI_CONNECT,
            source: None,
            preamble: None,
            call_timeout: Duration::from_secs(30),
            partial_line_grace: PARTIAL_LINE_GRACE,
            reply: Arc::new(|_| Reply::ok()),
            hangup_after: None,
            hangup_at_start: false,
            files: Arc::default(),
            audiotx: true,
            put_ready: 0,
            soundfile_timeout: SOUNDFILE_TIMEOUT,
            hangup_during_put: None,
        }
    }

    /// The header sent after connecting.
    pub fn header(mut self, header: AgiHeader) -> Self {
        self.header = header;
        self
    }

    /// Connect timeout (Asterisk: 2000 ms per address).
    /// Connects from this local address (loopback only, e.g. 127.0.0.7).
    pub fn source(mut self, ip: std::net::IpAddr) -> Self {
        self.source = Some(ip);
        self
    }

    /// Writes `bytes` before the header, as a load balancer that speaks
    /// the PROXY protocol does on behalf of the Asterisk behind it.
    pub fn preamble(mut self, bytes: &[u8]) -> Self {
        self.preamble = Some(Arc::from(bytes));
        self
    }

    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// Safety bound for tests on the whole call; hitting it gives
    /// [`AgiStatus::Hung`].
    pub fn call_timeout(mut self, limit: Duration) -> Self {
        self.call_timeout = limit;
        self
    }

    /// How long an incomplete line may wait for its `\n` before it is
    /// recorded as a violation (default [`PARTIAL_LINE_GRACE`]).
    pub fn partial_line_grace(mut self, grace: Duration) -> Self {
        self.partial_line_grace = grace;
        self
    }

    /// Replies to ordinary commands (not `SET VARIABLE`, the sound-file
    /// transfers, or commands refused on a dead channel).
    pub fn reply_with(mut self, reply: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
        self.reply = Arc::new(reply);
        self
    }

    /// `EXEC` commands (an `EXEC Dial`, a `Wait`) take `run` before their
    /// `200 result=0`; every other command is answered at once.
    pub fn exec_takes(self, run: Duration) -> Self {
        self.reply_with(move |c| {
            if c.starts_with("EXEC") {
                Reply::ok().after(run)
            } else {
                Reply::ok()
            }
        })
    }

    /// `GOSUB` as app_stack.c answers it: `100 result=0 Trying...` at once,
    /// the subroutine runs for `run` (the socket unread), then
    /// `200 result=0 Gosub complete`. Every other command: `200 result=0`.
    pub fn gosub_takes(self, run: Duration) -> Self {
        self.reply_with(move |c| {
            if c.starts_with("GOSUB") {
                Reply::line("100 result=0 Trying...").then(run, "200 result=0 Gosub complete")
            } else {
                Reply::ok()
            }
        })
    }

    /// The caller hangs up after Asterisk replied to `n` commands: an
    /// unsolicited `HANGUP\n`, then only dead-safe commands work. `0` is
    /// the same as [`hangup_at_start`](Self::hangup_at_start).
    pub fn hangup_after(mut self, n: usize) -> Self {
        self.hangup_after = Some(n);
        self
    }

    /// The caller hangs up right after the header was sent.
    pub fn hangup_at_start(mut self, yes: bool) -> Self {
        self.hangup_at_start = yes;
        self
    }

    /// A file `GET SOUNDFILE <name>` returns (files stored with
    /// `PUT SOUNDFILE` during the call are returned too).
    pub fn file(mut self, name: &str, data: impl Into<Vec<u8>>) -> Self {
        Arc::make_mut(&mut self.files).insert(name.to_owned(), data.into());
        self
    }

    /// An Asterisk without `asterisk-agi-audiotx`: `PUT`, `GET` and
    /// `ISEXISTING SOUNDFILE` get `510 Invalid or unknown command`.
    pub fn without_audiotx(mut self) -> Self {
        self.audiotx = false;
        self
    }

    /// The first reply to `PUT SOUNDFILE`: 0 (ready, the default), or the
    /// module's error (-10 cannot create the file, -11 the directory).
    pub fn put_ready(mut self, result: i64) -> Self {
        self.put_ready = result;
        self
    }

    /// How long the module waits for a payload line (default
    /// [`SOUNDFILE_TIMEOUT`]) before it answers `200 result=-1`.
    pub fn soundfile_timeout(mut self, limit: Duration) -> Self {
        self.soundfile_timeout = limit;
        self
    }

    /// The caller hangs up in the middle of a `PUT SOUNDFILE` payload, once
    /// `bytes` of it have arrived: an unsolicited `HANGUP\n`, and the module
    /// still reads the rest and answers.
    pub fn hangup_during_put(mut self, bytes: usize) -> Self {
        self.hangup_during_put = Some(bytes);
        self
    }

    /// Connects and writes `header` in one go, for tests that drive the
    /// rest of the conversation by hand.
    pub async fn raw_session(addr: SocketAddr, header: &[u8]) -> std::io::Result<TcpStream> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(header).await?;
        Ok(stream)
    }

    /// Runs one `AGI()` call against `addr` and reports what it saw. Never
    /// panics on network errors: they end up in the outcome.
    pub async fn run(&self, addr: SocketAddr) -> CallOutcome {
        let started = Instant::now();
        let mut out = CallOutcome::new();
        // On timeout the call future is dropped and `out` keeps what it saw.
        let status = timeout(self.call_timeout, self.call(addr, started, &mut out))
            .await
            .unwrap_or(AgiStatus::Hung);
        out.status = status;
        out.elapsed = started.elapsed();
        out
    }

    async fn call(&self, addr: SocketAddr, started: Instant, out: &mut CallOutcome) -> AgiStatus {
        let stream = match timeout(self.connect_timeout, connect_from(self.source, addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                out.connect_error = Some(format!("connect {addr}: {e}"));
                return AgiStatus::Failure;
            }
            Err(_) => {
                out.connect_error = Some(format!(
                    "connect {addr}: timed out after {:?}",
                    self.connect_timeout
                ));
                return AgiStatus::Failure;
            }
        };
        Session {
            cfg: self,
            stream,
            rb: ReadBuf::new(),
            out,
            started,
            replies: 0,
            dead: false,
            hung_up: false,
            failure: false,
            stored: HashMap::new(),
        }
        .run()
        .await
    }
}

/// How a conversation step ended.
enum Flow {
    Continue,
    End,
}

async fn connect_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

/// One connected call.
struct Session<'a> {
    cfg: &'a FakeAsterisk,
    stream: TcpStream,
    rb: ReadBuf,
    out: &'a mut CallOutcome,
    started: Instant,
    /// Replies written so far (for `hangup_after`).
    replies: usize,
    /// The channel is gone: only dead-safe commands work.
    dead: bool,
    /// The caller hung up during the session (AGISTATUS=HANGUP).
    hung_up: bool,
    /// A `failure` line was received (AGISTATUS=FAILURE).
    failure: bool,
    /// Files stored by `PUT SOUNDFILE` in this call.
    stored: HashMap<String, Vec<u8>>,
}

impl Session<'_> {
    async fn run(mut self) -> AgiStatus {
        // A server that resets during the header ends the session like any
        // other close: nothing is wrong on Asterisk's side.
        if self.send_header().await.is_ok() {
            if self.cfg.hangup_at_start || self.cfg.hangup_after == Some(0) {
                self.hang_up().await;
            }
            while let Some(line) = self.next_line().await {
                if let Flow::End = self.handle(line).await {
                    break;
                }
            }
        }
        self.end().await
    }

    /// One `write()` per line, then the blank line, as Asterisk does.
    async fn send_header(&mut self) -> std::io::Result<()> {
        if let Some(p) = self.cfg.preamble.clone() {
            self.write(&p).await?;
        }
        let mut line = Vec::with_capacity(64);
        for (name, value) in self.cfg.header.vars() {
            AgiHeader::line_into(name, value, &mut line);
            self.write(&line).await?;
        }
        self.write(b"\n").await
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.out.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    /// The caller hangs up: unsolicited `HANGUP`, channel dead from now on.
    async fn hang_up(&mut self) {
        let _ = self.write(b"HANGUP\n").await;
        self.dead = true;
        self.hung_up = true;
    }

    /// End of session, however it ended: `HANGUP` once more, close.
    async fn end(mut self) -> AgiStatus {
        let _ = self.write(b"HANGUP\n").await;
        let _ = self.stream.shutdown().await;
        if self.failure {
            AgiStatus::Failure
        } else if self.hung_up {
            AgiStatus::Hangup
        } else {
            AgiStatus::Success
        }
    }

    fn violation(&mut self, what: String) {
        self.out.violations.push(what);
    }

    /// The next line from the server, or `None` when it closed. Records a
    /// partial line that stays incomplete past the grace, or that the close
    /// cuts off.
    async fn next_line(&mut self) -> Option<String> {
        let mut deadline: Option<Instant> = None;
        let mut reported = false;
        loop {
            if let Some(line) = self.rb.take_line(MAX_LINE) {
                let line = String::from_utf8_lossy(line).into_owned();
                self.out
                    .time_to_first_command
                    .get_or_insert_with(|| self.started.elapsed());
                return Some(line);
            }
            let read = if self.rb.has_pending() && !reported {
                let deadline =
                    *deadline.get_or_insert_with(|| Instant::now() + self.cfg.partial_line_grace);
                match timeout_at(deadline.into(), self.rb.fill(&mut self.stream)).await {
                    Ok(read) => read,
                    Err(_) => {
                        reported = true;
                        let pending = String::from_utf8_lossy(self.rb.pending()).into_owned();
                        self.violation(format!(
                            "partial line: {pending:?} waited over {:?} for its newline",
                            self.cfg.partial_line_grace
                        ));
                        continue;
                    }
                }
            } else {
                self.rb.fill(&mut self.stream).await
            };
            match read {
                Ok(n) if n > 0 => self.out.bytes_received += n as u64,
                _ => {
                    if self.rb.has_pending() {
                        let pending = String::from_utf8_lossy(self.rb.pending()).into_owned();
                        self.violation(format!(
                            "partial line: connection closed inside {pending:?}"
                        ));
                    }
                    return None;
                }
            }
        }
    }

    /// Handles one command line: decide the reply, check pacing, reply.
    async fn handle(&mut self, line: String) -> Flow {
        self.out.commands.push(line.clone());
        if line
            .as_bytes()
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"failure"))
        {
            // No reply; end() sends HANGUP and closes.
            self.failure = true;
            return Flow::End;
        }
        let words = args::parse(&line);
        let reply = if line.ends_with('\r') {
            self.violation(format!("\\r\\n line ending: {line:?}"));
            Reply::line("510 Invalid or unknown command")
        } else if !self.cfg.audiotx
            && (args::starts_with(&words, &["PUT", "SOUNDFILE"])
                || args::starts_with(&words, &["GET", "SOUNDFILE"])
                || args::starts_with(&words, &["ISEXISTING", "SOUNDFILE"]))
        {
            Reply::line("510 Invalid or unknown command")
        } else if args::starts_with(&words, &["PUT", "SOUNDFILE"]) {
            return self.put_soundfile(&line, &words).await;
        } else if args::starts_with(&words, &["GET", "SOUNDFILE"]) {
            self.get_soundfile(&words)
        } else if args::starts_with(&words, &["ISEXISTING", "SOUNDFILE"]) {
            match words.get(2) {
                Some(name) if words.len() == 3 && self.file(name).is_some() => Reply::ok(),
                _ => Reply::result(-1),
            }
        } else if words.is_empty() {
            Reply::line("510 Invalid or unknown command")
        } else if self.dead && !args::dead_safe(&words) {
            Reply::line("511 Command Not Permitted on a dead channel or intercept routine")
        } else if args::starts_with(&words, &["SET", "VARIABLE"]) {
            self.set_variable(words)
        } else {
            (self.cfg.reply)(&line)
        };
        self.reply(&line, reply).await
    }

    /// Writes `reply` to the command `line`, checking first that the server
    /// waited for it.
    async fn reply(&mut self, line: &str, reply: Reply) -> Flow {
        let mut early = self.rb.pending().len();
        if !reply.delay.is_zero() {
            sleep(reply.delay).await;
        }
        early += self.rb.try_fill(&self.stream);
        if early > 0 {
            self.violation(format!(
                "pipelining: {early} bytes of a further command arrived before the reply to {line:?}"
            ));
        }
        if self.write(&reply.bytes).await.is_err() {
            return Flow::End;
        }
        for (after, bytes) in &reply.later {
            sleep(*after).await;
            let early = self.rb.try_fill(&self.stream);
            if early > 0 {
                self.violation(format!(
                    "pipelining: {early} bytes of a further command arrived before the last part of the reply to {line:?}"
                ));
            }
            if self.write(bytes).await.is_err() {
                return Flow::End;
            }
        }
        self.replies += 1;
        if !self.dead && self.cfg.hangup_after == Some(self.replies) {
            self.hang_up().await;
        }
        Flow::Continue
    }

    fn set_variable(&mut self, mut words: Vec<String>) -> Reply {
        if words.len() != 4 {
            return Reply::usage(" Usage: SET VARIABLE <variablename> <value>");
        }
        let value = words.pop().unwrap_or_default();
        let name = words.pop().unwrap_or_default();
        self.out.variables.insert(name, value);
        Reply::result(1)
    }

    /// `PUT SOUNDFILE <name> <size>`: answers ready (or the configured
    /// error), then reads base64 lines until `<size>` decoded bytes, each
    /// within the module's timeout, and answers once more. The pacing
    /// checks of [`reply`](Self::reply) apply to both answers: payload
    /// before the first, or a command before the second, is a violation.
    async fn put_soundfile(&mut self, line: &str, words: &[String]) -> Flow {
        let size = match (
            words.len(),
            words.get(3).and_then(|s| s.parse::<usize>().ok()),
        ) {
            (4, Some(size)) => size,
            _ => {
                let usage = Reply::usage(" Usage: PUT SOUNDFILE <filename> <size>");
                return self.reply(line, usage).await;
            }
        };
        let ready = self.cfg.put_ready;
        if let Flow::End = self.reply(line, Reply::result(ready)).await {
            return Flow::End;
        }
        if ready != 0 {
            return Flow::Continue;
        }
        let mut data = Vec::with_capacity(size.min(1 << 20));
        let mut hangup_due = self.cfg.hangup_during_put.filter(|_| !self.dead);
        while data.len() < size {
            let next = timeout(self.cfg.soundfile_timeout, self.payload_line()).await;
            let Ok(next) = next else {
                // The module gives up; the rest of the payload, should it
                // come, is read as commands.
                self.out.put_timeouts += 1;
                return self.answer(Reply::result(-1)).await;
            };
            let Some(ok) = next else {
                self.violation(format!(
                    "connection closed after {} of {size} PUT SOUNDFILE payload bytes",
                    data.len()
                ));
                return Flow::End;
            };
            if !ok {
                return Flow::End;
            }
            let Some(line) = self.rb.take_line(MAX_PAYLOAD_LINE) else {
                continue;
            };
            if let Err(e) = soundfile::decode_line(line, &mut data) {
                let text = String::from_utf8_lossy(line).into_owned();
                self.violation(format!("PUT SOUNDFILE payload line {text:?}: {e}"));
            }
            if hangup_due.is_some_and(|n| data.len() >= n) {
                hangup_due = None;
                self.hang_up().await;
            }
        }
        if data.len() > size {
            self.violation(format!(
                "PUT SOUNDFILE payload of {} bytes, {size} announced",
                data.len()
            ));
        }
        let name = words[2].clone();
        self.stored.insert(name.clone(), data.clone());
        self.out.received_files.push((name, data));
        self.reply(line, Reply::ok()).await
    }

    /// Waits until a whole line is buffered: `Some(true)`; `Some(false)`
    /// on a read error, `None` when the server closed.
    async fn payload_line(&mut self) -> Option<bool> {
        loop {
            let pending = self.rb.pending();
            if memchr::memchr(b'\n', pending).is_some() || pending.len() >= MAX_PAYLOAD_LINE {
                return Some(true);
            }
            match self.rb.fill(&mut self.stream).await {
                Ok(0) => return None,
                Ok(n) => self.out.bytes_received += n as u64,
                Err(_) => return Some(false),
            }
        }
    }

    /// Writes a reply that answers no new command (the module's own).
    async fn answer(&mut self, reply: Reply) -> Flow {
        if self.write(&reply.bytes).await.is_err() {
            return Flow::End;
        }
        Flow::Continue
    }

    fn file(&self, name: &str) -> Option<&Vec<u8>> {
        self.stored.get(name).or_else(|| self.cfg.files.get(name))
    }

    /// `200 result=0 size=<n>` and the file as base64 lines (no final line),
    /// or `200 result=-1` if unknown.
    fn get_soundfile(&self, words: &[String]) -> Reply {
        match words.get(2).and_then(|name| self.file(name)) {
            Some(data) if words.len() == 3 => {
                let mut bytes = format!("200 result=0 size={}\n", data.len()).into_bytes();
                bytes.extend_from_slice(&soundfile::encode_lines(data));
                Reply::raw(bytes)
            }
            _ => Reply::result(-1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_whole_lines() {
        assert_eq!(Reply::ok().bytes, b"200 result=0\n");
        assert_eq!(Reply::result(-1).bytes, b"200 result=-1\n");
        assert_eq!(
            Reply::line("510 Invalid or unknown command\n").bytes,
            b"510 Invalid or unknown command\n"
        );
        let slow = Reply::ok().after(Duration::from_millis(5));
        assert_eq!(slow.delay, Duration::from_millis(5));
        let usage = Reply::usage(" Usage: X");
        assert!(usage.bytes.starts_with(b"520-"));
        assert!(usage.bytes.ends_with(b"\n520 End of proper usage.\n"));
    }

    #[test]
    fn status_prints_as_the_dialplan_sees_it() {
        assert_eq!(AgiStatus::Failure.to_string(), "FAILURE");
        assert_eq!(AgiStatus::Hangup.to_string(), "HANGUP");
    }
}
