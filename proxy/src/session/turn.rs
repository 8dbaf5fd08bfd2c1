//! The turn observer: whose turn it is in a FastAGI conversation, read from
//! the bytes the relay passes. The backend owes a command; then Asterisk owes
//! the reply (while it executes, which may take hours); `HANGUP` lines from
//! Asterisk are not replies. Pure state, no I/O, so it is tested alone.
//!
//! The sound-file transfer of `asterisk-agi-audiotx` (see
//! `shared/fastagi-protocol.md`, "Sound-file transfer") is the one place
//! where lines are not commands and replies: `PUT SOUNDFILE <file> <size>`
//! is answered `200 result=0` (ready), then the backend sends the file as
//! base64 lines, no reply per line, until `<size>` decoded bytes, then
//! Asterisk answers once more; `GET SOUNDFILE <file>` is answered
//! `200 result=0 size=<n>` and then base64 lines from Asterisk, with no
//! final line. Payload lines are counted by the bytes they decode to.
//! These commands are recognised by their words as Asterisk splits and
//! matches them (any run of spaces and tabs, any case), since that is what
//! decides whether the module runs.

/// Sound-file sizes larger than this are not believed: the command is
/// relayed as an ordinary one (its first reply then ends it).
const MAX_PAYLOAD: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    BackendOwesCommand,
    AsteriskOwesReply,
    /// `PUT SOUNDFILE` was answered ready: the backend's lines are payload,
    /// this many decoded bytes still due; then Asterisk owes the final reply.
    CommandPayload(u64),
    /// Asterisk answered a `PUT SOUNDFILE` before its payload was complete
    /// (the module gave up): the rest of the payload, this many decoded
    /// bytes, is dropped instead of reaching Asterisk as commands.
    DropPayload(u64),
    /// `GET SOUNDFILE` was answered with a size: Asterisk's lines are
    /// payload, this many decoded bytes still due. No final reply follows.
    ReplyPayload(u64),
    /// The backend sent a `failure` line: Asterisk answers with HANGUP and a close.
    Ended,
}

/// What the pending command's first reply means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Pending {
    #[default]
    Plain,
    /// `PUT SOUNDFILE` of this many bytes: `200 result=0` starts the payload.
    Put(u64),
    /// `GET SOUNDFILE`: `200 result=0 size=N` starts Asterisk's payload.
    Get,
    /// A `PUT SOUNDFILE` payload given up: the module still owes its final
    /// answer, and may take lines as payload until it gives up itself (no
    /// ordinary command runs: a `failure` line would be read as payload).
    Abandoned,
}

#[derive(Debug, Default)]
pub struct Turn {
    state: State,
    /// Inside a `520-` multi-line usage reply.
    in_520: bool,
    pending: Pending,
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
    /// The reply to the pending command is complete (or, for a sound-file
    /// transfer, the part of it that lets the backend go on).
    ReplyDone,
    Other,
}

/// What one payload line did to the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadLine {
    /// More payload is due.
    More,
    /// That was the last payload line.
    Done,
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// One word of a command line, unescaped. Only short words are looked at
/// (command names, a size), so a longer one is kept cut and matches nothing.
/// Leading zeros are counted, not kept: a size written `000…0152` is 152
/// however many zeros it has (cut, it was read as a plain command, and its
/// payload lines as commands waiting for replies that never come).
#[derive(Default)]
struct Word {
    buf: [u8; 24],
    len: usize,
    cut: bool,
    zeros: bool,
}

impl Word {
    fn push(&mut self, c: u8) {
        if c == b'0' && self.len == 0 {
            self.zeros = true;
            return;
        }
        match self.buf.get_mut(self.len) {
            Some(b) => {
                *b = c;
                self.len += 1;
            }
            None => self.cut = true,
        }
    }

    fn is(&self, name: &[u8]) -> bool {
        !self.cut && !self.zeros && self.buf[..self.len].eq_ignore_ascii_case(name)
    }

    fn number(&self) -> Option<u64> {
        if self.cut {
            return None;
        }
        if self.len == 0 {
            return self.zeros.then_some(0);
        }
        // Digits only, as the size Asterisk's module reads (`+152` and
        // `0+152` are no size here, where `parse` would take them).
        if !self.buf[..self.len].iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(&self.buf[..self.len])
            .ok()?
            .parse()
            .ok()
    }
}

/// The words of a command line as Asterisk's `parse_args()` (res_agi.c)
/// splits them, which is what decides the command Asterisk runs: spaces
/// and tabs (any number, also leading) separate words outside double
/// quotes, quotes group and are removed, a backslash makes the next byte
/// literal; a quote after whitespace starts a word even if it stays empty.
/// Lazy, so a command is only scanned as far as it is looked at.
struct Words<'a> {
    line: &'a [u8],
    pos: usize,
}

impl Iterator for Words<'_> {
    type Item = Word;

    fn next(&mut self) -> Option<Word> {
        let mut word = Word::default();
        let (mut started, mut quoted, mut escaped) = (false, false, false);
        while let Some(&c) = self.line.get(self.pos) {
            self.pos += 1;
            match c {
                b'"' if !escaped => {
                    quoted = !quoted;
                    started |= quoted;
                }
                b' ' | b'\t' if !quoted && !escaped => {
                    if started {
                        return Some(word);
                    }
                }
                b'\\' if !escaped => escaped = true,
                _ => {
                    started = true;
                    escaped = false;
                    word.push(c);
                }
            }
        }
        started.then_some(word)
    }
}

/// What a command line asks of the sound-file module, its words matched as
/// Asterisk's `find_command()` does (case-insensitively): a backend may
/// write `put  soundfile\tx.gsm 152`, which the module runs all the same.
fn soundfile_command(cmd: &[u8]) -> Pending {
    let mut words = Words { line: cmd, pos: 0 };
    let put = match words.next() {
        Some(w) if w.is(b"PUT") => true,
        Some(w) if w.is(b"GET") => false,
        _ => return Pending::Plain,
    };
    if !words.next().is_some_and(|w| w.is(b"SOUNDFILE")) {
        return Pending::Plain;
    }
    // A file name must follow, as the old `PUT SOUNDFILE ` prefix needed
    // more after it; for PUT, the last word is the size.
    let Some(file) = words.next() else {
        return Pending::Plain;
    };
    if !put {
        return Pending::Get;
    }
    match words.last().unwrap_or(file).number() {
        Some(n @ 0..=MAX_PAYLOAD) => Pending::Put(n),
        _ => Pending::Plain,
    }
}

/// `N` of a `size=N` word in a reply line.
fn size_field(line: &[u8]) -> Option<u64> {
    let tok = line
        .split(|c| *c == b' ')
        .find_map(|t| t.strip_prefix(b"size="))?;
    std::str::from_utf8(tok).ok()?.parse().ok()
}

/// The bytes one base64 line decodes to, the line given in two pieces
/// (`head` then `tail`, `tail` ending in `\n`) so that a line split across
/// reads needs no copy. Line breaks (`\n`, `\r\n`) and `=` padding do not
/// count; an unpadded last group of 2 or 3 characters gives 1 or 2 bytes,
/// as a lenient decoder (the known client's) reads it. Looks at the last
/// few bytes only: constant time per line.
pub fn decoded_len(head: &[u8], tail: &[u8]) -> u64 {
    let mut len = head.len() + tail.len();
    let mut rev = tail.iter().rev().chain(head.iter().rev()).peekable();
    if rev.peek() == Some(&&b'\n') {
        rev.next();
        len -= 1;
    }
    if rev.peek() == Some(&&b'\r') {
        rev.next();
        len -= 1;
    }
    for _ in 0..2 {
        if rev.next() != Some(&b'=') {
            break;
        }
        len -= 1;
    }
    let len = len as u64;
    len / 4 * 3 + [0, 0, 1, 2][(len % 4) as usize]
}

impl Turn {
    pub fn backend_owes_command(&self) -> bool {
        self.state == State::BackendOwesCommand
    }

    /// Asterisk owes a reply (or a `GET SOUNDFILE` payload): it runs a
    /// command, or takes or sends a sound file.
    pub fn asterisk_owes_reply(&self) -> bool {
        matches!(
            self.state,
            State::AsteriskOwesReply | State::CommandPayload(_) | State::ReplyPayload(_)
        )
    }

    /// Asterisk runs an ordinary command (not a sound-file transfer) and
    /// reads its socket again only when the command returns.
    pub fn asterisk_runs_command(&self) -> bool {
        self.state == State::AsteriskOwesReply && self.pending == Pending::Plain
    }

    /// `PUT SOUNDFILE` was sent and its ready answer is not in yet: after
    /// it, the module takes lines as payload.
    pub fn awaits_put_ready(&self) -> bool {
        self.state == State::AsteriskOwesReply && matches!(self.pending, Pending::Put(_))
    }

    /// Asterisk's sound-file module takes lines as payload (or may still,
    /// after a payload was given up) until it answers: no line written to
    /// it is read as a command before that answer.
    pub fn module_takes_payload(&self) -> bool {
        matches!(self.state, State::CommandPayload(_))
            || (self.state == State::AsteriskOwesReply && self.pending == Pending::Abandoned)
    }

    /// The backend's next lines are payload (passed or dropped), not commands.
    pub fn in_payload(&self) -> bool {
        matches!(self.state, State::CommandPayload(_) | State::DropPayload(_))
    }

    /// The rest of the backend's payload is dropped (Asterisk answered early).
    pub fn dropping_payload(&self) -> bool {
        matches!(self.state, State::DropPayload(_))
    }

    /// Asterisk's next lines are a `GET SOUNDFILE` payload.
    pub fn in_reply_payload(&self) -> bool {
        matches!(self.state, State::ReplyPayload(_))
    }

    /// The backend's whole lines are taken now (as a command or as payload):
    /// a buffered partial line can be completed by the next bytes.
    pub fn takes_backend_lines(&self) -> bool {
        self.backend_owes_command() || self.in_payload()
    }

    pub fn ended(&self) -> bool {
        self.state == State::Ended
    }

    /// The backend's payload is given up (it stopped, closed or broke):
    /// Asterisk still owes the `PUT SOUNDFILE` its final reply, which the
    /// module sends when it gives up waiting.
    pub fn abandon_payload(&mut self) {
        self.state = match self.state {
            State::CommandPayload(_) => {
                self.pending = Pending::Abandoned;
                State::AsteriskOwesReply
            }
            State::DropPayload(_) => State::BackendOwesCommand,
            s => s,
        };
    }

    /// One whole payload line from the backend (`head` then `tail`, see
    /// [`decoded_len`]), while [`in_payload`](Self::in_payload).
    pub fn on_payload_line(&mut self, head: &[u8], tail: &[u8]) -> PayloadLine {
        let n = decoded_len(head, tail);
        let (due, next) = match self.state {
            State::CommandPayload(due) => (due, State::AsteriskOwesReply),
            State::DropPayload(due) => (due, State::BackendOwesCommand),
            _ => return PayloadLine::Done,
        };
        if n >= due {
            self.state = next;
            PayloadLine::Done
        } else {
            self.state = match self.state {
                State::CommandPayload(_) => State::CommandPayload(due - n),
                _ => State::DropPayload(due - n),
            };
            PayloadLine::More
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
        self.pending = Pending::Plain;
        self.state = if starts_with_ci(cmd, b"failure") {
            State::Ended
        } else {
            self.pending = soundfile_command(cmd);
            State::AsteriskOwesReply
        };
        kind
    }

    /// A whole line from Asterisk.
    pub fn on_asterisk_line(&mut self, line: &[u8]) -> AsteriskLine {
        let line = trim_eol(line);
        if let State::ReplyPayload(due) = self.state {
            // Base64 never holds a space: a `200 ` line is the module's
            // error in place of the rest. Anything else is payload, also a
            // line that reads `HANGUP` (valid base64).
            if line.starts_with(b"200 ") {
                return self.reply_done();
            }
            let n = decoded_len(line, b"");
            if n >= due {
                return self.reply_done();
            }
            self.state = State::ReplyPayload(due - n);
            return AsteriskLine::Other;
        }
        if line == b"HANGUP" {
            return AsteriskLine::Hangup;
        }
        if let State::CommandPayload(due) = self.state {
            // An answer before the payload is complete: the module gave up
            // (it timed out or failed to write). The command is over; the
            // rest of the payload must not reach Asterisk as commands.
            self.state = State::DropPayload(due);
            return AsteriskLine::ReplyDone;
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
        if line.starts_with(b"100 ") {
            // An interim answer: `GOSUB` says `100 result=0 Trying...`, runs
            // the dialplan subroutine (a `Dial` may last hours, its socket
            // unread), then answers `200 result=0 Gosub complete`. The
            // command still runs: no deadline on the backend yet.
            return AsteriskLine::Other;
        }
        match std::mem::take(&mut self.pending) {
            Pending::Put(n) if line == b"200 result=0" || line.starts_with(b"200 result=0 ") => {
                // Ready: the payload, then the final reply.
                self.state = if n > 0 {
                    State::CommandPayload(n)
                } else {
                    State::AsteriskOwesReply
                };
                AsteriskLine::ReplyDone
            }
            Pending::Get if line.starts_with(b"200 result=0 ") => match size_field(line) {
                Some(n @ 1..) => {
                    self.state = State::ReplyPayload(n);
                    AsteriskLine::Other
                }
                _ => self.reply_done(),
            },
            _ => self.reply_done(),
        }
    }

    /// Whether `head`, the start of a line from Asterisk not ended yet, can
    /// only be the reply to an ordinary command (not `HANGUP`, not part of
    /// a `520-` block, not `GOSUB`'s interim answer, not a sound-file
    /// transfer's): then its bytes may pass on before its end, which
    /// [`long_reply_done`](Self::long_reply_done) marks.
    pub fn streams_reply(&self, head: &[u8]) -> bool {
        self.state == State::AsteriskOwesReply
            && self.pending == Pending::Plain
            && !self.in_520
            && head.len() > b"HANGUP\r".len()
            && !head.starts_with(b"520")
            && !head.starts_with(b"100 ")
    }

    /// The end of a line [`streams_reply`](Self::streams_reply) allowed.
    pub fn long_reply_done(&mut self) {
        self.reply_done();
    }

    fn reply_done(&mut self) -> AsteriskLine {
        self.state = State::BackendOwesCommand;
        self.pending = Pending::Plain;
        AsteriskLine::ReplyDone
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

    /// Only an ordinary command may be followed by a `failure` line while
    /// it runs: in a sound-file transfer that line would be payload.
    #[test]
    fn asterisk_runs_only_ordinary_commands() {
        let mut t = Turn::default();
        assert!(!t.asterisk_runs_command());
        t.on_backend_line(b"EXEC Dial PJSIP/100\n");
        assert!(t.asterisk_runs_command());
        t.on_asterisk_line(b"200 result=0\n");
        assert!(!t.asterisk_runs_command());
        for cmd in [&b"PUT SOUNDFILE x.gsm 100\n"[..], b"GET SOUNDFILE x.gsm\n"] {
            let mut t = Turn::default();
            t.on_backend_line(cmd);
            assert!(!t.asterisk_runs_command(), "{cmd:?}");
        }
        t.on_backend_line(b"failure\n");
        assert!(!t.asterisk_runs_command());
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

    /// `GOSUB` (app_stack.c) answers twice: `100 result=0 Trying...` when
    /// the subroutine starts, `200 result=0 Gosub complete` when it returns.
    /// Taken as the reply, the first put the backend on the clock for its
    /// next command while the subroutine ran (audit: a subroutine past
    /// `next_command` got the call failed and the backend hung up).
    #[test]
    fn an_interim_answer_is_not_the_reply() {
        let mut t = Turn::default();
        t.on_backend_line(b"GOSUB sub s 1\n");
        assert_eq!(
            t.on_asterisk_line(b"100 result=0 Trying...\n"),
            AsteriskLine::Other
        );
        assert!(t.asterisk_runs_command(), "the subroutine runs");
        assert!(!t.backend_owes_command());
        assert_eq!(t.on_asterisk_line(b"HANGUP\n"), AsteriskLine::Hangup);
        assert_eq!(
            t.on_asterisk_line(b"200 result=0 Gosub complete\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.backend_owes_command());
        // A failed GOSUB answers once.
        t.on_backend_line(b"GOSUB nowhere s 1\n");
        assert_eq!(
            t.on_asterisk_line(b"200 result=-1 Gosub label not found\n"),
            AsteriskLine::ReplyDone
        );
    }

    /// Only a reply to an ordinary command may pass on before its end.
    #[test]
    fn only_an_ordinary_reply_streams() {
        let long = |p: &[u8]| [p, &[b'x'; 64][..]].concat();
        let mut t = Turn::default();
        assert!(!t.streams_reply(&long(b"200 result=1 (")), "no command yet");
        t.on_backend_line(b"GET FULL VARIABLE ${X}\n");
        assert!(t.streams_reply(&long(b"200 result=1 (")));
        assert!(!t.streams_reply(b"HANGUP\r"));
        assert!(!t.streams_reply(&long(b"520-Invalid")));
        assert!(!t.streams_reply(&long(b"100 result=0 Trying")));
        t.long_reply_done();
        assert!(t.backend_owes_command());
        for cmd in [&b"PUT SOUNDFILE x.gsm 100\n"[..], b"GET SOUNDFILE x.gsm\n"] {
            let mut t = Turn::default();
            t.on_backend_line(cmd);
            assert!(!t.streams_reply(&long(b"200 result=0 ")), "{cmd:?}");
        }
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
    fn decoded_sizes_of_base64_lines() {
        assert_eq!(decoded_len(b"QUJD\n", b""), 3);
        assert_eq!(decoded_len(b"QUI=\n", b""), 2);
        assert_eq!(decoded_len(b"QQ==\n", b""), 1);
        assert_eq!(decoded_len(b"QQ==\r\n", b""), 1);
        assert_eq!(decoded_len(b"QUI\n", b""), 2, "unpadded");
        assert_eq!(decoded_len(b"QQ", b""), 1, "no newline");
        assert_eq!(decoded_len(b"\n", b""), 0);
        let line = [b'A'; 76];
        assert_eq!(decoded_len(&line, b"\n"), 57);
        // Split anywhere, even inside the padding or the line break.
        assert_eq!(decoded_len(b"QQ=", b"=\n"), 1);
        assert_eq!(decoded_len(b"QUJD\r", b"\n"), 3);
        assert_eq!(decoded_len(b"QU", b"I=\n"), 2);
    }

    #[test]
    fn put_soundfile_ready_payload_final_reply() {
        let mut t = Turn::default();
        t.on_backend_line(b"PUT SOUNDFILE greeting.gsm 100\n");
        assert!(!t.backend_owes_command() && !t.in_payload());
        assert_eq!(
            t.on_asterisk_line(b"200 result=0\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.in_payload() && t.takes_backend_lines());
        let line = [b'A'; 76];
        assert_eq!(t.on_payload_line(&line, b"\n"), PayloadLine::More); // 57
        assert_eq!(t.on_asterisk_line(b"HANGUP\n"), AsteriskLine::Hangup);
        assert!(t.in_payload(), "HANGUP does not end the payload");
        assert_eq!(
            t.on_payload_line(
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                b"A==\n"
            ),
            PayloadLine::Done
        );
        assert!(!t.in_payload() && !t.backend_owes_command());
        assert_eq!(
            t.on_asterisk_line(b"200 result=0\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.backend_owes_command());
    }

    #[test]
    fn put_soundfile_refused_has_no_payload() {
        for reply in [
            &b"200 result=-10\n"[..],
            b"200 result=-11\n",
            b"200 result=01\n",
            b"510 Invalid or unknown command\n",
        ] {
            let mut t = Turn::default();
            t.on_backend_line(b"PUT SOUNDFILE x.gsm 100\n");
            assert_eq!(t.on_asterisk_line(reply), AsteriskLine::ReplyDone);
            assert!(t.backend_owes_command(), "{reply:?}");
        }
        let mut t = Turn::default();
        t.on_backend_line(b"PUT SOUNDFILE\n");
        t.on_asterisk_line(b"520-Invalid command syntax.  Proper usage follows:\n");
        t.on_asterisk_line(b"Usage: PUT SOUNDFILE <file> <size>\n");
        assert_eq!(
            t.on_asterisk_line(b"520 End of proper usage.\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.backend_owes_command());
        // Without a believable size, `200 result=0` is an ordinary reply.
        t.on_backend_line(b"PUT SOUNDFILE x lots\n");
        t.on_asterisk_line(b"200 result=0\n");
        assert!(t.backend_owes_command());
    }

    #[test]
    fn a_ready_answer_may_carry_text() {
        let mut t = Turn::default();
        t.on_backend_line(b"PUT SOUNDFILE x.gsm 3\n");
        t.on_asterisk_line(b"200 result=0 (ready)\n");
        assert!(t.in_payload());
        assert_eq!(t.on_payload_line(b"QUJD\n", b""), PayloadLine::Done);
    }

    #[test]
    fn an_early_answer_drops_the_rest_of_a_put_payload() {
        let mut t = Turn::default();
        t.on_backend_line(b"PUT SOUNDFILE x.gsm 10\n");
        t.on_asterisk_line(b"200 result=0\n");
        assert_eq!(
            t.on_asterisk_line(b"200 result=-1\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.dropping_payload() && !t.backend_owes_command());
        assert_eq!(
            t.on_payload_line(b"QUJDREVGR0hJSg==\n", b""),
            PayloadLine::Done
        );
        assert!(t.backend_owes_command());
    }

    #[test]
    fn get_soundfile_payload_is_not_read_as_replies() {
        let mut t = Turn::default();
        t.on_backend_line(b"GET SOUNDFILE rec.gsm\n");
        assert_eq!(
            t.on_asterisk_line(b"200 result=0 size=10\n"),
            AsteriskLine::Other
        );
        assert!(t.in_reply_payload());
        // `HANGUP` is valid base64 (4 bytes) inside a payload.
        assert_eq!(t.on_asterisk_line(b"HANGUP\n"), AsteriskLine::Other);
        assert_eq!(t.on_asterisk_line(b"QUJD\n"), AsteriskLine::Other);
        assert_eq!(t.on_asterisk_line(b"QUI=\n"), AsteriskLine::Other);
        assert!(!t.backend_owes_command());
        assert_eq!(t.on_asterisk_line(b"QQ==\n"), AsteriskLine::ReplyDone);
        assert!(t.backend_owes_command());

        // A missing file carries no payload; nor does size=0.
        t.on_backend_line(b"GET SOUNDFILE missing.gsm\n");
        assert_eq!(
            t.on_asterisk_line(b"200 result=-1\n"),
            AsteriskLine::ReplyDone
        );
        t.on_backend_line(b"GET SOUNDFILE empty.gsm\n");
        assert_eq!(
            t.on_asterisk_line(b"200 result=0 size=0\n"),
            AsteriskLine::ReplyDone
        );
        // A `200 ` line inside the payload is the module's error.
        t.on_backend_line(b"get soundfile rec.gsm\n");
        t.on_asterisk_line(b"200 result=0 size=1000\n");
        assert_eq!(
            t.on_asterisk_line(b"200 result=-1\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.backend_owes_command());
    }

    /// Words as Asterisk's `parse_args()` splits them: any run of spaces
    /// and tabs, quotes and backslashes removed; case does not matter.
    #[test]
    fn soundfile_commands_are_matched_word_by_word() {
        for (cmd, want) in [
            (&b"PUT  SOUNDFILE x.gsm 152"[..], Pending::Put(152)),
            (b"PUT\tSOUNDFILE\tx.gsm\t152\t", Pending::Put(152)),
            (b" \tput soundfile x.gsm  152 ", Pending::Put(152)),
            (
                b"\"PUT\" S\\OUND\"FILE\" \"a b.gsm\" \"152\"",
                Pending::Put(152),
            ),
            (b"PUT SOUNDFILE x.gsm 152 \\", Pending::Put(152)),
            (b"GET \t SOUNDFILE x.gsm", Pending::Get),
            (b"get  soundfile \"\"", Pending::Get),
            (b"PUT SOUNDFILE", Pending::Plain),
            (b"GET SOUNDFILE  ", Pending::Plain),
            (b"PUT SOUNDFILES x.gsm 152", Pending::Plain),
            (b"PUT\\ SOUNDFILE x.gsm 152", Pending::Plain),
            (b"\"PUT SOUNDFILE\" x.gsm 152", Pending::Plain),
            (
                b"PUT SOUNDFILE x.gsm 99999999999999999999999999",
                Pending::Plain,
            ),
            // Leading zeros, past the 24 bytes a word keeps.
            (
                b"PUT SOUNDFILE x.gsm 0000000000000000000000000000000152",
                Pending::Put(152),
            ),
            (b"PUT SOUNDFILE x.gsm 000", Pending::Put(0)),
            (b"PUT SOUNDFILE x.gsm 0", Pending::Put(0)),
            (b"PUT SOUNDFILE x.gsm 0x10", Pending::Plain),
            (b"PUT SOUNDFILE x.gsm 0+152", Pending::Plain),
            (b"PUT SOUNDFILE x.gsm +152", Pending::Plain),
            (b"PUT SOUNDFILE x.gsm \"\"", Pending::Plain),
            (b"0PUT SOUNDFILE x.gsm 152", Pending::Plain),
            (b"PUT 0SOUNDFILE x.gsm 152", Pending::Plain),
            (b"GET VARIABLE x", Pending::Plain),
        ] {
            assert_eq!(
                soundfile_command(cmd),
                want,
                "{:?}",
                String::from_utf8_lossy(cmd)
            );
        }
        let mut t = Turn::default();
        t.on_backend_line(b"PUT  SOUNDFILE x.gsm 3\n");
        t.on_asterisk_line(b"200 result=0\n");
        assert!(t.in_payload());
    }

    /// The module of an abandoned payload is no ordinary command: a
    /// `failure` line left for it would be read as payload (review).
    #[test]
    fn an_abandoned_payload_is_no_running_command() {
        let mut t = Turn::default();
        t.on_backend_line(b"PUT SOUNDFILE x.gsm 100\n");
        t.on_asterisk_line(b"200 result=0\n");
        assert!(t.in_payload());
        t.abandon_payload();
        assert!(t.asterisk_owes_reply());
        assert!(!t.asterisk_runs_command());
        assert!(!t.streams_reply(&[b'2'; 64]));
        assert_eq!(
            t.on_asterisk_line(b"200 result=-1\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.backend_owes_command());
    }

    #[test]
    fn an_abandoned_payload_leaves_asterisk_owing_its_answer() {
        let mut t = Turn::default();
        t.on_backend_line(b"PUT SOUNDFILE x.gsm 1000\n");
        t.on_asterisk_line(b"200 result=0\n");
        t.abandon_payload();
        assert!(!t.in_payload() && !t.backend_owes_command());
        assert_eq!(
            t.on_asterisk_line(b"200 result=-1\n"),
            AsteriskLine::ReplyDone
        );
        assert!(t.backend_owes_command());
    }
}
