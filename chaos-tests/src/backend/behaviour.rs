//! What a [`FakeBackend`](super::FakeBackend) does with each connection.

use std::time::Duration;

/// How a scripted session ends once its commands are done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Then {
    /// Orderly close: FIN, then keep reading until Asterisk closes (so the
    /// end-of-session `HANGUP` is seen and counted, and the close stays a FIN
    /// rather than an RST over unread bytes).
    #[default]
    Close,
    /// Abortive close: `SO_LINGER` 0, then drop, so the peer sees an RST.
    Reset,
    /// Say nothing more; hold the connection until the peer closes.
    Stall,
    /// Read until a `HANGUP` line (at once if one was already seen), then
    /// close as [`Then::Close`] does.
    WaitForHangupThenClose,
}

/// One step of a [`Behaviour::Steps`] session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write the command line (`\n` appended when missing) in one `write()`
    /// and read one reply. `GET SOUNDFILE` replies carry their payload.
    Command(String),
    /// `PUT SOUNDFILE <name> <len>\n`, read the first reply; if it is
    /// `200 result=0` (ready), `data` as base64 lines of 76 characters in
    /// one write, then read the final reply.
    PutFile { name: String, data: Vec<u8> },
    /// As `PutFile`, with `command` (spelled as a backend may: extra
    /// whitespace, tabs, lower case) in place of `PUT SOUNDFILE <name> <len>`.
    PutFileAs { command: String, data: Vec<u8> },
    /// As `PutFile`, but only the first `send` bytes of `data` (whole
    /// lines of 57 bytes, the last one shorter) are sent, and no final
    /// reply is read: a payload cut midway (the session's `then` follows).
    PutFileCut {
        name: String,
        data: Vec<u8>,
        send: usize,
    },
    /// `GET SOUNDFILE <name>\n`; read `200 result=0 size=N` and the base64
    /// lines behind it up to N bytes (recorded in the session log's `files`).
    GetFile { name: String },
    /// Write these bytes as they are and read nothing (`failure\n`, a broken
    /// line, garbage).
    Send(Vec<u8>),
    /// Wait before the next step.
    Sleep(Duration),
    /// Read until a `HANGUP` line.
    WaitForHangup,
}

/// The pause in the middle of each line of [`Behaviour::SplitLines`].
pub const SPLIT_LINE_PAUSE: Duration = Duration::from_millis(50);

/// The command the fault behaviours send before failing (`NOOP` is safe on a
/// dead channel, so it never changes what a test observes).
pub const FILLER_COMMAND: &str = "NOOP";

/// What a fake FastAGI server does with each accepted connection. Every
/// variant that reads the header records it byte-exact in the stats; a
/// `HANGUP` line is never taken for a reply: it is counted and skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Read the header, send each command and read its reply (one line, or a
    /// `520-` block up to its `520 ` line), then end as `then` says.
    Script { commands: Vec<String>, then: Then },
    /// Like `Script`, with sound-file payloads, pauses and raw writes.
    Steps { steps: Vec<Step>, then: Then },
    /// Benchmark backend: `NOOP` `commands` times, each after the previous
    /// reply, then close. One buffer per session, no allocation per command;
    /// records counters only (no header, replies or session log).
    Echo { commands: usize },
    /// Accept, close (FIN) without reading the header.
    CloseImmediately,
    /// Read the header, close (FIN).
    CloseAfterHeader,
    /// Accept, reset (RST) without reading.
    ResetImmediately,
    /// Read the header, reset.
    ResetAfterHeader,
    /// Header, `n` `NOOP`s with their replies, reset.
    ResetAfterCommands(usize),
    /// Read the header, never speak; hold the connection until the peer
    /// closes.
    StallAfterHeader,
    /// Header, `n` `NOOP`s with their replies, then silence.
    StallAfterCommands(usize),
    /// Header, then ALL the commands in ONE `write()`, then read one reply
    /// per command and close: what Asterisk must never receive.
    Pipelined(Vec<String>),
    /// Header, then each command in two writes with [`SPLIT_LINE_PAUSE`]
    /// in the middle of the line, reading each reply; then close.
    SplitLines(Vec<String>),
    /// Header, these bytes, close.
    Garbage(Vec<u8>),
    /// Read the header, wait, then behave as the inner behaviour (whose own
    /// header reading is then already done).
    FirstCommandAfter(Duration, Box<Behaviour>),
    /// Echo every byte back untouched, header included, until the peer
    /// closes: for raw-mode routes.
    Raw,
    /// Connection n (counted from 0 per listener) behaves as `list[n % len]`:
    /// e.g. one early close in five sessions.
    Cycle(Vec<Behaviour>),
}

impl Behaviour {
    /// A `Script` that closes (FIN) after the last reply.
    pub fn script<S: AsRef<str>>(commands: &[S]) -> Self {
        Behaviour::Script {
            commands: commands.iter().map(|c| c.as_ref().to_owned()).collect(),
            then: Then::Close,
        }
    }

    /// `good` on every session but the first of each `n`, which closes
    /// right after the header (a green that breaks one call in `n`).
    pub fn closing_early_one_in(n: usize, good: Behaviour) -> Self {
        let mut cycle = vec![Behaviour::CloseAfterHeader];
        cycle.extend(std::iter::repeat_n(good, n.saturating_sub(1)));
        Behaviour::Cycle(cycle)
    }

    /// `Steps` that close (FIN) after the last step.
    pub fn steps(steps: Vec<Step>) -> Self {
        Behaviour::Steps {
            steps,
            then: Then::Close,
        }
    }
}
