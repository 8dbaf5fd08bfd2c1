//! Backend -> Asterisk: whole lines, one command at a time, a held command
//! released by Asterisk's reply; `PUT SOUNDFILE` payload lines unpaced.

use std::io;
use std::mem::MaybeUninit;

use tokio::io::ReadBuf;

use super::*;

impl Relay<'_> {
    pub(super) fn on_backend_readable(&mut self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut buf);
        match read_now(self.b, &mut buf) {
            Some(Ok(0)) => self.backend_eof(),
            Some(Ok(_)) => self.ingest_backend(buf.filled()),
            None => {}
            Some(Err(_)) => self.backend_reset(),
        }
    }

    pub(super) fn backend_eof(&mut self) {
        self.b_eof = true;
        if self.turn.in_payload() {
            // The file is cut short: Asterisk's module waits for lines that
            // will not come. Its answer (when it gives up) is awaited, then
            // the dialplan is told FAILURE rather than a silent SUCCESS.
            self.give_up_payload(Reason::BackendClosed);
            return;
        }
        // A last command without its newline: complete it rather than make
        // Asterisk spin on a partial line.
        if !self.held.is_empty() && self.held.last() != Some(&b'\n') {
            self.held.push(b'\n');
            self.release_held();
        }
    }

    pub(super) fn backend_reset(&mut self) {
        let in_payload = self.turn.in_payload();
        self.b_eof = true;
        self.b_dead = true;
        self.b_shut = true;
        self.held = Vec::new();
        self.b_out = Vec::new();
        if in_payload {
            self.give_up_payload(Reason::BackendReset);
        }
    }

    /// A write to the backend failed with `error` (`None`: its socket
    /// reported an error without saying which).
    pub(super) fn b_write_failed(&mut self, error: Option<io::Error>) {
        if error.is_some_and(|e| e.kind() == io::ErrorKind::ConnectionReset) {
            // A reset met by a write is a reset: the write took the
            // socket's error, and the next read would return 0 as if the
            // backend had closed (SUCCESS instead of `backend_reset`). A
            // backend that had closed first gives EPIPE here instead.
            self.backend_reset();
            return;
        }
        // The backend closed its read side: nothing more can reach it.
        self.b_shut = true;
        self.b_out = Vec::new();
    }

    /// The backend's `PUT SOUNDFILE` payload will not be completed (it
    /// stalled, closed, reset or broke the line bound). The module on
    /// Asterisk's side still reads payload lines: nothing may be sent to it
    /// until it answers (it gives up after its own timeout). Then Asterisk
    /// is told FAILURE for `reason`; if it never answers, after
    /// [`ABANDONED_PAYLOAD_WAIT`] anyway.
    pub(super) fn give_up_payload(&mut self, reason: Reason) {
        self.turn.abandon_payload();
        self.pending_failure.get_or_insert(reason);
        self.held = Vec::new();
        self.deadline = Some(Instant::now() + ABANDONED_PAYLOAD_WAIT);
    }

    pub(super) fn ingest_backend(&mut self, mut data: &[u8]) {
        if self.pending_failure.is_some() || self.protocol_error {
            return;
        }
        if !self.held.is_empty() {
            if !self.turn.takes_backend_lines() {
                // Waiting for Asterisk's reply; `want_read_b` bounds this.
                self.held.extend_from_slice(data);
                return;
            }
            // Everything whole was released before: `held` is the start of
            // one line, and only the new bytes can end it (no rescan).
            let Some(nl) = memchr::memchr(b'\n', data) else {
                self.held.extend_from_slice(data);
                self.check_backend_line();
                return;
            };
            if self.turn.in_payload() {
                // The line's start and the whole lines behind it go out in
                // one write.
                let head = std::mem::take(&mut self.held);
                let used = self.release_payload(&head, data);
                self.held = recycle(head);
                data = &data[used..];
            } else {
                // Measured whole before it is copied; then passed without
                // a rescan of its start.
                if self.held.len() + nl > MAX_COMMAND_LINE {
                    return self.refuse_command(self.held.len() + nl);
                }
                let mut line = std::mem::take(&mut self.held);
                line.extend_from_slice(&data[..=nl]);
                self.release_command(&line);
                self.held = recycle(line);
                data = &data[nl + 1..];
            }
        }
        let used = self.release(data);
        if used < data.len() {
            self.held.extend_from_slice(&data[used..]);
            self.check_backend_line();
        }
    }

    /// Bounds the line being buffered while it is taken as a command or as
    /// payload (held commands behind a pending reply are bounded by
    /// `want_read_b`).
    pub(super) fn check_backend_line(&mut self) {
        if self.turn.backend_owes_command() && self.held.len() > MAX_COMMAND_LINE {
            self.refuse_command(self.held.len());
        } else if self.turn.in_payload() && self.held.len() > MAX_PAYLOAD_LINE {
            self.warn_protocol("PUT SOUNDFILE payload", self.held.len(), MAX_PAYLOAD_LINE);
            self.give_up_payload(Reason::BackendProtocol);
        }
    }

    pub(super) fn release_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        let used = self.release(&held);
        self.held = held;
        self.held.drain(..used);
        if self.held.is_empty() && self.held.capacity() > KEEP_CAPACITY {
            self.held = Vec::new();
        }
        if self.turn.takes_backend_lines() {
            self.check_backend_line();
        }
    }

    /// Releases to Asterisk what the turn allows; returns the bytes used.
    pub(super) fn release(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        while pos < data.len() {
            if self.turn.in_payload() {
                let used = self.release_payload(&[], &data[pos..]);
                if used == 0 {
                    break;
                }
                pos += used;
                continue;
            }
            if !self.turn.backend_owes_command() || self.protocol_error {
                break;
            }
            let Some(nl) = memchr::memchr(b'\n', &data[pos..]) else {
                break;
            };
            let line = &data[pos..pos + nl + 1];
            pos += nl + 1;
            if !self.release_command(line) {
                // The rest goes with the session.
                return data.len();
            }
        }
        pos
    }

    /// Passes one whole command line (`\n` included) to Asterisk, unless it
    /// is over [`MAX_COMMAND_LINE`] (returns `false`): Asterisk would cut it
    /// at 8191 bytes and run the rest as a second command, so none of it is
    /// sent and the session ends in FAILURE.
    fn release_command(&mut self, line: &[u8]) -> bool {
        if line.len() - 1 > MAX_COMMAND_LINE {
            self.refuse_command(line.len() - 1);
            return false;
        }
        let kind = self.turn.on_backend_line(line);
        // Before any of it is written: Asterisk may read it from now on.
        self.mark();
        match kind {
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
        if !self.a_out.is_empty() {
            // Part of it waits for Asterisk's socket.
            self.mark();
        }
        #[cfg(test)]
        if self.opts.panic_at == Some("command-sent") {
            panic!("deliberately, for the test, just after a command went to Asterisk");
        }
        true
    }

    /// The backend broke the line bound where a command is due: what it
    /// sent is dropped and Asterisk, still owed a command, is told FAILURE.
    /// `got`: the line's bytes so far.
    fn refuse_command(&mut self, got: usize) {
        self.warn_protocol("command", got, MAX_COMMAND_LINE);
        self.protocol_error = true;
        self.held = Vec::new();
    }

    /// Says where `backend_protocol` is decided which backend broke which
    /// bound: the FAILURE told later names neither (audit). Once per
    /// session (what follows is dropped), so the `getpeername` is no cost.
    fn warn_protocol(&self, line: &'static str, got: usize, limit: usize) {
        let kind = if line == "command" {
            "command"
        } else {
            "payload"
        };
        if !throttled::BACKEND_LINE.admit(kind) {
            return;
        }
        tracing::warn!(
            backend = %peer_of(self.b),
            peer = %peer_of(self.a),
            reason = Reason::BackendProtocol.as_str(),
            line,
            bytes = got,
            limit,
            "backend sent a {line} line over the limit ({got} > {limit} bytes): \
             telling Asterisk FAILURE backend_protocol"
        );
    }

    /// Passes the whole payload lines at the start of `head` + `data`
    /// (`head`, when not empty, is the start of the first line and `data`
    /// holds its end) in one write, unpaced, up to the end of the payload;
    /// returns the bytes of `data` used. Each line costs a `memchr` and a
    /// look at its last bytes: no copy, no allocation, no system call of
    /// its own. A flowing payload pushes the deadline on (until Asterisk
    /// closes).
    pub(super) fn release_payload(&mut self, head: &[u8], data: &[u8]) -> usize {
        let dropping = self.turn.dropping_payload();
        let mut first = head;
        let mut pos = 0;
        // The length of a line over the bound.
        let mut over = None;
        while let Some(nl) = memchr::memchr(b'\n', &data[pos..]) {
            // Every whole line is measured, also one finished by this read
            // or held behind the module's "ready": the check of a partial
            // line alone let longer ones through.
            if first.len() + nl > MAX_PAYLOAD_LINE {
                over = Some(first.len() + nl);
                break;
            }
            let end = pos + nl + 1;
            let done = self.turn.on_payload_line(first, &data[pos..end]);
            first = &[];
            pos = end;
            if done == PayloadLine::Done {
                break;
            }
        }
        if pos > 0 {
            if !dropping {
                self.send_a_parts(head, &data[..pos]);
            }
            // Not once Asterisk has closed: then the backend has
            // `next_command` to close, and a trickle must not push it on.
            if !self.a_eof {
                self.deadline = Some(Instant::now() + self.opts.next_command);
            }
        }
        if let Some(got) = over {
            // None of the long line is sent; the rest goes with the payload.
            self.warn_protocol("PUT SOUNDFILE payload", got, MAX_PAYLOAD_LINE);
            self.give_up_payload(Reason::BackendProtocol);
            return data.len();
        }
        pos
    }

    /// Relays `bytes` to Asterisk: counted here, as sent, not as read (a
    /// refused line or a CR taken out never reaches Asterisk: audit).
    pub(super) fn send_a(&mut self, bytes: &[u8]) {
        if self.a_dead {
            return;
        }
        self.stats.bytes_to_asterisk += bytes.len() as u64;
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

    /// Two pieces with one system call (`writev`), nothing copied unless
    /// the socket is full.
    pub(super) fn send_a_parts(&mut self, head: &[u8], tail: &[u8]) {
        if head.is_empty() {
            return self.send_a(tail);
        }
        if self.a_dead {
            return;
        }
        self.stats.bytes_to_asterisk += (head.len() + tail.len()) as u64;
        if self.a_out.is_empty() {
            let parts = [IoSlice::new(head), IoSlice::new(tail)];
            match self.a.try_write_vectored(&parts) {
                Ok(n) => keep_unwritten(&mut self.a_out, head, tail, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    keep_unwritten(&mut self.a_out, head, tail, 0)
                }
                Err(_) => self.a_dead = true,
            }
        } else {
            keep_unwritten(&mut self.a_out, head, tail, 0);
        }
    }

    pub(super) fn flush_a(&mut self) {
        match self.a.try_write(&self.a_out) {
            Ok(n) => {
                self.a_out.drain(..n);
                if self.a_out.is_empty() {
                    // The rest of a command line is out, if one waited.
                    self.mark();
                }
                if n > 0
                    && self.turn.in_payload()
                    && !self.turn.dropping_payload()
                    && !self.a_eof
                    && self.pending_failure.is_none()
                {
                    // A `PUT SOUNDFILE` payload still flows while Asterisk
                    // takes it: the backend is not read meanwhile (its lines
                    // wait behind these), and its deadline must not run out
                    // for a slow Asterisk (audit: a backend that had sent
                    // everything got HANGUP).
                    self.deadline = Some(Instant::now() + self.opts.next_command);
                }
                if self.a_out.is_empty() && self.a_out.capacity() > KEEP_CAPACITY {
                    self.a_out = Vec::new();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.a_dead = true,
        }
    }
}
