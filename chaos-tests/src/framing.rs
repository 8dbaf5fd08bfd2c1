//! A read buffer that hands out whole lines.
//!
//! Both fake peers speak a line protocol (sound-file payloads included:
//! they are base64 lines). Keeping "is a whole line here?" apart
//! from the socket reads lets each peer decide what to do while a line is
//! incomplete (FakeAsterisk times it, FakeBackend just waits), and lets the
//! benchmark backend reuse one buffer for a whole session.

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// How much spare room a read asks for: large enough for a 1 MiB payload to
/// arrive in a reasonable number of reads, small enough to stay per session.
const READ_CHUNK: usize = 16 * 1024;

/// Bytes received but not consumed yet.
#[derive(Debug, Default)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
}

impl ReadBuf {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
        }
    }

    /// The received bytes nobody has consumed yet.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.start < self.buf.len()
    }

    /// Marks `n` pending bytes as consumed.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.buf.len() - self.start);
        self.start += n;
    }

    /// Takes one line, without its `\n`. A line that reaches `max` bytes
    /// without a newline is cut there and the rest becomes the next line,
    /// which is what Asterisk does with its 8191-byte buffer.
    pub(crate) fn take_line(&mut self, max: usize) -> Option<&[u8]> {
        let data = self.pending();
        let window = &data[..data.len().min(max + 1)];
        let (len, consumed) = match memchr::memchr(b'\n', window) {
            Some(i) => (i, i + 1),
            None if data.len() >= max => (max, max),
            None => return None,
        };
        let from = self.start;
        self.start += consumed;
        Some(&self.buf[from..from + len])
    }

    /// Reads once from `r`; `Ok(0)` means end of stream.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        self.compact();
        self.buf.reserve(READ_CHUNK);
        r.read_buf(&mut self.buf).await
    }

    /// Appends whatever the socket already holds, without waiting.
    /// `Ok(0)` means either nothing is there or end of stream.
    pub(crate) fn try_fill(&mut self, stream: &TcpStream) -> usize {
        self.compact();
        self.buf.reserve(READ_CHUNK);
        stream.try_read_buf(&mut self.buf).unwrap_or(0)
    }

    /// Moves pending bytes to the front so the buffer does not grow with the
    /// session. Slices handed out earlier are dead by now (they borrow self).
    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
        } else if self.start > 0 {
            self.buf.drain(..self.start);
        }
        self.start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(bytes: &[u8]) -> ReadBuf {
        let mut rb = ReadBuf::new();
        rb.buf.extend_from_slice(bytes);
        rb
    }

    #[test]
    fn lines_come_out_whole_and_without_newline() {
        let mut rb = filled(b"NOOP\nVERBOSE \"x\" 1\npart");
        assert_eq!(rb.take_line(8191), Some(&b"NOOP"[..]));
        assert_eq!(rb.take_line(8191), Some(&b"VERBOSE \"x\" 1"[..]));
        assert_eq!(rb.take_line(8191), None);
        assert_eq!(rb.pending(), b"part");
    }

    #[test]
    fn long_lines_are_cut_like_asterisk_does() {
        let mut rb = filled(b"abcdefg\n");
        assert_eq!(rb.take_line(3), Some(&b"abc"[..]));
        assert_eq!(rb.take_line(3), Some(&b"def"[..]));
        assert_eq!(rb.take_line(3), Some(&b"g"[..]));
        let mut exact = filled(b"abc\n");
        assert_eq!(exact.take_line(3), Some(&b"abc"[..]));
        assert!(!exact.has_pending());
    }
}
