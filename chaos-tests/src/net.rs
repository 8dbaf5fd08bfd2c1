//! Loopback addresses where a connect fails the two ways Asterisk tells
//! apart: refused at once, or never answered (a full accept queue drops
//! SYNs, so the connect hangs until its timeout — 2000 ms per address in
//! Asterisk).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// An address nothing listens on: connects are refused at once.
///
/// The port was free a moment ago (bound, then released), so nothing else
/// of ours is on it; another process could take it, but on loopback with an
/// ephemeral port that does not happen in practice.
///
/// # Panics
/// If no loopback port can be bound.
pub fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("refused_addr: cannot bind 127.0.0.1:0: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("refused_addr: no local address: {e}"))
}

/// Keeps a black-holed address black-holed: the listener that never accepts
/// and the connections filling its queue. Drop it to release the port.
#[derive(Debug)]
pub struct Blackhole {
    _listener: Socket,
    _queued: Vec<TcpStream>,
}

/// A listener with backlog 0 whose accept queue is full: further SYNs are
/// dropped, so connects to the returned address hang until they time out.
///
/// Fills the queue with blocking loopback connects until one times out
/// (50 ms): that probe is the proof the queue is full. Call it before
/// timing anything.
///
/// # Panics
/// If the socket cannot be set up or the queue never fills.
pub fn blackholed_listener() -> (Blackhole, SocketAddr) {
    const PROBE: Duration = Duration::from_millis(50);
    let fail = |what: &str, e: std::io::Error| -> ! { panic!("blackholed_listener: {what}: {e}") };
    let listener =
        Socket::new(Domain::IPV4, Type::STREAM, None).unwrap_or_else(|e| fail("socket", e));
    listener
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap_or_else(|e| fail("bind", e));
    listener.listen(0).unwrap_or_else(|e| fail("listen", e));
    let addr = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or_else(|| panic!("blackholed_listener: listener has no inet address"));
    let mut queued = Vec::new();
    for _ in 0..64 {
        match TcpStream::connect_timeout(&addr, PROBE) {
            Ok(stream) => queued.push(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                let hole = Blackhole {
                    _listener: listener,
                    _queued: queued,
                };
                return (hole, addr);
            }
            Err(e) => fail("filling the accept queue", e),
        }
    }
    panic!("blackholed_listener: accept queue still taking connections after 64")
}

/// True while `s` has not been closed by its peer: nothing to read, no end
/// of stream, no error. (A test's way to see whether the proxy still holds
/// a silent connection.)
pub fn still_open(s: &tokio::net::TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn refused_addr_refuses_at_once() {
        let addr = refused_addr();
        let started = Instant::now();
        let err = tokio::net::TcpStream::connect(addr)
            .await
            .expect_err("nothing listens");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn blackholed_connect_times_out_instead_of_failing() {
        let (_hole, addr) = blackholed_listener();
        let started = Instant::now();
        let connect = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        assert!(connect.is_err(), "connect must hang, got {connect:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
