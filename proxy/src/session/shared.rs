//! What every session of a running proxy shares: the running config, the
//! metrics, the drain signals, the count of sessions and the feed of
//! finished ones. The server owns it; sessions only read it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::broadcast;

use super::header::HeaderMemory;
use super::outcome::Reason;
use super::record::SessionRecord;
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// State every session shares.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub drain: Drain,
    active: AtomicUsize,
    /// Refused connections still being told FAILURE (see [`Shared::refuse`]).
    refusing: AtomicUsize,
    /// Connections still sending their header, by peer (see [`HeaderGate`]).
    headers: HeaderGate,
    /// Header buffers past their first 2 KiB (`limits.max_header_memory`).
    pub header_memory: HeaderMemory,
    records: broadcast::Sender<SessionRecord>,
    /// Snapshots a config change replaced, while a session still runs on
    /// one (only sessions hold a snapshot): their routes, pools and
    /// backends can still end a session, so their `sessions_total` series
    /// are kept (`metrics::retention`).
    pub(crate) replaced: std::sync::Mutex<Vec<std::sync::Weak<Snapshot>>>,
}

impl Shared {
    pub fn new(snapshot: Snapshot) -> Shared {
        let (records, _) = broadcast::channel(4096);
        let metrics = Metrics::new();
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            header_memory: HeaderMemory::new(metrics.header_memory_bytes.clone()),
            metrics,
            drain: Drain::new(),
            active: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            headers: HeaderGate::default(),
            records,
            replaced: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn publish(&self, rec: SessionRecord) {
        if self.records.receiver_count() > 0 {
            let _ = self.records.send(rec);
        }
    }

    /// A feed of finished sessions (for tests, the demo and tooling).
    pub fn subscribe(&self) -> broadcast::Receiver<SessionRecord> {
        self.records.subscribe()
    }

    /// Sessions running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a new session unless `max` are running already.
    pub(crate) fn admit(self: &Arc<Self>, max: usize) -> Option<ActiveGuard> {
        if self.active.fetch_add(1, Ordering::Relaxed) >= max {
            self.active.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.metrics.active_sessions.inc();
        Some(ActiveGuard(self.clone()))
    }

    /// A slot to tell a refused connection FAILURE (it must first read its
    /// header), if fewer than `max` are in use. Refused connections are not
    /// bounded by `max_sessions` (they are its overflow), and a slow peer
    /// holds one for its header timeout: without this bound, a flood of
    /// them took every descriptor of the reserve (the control API's) and
    /// memory without end.
    pub(crate) fn refuse(self: &Arc<Self>, max: usize, reason: Reason) -> Option<Refusal> {
        if self.refusing.fetch_add(1, Ordering::Relaxed) >= max {
            self.refusing.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Refusal {
            shared: self.clone(),
            reason,
        })
    }

    /// A place for `peer`'s connection among those still sending their
    /// header, and how many `peer` holds with it.
    pub(crate) fn header_slot(self: &Arc<Self>, peer: IpAddr) -> (HeaderSlot, usize) {
        let bucket = HeaderGate::bucket(peer);
        let held = self.headers.0[bucket].fetch_add(1, Ordering::Relaxed) as usize + 1;
        let slot = HeaderSlot {
            shared: self.clone(),
            bucket,
        };
        (slot, held)
    }
}

/// Connections still sending their header, counted per peer in a fixed
/// table of buckets (an address hashes to one; an IPv6 address by its /64):
/// no lock and no allocation per session. Peers that share a bucket share
/// its count, which only makes the bound stricter for them; with 4,096
/// buckets and a real Asterisk's header taking a round trip, ordinary
/// traffic never comes near it.
struct HeaderGate(Box<[AtomicU32]>);

impl Default for HeaderGate {
    fn default() -> Self {
        HeaderGate(
            (0..HeaderGate::BUCKETS)
                .map(|_| AtomicU32::new(0))
                .collect(),
        )
    }
}

impl HeaderGate {
    const BUCKETS: usize = 4096;

    fn bucket(peer: IpAddr) -> usize {
        let key = match peer {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => u64::from(u32::from(v4)),
                None => (u128::from(a) >> 64) as u64,
            },
        };
        // Fibonacci hashing: the top bits of the product.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - 12)) as usize
    }
}

/// Holds a connection's place among those sending their header; released
/// when the header is in (or the connection ends).
pub struct HeaderSlot {
    shared: Arc<Shared>,
    bucket: usize,
}

impl Drop for HeaderSlot {
    fn drop(&mut self) {
        self.shared.headers.0[self.bucket].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A refused connection's slot, held until it is done with, and why it was
/// refused.
pub struct Refusal {
    shared: Arc<Shared>,
    pub reason: Reason,
}

impl Drop for Refusal {
    fn drop(&mut self) {
        self.shared.refusing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a session as active until it ends, however it ends.
pub struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active_sessions.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_counted_by_its_address_or_its_ipv6_slash_64() {
        let b = |s: &str| HeaderGate::bucket(s.parse().unwrap());
        assert_eq!(b("192.0.2.7"), b("::ffff:192.0.2.7"));
        assert_eq!(b("2001:db8:1:2::5"), b("2001:db8:1:2:ffff::9"));
        assert!((0..HeaderGate::BUCKETS).contains(&b("255.255.255.255")));
        // Neighbouring addresses (one Asterisk farm) spread over buckets.
        let spread: std::collections::HashSet<usize> =
            (1..=200u8).map(|i| b(&format!("10.0.0.{i}"))).collect();
        assert!(spread.len() > 190, "{}", spread.len());
        assert_ne!(b("2001:db8:1:2::5"), b("2001:db8:1:3::5"));
    }
}
