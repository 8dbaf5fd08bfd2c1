//! A fixed read buffer that hands out whole lines, shared by the load
//! generator and the benchmark backend.
//!
//! Allocated once per connection and never grown: a benchmark peer must not
//! allocate per command, and no line either side sends is anywhere near the
//! buffer size (a longer one is a protocol error, not something to absorb).

use std::io;
use std::ops::Range;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Big enough for a whole realistic header (~600 bytes) plus what may follow
/// it in the same segment; FastAGI lines are cut at 8191 bytes by Asterisk.
pub const LINE_BUF: usize = 8192;

pub struct Lines {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Lines {
    pub fn new() -> Self {
        Self::with_capacity(LINE_BUF)
    }

    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Forgets everything buffered (the buffer is reused for the next
    /// session).
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Received bytes not handed out yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn has_pending(&self) -> bool {
        self.start < self.end
    }

    /// Marks `n` pending bytes as used.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
    }

    /// The next complete line already buffered, without its `\n`, as a
    /// range for [`Lines::get`] (a range rather than a slice so the caller
    /// can write to the socket while it looks at the line).
    pub fn next_line(&mut self) -> Option<Range<usize>> {
        let nl = memchr::memchr(b'\n', &self.buf[self.start..self.end])?;
        let line = self.start..self.start + nl;
        self.start += nl + 1;
        Some(line)
    }

    pub fn get(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Reads once from `stream` into the free space; `Ok(0)` is end of
    /// stream. Ranges handed out earlier are invalid afterwards.
    ///
    /// Cancel-safe (used inside `select!`): a cancelled call has at most
    /// moved pending bytes to the front.
    pub async fn fill(&mut self, stream: &mut TcpStream) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "line longer than the read buffer",
                ));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

impl Default for Lines {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_out_whole_and_partial_ones_wait() {
        let mut l = Lines::with_capacity(32);
        l.buf[..11].copy_from_slice(b"NOOP\nANS\nxy");
        l.end = 11;
        let a = l.next_line().unwrap();
        assert_eq!(l.get(a), b"NOOP");
        let b = l.next_line().unwrap();
        assert_eq!(l.get(b), b"ANS");
        assert_eq!(l.next_line(), None);
        assert_eq!(l.pending(), b"xy");
    }
}
