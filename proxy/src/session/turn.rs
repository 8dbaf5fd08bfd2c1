//! The turn observer: whose turn it is in a FastAGI conversation, read from
//! the bytes the relay passes. The backend owes a command; then Asterisk owes
//! the reply (while it executes, which may take hours); `HANGUP` lines from
//! Asterisk are not replies. Pure state, no I/O, so it is tested alone.

/// Sound-file payloads larger than this are not believed (and the line is
/// relayed as an ordinary command).
const MAX_PAYLOAD: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    BackendOwesCommand,
    /// A `PUT SOUNDFILE` command's payload is still passing to Asterisk.
    CommandPayload(u64),
    AsteriskOwesReply,
    /// The backend sent a `failure` line: Asterisk answers with HANGUP and a close.
    Ended,
}

#[derive(Debug, Default)]
pub struct Turn {
    state: State,
    /// Inside a `520-` multi-line usage reply.
    in_520: bool,
    /// The pending command is `GET SOUNDFILE`: its reply carries a payload.
    get_file: bool,
    reply_payload: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendLine {
    Command,
    /// A command ending in CRLF: Asterisk would answer 510, so it is sent with LF.
    Crlf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsteriskLine {
    Hangup,
    /// The reply to the pending command is complete.
    ReplyDone,
    Other,
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn last_number(line: &[u8]) -> Option<u64> {
    let tok = line.rsplit(|c| *c == b' ').find(|t| !t.is_empty())?;
    std::str::from_utf8(tok).ok()?.parse().ok()
}

impl Turn {
    pub fn backend_owes_command(&self) -> bool {
        self.state == State::BackendOwesCommand
    }

    pub fn in_payload(&self) -> bool {
        matches!(self.state, State::CommandPayload(_))
    }

    pub fn ended(&self) -> bool {
        self.state == State::Ended
    }

    pub fn payload_remaining(&self) -> Option<u64> {
        match self.state {
            State::CommandPayload(n) => Some(n),
            _ => None,
        }
    }

    pub fn payload_sent(&mut self, k: u64) {
        if let State::CommandPayload(n) = self.state {
            self.state = if n <= k {
                State::AsteriskOwesReply
            } else {
                State::CommandPayload(n - k)
            };
        }
    }

    /// A whole line from the backend while it owes a command.
    pub fn on_backend_line(&mut self, line: &[u8]) -> BackendLine {
        let kind = if line.ends_with(b"\r\n") {
            BackendLine::Crlf
        } else {
            BackendLine::Command
        };
        let cmd = trim_eol(line);
        self.get_file = false;
        self.state = if starts_with_ci(cmd, b"failure") {
            State::Ended
        } else if starts_with_ci(cmd, b"PUT SOUNDFILE ") {
            match last_number(cmd) {
                Some(n) if n > 0 && n <= MAX_PAYLOAD => State::CommandPayload(n),
                _ => State::AsteriskOwesReply,
            }
        } else {
            self.get_file = starts_with_ci(cmd, b"GET SOUNDFILE ");
            State::AsteriskOwesReply
        };
        kind
    }

    /// A whole line from Asterisk.
    pub fn on_asterisk_line(&mut self, line: &[u8]) -> AsteriskLine {
        let line = trim_eol(line);
        if line == b"HANGUP" {
            return AsteriskLine::Hangup;
        }
        if self.state != State::AsteriskOwesReply {
            return AsteriskLine::Other;
        }
        if self.in_520 {
            if line.starts_with(b"520 ") {
                self.in_520 = false;
                return self.reply_done();
            }
            return AsteriskLine::Other;
        }
        if line.starts_with(b"520-") {
            self.in_520 = true;
            return AsteriskLine::Other;
        }
        if self.get_file && line.starts_with(b"200 result=") {
            let n = std::str::from_utf8(&line[11..])
                .ok()
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(n @ 1..=MAX_PAYLOAD) = n {
                self.reply_payload = Some(n);
                return AsteriskLine::Other;
            }
        }
        self.reply_done()
    }

    fn reply_done(&mut self) -> AsteriskLine {
        self.state = State::BackendOwesCommand;
        self.get_file = false;
        AsteriskLine::ReplyDone
    }

    pub fn reply_payload_remaining(&self) -> Option<u64> {
        self.reply_payload
    }

    /// Payload bytes of a `GET SOUNDFILE` reply passed; true when complete.
    pub fn reply_payload_read(&mut self, k: u64) -> bool {
        match self.reply_payload {
            Some(n) if n > k => {
                self.reply_payload = Some(n - k);
                false
            }
            Some(_) => {
                self.reply_payload = None;
                self.reply_done();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_then_reply() {
        let mut t = Turn::default();
        assert!(t.backend_owes_command());
        assert_eq!(
            t.on_backend_line(b"VERBOSE \"hi\" 1\n"),
            BackendLine::Command
        );
        assert!(!t.backend_owes_command());
        assert_eq!(t.on_asterisk_line(b"HANGUP\n"), AsteriskLine::Hangup);
        assert!(!t.backend_owes_command(), "HANGUP is not a reply");
        assert_eq!(
            t.on_asterisk_line(b"200 result=1\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.backend_owes_command());
        assert_eq!(t.on_asterisk_line(b"HANGUP\n"), AsteriskLine::Hangup);
    }

    #[test]
    fn usage_block_is_one_reply() {
        let mut t = Turn::default();
        t.on_backend_line(b"STREAM FILE\n");
        assert_eq!(
            t.on_asterisk_line(b"520-Invalid command syntax.  Proper usage follows:\n"),
            AsteriskLine::Other
        );
        assert_eq!(
            t.on_asterisk_line(b"Usage: STREAM FILE <filename>\n"),
            AsteriskLine::Other
        );
        assert_eq!(
            t.on_asterisk_line(b"520 End of proper usage.\n"),
            AsteriskLine::ReplyDone
        );
    }

    #[test]
    fn crlf_and_failure_lines() {
        let mut t = Turn::default();
        assert_eq!(t.on_backend_line(b"NOOP\r\n"), BackendLine::Crlf);
        t.on_asterisk_line(b"200 result=0\n");
        t.on_backend_line(b"Failure: no route\n");
        assert!(t.ended());
        assert!(!t.backend_owes_command());
    }

    #[test]
    fn sound_file_payloads() {
        let mut t = Turn::default();
        t.on_backend_line(b"PUT SOUNDFILE greeting 10\n");
        assert_eq!(t.payload_remaining(), Some(10));
        t.payload_sent(4);
        assert_eq!(t.payload_remaining(), Some(6));
        t.payload_sent(6);
        assert!(!t.in_payload());
        assert_eq!(
            t.on_asterisk_line(b"200 result=0\n"),
            AsteriskLine::ReplyDone
        );

        t.on_backend_line(b"GET SOUNDFILE greeting\n");
        assert_eq!(t.on_asterisk_line(b"200 result=5\n"), AsteriskLine::Other);
        assert_eq!(t.reply_payload_remaining(), Some(5));
        assert!(!t.reply_payload_read(3));
        assert!(t.reply_payload_read(2));
        assert!(t.backend_owes_command());

        // A GET SOUNDFILE that fails carries no payload.
        t.on_backend_line(b"GET SOUNDFILE missing\n");
        assert_eq!(
            t.on_asterisk_line(b"200 result=-1\n"),
            AsteriskLine::ReplyDone
        );
        // PUT SOUNDFILE without a believable size is an ordinary command.
        t.on_backend_line(b"PUT SOUNDFILE x lots\n");
        assert!(!t.in_payload());
    }
}
