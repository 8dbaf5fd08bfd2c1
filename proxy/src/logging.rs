//! Log setup: human-readable by default, JSON lines for log pipelines.
//! The access log is the `agiproxy::access` target, one line per session.
//!
//! Every line goes to stderr from a thread of its own, through a bounded
//! buffer that drops (and counts) lines when full: a log reader that stalls
//! (a full pipe to a container runtime, a frozen terminal) costs log lines,
//! never a call. Written from the session threads, one full pipe would
//! block every session of that thread.
//!
//! The buffer is one byte vector behind a mutex, swapped out whole by the
//! writer: queuing a line is a copy, never a system call. The writer sleeps
//! until the first line of a batch arrives, gives the batch `FLUSH_AFTER`
//! to fill (or `WAKE_BYTES`, whichever comes first) and writes it with one
//! `write(2)`. A channel with a parked receiver (tracing-appender's) cost
//! a wake-up, a `write(2)` and the receiver's spinning per access line:
//! 5-6 system calls a session with two workers.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Lines the buffer holds before it drops: 8,192 lines of about 300 bytes
/// is a few seconds of access log at thousands of calls a second, and a
/// few MiB at most.
pub const DEFAULT_BUFFER_LINES: u32 = 8192;

/// How long a batch may wait for more lines: short enough that a terminal
/// shows a line at once to a person, long enough that thousands of calls a
/// second cost a few writes a second.
const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// A batch this large is written at once, without waiting out `FLUSH_AFTER`.
const WAKE_BYTES: usize = 64 * 1024;

/// Bytes a buffered line may take on average before the buffer counts as
/// full (lines are about 300 bytes; a long warning with a peer's bytes in
/// it is cut by the size bound, not by the line count).
const BYTES_PER_LINE: usize = 1024;

/// The buffer's byte bound is never below this: the longest line agiproxy
/// writes (a refused config's errors, up to 64 KiB) must fit even with a
/// small `--log-buffer-lines`, or the one line that says a change was
/// refused is the one dropped.
const MIN_BYTES: usize = 128 * 1024;

static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

/// The access log's own way to the writer: the line is built by
/// `SessionRecord::log` without tracing's general-purpose field formatting.
static ACCESS_FORMAT: OnceLock<LogFormat> = OnceLock::new();

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Writes out what is queued when dropped: hold it until the process ends.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    queue: Arc<Queue>,
    writer: Option<JoinHandle<()>>,
}

/// How long the exit waits for the writer to write out what is queued. A
/// reader that stalls (a pipe nobody reads) blocks it in `write(2)` for
/// ever; the exit then goes on without those lines (audit: it waited for
/// ever, deaf to further signals).
const EXIT_FLUSH: Duration = Duration::from_secs(2);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.queue.stop.store(true, Ordering::Release);
        if let Some(writer) = self.writer.take() {
            writer.thread().unpark();
            let until = Instant::now() + EXIT_FLUSH;
            while !writer.is_finished() && Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            }
        }
    }
}

/// Log lines dropped so far because the writer was `buffer_lines` behind
/// (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}

static PANICS: AtomicU64 = AtomicU64::new(0);

const WRITER_THREAD: &str = "agiproxy-log";

/// Panics so far (`agiproxy_panics_total`): each is a bug. A session's
/// ends that call; a health check's is a failed check; either way the
/// process goes on, so without a count nobody would know.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Panics are logged as ERROR lines through the log's own writer (the
/// default hook writes raw text to stderr, beside JSON lines that a log
/// pipeline then cannot parse) and counted.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = thread::current();
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => backtrace.to_string(),
            _ => "set RUST_BACKTRACE=1 for one".to_string(),
        };
        if thread.name() == Some(WRITER_THREAD) {
            // The writer itself: a line queued for it would never go out.
            // `eprintln!` panics on a write error, and a panic in the hook
            // aborts the process.
            let _ = writeln!(
                std::io::stderr(),
                "agiproxy: panic in the log writer at {location}: {what} (log lines from now on are lost)\n{backtrace}"
            );
            return;
        }
        tracing::error!(
            what,
            location,
            thread = thread.name().unwrap_or("unnamed"),
            backtrace,
            "panic: a bug in agiproxy; what it was doing has ended (a call, or a health check, \
             counted as failed), the rest goes on; please report this line"
        );
    }));
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init(format: LogFormat, default_filter: &str, buffer_lines: usize) -> LogGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    // Colours only on a terminal (and not with NO_COLOR): log files and
    // journald get plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let queue = Arc::new(Queue::new(buffer_lines.max(1)));
    let writer = {
        let queue = Arc::clone(&queue);
        thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || queue.write_out(std::io::stderr()))
            .expect("spawning the log writer thread")
    };
    let _ = queue.writer.set(writer.thread().clone());
    let _ = QUEUE.set(Arc::clone(&queue));
    let _ = ACCESS_FORMAT.set(format);
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(filter)
        .with_writer(Arc::clone(&queue));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    log_panics();
    LogGuard {
        queue,
        writer: Some(writer),
    }
}

/// How this process writes access lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AccessLog {
    /// The filter keeps `agiproxy::access` at info out.
    Off,
    /// Built by hand and queued with [`write_access`].
    Direct(LogFormat),
    /// [`init`] never ran (library use, tests): as `tracing` events, for
    /// whatever subscriber there is.
    Tracing,
}

pub(crate) fn access_log() -> AccessLog {
    let Some(format) = ACCESS_FORMAT.get() else {
        return AccessLog::Tracing;
    };
    if tracing::enabled!(target: "agiproxy::access", tracing::Level::INFO) {
        AccessLog::Direct(*format)
    } else {
        AccessLog::Off
    }
}

/// Queues one finished access line (newline included). Lossy like every
/// other line: a full buffer drops it and counts it in [`dropped_lines`].
pub(crate) fn write_access(line: &[u8]) {
    if let Some(queue) = QUEUE.get() {
        queue.push(line);
    }
}

/// The bounded buffer between the threads that log and the one that writes.
struct Queue {
    pending: Mutex<Pending>,
    max_lines: usize,
    max_bytes: usize,
    dropped: AtomicU64,
    stop: AtomicBool,
    writer: OnceLock<Thread>,
}

struct Pending {
    bytes: Vec<u8>,
    lines: usize,
    /// The writer is parked for want of lines: the next line wakes it.
    writer_idle: bool,
}

impl Queue {
    fn new(max_lines: usize) -> Self {
        Queue {
            pending: Mutex::new(Pending {
                bytes: Vec::new(),
                lines: 0,
                writer_idle: false,
            }),
            max_lines,
            max_bytes: max_lines.saturating_mul(BYTES_PER_LINE).max(MIN_BYTES),
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            writer: OnceLock::new(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Nothing panics while holding it; a poisoned buffer is still bytes.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `line` or counts it dropped; wakes the writer only for the
    /// first line of a batch and when the batch reaches `WAKE_BYTES`.
    fn push(&self, line: &[u8]) {
        let wake = {
            let mut p = self.pending();
            if p.lines >= self.max_lines || p.bytes.len() + line.len() > self.max_bytes {
                drop(p);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let before = p.bytes.len();
            p.bytes.extend_from_slice(line);
            p.lines += 1;
            let wake = p.writer_idle || (before < WAKE_BYTES && p.bytes.len() >= WAKE_BYTES);
            p.writer_idle = false;
            wake
        };
        if let Some(writer) = self.writer.get().filter(|_| wake) {
            writer.unpark();
        }
    }

    /// The writer thread: batch, write, repeat; returns once stopped and
    /// everything queued before the stop is written.
    fn write_out(&self, mut out: impl Write) {
        let mut batch = Vec::with_capacity(WAKE_BYTES);
        loop {
            // Park until a line arrives.
            loop {
                let mut p = self.pending();
                if !p.bytes.is_empty() {
                    break;
                }
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                p.writer_idle = true;
                drop(p);
                thread::park();
            }
            // Give the batch time to fill.
            let deadline = Instant::now() + FLUSH_AFTER;
            while !self.stop.load(Ordering::Acquire) && self.pending().bytes.len() < WAKE_BYTES {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                thread::park_timeout(deadline - now);
            }
            {
                let mut p = self.pending();
                std::mem::swap(&mut p.bytes, &mut batch);
                p.lines = 0;
            }
            // A closed or broken stderr loses lines, nothing else.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            // Give back what a burst grew.
            if batch.capacity() > 4 * WAKE_BYTES {
                batch = Vec::with_capacity(WAKE_BYTES);
            }
        }
    }
}

/// tracing's writer: one formatted event is one `write` call, one line.
impl<'a> MakeWriter<'a> for Queue {
    type Writer = &'a Queue;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Write for &Queue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that records each write(2)-sized call.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn start(lines: usize, out: Calls) -> (Arc<Queue>, JoinHandle<()>) {
        let queue = Arc::new(Queue::new(lines));
        let q = Arc::clone(&queue);
        let writer = thread::spawn(move || q.write_out(out));
        let _ = queue.writer.set(writer.thread().clone());
        (queue, writer)
    }

    fn stop(queue: &Queue, writer: JoinHandle<()>) {
        queue.stop.store(true, Ordering::Release);
        writer.thread().unpark();
        writer.join().unwrap();
    }

    #[test]
    fn a_burst_of_lines_is_written_in_few_writes_and_in_order() {
        let out = Calls::default();
        let (queue, writer) = start(10_000, out.clone());
        for i in 0..2_000 {
            queue.push(format!("line {i}\n").as_bytes());
        }
        stop(&queue, writer);
        let calls = out.0.lock().unwrap();
        let all: Vec<u8> = calls.concat();
        let expected: String = (0..2_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(all).unwrap(), expected);
        assert!(calls.len() <= 4, "{} writes for 2,000 lines", calls.len());
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_buffer_drops_and_counts_and_a_line_is_written_without_waiting_for_more() {
        // A writer that never gets to run keeps the buffer full: only the
        // queue's own bound decides.
        let queue = Queue::new(3);
        for _ in 0..5 {
            queue.push(b"x\n");
        }
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(queue.pending().lines, 3);
        // Bytes are bounded too: one long line takes the room of many.
        let queue = Queue::new(200);
        queue.push(&vec![b'y'; 300 * BYTES_PER_LINE]);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 1);
        // But a refused config's line (64 KiB of errors) fits whatever the
        // line count: it was dropped below about 64 lines.
        let queue = Queue::new(2);
        queue.push(&vec![b'z'; 65 * 1024]);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(queue.pending().lines, 1);

        // A lone line reaches the output after about FLUSH_AFTER.
        let out = Calls::default();
        let (queue, writer) = start(16, out.clone());
        queue.push(b"alone\n");
        let until = Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.0.lock().unwrap().concat(), b"alone\n");
        stop(&queue, writer);
    }
}
