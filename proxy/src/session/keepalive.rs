//! TCP keepalive for calls that sit in one long command.
//!
//! While Asterisk runs a command (an `EXEC Dial` may last hours) neither
//! side sends a byte. A host that died, or a firewall or load balancer that
//! forgot the idle flow (AWS NLB after 350 s, Azure's after 4 minutes by
//! default), would then hold the session, the backend's script and two
//! descriptors until the process ends. Keepalive probes find the dead peer,
//! and keep the flow alive in the middleboxes.
//!
//! Set lazily, once a command has run for half of `idle`, on both sockets,
//! with the kernel's idle time shortened by that half: the first probe still
//! goes `idle` after the last packet. A short session never pays for it
//! (four `setsockopt`s a socket measured 2 % of a short session's CPU, and
//! the kernel's keepalive timer on every socket about 1 %, docs/benchmarks.md).

use std::io;
use std::time::Duration;

use agiproxy_config::Keepalive;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// How long a command runs before the session's sockets get keepalive.
pub fn arm_after(k: &Keepalive) -> Duration {
    k.idle / 2
}

/// The kernel's idle time once armed: what is left of `idle`, in whole
/// seconds, at least 1.
fn kernel_idle(k: &Keepalive) -> Duration {
    let left = k.idle.saturating_sub(arm_after(k));
    Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0))
        .max(Duration::from_secs(1))
}

/// Turns keepalive on for `stream` now, the first probe `idle` after the
/// last packet when that was `arm_after` ago.
pub fn apply(stream: &TcpStream, k: &Keepalive) -> io::Result<()> {
    set(stream, kernel_idle(k), k)
}

/// For relays that cannot tell a long command from a quiet moment (`mode:
/// raw`): keepalive from the start, with the configured idle time.
pub fn apply_now(stream: &TcpStream, k: &Keepalive) -> io::Result<()> {
    set(stream, k.idle, k)
}

fn set(stream: &TcpStream, idle: Duration, k: &Keepalive) -> io::Result<()> {
    SockRef::from(stream).set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(idle)
            .with_interval(k.interval)
            .with_retries(k.probes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(idle: u64) -> Keepalive {
        Keepalive {
            idle: Duration::from_secs(idle),
            ..Keepalive::default()
        }
    }

    #[test]
    fn the_first_probe_still_goes_idle_after_the_last_packet() {
        for (idle, arm, kernel) in [
            (60, 30_000, 30),
            (1, 500, 1),
            (3, 1_500, 2),
            (32_767, 16_383_500, 16_384),
        ] {
            let k = k(idle);
            assert_eq!(arm_after(&k), Duration::from_millis(arm), "idle {idle}");
            assert_eq!(kernel_idle(&k), Duration::from_secs(kernel), "idle {idle}");
            assert!(arm_after(&k) + kernel_idle(&k) >= k.idle);
        }
    }

    #[tokio::test]
    async fn apply_sets_the_kernels_keepalive() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let sock = SockRef::from(&s);
        assert!(!sock.keepalive().unwrap());
        let k = Keepalive {
            idle: Duration::from_secs(40),
            interval: Duration::from_secs(7),
            probes: 3,
        };
        apply(&s, &k).unwrap();
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(20));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(sock.keepalive_retries().unwrap(), 3);
        apply_now(&s, &k).unwrap();
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(40));
    }
}
