//! How agiproxy ends a backend connection it abandons (a health probe, a
//! retry it gave up, a budget that ran out after connect): the way Asterisk
//! would. Fragile FastAGI servers crash on anything ruder
//! (`shared/fastagi-protocol.md`).

use std::sync::LazyLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

/// How long an abandoned backend gets to close after our `HANGUP`.
const POLITE_CLOSE: Duration = Duration::from_secs(2);

/// What an abandoned backend may still send before it is cut off (a reset:
/// it misbehaves). An honest one sends a line or two after `HANGUP`; one
/// that streams on kept a core busy reading it, for every probe (audit).
const POLITE_CLOSE_BYTES: usize = 64 * 1024;

/// Ends a backend connection the way Asterisk would: it already has the
/// whole header; send `HANGUP`, close our side, and read what it sends until
/// it closes (at most [`POLITE_CLOSE_BYTES`] and [`POLITE_CLOSE`]).
/// Fragile FastAGI servers crash on anything ruder.
pub fn close_politely(stream: TcpStream) {
    CLOSING.spawn(close_politely_now(stream));
}

/// [`close_politely`], holding `guard` (a place among the probes in
/// flight, say) until the socket is closed.
pub fn close_politely_holding<G: Send + 'static>(stream: TcpStream, guard: G) {
    CLOSING.spawn(async move {
        close_politely_now(stream).await;
        drop(guard);
    });
}

/// The polite closes in flight, process-wide (sessions and health probes
/// both abandon backends), so that the exit can wait for them: cut by the
/// runtime's end, the backend got a reset after our `HANGUP` (audit).
static CLOSING: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Resolves once the polite closes begun so far have ended: at most
/// [`POLITE_CLOSE`] and a little, whatever the peers do.
pub(crate) async fn finished() {
    let closing = CLOSING.clone();
    closing.close();
    let _ = tokio::time::timeout(POLITE_CLOSE + Duration::from_millis(100), closing.wait()).await;
    // Open for the next server in this process (tests run many).
    closing.reopen();
}

async fn close_politely_now(mut stream: TcpStream) {
    let _ = tokio::time::timeout(POLITE_CLOSE, async {
        let _ = stream.write_all(b"HANGUP\n").await;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut left = POLITE_CLOSE_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A backend that streams after `HANGUP` is cut off after
    /// `POLITE_CLOSE_BYTES`, not read for the whole `POLITE_CLOSE`.
    #[tokio::test]
    async fn a_backend_that_streams_on_is_cut_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let streamer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let line = [b'x'; 1024];
            let mut sent = 0usize;
            while s.write_all(&line).await.is_ok() {
                sent += line.len();
                if sent > 1 << 30 {
                    break;
                }
            }
            sent
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        close_politely_now(stream).await;
        let took = started.elapsed();
        let sent = streamer.await.unwrap();
        assert!(took < POLITE_CLOSE / 2, "{took:?}");
        // What was read, plus what the socket buffers held when it closed.
        assert!(sent < 64 << 20, "{sent}");
    }

    /// An honest backend closes after `HANGUP`: read to its end, a FIN.
    #[tokio::test]
    async fn an_honest_backend_gets_hangup_and_its_close_is_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(b"200 result=0\n").await.ok();
            got
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        close_politely_now(stream).await;
        assert_eq!(backend.await.unwrap(), b"HANGUP\n");
    }
}
