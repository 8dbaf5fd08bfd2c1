//! The Asterisk side of the benchmark: clients that run FastAGI sessions
//! back to back (load) or hold them open on a long command (idle).
//!
//! Written so the generator is not what gets measured: one task per client
//! that owns its buffers (header, read buffer, histograms) for the whole
//! run, no allocation and no shared lock per command, one timer per session
//! rather than per read, and counters merged only at the end.
//!
//! Each session does what a real Asterisk does (`shared/fastagi-protocol.md`):
//! connect, send the header, answer every command line with one reply line,
//! and when the server closes send `HANGUP\n` and close. The header goes out
//! in one write rather than Asterisk's one write per line: the benchmark
//! measures the proxy, not the kernel's segment handling.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

use super::lines::Lines;
use super::stats::{ErrorKind, Recorder};
use crate::header::AgiHeader;

/// What a client answers to every command.
pub const REPLY: &[u8] = b"200 result=0\n";
/// What Asterisk sends when the server has closed.
pub const HANGUP: &[u8] = b"HANGUP\n";

/// The `agi_uniqueid` of every session: a fixed prefix and this many digits
/// patched in place per session, so the header is serialised once per
/// client and never rebuilt.
const UID_PREFIX: &str = "1700000000.";
const UID_DIGITS: usize = 14;

/// A serialised header whose `agi_uniqueid` is rewritten in place.
#[derive(Debug, Clone)]
pub struct HeaderTemplate {
    bytes: Vec<u8>,
    uid_at: usize,
}

impl HeaderTemplate {
    /// [`AgiHeader::realistic`] for `script` and `args`: 22 variables plus one
    /// per argument.
    pub fn new(script: &str, args: &[&str]) -> Self {
        let uid = format!("{UID_PREFIX}{}", "0".repeat(UID_DIGITS));
        let bytes = AgiHeader::realistic(script, args, &uid).to_bytes();
        let needle = format!("agi_uniqueid: {uid}\n");
        let line = memchr::memmem::find(&bytes, needle.as_bytes())
            .expect("the realistic header carries agi_uniqueid");
        let uid_at = line + "agi_uniqueid: ".len() + UID_PREFIX.len();
        Self { bytes, uid_at }
    }

    /// Writes `n` (mod 10^14) as the uniqueid's digits; no allocation.
    pub fn set_uniqueid(&mut self, mut n: u64) {
        for b in self.bytes[self.uid_at..self.uid_at + UID_DIGITS]
            .iter_mut()
            .rev()
        {
            *b = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of `agi_*` lines (for the report).
    pub fn lines(&self) -> usize {
        self.bytes.iter().filter(|&&b| b == b'\n').count() - 1
    }
}

/// What every client of a run shares (read-only).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client `i` connects to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    pub script: String,
    pub args: Vec<String>,
    /// Commands a normal session has; fewer is a short session. 0: any.
    pub expect_commands: usize,
    /// Bound on one session outside an idle hold.
    pub session_timeout: Duration,
    pub connect_timeout: Duration,
    /// Each client starts a session every this often (an open loop at a
    /// fixed rate) instead of back to back. A session that ends late starts
    /// the next one at once, without a burst to catch up.
    pub session_interval: Option<Duration>,
}

impl ClientConfig {
    pub fn new(targets: Vec<SocketAddr>, script: &str) -> Self {
        Self {
            targets,
            script: script.to_owned(),
            args: vec!["arg1".to_owned(), "arg2".to_owned()],
            expect_commands: 0,
            session_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            session_interval: None,
        }
    }

    fn header(&self) -> HeaderTemplate {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        HeaderTemplate::new(&self.script, &args)
    }

    /// Lines of the header the clients send (for the report).
    pub fn header_lines(&self) -> usize {
        self.header().lines()
    }
}

const WARMUP: u8 = 0;
const MEASURING: u8 = 1;
const STOPPING: u8 = 2;

/// Run-wide state the clients poll: the phase, and in count mode how many
/// sessions are left to start.
struct Control {
    phase: AtomicU8,
    remaining: Option<AtomicU64>,
}

impl Control {
    fn measuring(&self) -> bool {
        self.phase.load(Relaxed) == MEASURING
    }

    /// Claims the next session; false when the run is over.
    fn next_session(&self) -> bool {
        if self.phase.load(Relaxed) == STOPPING {
            return false;
        }
        match &self.remaining {
            None => true,
            Some(left) => left
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

/// How a session that ended normally went.
struct Done {
    commands: u64,
    setup: Option<Duration>,
    total: Duration,
}

/// An idle session's link to the run: it reports when its long command has
/// arrived and waits for the release.
struct Hold {
    shared: Arc<IdleShared>,
    release: watch::Receiver<bool>,
    /// This session's connect slot, given back once it is established.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    established: bool,
}

struct IdleShared {
    established: AtomicUsize,
    failed: AtomicUsize,
    changed: Notify,
}

impl IdleShared {
    fn bump(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Relaxed);
        // notify_one keeps a permit when the controller is not waiting yet,
        // so no change is missed.
        self.changed.notify_one();
    }
}

/// One client: a connection at a time, its buffers kept across sessions.
struct Client {
    id: u64,
    target: SocketAddr,
    cfg: Arc<ClientConfig>,
    header: HeaderTemplate,
    lines: Lines,
    seq: u64,
}

fn classify(e: &io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => ErrorKind::Reset,
        io::ErrorKind::InvalidData => ErrorKind::Protocol,
        _ => ErrorKind::Io,
    }
}

fn is_failure(line: &[u8]) -> bool {
    line.len() >= 7 && line[..7].eq_ignore_ascii_case(b"failure")
}

impl Client {
    fn new(id: u64, cfg: Arc<ClientConfig>) -> Self {
        let target = cfg.targets[id as usize % cfg.targets.len()];
        Self {
            id,
            target,
            header: cfg.header(),
            cfg,
            lines: Lines::new(),
            seq: 0,
        }
    }

    async fn connect(&self) -> Result<TcpStream, ErrorKind> {
        match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(self.target)).await
        {
            Err(_) => Err(ErrorKind::ConnectTimeout),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Err(ErrorKind::ConnectRefused)
            }
            Ok(Err(_)) => Err(ErrorKind::ConnectOther),
            Ok(Ok(s)) => {
                // Replies are single small writes answering a command: no
                // Nagle delay can apply, but be explicit so none ever does.
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        }
    }

    /// Runs one session. Round-trip times go into `rec` while the run is
    /// measuring; `hold` makes it an idle session.
    async fn session(
        &mut self,
        ctl: &Control,
        mut rec: Option<&mut Recorder>,
        mut hold: Option<&mut Hold>,
    ) -> Result<Done, ErrorKind> {
        let t0 = Instant::now();
        let mut s = self.connect().await?;
        self.seq += 1;
        self.header.set_uniqueid(self.id * 100_000_000 + self.seq);
        self.lines.clear();
        s.write_all(self.header.bytes())
            .await
            .map_err(|e| classify(&e))?;

        let deadline = tokio::time::sleep_until(t0 + self.cfg.session_timeout);
        tokio::pin!(deadline);
        let mut commands = 0u64;
        let mut setup = None;
        let mut replied_at: Option<Instant> = None;
        loop {
            let n = tokio::select! {
                biased;
                r = self.lines.fill(&mut s) => r.map_err(|e| classify(&e))?,
                _ = &mut deadline => return Err(ErrorKind::Timeout),
            };
            if n == 0 {
                break;
            }
            let now = Instant::now();
            while let Some(line) = self.lines.next_line() {
                if is_failure(self.lines.get(line)) {
                    // Asterisk: no reply, HANGUP, close.
                    let _ = s.write_all(HANGUP).await;
                    return Err(ErrorKind::Failure);
                }
                // A further command already here means the server did not
                // wait for this reply.
                if self.lines.has_pending() {
                    return Err(ErrorKind::Protocol);
                }
                commands += 1;
                match replied_at {
                    None => setup = Some(now - t0),
                    Some(at) => {
                        if let Some(r) = rec.as_deref_mut().filter(|_| ctl.measuring()) {
                            r.rtt.record(now - at);
                        }
                    }
                }
                if let Some(h) = hold.as_deref_mut().filter(|_| commands == 1) {
                    self.hold(&mut s, h).await?;
                    deadline
                        .as_mut()
                        .reset(Instant::now() + self.cfg.session_timeout);
                }
                s.write_all(REPLY).await.map_err(|e| classify(&e))?;
                replied_at = Some(Instant::now());
            }
        }
        // The server closed: say HANGUP as Asterisk does. It may have closed
        // both ways already; that is no error of the session.
        let _ = s.write_all(HANGUP).await;
        drop(s);
        let expected = self.cfg.expect_commands as u64;
        if commands < expected.max(u64::from(hold.is_some())) {
            return Err(ErrorKind::ShortSession);
        }
        Ok(Done {
            commands,
            setup,
            total: t0.elapsed(),
        })
    }

    /// Holds the long command unanswered until released. Anything the
    /// server does meanwhile (a byte, a close, a reset) breaks the session.
    async fn hold(&mut self, s: &mut TcpStream, h: &mut Hold) -> Result<(), ErrorKind> {
        h.permit = None;
        h.established = true;
        h.shared.bump(&h.shared.established);
        tokio::select! {
            r = h.release.wait_for(|&go| go) => {
                // The sender gone means the run was abandoned: release too.
                let _ = r;
                Ok(())
            }
            _ = self.lines.fill(s) => Err(ErrorKind::DroppedIdle),
        }
    }

    /// Sessions back to back until the run says stop.
    async fn run_load(mut self, ctl: Arc<Control>, clients: u64) -> Recorder {
        let mut rec = Recorder::default();
        // Paced clients start spread over one interval, so that the
        // sessions of a fixed rate do not arrive in step.
        let mut pace = self.cfg.session_interval.map(|every| {
            let offset = every.mul_f64(self.id as f64 / clients.max(1) as f64);
            let mut t = tokio::time::interval_at(Instant::now() + offset, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        while ctl.next_session() {
            if let Some(t) = pace.as_mut() {
                t.tick().await;
            }
            match self.session(&ctl, Some(&mut rec), None).await {
                Ok(done) => {
                    if ctl.measuring() {
                        rec.sessions += 1;
                        rec.commands += done.commands;
                        if let Some(d) = done.setup {
                            rec.setup.record(d);
                        }
                        rec.session.record(done.total);
                    }
                }
                Err(kind) => {
                    rec.errors.add(kind);
                    if matches!(kind, ErrorKind::ConnectRefused | ErrorKind::ConnectOther) {
                        // Don't spin on a dead target.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
        rec
    }
}

/// When a load run ends.
#[derive(Debug, Clone, Copy)]
pub enum RunLength {
    /// Run `warmup` unmeasured, then measure for `measure`.
    Time { warmup: Duration, measure: Duration },
    /// Exactly this many session attempts, all measured.
    Sessions(u64),
}

/// Marks the edges of the measurement window (to sample the processes
/// under test exactly there).
pub trait Window {
    fn start(&mut self) {}
    fn end(&mut self) {}
}

impl Window for () {}

impl Window for super::procstat::Watcher {
    fn start(&mut self) {
        super::procstat::Watcher::start(self);
    }
    fn end(&mut self) {
        super::procstat::Watcher::end(self);
    }
}

/// The merged result of a load run.
#[derive(Debug)]
pub struct LoadOutcome {
    pub rec: Recorder,
    /// The measurement window (from the end of warm-up).
    pub window: Duration,
    pub clients: usize,
    pub header_lines: usize,
}

/// Runs `clients` clients against `cfg.targets` for `length`.
pub async fn run_load(
    cfg: ClientConfig,
    clients: usize,
    length: RunLength,
    window: &mut dyn Window,
) -> LoadOutcome {
    let cfg = Arc::new(cfg);
    let header_lines = cfg.header().lines();
    let ctl = Arc::new(Control {
        phase: AtomicU8::new(match length {
            RunLength::Time { warmup, .. } if !warmup.is_zero() => WARMUP,
            _ => MEASURING,
        }),
        remaining: match length {
            RunLength::Sessions(n) => Some(AtomicU64::new(n)),
            RunLength::Time { .. } => None,
        },
    });
    let mut measure_start = Instant::now();
    if ctl.measuring() {
        window.start();
    }
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let client = Client::new(i as u64, Arc::clone(&cfg));
            tokio::spawn(client.run_load(Arc::clone(&ctl), clients as u64))
        })
        .collect();
    let mut measure_end = None;
    if let RunLength::Time { warmup, measure } = length {
        if !warmup.is_zero() {
            tokio::time::sleep(warmup).await;
            window.start();
            measure_start = Instant::now();
            ctl.phase.store(MEASURING, Relaxed);
        }
        tokio::time::sleep(measure).await;
        ctl.phase.store(STOPPING, Relaxed);
        measure_end = Some(Instant::now());
        window.end();
    }
    let mut rec = Recorder::default();
    for t in tasks {
        // A client task only ends by returning (it does not panic on I/O).
        rec.merge(&t.await.expect("client task"));
    }
    let measure_end = measure_end.unwrap_or_else(|| {
        window.end();
        Instant::now()
    });
    LoadOutcome {
        rec,
        window: measure_end - measure_start,
        clients,
        header_lines,
    }
}

/// The result of an idle run.
#[derive(Debug)]
pub struct IdleOutcome {
    pub rec: Recorder,
    pub requested: usize,
    /// Sessions whose long command arrived.
    pub established: usize,
    /// From the first connect until all sessions were established or failed.
    pub establish_time: Duration,
    pub held: Duration,
    /// From the release until every session had closed.
    pub release_time: Duration,
}

/// Parameters of an idle run.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    pub sessions: usize,
    pub hold: Duration,
    /// Sessions connecting at once (the rest wait their turn), so a burst
    /// of thousands of SYNs does not overflow a listen backlog.
    pub connect_concurrency: usize,
}

/// Opens `idle.sessions` sessions, waits until each holds its long command,
/// calls `on_established`, holds them for `idle.hold`, then releases them.
///
/// `window.start()` is called before the first connect (the baseline) and
/// `window.end()` at the end of the hold, before the release (the peak).
pub async fn run_idle(
    cfg: ClientConfig,
    idle: IdleConfig,
    window: &mut dyn Window,
    on_established: impl FnOnce(&IdleProgress),
) -> IdleOutcome {
    let cfg = Arc::new(cfg);
    let ctl = Arc::new(Control {
        phase: AtomicU8::new(MEASURING),
        remaining: None,
    });
    let shared = Arc::new(IdleShared {
        established: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        changed: Notify::new(),
    });
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let (release, released) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(idle.connect_concurrency.max(1)));
    window.start();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..idle.sessions)
        .map(|i| {
            let mut client = Client::new(i as u64, Arc::clone(&cfg));
            let ctl = Arc::clone(&ctl);
            let rec = Arc::clone(&rec);
            let gate = Arc::clone(&gate);
            let mut hold = Hold {
                shared: Arc::clone(&shared),
                release: released.clone(),
                permit: None,
                established: false,
            };
            tokio::spawn(async move {
                // Held until this session is established, so at most
                // `connect_concurrency` sessions are connecting at once.
                hold.permit = gate.acquire_owned().await.ok();
                let result = client.session(&ctl, None, Some(&mut hold)).await;
                if !hold.established {
                    hold.shared.bump(&hold.shared.failed);
                }
                let mut rec = rec.lock().unwrap_or_else(|e| e.into_inner());
                match result {
                    Ok(done) => {
                        rec.sessions += 1;
                        rec.commands += done.commands;
                        if let Some(d) = done.setup {
                            rec.setup.record(d);
                        }
                        rec.session.record(done.total);
                    }
                    Err(kind) => rec.errors.add(kind),
                }
            })
        })
        .collect();
    drop(released);
    loop {
        let done = shared.established.load(Relaxed) + shared.failed.load(Relaxed);
        if done >= idle.sessions {
            break;
        }
        shared.changed.notified().await;
    }
    let establish_time = t0.elapsed();
    let progress = IdleProgress {
        established: shared.established.load(Relaxed),
        failed: shared.failed.load(Relaxed),
        elapsed: establish_time,
    };
    on_established(&progress);
    let held_from = Instant::now();
    tokio::time::sleep(idle.hold).await;
    window.end();
    let held = held_from.elapsed();
    let released_at = Instant::now();
    let _ = release.send(true);
    for t in tasks {
        t.await.expect("idle client task");
    }
    let release_time = released_at.elapsed();
    let rec = Arc::try_unwrap(rec)
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_else(|arc| arc.lock().unwrap_or_else(|e| e.into_inner()).clone());
    IdleOutcome {
        rec,
        requested: idle.sessions,
        established: progress.established,
        establish_time,
        held,
        release_time,
    }
}

/// How far an idle run got when every session was established or failed.
#[derive(Debug, Clone, Copy)]
pub struct IdleProgress {
    pub established: usize,
    pub failed: usize,
    pub elapsed: Duration,
}

/// Runs single sessions against every target until each completes one
/// normally (the server under test is up and routes), or `within` passes.
pub async fn wait_ready(cfg: ClientConfig, within: Duration) -> Result<(), ErrorKind> {
    let deadline = Instant::now() + within;
    let cfg = Arc::new(cfg);
    let ctl = Control {
        phase: AtomicU8::new(WARMUP),
        remaining: None,
    };
    for i in 0..cfg.targets.len() {
        let mut client = Client::new(i as u64, Arc::clone(&cfg));
        loop {
            match client.session(&ctl, None, None).await {
                Ok(_) => break,
                Err(kind) if Instant::now() >= deadline => return Err(kind),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    Ok(())
}
