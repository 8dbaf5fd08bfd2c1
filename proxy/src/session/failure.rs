//! Telling Asterisk FAILURE. A closed or reset connection reads as SUCCESS
//! to Asterisk, so every failure is spoken: `SET VARIABLE AGIPROXY_ERROR`
//! (its reply read first, so the variable is set before the dialplan goes
//! on), then a `FAILURE` line, which makes Asterisk set AGISTATUS=FAILURE.
//! Asterisk then sends its end-of-session `HANGUP` and closes. When the
//! reply is late, `FAILURE` is written all the same: Asterisk reads it once
//! it gets to it.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::outcome::Reason;

/// The channel variable that tells the dialplan why.
pub const ERROR_VARIABLE: &str = "AGIPROXY_ERROR";

/// How long Asterisk gets to answer `SET VARIABLE` before `FAILURE` is
/// written anyway, and (twice this in all) to close after `FAILURE` (it
/// answers in microseconds; this only bounds a slow or dead peer).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// After a late reply, how long Asterisk gets to close once `FAILURE` is
/// written: a silent peer (a flood's) is not held the whole bound again.
const LATE_CLOSE: Duration = Duration::from_millis(500);
/// How long Asterisk's sound-file module gets to answer when its payload
/// will not be completed (the module gives up after 10 s).
pub const MODULE_ANSWER_WAIT: Duration = Duration::from_secs(15);
/// How long a `failure` line left for a running command may take to write.
const FAILURE_LINE_WRITE: Duration = Duration::from_millis(200);

/// What Asterisk reads next, as far as telling it FAILURE goes. The relay
/// keeps it in a [`LastKnown`] owned outside its future, so that the
/// session's panic guard still knows it once that future has unwound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AsteriskReads {
    /// It waits for a command: `SET VARIABLE`, its reply, `FAILURE`.
    Command = 0,
    /// It runs a command (an `EXEC Dial` may take hours) and reads the next
    /// line when the command returns: anything written now is that line, so
    /// only a `failure` line (FAILURE without `AGIPROXY_ERROR`).
    AfterCommand = 1,
    /// It runs `PUT SOUNDFILE`: its ready answer, then its module takes
    /// lines as payload until it gives up and answers again.
    AfterReady = 2,
    /// Its sound-file module takes lines as payload: only once it has
    /// answered (given up) does it read a command.
    AfterPayload = 3,
    /// Part of a command line went out and the rest is lost: whatever is
    /// written would end it (a command glued together), so nothing is.
    RestOfLine = 4,
}

/// The cell behind [`AsteriskReads`]: one relaxed atomic store per change,
/// no lock, no allocation (the relay sets it per command and per reply).
#[derive(Debug, Default)]
pub struct LastKnown(AtomicU8);

impl LastKnown {
    pub fn set(&self, reads: AsteriskReads) {
        self.0.store(reads as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> AsteriskReads {
        match self.0.load(Ordering::Relaxed) {
            0 => AsteriskReads::Command,
            1 => AsteriskReads::AfterCommand,
            2 => AsteriskReads::AfterReady,
            3 => AsteriskReads::AfterPayload,
            _ => AsteriskReads::RestOfLine,
        }
    }
}

/// Tells Asterisk FAILURE for `reason` the way `reads` allows (see
/// [`AsteriskReads`]); an error as for [`tell_failure`]. For the session's
/// panic guard: the relay, which knew more, tells its own failures.
pub async fn tell_failure_when(
    asterisk: &mut TcpStream,
    reason: Reason,
    reads: AsteriskReads,
) -> io::Result<()> {
    match reads {
        AsteriskReads::Command => tell_failure(asterisk, reason, true).await,
        AsteriskReads::AfterCommand => {
            let write = asterisk.write_all(b"failure\n");
            match tokio::time::timeout(FAILURE_LINE_WRITE, write).await {
                Ok(r) => r,
                Err(_) => Err(io::ErrorKind::TimedOut.into()),
            }
        }
        AsteriskReads::AfterReady | AsteriskReads::AfterPayload => {
            // Its ready answer (`200 result=0`, or an error that ends the
            // command), then the module's answer when it gives up.
            let mut ready_due = reads == AsteriskReads::AfterReady;
            let answered = read_lines(asterisk, MODULE_ANSWER_WAIT, |line| {
                let ready = line == b"200 result=0" || line.starts_with(b"200 result=0 ");
                let more = ready_due && ready;
                ready_due = false;
                more
            });
            let surely_waits = match tokio::time::timeout(MODULE_ANSWER_WAIT, answered).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) if e.kind() != io::ErrorKind::TimedOut => return Err(e),
                // No answer: told all the same (as the relay does), unsure.
                _ => false,
            };
            tell_failure(asterisk, reason, surely_waits).await
        }
        AsteriskReads::RestOfLine => Err(io::Error::other(
            "part of a command line went to Asterisk: nothing can follow it",
        )),
    }
}

/// Sends the reason and the FAILURE line, then waits for Asterisk to close.
/// Asterisk must be waiting for a command (never mid-line). An error means
/// the FAILURE line may not have been heard (once it is written, Asterisk's
/// way of closing does not matter). `surely_waits`: Asterisk is known to
/// wait for a command, so a `FAILURE` written after a late reply is read as
/// one; false where it may still be in a module (an abandoned sound-file
/// payload the module never answered), where it would be read as payload.
pub async fn tell_failure(
    asterisk: &mut TcpStream,
    reason: Reason,
    surely_waits: bool,
) -> io::Result<()> {
    // Built on the stack, no formatting: a pool that is down answers every
    // call this way, thousands a second.
    let mut set = [0u8; 128];
    let len = set_variable_line(&mut set, reason.as_str());
    let mut heard = false;
    let exchange = async {
        asterisk.write_all(&set[..len]).await?;
        let late = match read_reply(asterisk).await {
            Ok(()) => false,
            // A slow Asterisk (overloaded) still runs commands in order: a
            // FAILURE written now is read after its late reply, whereas a
            // close would read as SUCCESS.
            Err(e) if e.kind() == io::ErrorKind::TimedOut && surely_waits => true,
            Err(e) => return Err(e),
        };
        asterisk.write_all(b"FAILURE\n").await?;
        heard = true;
        // Asterisk answers FAILURE with HANGUP and a close; read it so our
        // close is orderly. Up to its FIN, not just its HANGUP: a socket
        // closed before the peer's FIN becomes a TIME_WAIT in our close(),
        // one that has the FIN does so in the peer's (measured: 1.08x CPU
        // per FAILURE when the drain stopped at HANGUP).
        let _ = asterisk.shutdown().await;
        let mut sink = [0u8; 256];
        let drain = async {
            while asterisk.read(&mut sink).await? > 0 {}
            io::Result::Ok(())
        };
        if late {
            let _ = tokio::time::timeout(LATE_CLOSE, drain).await;
            return Ok(());
        }
        drain.await
    };
    let result = tokio::time::timeout(ANSWER_TIMEOUT * 2, exchange)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    // Once the FAILURE line is written, how Asterisk closes does not matter.
    if heard {
        return Ok(());
    }
    result
}

/// `SET VARIABLE AGIPROXY_ERROR "<reason>"\n` into `buf`; its length.
fn set_variable_line(buf: &mut [u8; 128], reason: &str) -> usize {
    let parts: [&[u8]; 4] = [
        b"SET VARIABLE ",
        ERROR_VARIABLE.as_bytes(),
        b" \"",
        reason.as_bytes(),
    ];
    let mut len = 0;
    for part in parts.into_iter().chain([&b"\"\n"[..]]) {
        // Reasons are short fixed names; a longer one is cut, never a panic.
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    len
}

/// Reads up to the end of one reply line, skipping unsolicited `HANGUP`
/// lines. Reads in blocks, not byte by byte (one system call, not one per
/// byte), so it may read past the reply: the caller only sends FAILURE and
/// drains after it, so nothing that follows is lost to anyone.
async fn read_reply(asterisk: &mut TcpStream) -> io::Result<()> {
    read_lines(asterisk, ANSWER_TIMEOUT, |_| false).await
}

/// Reads Asterisk's lines, skipping unsolicited `HANGUP` lines, up to the
/// end of the one for which `more` (given the line without its newline,
/// empty for a line too long to keep) says no more are awaited. Each read
/// gets `within`.
async fn read_lines(
    asterisk: &mut TcpStream,
    within: Duration,
    mut more: impl FnMut(&[u8]) -> bool,
) -> io::Result<()> {
    let mut buf = [0u8; 512];
    // Bytes of the unfinished line at the start of `buf`.
    let mut kept = 0;
    // The unfinished line outgrew `buf`: it is no HANGUP, whatever follows.
    let mut long = false;
    loop {
        let n = tokio::time::timeout(within, asterisk.read(&mut buf[kept..]))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let end = kept + n;
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &buf[start..end]) {
            let line = &buf[start..start + nl];
            let line = if long { &b""[..] } else { line };
            if (long || line != b"HANGUP") && !more(line) {
                return Ok(());
            }
            long = false;
            start += nl + 1;
        }
        buf.copy_within(start..end, 0);
        kept = end - start;
        if kept == buf.len() {
            (kept, long) = (0, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// What the fake Asterisk reads up to the end of the proxy's first line.
    async fn first_line(ast: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.ends_with(b"\n") {
            let n = ast.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a line: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// A connected pair on loopback: (Asterisk's end, the proxy's).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (p, _) = l.accept().await.unwrap();
        (a, p)
    }

    /// What the proxy sent, for `asterisk_says` written by a fake Asterisk
    /// in the chunks given.
    async fn exchange(asterisk_says: &[&[u8]]) -> (io::Result<()>, Vec<u8>) {
        let (mut ast, mut proxy) = pair().await;
        let chunks: Vec<Vec<u8>> = asterisk_says.iter().map(|c| c.to_vec()).collect();
        let fake = tokio::spawn(async move {
            // The SET VARIABLE line first, then the reply in chunks.
            let mut got = first_line(&mut ast).await;
            for c in chunks {
                // An empty chunk: Asterisk closes (its side; it still reads).
                if c.is_empty() {
                    ast.shutdown().await.unwrap();
                    continue;
                }
                ast.write_all(&c).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = ast.read_to_end(&mut got).await;
            got
        });
        let r = tell_failure(&mut proxy, Reason::ConnectFailed, true).await;
        drop(proxy);
        (r, fake.await.unwrap())
    }

    #[tokio::test]
    async fn failure_follows_the_reply_however_it_arrives() {
        let long = [b'x'; 700];
        let long_reply: &[u8] = &[&long[..], b"\n"].concat();
        for says in [
            &[&b"200 result=1\n"[..]][..],
            &[b"20", b"0 resu", b"lt=1\n"],
            &[b"HANGUP\n", b"200 result=1\n"],
            &[b"HANGUP\nHANG", b"UP\n200 result=1\nHANGUP\n"],
            &[long_reply],
        ] {
            let (r, got) = exchange(says).await;
            r.unwrap();
            assert_eq!(
                String::from_utf8_lossy(&got),
                "SET VARIABLE AGIPROXY_ERROR \"connect_failed\"\nFAILURE\n",
                "{says:?}"
            );
        }
    }

    /// An overloaded Asterisk that answers `SET VARIABLE` after the 2 s
    /// wait still gets FAILURE: a close would have read as SUCCESS.
    #[tokio::test]
    async fn a_late_reply_still_gets_the_failure_line() {
        let (mut ast, mut proxy) = pair().await;
        let fake = tokio::spawn(async move {
            let mut got = first_line(&mut ast).await;
            tokio::time::sleep(Duration::from_millis(2200)).await;
            ast.write_all(b"200 result=1\n").await.unwrap();
            // Then, as Asterisk: the next line, HANGUP and a close.
            let mut rest = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(2), ast.read(&mut rest))
                .await
                .expect("FAILURE line")
                .unwrap();
            got.extend_from_slice(&rest[..n]);
            ast.write_all(b"HANGUP\n").await.unwrap();
            got
        });
        let started = std::time::Instant::now();
        let r = tell_failure(&mut proxy, Reason::ConnectFailed, true).await;
        assert!(started.elapsed() < ANSWER_TIMEOUT * 2 + Duration::from_millis(500));
        drop(proxy);
        let got = fake.await.unwrap();
        r.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            "SET VARIABLE AGIPROXY_ERROR \"connect_failed\"\nFAILURE\n"
        );
    }

    /// A peer that never answers nor closes (a flood's) gets FAILURE after
    /// the 2 s wait and is let go `LATE_CLOSE` later, not held the whole
    /// 4 s bound.
    #[tokio::test]
    async fn a_silent_peer_is_let_go_soon_after_its_failure_line() {
        let (mut peer, mut proxy) = pair().await;
        let started = std::time::Instant::now();
        tell_failure(&mut proxy, Reason::Overloaded, true)
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= ANSWER_TIMEOUT
                && took < ANSWER_TIMEOUT + LATE_CLOSE + Duration::from_millis(400),
            "{took:?}"
        );
        drop(proxy);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            "SET VARIABLE AGIPROXY_ERROR \"overloaded\"\nFAILURE\n"
        );
    }

    /// Inside `PUT SOUNDFILE` nothing is written before the module has
    /// answered (its ready, then its giving up): a line written earlier
    /// would be taken as payload.
    #[tokio::test]
    async fn inside_a_sound_file_transfer_failure_waits_for_the_modules_answer() {
        for (reads, says) in [
            (
                AsteriskReads::AfterReady,
                &[&b"200 result=0\n"[..], b"HANGUP\n200 result=-1\n"][..],
            ),
            (AsteriskReads::AfterReady, &[b"200 result=-10\n"]),
            (AsteriskReads::AfterPayload, &[b"200 result=-1\n"]),
        ] {
            let (mut ast, mut proxy) = pair().await;
            let chunks: Vec<Vec<u8>> = says.iter().map(|c| c.to_vec()).collect();
            let fake = tokio::spawn(async move {
                let mut got = Vec::new();
                for c in chunks {
                    // Nothing may come before the module's answer.
                    let mut b = [0u8; 64];
                    let early = tokio::time::timeout(Duration::from_millis(200), ast.read(&mut b));
                    assert!(early.await.is_err(), "written before the answer");
                    ast.write_all(&c).await.unwrap();
                }
                got.extend(first_line(&mut ast).await);
                ast.write_all(b"200 result=1\n").await.unwrap();
                let _ = ast.read_to_end(&mut got).await;
                got
            });
            tell_failure_when(&mut proxy, Reason::Internal, reads)
                .await
                .unwrap();
            drop(proxy);
            assert_eq!(
                String::from_utf8_lossy(&fake.await.unwrap()),
                "SET VARIABLE AGIPROXY_ERROR \"internal\"\nFAILURE\n",
                "{reads:?} {says:?}"
            );
        }
    }

    #[tokio::test]
    async fn no_failure_line_before_a_reply() {
        // Only HANGUPs, then a close: no reply ever came, nobody is left to
        // read a FAILURE. (A peer that merely stays silent gets one: see
        // `a_late_reply_still_gets_the_failure_line`.)
        let (r, got) = exchange(&[b"HANGUP\nHAN", b"GUP\n", b""]).await;
        assert!(r.is_err());
        assert!(
            !String::from_utf8_lossy(&got).contains("FAILURE"),
            "{got:?}"
        );
    }
}
