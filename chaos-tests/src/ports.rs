//! Ports for tests that must name an address before something binds it
//! (a replica's peers list, a config file): free when asked, and taken
//! from below the kernel's ephemeral range, so that no `connect()` of a
//! test running beside it can take one as its source port in between
//! (a replica's bind then failed with `AddrInUse`: seen in CI).

use std::sync::atomic::{AtomicU32, Ordering};

/// The kernel's ephemeral range (`ip_local_port_range`), or Linux's
/// default when it cannot be read.
fn ephemeral() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A TCP port free on `ip` now, outside the ephemeral range when there is
/// room below it (else any free port, as `bind(0)` gives). Distinct within
/// a process; spread by process id across processes.
pub fn free_port(ip: &str) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, _) = ephemeral();
    let (first, last) = (10_000u32, low.min(65_536));
    if last > first + 1000 {
        let span = last - first;
        let start = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = first + (start + n) % span;
            if std::net::TcpListener::bind((ip, port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let (low, _) = ephemeral();
        let ports: Vec<u16> = (0..50).map(|_| free_port("127.0.0.1")).collect();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "{ports:?}");
        for p in ports {
            assert!(u32::from(p) < low, "{p} is in the ephemeral range");
            std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
