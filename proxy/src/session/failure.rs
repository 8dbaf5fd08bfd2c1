//! Telling Asterisk FAILURE. A closed or reset connection reads as SUCCESS
//! to Asterisk, so every failure is spoken: `SET VARIABLE AGIPROXY_ERROR`
//! (its reply read first, so the variable is set before the dialplan goes
//! on), then a `FAILURE` line, which makes Asterisk set AGISTATUS=FAILURE.
//! Asterisk then sends its end-of-session `HANGUP` and closes.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::outcome::Reason;

/// The channel variable that tells the dialplan why.
pub const ERROR_VARIABLE: &str = "AGIPROXY_ERROR";

/// How long Asterisk gets to answer `SET VARIABLE` and to close after
/// `FAILURE` (it answers in microseconds; this only bounds a dead peer).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends the reason and the FAILURE line, then waits for Asterisk to close.
/// Asterisk must be waiting for a command (never mid-line).
pub async fn tell_failure(asterisk: &mut TcpStream, reason: Reason) -> io::Result<()> {
    let set = format!("SET VARIABLE {ERROR_VARIABLE} \"{}\"\n", reason.as_str());
    let exchange = async {
        asterisk.write_all(set.as_bytes()).await?;
        read_reply(asterisk).await?;
        asterisk.write_all(b"FAILURE\n").await?;
        // Asterisk answers FAILURE with HANGUP and a close; read it so our
        // close is orderly.
        let _ = asterisk.shutdown().await;
        let mut sink = [0u8; 256];
        while asterisk.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(ANSWER_TIMEOUT * 2, exchange)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Reads one reply line, skipping unsolicited `HANGUP` lines.
async fn read_reply(asterisk: &mut TcpStream) -> io::Result<()> {
    let mut line = [0u8; 512];
    let mut len = 0;
    loop {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(ANSWER_TIMEOUT, asterisk.read(&mut byte))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            if &line[..len] != b"HANGUP" {
                return Ok(());
            }
            len = 0;
        } else if len < line.len() {
            line[len] = byte[0];
            len += 1;
        }
    }
}
