//! One accepted connection of a [`FakeBackend`](super::FakeBackend), driven
//! by its [`Behaviour`].

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::sleep;

use super::behaviour::{Behaviour, Step, Then, FILLER_COMMAND, SPLIT_LINE_PAUSE};
use super::stats::{BackendStats, SessionLog};
use crate::framing::ReadBuf;
use crate::header::AgiHeader;
use crate::soundfile;

/// Replies longer than this are cut into several lines (this only bounds
/// memory against a broken peer: Asterisk bounds no reply, and `GET FULL
/// VARIABLE` of a large value answers hundreds of KB in one line).
const MAX_REPLY_LINE: usize = 4 << 20;

/// A header that has not ended after this many bytes is refused.
const MAX_HEADER: usize = 1 << 20;

/// What a reply said, as far as the script needs to know.
struct Replied {
    /// N of a plain `200 result=N` line.
    result: Option<i64>,
    /// N of a `size=N` word (the answer to `GET SOUNDFILE`).
    size: Option<usize>,
}

/// One connection and its log. Dropping it (the session ending, or the
/// backend stopping and aborting it) files the log into the stats.
pub(super) struct Conn {
    stream: TcpStream,
    rb: ReadBuf,
    stats: Arc<BackendStats>,
    log: SessionLog,
    /// Keep header and reply texts (everything but the benchmark backend).
    record: bool,
    header_done: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let log = self.record.then(|| std::mem::take(&mut self.log));
        self.stats.session_ended(log);
    }
}

impl Conn {
    /// Counts the connection as accepted and active until dropped.
    pub(super) fn new(stream: TcpStream, stats: Arc<BackendStats>, record: bool) -> Self {
        stats.session_started();
        Self {
            stream,
            rb: ReadBuf::new(),
            stats,
            log: SessionLog::default(),
            record,
            header_done: false,
        }
    }

    pub(super) fn set_error(&mut self, error: &io::Error) {
        self.log.error = Some(error.to_string());
    }

    /// Reads once; `false` at end of stream.
    async fn read_more(&mut self) -> io::Result<bool> {
        let n = self.rb.fill(&mut self.stream).await?;
        self.stats.bytes_received.fetch_add(n as u64, Relaxed);
        self.log.bytes_received += n as u64;
        Ok(n > 0)
    }

    fn count_hangup(&mut self) {
        self.log.hangups += 1;
        self.stats.hangups.fetch_add(1, Relaxed);
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads up to the blank line and records the header byte-exact.
    /// `false` when the peer closed first.
    async fn read_header(&mut self) -> io::Result<bool> {
        while !self.header_done {
            if let Some(len) = AgiHeader::len_in(self.rb.pending()) {
                if self.record {
                    let header = self.rb.pending()[..len].to_vec();
                    self.stats.record_header(header.clone());
                    self.log.header = header;
                }
                self.rb.consume(len);
                self.header_done = true;
            } else if self.rb.pending().len() > MAX_HEADER {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "header over 1 MiB",
                ));
            } else if !self.read_more().await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads one reply: a line, or a `520-` block up to its `520 ` line.
    /// `HANGUP` lines are counted and skipped, and so is `GOSUB`'s interim
    /// `100 result=0 Trying...` (the final answer follows when the
    /// subroutine returns). `None` at end of stream.
    async fn read_reply(&mut self) -> io::Result<Option<Replied>> {
        let mut block: Option<Vec<u8>> = None;
        loop {
            while let Some(line) = self.rb.take_line(MAX_REPLY_LINE) {
                if line == b"HANGUP" {
                    self.log.hangups += 1;
                    self.stats.hangups.fetch_add(1, Relaxed);
                    continue;
                }
                if block.is_none() && line.starts_with(b"100 ") {
                    continue;
                }
                let complete = match block.as_mut() {
                    Some(b) => {
                        b.push(b'\n');
                        b.extend_from_slice(line);
                        line.starts_with(b"520 ")
                    }
                    None if line.starts_with(b"520-") => {
                        block = Some(line.to_vec());
                        false
                    }
                    None => true,
                };
                if !complete {
                    continue;
                }
                let (result, size) = if block.is_some() {
                    (None, None)
                } else {
                    (parse_result(line), parse_size(line))
                };
                self.stats.replies.fetch_add(1, Relaxed);
                self.log.reply_count += 1;
                if self.record {
                    let text = match block.take() {
                        Some(b) => String::from_utf8_lossy(&b).into_owned(),
                        None => String::from_utf8_lossy(line).into_owned(),
                    };
                    self.log.replies.push(text);
                }
                return Ok(Some(Replied { result, size }));
            }
            if !self.read_more().await? {
                return Ok(None);
            }
        }
    }

    /// Reads base64 lines until `n` decoded bytes; `None` if the peer
    /// closed first. Nothing in them is a reply or a `HANGUP`.
    async fn read_payload(&mut self, n: usize) -> io::Result<Option<Vec<u8>>> {
        let mut data = Vec::with_capacity(n.min(1 << 20));
        while data.len() < n {
            match self.rb.take_line(MAX_REPLY_LINE) {
                Some(line) => soundfile::decode_line(line, &mut data)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                None => {
                    if !self.read_more().await? {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(Some(data))
    }

    /// Sends one command line in one write and reads its reply (and the
    /// payload of a `GET SOUNDFILE`). `false` when the peer closed.
    async fn command(&mut self, command: &str) -> io::Result<bool> {
        self.send(&with_newline(command)).await?;
        let Some(reply) = self.read_reply().await? else {
            return Ok(false);
        };
        let mut words = command.split_ascii_whitespace();
        let is_get = words.next().is_some_and(|w| w.eq_ignore_ascii_case("GET"))
            && words
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("SOUNDFILE"));
        if let (true, Some(0), Some(size)) = (is_get, reply.result, reply.size) {
            let Some(data) = self.read_payload(size).await? else {
                return Ok(false);
            };
            let name = words.next().unwrap_or_default().to_owned();
            self.log.files.push((name, data));
        }
        Ok(true)
    }

    /// `command` (a `PUT SOUNDFILE <name> <len>` line); on `200 result=0` (ready) the first
    /// `send` bytes of `data` as base64 lines (all of it: `None`) in one
    /// write, then the final reply when all was sent. `false` when the
    /// peer closed.
    async fn put_file(
        &mut self,
        command: &str,
        data: &[u8],
        send: Option<usize>,
    ) -> io::Result<bool> {
        self.send(&with_newline(command)).await?;
        let Some(ready) = self.read_reply().await? else {
            return Ok(false);
        };
        if ready.result != Some(0) {
            return Ok(true);
        }
        let part = send.unwrap_or(data.len()).min(data.len());
        self.send(&soundfile::encode_lines(&data[..part])).await?;
        if part < data.len() {
            return Ok(true);
        }
        Ok(self.read_reply().await?.is_some())
    }

    /// Reads until a `HANGUP` line; `false` if the peer closed first.
    async fn wait_for_hangup(&mut self) -> io::Result<bool> {
        loop {
            while let Some(line) = self.rb.take_line(MAX_REPLY_LINE) {
                if line == b"HANGUP" {
                    self.count_hangup();
                    return Ok(true);
                }
            }
            if !self.read_more().await? {
                return Ok(false);
            }
        }
    }

    /// Reads (counting `HANGUP`s) until the peer closes.
    async fn drain(&mut self) {
        loop {
            while let Some(line) = self.rb.take_line(MAX_REPLY_LINE) {
                if line == b"HANGUP" {
                    self.count_hangup();
                }
            }
            if !matches!(self.read_more().await, Ok(true)) {
                return;
            }
        }
    }

    /// FIN, then drain: an orderly close that still sees the end-of-session
    /// `HANGUP`.
    async fn close(&mut self) -> io::Result<()> {
        let _ = self.stream.shutdown().await;
        self.drain().await;
        Ok(())
    }

    async fn finish(&mut self, then: Then) -> io::Result<()> {
        match then {
            Then::Close => self.close().await,
            // The RST goes out when the connection is dropped, right after.
            Then::Reset => self.stream.set_zero_linger(),
            Then::Stall => {
                self.drain().await;
                Ok(())
            }
            Then::WaitForHangupThenClose => {
                if self.log.hangups == 0 {
                    self.wait_for_hangup().await?;
                }
                self.close().await
            }
        }
    }

    async fn fillers(&mut self, n: usize) -> io::Result<bool> {
        for _ in 0..n {
            if !self.command(FILLER_COMMAND).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn echo_raw(&mut self) -> io::Result<()> {
        while self.read_more().await? {
            let n = self.rb.pending().len();
            self.stream.write_all(self.rb.pending()).await?;
            self.rb.consume(n);
        }
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

/// Runs `behaviour` on the connection.
pub(super) async fn serve(conn: &mut Conn, behaviour: &Behaviour) -> io::Result<()> {
    match behaviour {
        // The accept loop picks one of the cycle per connection; this is
        // only reached by a cycle nested in another behaviour.
        Behaviour::Cycle(list) => {
            return match list.first() {
                Some(b) => Box::pin(serve(conn, b)).await,
                None => conn.close().await,
            }
        }
        Behaviour::CloseImmediately => return conn.close().await,
        Behaviour::ResetImmediately => return conn.finish(Then::Reset).await,
        Behaviour::Raw => return conn.echo_raw().await,
        _ => {}
    }
    if !conn.read_header().await? {
        return Ok(());
    }
    match behaviour {
        Behaviour::Script { commands, then } => {
            for command in commands {
                if !conn.command(command).await? {
                    break;
                }
            }
            conn.finish(*then).await
        }
        Behaviour::Steps { steps, then } => {
            for step in steps {
                let open = match step {
                    Step::Command(command) => conn.command(command).await?,
                    Step::PutFile { name, data } => {
                        let command = format!("PUT SOUNDFILE {name} {}", data.len());
                        conn.put_file(&command, data, None).await?
                    }
                    Step::PutFileAs { command, data } => conn.put_file(command, data, None).await?,
                    Step::PutFileCut { name, data, send } => {
                        let command = format!("PUT SOUNDFILE {name} {}", data.len());
                        conn.put_file(&command, data, Some(*send)).await?
                    }
                    Step::GetFile { name } => {
                        conn.command(&format!("GET SOUNDFILE {name}")).await?
                    }
                    Step::Send(bytes) => conn.send(bytes).await.map(|()| true)?,
                    Step::Sleep(pause) => {
                        sleep(*pause).await;
                        true
                    }
                    Step::WaitForHangup => conn.wait_for_hangup().await?,
                };
                if !open {
                    break;
                }
            }
            conn.finish(*then).await
        }
        Behaviour::Echo { commands } => {
            for _ in 0..*commands {
                conn.send(b"NOOP\n").await?;
                if conn.read_reply().await?.is_none() {
                    return Ok(());
                }
            }
            conn.close().await
        }
        Behaviour::CloseAfterHeader => conn.close().await,
        Behaviour::ResetAfterHeader => conn.finish(Then::Reset).await,
        Behaviour::ResetAfterCommands(n) => {
            conn.fillers(*n).await?;
            conn.finish(Then::Reset).await
        }
        Behaviour::StallAfterHeader => conn.finish(Then::Stall).await,
        Behaviour::StallAfterCommands(n) => {
            conn.fillers(*n).await?;
            conn.finish(Then::Stall).await
        }
        Behaviour::Pipelined(commands) => {
            let all: Vec<u8> = commands.iter().flat_map(|c| with_newline(c)).collect();
            conn.send(&all).await?;
            for _ in commands {
                if conn.read_reply().await?.is_none() {
                    break;
                }
            }
            conn.close().await
        }
        Behaviour::SplitLines(commands) => {
            for command in commands {
                let line = with_newline(command);
                let mid = (line.len() / 2).max(1);
                if mid < line.len() {
                    conn.send(&line[..mid]).await?;
                    sleep(SPLIT_LINE_PAUSE).await;
                }
                conn.send(&line[mid.min(line.len())..]).await?;
                if conn.read_reply().await?.is_none() {
                    break;
                }
            }
            conn.close().await
        }
        Behaviour::Garbage(bytes) => {
            conn.send(bytes).await?;
            conn.close().await
        }
        Behaviour::FirstCommandAfter(pause, inner) => {
            sleep(*pause).await;
            Box::pin(serve(conn, inner)).await
        }
        Behaviour::CloseImmediately
        | Behaviour::ResetImmediately
        | Behaviour::Raw
        | Behaviour::Cycle(_) => {
            unreachable!("handled before the header")
        }
    }
}

/// The command as one line: `\n` appended when missing.
fn with_newline(command: &str) -> Vec<u8> {
    let mut line = Vec::with_capacity(command.len() + 1);
    line.extend_from_slice(command.as_bytes());
    if !line.ends_with(b"\n") {
        line.push(b'\n');
    }
    line
}

/// N of a `size=N` word.
fn parse_size(line: &[u8]) -> Option<usize> {
    let word = line
        .split(|b| *b == b' ')
        .find_map(|w| w.strip_prefix(b"size="))?;
    std::str::from_utf8(word).ok()?.parse().ok()
}

/// N of `200 result=N[ ...]`.
fn parse_result(line: &[u8]) -> Option<i64> {
    let rest = line.strip_prefix(b"200 result=")?;
    let end = rest
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b'-'))
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_parse_from_reply_lines() {
        assert_eq!(parse_result(b"200 result=0"), Some(0));
        assert_eq!(parse_result(b"200 result=-1 (hangup)"), Some(-1));
        assert_eq!(parse_result(b"200 result=1048576"), Some(1_048_576));
        assert_eq!(parse_result(b"200 result=49 endpos=1234"), Some(49));
        assert_eq!(parse_result(b"510 Invalid or unknown command"), None);
        assert_eq!(parse_size(b"200 result=0 size=51200"), Some(51200));
        assert_eq!(parse_size(b"200 result=-1"), None);
    }

    #[test]
    fn commands_become_one_line() {
        assert_eq!(with_newline("NOOP"), b"NOOP\n");
        assert_eq!(with_newline("NOOP\n"), b"NOOP\n");
    }
}
