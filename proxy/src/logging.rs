//! Log setup: human-readable by default, JSON lines for log pipelines.
//! The access log is the `agiproxy::access` target, one line per session.
//!
//! Lines go to stderr from a thread of their own, through a bounded queue
//! that drops (and counts) lines when full: a log reader that stalls (a
//! full pipe to a container runtime, a frozen terminal) costs log lines,
//! never a call. Written from the session threads, one full pipe would
//! block every session of that thread.

use std::io::{BufWriter, Write};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines the queue holds before it drops: 8,192 lines of about 300 bytes
/// is a few seconds of access log at thousands of calls a second, and a
/// few MiB at most.
pub const DEFAULT_BUFFER_LINES: u32 = 8192;

/// What the writer thread hands to write(2) at once: it drains every queued
/// line into this buffer and flushes when the queue is empty, so a burst of
/// sessions costs one system call, not one per line.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The access log's own way to the writer queue: the line is built by
/// `SessionRecord::log` without tracing's general-purpose field formatting.
static ACCESS: OnceLock<AccessSink> = OnceLock::new();

struct AccessSink {
    writer: NonBlocking,
    format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Writes out what is queued when dropped: hold it until the process ends.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: WorkerGuard,
}

/// Log lines dropped so far because the writer was `buffer_lines` behind
/// (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init(format: LogFormat, default_filter: &str, buffer_lines: usize) -> LogGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    // Colours only on a terminal (and not with NO_COLOR): log files and
    // journald get plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(buffer_lines.max(1))
        .thread_name("agiproxy-log")
        .finish(BufWriter::with_capacity(
            WRITE_BATCH_BYTES,
            std::io::stderr(),
        ));
    let _ = DROPPED.set(writer.error_counter());
    let _ = ACCESS.set(AccessSink {
        writer: writer.clone(),
        format,
    });
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogGuard { _writer: guard }
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
    let Some(sink) = ACCESS.get() else {
        return AccessLog::Tracing;
    };
    if tracing::enabled!(target: "agiproxy::access", tracing::Level::INFO) {
        AccessLog::Direct(sink.format)
    } else {
        AccessLog::Off
    }
}

/// Queues one finished access line (newline included). Lossy like every
/// other line: a full queue drops it and counts it in [`dropped_lines`].
pub(crate) fn write_access(line: &[u8]) {
    if let Some(sink) = ACCESS.get() {
        // NonBlocking's write only enqueues (or counts a drop); it never fails.
        let _ = sink.writer.clone().write_all(line);
    }
}
