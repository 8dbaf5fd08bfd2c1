//! The FastAGI header codec: read the `agi_*: value` lines Asterisk sends up
//! to the blank line, within limits on bytes, lines and time; keep the raw
//! bytes for replay to a backend; look variables up without copying them.

use std::borrow::Cow;
use std::ops::Range;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Why a header was refused. Each maps to a `reason` label in metrics.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    #[error("header larger than {0} bytes")]
    TooLarge(usize),
    /// The flag says whether the blank line was already read.
    #[error("header has more than {0} lines")]
    TooManyLines(usize, bool),
    #[error("header not complete within {0:?} (slow or stalled client)")]
    Timeout(Duration),
    #[error("line {0} is not an `agi_name: value` line")]
    Malformed(usize),
    #[error("connection closed before sending anything")]
    Closed,
    #[error("connection closed before the blank line that ends the header")]
    Truncated,
    #[error("read error: {0:?}")]
    Io(std::io::ErrorKind),
}

impl HeaderError {
    /// A bounded label for metrics and the access log.
    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::TooLarge(_) => "too_large",
            HeaderError::TooManyLines(..) => "too_many_lines",
            HeaderError::Timeout(_) => "timeout",
            HeaderError::Malformed(_) => "malformed",
            HeaderError::Closed => "closed",
            HeaderError::Truncated => "truncated",
            HeaderError::Io(_) => "io",
        }
    }

    /// True when the peer is plausibly a real Asterisk whose dialplan is
    /// waiting: it then deserves a FAILURE rather than a silent close
    /// (which Asterisk reports as SUCCESS).
    pub fn answer_with_failure(&self) -> bool {
        matches!(
            self,
            HeaderError::TooLarge(_) | HeaderError::TooManyLines(..)
        )
    }

    /// The blank line ending the header was read already (nothing of the
    /// header is left in the socket).
    pub fn header_complete(&self) -> bool {
        matches!(self, HeaderError::TooManyLines(_, true))
    }
}

/// Limits on one header.
#[derive(Debug, Clone, Copy)]
pub struct HeaderLimits {
    pub max_bytes: usize,
    pub max_lines: usize,
    pub timeout: Duration,
}

/// A parsed header. Variables are spans into `raw`, so lookups allocate nothing.
#[derive(Debug, Clone)]
pub struct Header {
    raw: Vec<u8>,
    /// Length of the header proper in `raw`, blank line included.
    len: usize,
    vars: Vec<(Range<usize>, Range<usize>)>,
}

impl Header {
    /// Parses a complete header (`raw[..]` must end with the blank line;
    /// anything after it is kept as early bytes from Asterisk).
    pub fn parse(raw: Vec<u8>, max_lines: usize) -> Result<Header, HeaderError> {
        let end = find_end(&raw, 0).ok_or(HeaderError::Truncated)?;
        let mut vars = Vec::with_capacity(32);
        let mut start = 0;
        let mut line_no = 0;
        while start < end - 1 {
            line_no += 1;
            if line_no > max_lines {
                return Err(HeaderError::TooManyLines(max_lines, true));
            }
            let nl = start + memchr::memchr(b'\n', &raw[start..end]).expect("end is a newline");
            let (name, value) =
                split_line(&raw, start, nl).ok_or(HeaderError::Malformed(line_no))?;
            vars.push((name, value));
            start = nl + 1;
        }
        if vars.is_empty() {
            return Err(HeaderError::Malformed(1));
        }
        Ok(Header {
            raw,
            len: end,
            vars,
        })
    }

    /// The header bytes exactly as Asterisk sent them, blank line included.
    pub fn raw(&self) -> &[u8] {
        &self.raw[..self.len]
    }

    /// Bytes Asterisk sent after the blank line (normally none; an early
    /// `HANGUP` lands here). They are forwarded once a backend is attached.
    pub fn trailing(&self) -> &[u8] {
        &self.raw[self.len..]
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| &self.raw[n.clone()] == name.as_bytes())
            .map(|(_, v)| self.str_at(v.clone()))
    }

    /// Variables in the order Asterisk sent them.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars
            .iter()
            .map(|(n, v)| (self.str_at(n.clone()), self.str_at(v.clone())))
    }

    pub fn line_count(&self) -> usize {
        self.vars.len()
    }

    /// `agi_network_script` without its query string or leading slash.
    /// Real Asterisk sends `ivr/main?lang=de`; a hand-written client may add a `/`.
    pub fn script_path(&self) -> &str {
        agiproxy_config::script_path(self.get("agi_network_script").unwrap_or(""))
    }

    /// The raw query string of `agi_network_script` (after `?`), or "".
    pub fn script_query(&self) -> &str {
        self.get("agi_network_script")
            .and_then(|s| s.split_once('?'))
            .map_or("", |(_, q)| q)
    }

    /// The percent-decoded value of query parameter `key`. `+` is kept as is:
    /// in telephony it starts an E.164 number far more often than it means a space.
    pub fn query_param(&self, key: &str) -> Option<Cow<'_, str>> {
        self.script_query().split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k) == key).then(|| decode(v))
        })
    }

    /// A value as text. Asterisk passes bytes through as the channel has
    /// them (a Latin-1 caller name is not UTF-8): routing sees the valid
    /// UTF-8 prefix, while replay always sends the original bytes.
    fn str_at(&self, r: Range<usize>) -> &str {
        let bytes = &self.raw[r];
        match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// Variables as (name, raw value bytes), in the order Asterisk sent them.
    pub fn raw_vars(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.vars
            .iter()
            .map(|(n, v)| (self.str_at(n.clone()), &self.raw[v.clone()]))
    }
}

fn decode(s: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}

/// Finds the blank line ending the header, searching from `from` (a resume
/// point, so re-scans after each read cost nothing). Returns the index one
/// past it.
pub(crate) fn find_end(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.saturating_sub(1);
    if from == 0 && buf.first() == Some(&b'\n') {
        return Some(1);
    }
    memchr::memmem::find(&buf[from..], b"\n\n").map(|i| from + i + 2)
}

/// Splits `name: value` (Asterisk always writes `": "`, also for an empty value).
fn split_line(raw: &[u8], start: usize, nl: usize) -> Option<(Range<usize>, Range<usize>)> {
    let line = &raw[start..nl];
    // Names are ASCII; values are whatever bytes the channel holds.
    if !line.starts_with(b"agi_") {
        return None;
    }
    let colon = memchr::memchr(b':', line)?;
    let name = &line[..colon];
    if !name
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
    {
        return None;
    }
    let mut vstart = start + colon + 1;
    if raw.get(vstart) == Some(&b' ') {
        vstart += 1;
    }
    Some((start..start + colon, vstart.min(nl)..nl))
}

/// Checks the lines seen so far as they arrive, so garbage is refused at once
/// instead of at the header deadline. Returns the number of complete lines.
fn check_prefix(buf: &[u8], limits: &HeaderLimits) -> Result<usize, HeaderError> {
    let mut lines = 0;
    let mut start = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[start..]) {
        let nl = start + i;
        if nl == start {
            break; // the blank line
        }
        lines += 1;
        if lines > limits.max_lines {
            return Err(HeaderError::TooManyLines(limits.max_lines, false));
        }
        split_line(buf, start, nl).ok_or(HeaderError::Malformed(lines))?;
        start = nl + 1;
    }
    // A partial first line must still look like the start of an agi_ line.
    let tail = &buf[start..];
    let n = tail.len().min(4);
    if tail[..n] != b"agi_"[..n] {
        return Err(HeaderError::Malformed(lines + 1));
    }
    Ok(lines)
}

/// Reads one header from Asterisk, within `limits`.
pub async fn read_header(
    stream: &mut TcpStream,
    limits: &HeaderLimits,
) -> Result<Header, HeaderError> {
    let fut = async {
        let mut buf = Vec::with_capacity(2048);
        let mut checked = 0;
        loop {
            if buf.len() >= limits.max_bytes {
                return Err(HeaderError::TooLarge(limits.max_bytes));
            }
            if buf.capacity() == buf.len() {
                buf.reserve((buf.len()).min(limits.max_bytes - buf.len()));
            }
            let want = limits.max_bytes - buf.len();
            let n = (&mut *stream)
                .take(want as u64)
                .read_buf(&mut buf)
                .await
                .map_err(|e| HeaderError::Io(e.kind()))?;
            if n == 0 {
                return Err(if buf.is_empty() {
                    HeaderError::Closed
                } else {
                    HeaderError::Truncated
                });
            }
            if let Some(_end) = find_end(&buf, checked) {
                return Header::parse(buf, limits.max_lines);
            }
            // Validate only complete lines; resume where the last check ended.
            let last_nl = memchr::memrchr(b'\n', &buf).map_or(0, |i| i + 1);
            check_prefix(&buf, limits)?;
            checked = last_nl;
        }
    };
    match tokio::time::timeout(limits.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(HeaderError::Timeout(limits.timeout)),
    }
}

/// After an oversized header, reads (and drops) the rest up to the blank
/// line, so that Asterisk, which writes the whole header before it reads, is
/// then waiting for a command. Bounded in bytes and time; true when the
/// blank line was seen.
pub async fn discard_rest(stream: &mut TcpStream, timeout: Duration) -> bool {
    const MAX_DISCARD: usize = 1 << 20;
    let fut = async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        let mut last = 0u8;
        while total < MAX_DISCARD {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            total += n;
            let chunk = &buf[..n];
            if (last == b'\n' && chunk[0] == b'\n')
                || memchr::memmem::find(chunk, b"\n\n").is_some()
            {
                return true;
            }
            last = chunk[n - 1];
        }
        false
    };
    tokio::time::timeout(timeout, fut).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FX: &[u8] = include_bytes!("../../chaos-tests/fixtures/header-FX.bin");
    const J: &[u8] = include_bytes!("../../chaos-tests/fixtures/header-J.bin");
    const J2: &[u8] = include_bytes!("../../chaos-tests/fixtures/header-J2.bin");
    const HC: &[u8] = include_bytes!("../../chaos-tests/fixtures/header-HC.bin");

    #[test]
    fn parses_real_headers() {
        let h = Header::parse(FX.to_vec(), 512).unwrap();
        assert_eq!(h.raw(), FX);
        assert_eq!(h.line_count(), 24);
        assert_eq!(h.get("agi_uniqueid"), Some("1795769496.429"));
        assert_eq!(h.get("agi_accountcode"), Some(""));
        assert_eq!(h.script_path(), "some/script");
        assert_eq!(h.script_query(), "x=1");
        assert_eq!(h.query_param("x").as_deref(), Some("1"));
        assert_eq!(h.query_param("y"), None);

        let j = Header::parse(J.to_vec(), 512).unwrap();
        assert_eq!(j.get("agi_arg_4"), Some("q,c"));
        assert_eq!(j.get("agi_arg_7"), Some(""));
        assert_eq!(j.query_param("y").as_deref(), Some("2"));

        let j2 = Header::parse(J2.to_vec(), 512).unwrap();
        assert_eq!(j2.script_path(), "");
        assert_eq!(j2.script_query(), "");

        let hc = Header::parse(HC.to_vec(), 512).unwrap();
        assert_eq!(hc.get("agi_calleridname"), Some("Alice Example"));
        assert_eq!(hc.query_param("lang").as_deref(), Some("de"));
    }

    #[test]
    fn query_is_percent_decoded_and_plus_kept() {
        let raw = b"agi_network: yes\nagi_network_script: /ivr/x?n=%4A%C3%BCrgen&cid=+4930&e\n\n"
            .to_vec();
        let h = Header::parse(raw, 16).unwrap();
        assert_eq!(h.script_path(), "ivr/x");
        assert_eq!(h.query_param("n").as_deref(), Some("Jürgen"));
        assert_eq!(h.query_param("cid").as_deref(), Some("+4930"));
        assert_eq!(h.query_param("e").as_deref(), Some(""));
    }

    #[test]
    fn latin1_values_are_accepted_and_kept() {
        let raw = b"agi_network: yes\nagi_calleridname: Ren\xe9 M\xfcller\nagi_context: from-x\n\n"
            .to_vec();
        let h = Header::parse(raw.clone(), 16).unwrap();
        assert_eq!(h.raw(), &raw[..]);
        assert_eq!(h.get("agi_calleridname"), Some("Ren"));
        assert_eq!(h.get("agi_context"), Some("from-x"));
        let (_, v) = h.raw_vars().nth(1).unwrap();
        assert_eq!(v, b"Ren\xe9 M\xfcller");
    }

    #[test]
    fn trailing_bytes_are_kept_apart() {
        let mut raw = FX.to_vec();
        raw.extend_from_slice(b"HANGUP\n");
        let h = Header::parse(raw, 512).unwrap();
        assert_eq!(h.raw(), FX);
        assert_eq!(h.trailing(), b"HANGUP\n");
    }

    #[test]
    fn garbage_is_refused_early() {
        let limits = HeaderLimits {
            max_bytes: 1024,
            max_lines: 8,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            check_prefix(b"GET / HTTP/1.1\r\n", &limits),
            Err(HeaderError::Malformed(1))
        );
        assert_eq!(
            check_prefix(b"\x16\x03\x01", &limits),
            Err(HeaderError::Malformed(1))
        );
        assert_eq!(check_prefix(b"agi_network: yes\nag", &limits), Ok(1));
        assert_eq!(check_prefix(b"agi_network: yes\nagi_x", &limits), Ok(1));
        assert_eq!(
            check_prefix(b"agi_network yes\n", &limits),
            Err(HeaderError::Malformed(1))
        );
        let many = b"agi_a: 1\n".repeat(9);
        assert_eq!(
            check_prefix(&many, &limits),
            Err(HeaderError::TooManyLines(8, false))
        );
    }

    #[test]
    fn end_is_found_across_reads() {
        assert_eq!(find_end(b"agi_a: 1\n", 0), None);
        assert_eq!(find_end(b"agi_a: 1\n\n", 9), Some(10));
        assert_eq!(find_end(b"\n", 0), Some(1));
    }
}
