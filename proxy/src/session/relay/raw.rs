//! `mode: raw`: everything passes untouched both ways, no pacing, and no
//! deadline while both sides are open but one on a write the other side
//! stops taking (for routes whose backends speak something else).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::{RelayEnd, RelayStats};
use crate::drain::Cut;

/// Bytes read per syscall and direction; held for the session's life, as
/// `copy_bidirectional`'s buffers were (the same size).
const RAW_CHUNK: usize = 8 * 1024;

/// Raw mode: everything passes untouched both ways, no pacing. Each side's
/// close is passed on as a half-close; from then on the other side has
/// `linger` (the route's `next_command`) to close too, or the session ends
/// anyway: a peer that ignores the close would otherwise hold the task, both
/// sockets and a session slot for ever (keepalive cannot tell, it is alive).
pub async fn relay_raw(
    a: &mut TcpStream,
    b: &mut TcpStream,
    early: &[u8],
    first: &[u8],
    cut: &Cut,
    linger: Duration,
) -> (RelayEnd, RelayStats) {
    let mut stats = RelayStats::default();
    if !first.is_empty() {
        if a.write_all(first).await.is_err() {
            return (RelayEnd::PeerError, stats);
        }
        stats.bytes_to_asterisk += first.len() as u64;
    }
    if !early.is_empty() {
        if b.write_all(early).await.is_err() {
            return (RelayEnd::PeerError, stats);
        }
        stats.bytes_from_asterisk += early.len() as u64;
    }
    let (mut up, mut down) = (0, 0);
    let end = 'relay: {
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let to_b = pump(&mut ar, &mut bw, &mut up, linger);
        let to_a = pump(&mut br, &mut aw, &mut down, linger);
        tokio::pin!(to_b, to_a);
        let cancelled = cut.watch();
        tokio::pin!(cancelled);
        let asterisk_closed = tokio::select! {
            _ = &mut cancelled => break 'relay RelayEnd::Aborted,
            r = &mut to_b => r.map(|()| true),
            r = &mut to_a => r.map(|()| false),
        };
        let other = match asterisk_closed {
            Err(_) => break 'relay RelayEnd::PeerError,
            Ok(true) => to_a,
            Ok(false) => to_b,
        };
        tokio::select! {
            _ = &mut cancelled => RelayEnd::Aborted,
            r = tokio::time::timeout(linger, other) => match r {
                Ok(Err(_)) => RelayEnd::PeerError,
                // Closed in time, or lingered: the conversation is over
                // either way.
                Ok(Ok(())) | Err(_) => RelayEnd::Closed,
            },
        }
    };
    stats.bytes_from_asterisk += up;
    stats.bytes_to_asterisk += down;
    (end, stats)
}

/// One direction until `r`'s end, passed on as a half-close of `w`; counts
/// the bytes as they go (a cut session still reports what passed). A write
/// that `w` takes nothing of for `stall` ends it as an error: a peer that
/// stops reading would otherwise stop this direction for good, and with it
/// the sight of `r`'s close (audit of the lines relay, which had the same
/// hole).
async fn pump(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    count: &mut u64,
    stall: Duration,
) -> io::Result<()> {
    let mut buf = vec![0u8; RAW_CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        let mut sent = 0;
        while sent < n {
            // The timer only when the peer's socket is full: a timeout
            // around every write would cost each chunk a clock read and
            // a runtime-handle clone.
            match w.as_ref().try_write(&buf[sent..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::timeout(stall, w.as_ref().writable())
                        .await
                        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                }
                Err(e) => return Err(e),
            }
        }
        *count += n as u64;
    }
}
