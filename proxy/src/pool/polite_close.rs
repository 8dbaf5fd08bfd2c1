//! How agiproxy ends a backend connection it abandons (a health probe, a
//! retry it gave up, a budget that ran out after connect): the way Asterisk
//! would. Fragile FastAGI servers crash on anything ruder
//! (`shared/fastagi-protocol.md`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long an abandoned backend gets to close after our `HANGUP`.
const POLITE_CLOSE: Duration = Duration::from_secs(2);

/// Ends a backend connection the way Asterisk would: it already has the
/// whole header; send `HANGUP`, close our side, and read what it sends until
/// it closes. Fragile FastAGI servers crash on anything ruder.
pub fn close_politely(mut stream: TcpStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(POLITE_CLOSE, async {
            let _ = stream.write_all(b"HANGUP\n").await;
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 512];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    });
}
