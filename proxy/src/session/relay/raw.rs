//! `mode: raw`: everything passes untouched both ways, no pacing, no
//! deadlines (for routes whose backends speak something else).

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{RelayEnd, RelayStats};
use crate::drain::Cut;

/// Raw mode: everything passes untouched both ways, no pacing, no deadlines.
pub async fn relay_raw(
    a: &mut TcpStream,
    b: &mut TcpStream,
    early: &[u8],
    first: &[u8],
    cut: &Cut,
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
    tokio::select! {
        r = tokio::io::copy_bidirectional(a, b) => match r {
            Ok((up, down)) => {
                stats.bytes_from_asterisk += up;
                stats.bytes_to_asterisk += down;
                (RelayEnd::Closed, stats)
            }
            Err(_) => (RelayEnd::PeerError, stats),
        },
        _ = cut.watch() => (RelayEnd::Aborted, stats),
    }
}
