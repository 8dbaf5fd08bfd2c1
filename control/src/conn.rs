//! What bounds one control API connection, whoever is on the other end:
//! its share of the connection cap ([`Slots`]), a deadline on every write
//! ([`WriteDeadline`]), and a lifetime (in `server::serve_connection`).
//!
//! Without them a client that sends requests and never reads the answers
//! kept its connection for ever (hyper waits on the write), and 64 such
//! connections from one peer shut the kubelet's probes out.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// Who a connection counts against in [`Slots`]: an IPv4 address, an IPv6
/// /64 (one host usually holds a whole /64, so its addresses are one peer),
/// or the control socket (every local user together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    V4(Ipv4Addr),
    V6Net(u64),
    Socket,
}

impl Peer {
    pub(crate) fn of(ip: IpAddr) -> Peer {
        // An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d.
        match ip.to_canonical() {
            IpAddr::V4(a) => Peer::V4(a),
            IpAddr::V6(a) => Peer::V6Net((u128::from(a) >> 64) as u64),
        }
    }
}

/// The connection cap and each peer's share of it.
///
/// At the cap, a newcomer whose peer holds at least two connections fewer
/// than the greediest peer takes that peer's oldest connection's slot (the
/// connection is closed, counted as `evicted`): a few addresses holding
/// every slot (four at 16 each) cannot then shut out the kubelet's probes
/// or Prometheus, which hold one or two. To refuse a newcomer, the slots
/// must be spread so evenly that no peer holds two more than it does.
#[derive(Clone)]
pub(crate) struct Slots {
    inner: Arc<SlotsInner>,
}

struct SlotsInner {
    total: usize,
    per_peer: usize,
    open: Mutex<Open>,
}

/// Open connections: in all, and by peer, oldest first (no entry for a
/// peer holding none, so at most `total` entries of at most `per_peer`).
#[derive(Default)]
struct Open {
    all: usize,
    next_id: u64,
    by_peer: HashMap<Peer, Vec<Held>>,
}

struct Held {
    id: u64,
    evict: Arc<Notify>,
}

/// What [`Slots::take`] gave: the slot, and whether another peer's
/// connection was evicted for it.
pub(crate) struct Taken {
    pub(crate) slot: Slot,
    pub(crate) evicted: bool,
}

impl Slots {
    pub(crate) fn new(total: usize, per_peer: usize) -> Slots {
        Slots {
            inner: Arc::new(SlotsInner {
                total,
                per_peer,
                open: Mutex::new(Open::default()),
            }),
        }
    }

    /// A slot for a new connection from `peer`, or the refusal's reason
    /// (one of `server::REFUSED_REASONS`).
    pub(crate) fn take(&self, peer: Peer) -> Result<Taken, &'static str> {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        let open = &mut *open;
        let mine = open.by_peer.get(&peer).map_or(0, Vec::len);
        if mine >= self.inner.per_peer {
            return Err("peer_cap");
        }
        let mut evicted = false;
        if open.all >= self.inner.total {
            // At most `total` entries, and only at the cap: a scan is fine.
            let greediest = open
                .by_peer
                .iter()
                .map(|(p, held)| (*p, held.len()))
                .max_by_key(|&(_, n)| n);
            match greediest {
                Some((victim, n)) if n >= mine + 2 => {
                    let held = open.by_peer.get_mut(&victim).expect("just seen");
                    let oldest = held.remove(0);
                    if held.is_empty() {
                        open.by_peer.remove(&victim);
                    }
                    // Its slot is ours now; its `Slot` finds itself gone.
                    oldest.evict.notify_one();
                    open.all -= 1;
                    evicted = true;
                }
                _ => return Err("connection_cap"),
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let evict = Arc::new(Notify::new());
        open.by_peer.entry(peer).or_default().push(Held {
            id,
            evict: evict.clone(),
        });
        open.all += 1;
        Ok(Taken {
            slot: Slot {
                slots: self.inner.clone(),
                peer,
                id,
                evict,
            },
            evicted,
        })
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.inner.open.lock().unwrap().all
    }
}

/// Held by a connection for its life; given back when dropped.
pub(crate) struct Slot {
    slots: Arc<SlotsInner>,
    peer: Peer,
    id: u64,
    evict: Arc<Notify>,
}

impl Slot {
    /// Completes when a newcomer has taken this slot: the connection must
    /// close now.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        let open = &mut *open;
        let Some(held) = open.by_peer.get_mut(&self.peer) else {
            return;
        };
        // Absent when evicted: already given to the newcomer.
        if let Some(i) = held.iter().position(|h| h.id == self.id) {
            held.remove(i);
            if held.is_empty() {
                open.by_peer.remove(&self.peer);
            }
            open.all -= 1;
        }
    }
}

/// A stream whose writes fail (`TimedOut`) once the peer has taken no byte
/// for `limit`: a client that stops reading is dropped, not waited on.
/// Any progress restarts the clock, so a slow but live reader is served.
pub(crate) struct WriteDeadline<I> {
    io: I,
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    /// Whether `timer` runs (a write is waiting on the peer).
    armed: bool,
    /// Called once, when the deadline passes.
    on_timeout: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<I> WriteDeadline<I> {
    pub(crate) fn new(
        io: I,
        limit: Duration,
        on_timeout: impl FnOnce() + Send + Sync + 'static,
    ) -> Self {
        WriteDeadline {
            io,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            armed: false,
            on_timeout: Some(Box::new(on_timeout)),
        }
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        if !self.armed {
            self.armed = true;
            self.timer.as_mut().reset(Instant::now() + self.limit);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if let Some(count) = self.on_timeout.take() {
            count();
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client took no byte of its answer for {:?} (control.request_timeout)",
                self.limit
            ),
        )))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_peer_is_an_ipv4_address_or_an_ipv6_64() {
        let p = |s: &str| Peer::of(s.parse().unwrap());
        assert_eq!(p("10.0.0.1"), Peer::V4("10.0.0.1".parse().unwrap()));
        assert_eq!(p("::ffff:10.0.0.1"), p("10.0.0.1"));
        assert_ne!(p("10.0.0.1"), p("10.0.0.2"));
        assert_eq!(p("2001:db8:1:2::1"), p("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
        assert_eq!(p("::1"), Peer::V6Net(0));
    }

    #[test]
    fn each_peer_gets_its_share_of_the_cap_and_gives_it_back() {
        let slots = Slots::new(4, 2);
        let (a, b, c) = (
            Peer::of("127.0.0.2".parse().unwrap()),
            Peer::of("127.0.0.3".parse().unwrap()),
            Peer::Socket,
        );
        let take = |p| slots.take(p).map(|t| (t.slot, t.evicted));
        let (a1, _) = take(a).unwrap();
        let _a2 = take(a).unwrap();
        assert_eq!(take(a).err(), Some("peer_cap"));
        let _b1 = take(b).unwrap();
        let _c1 = take(c).unwrap();
        // Full, and b holds one fewer than the greediest (a): refused.
        assert_eq!(take(b).err(), Some("connection_cap"));
        drop(a1);
        assert_eq!(slots.open(), 3);
        let (_b2, evicted) = take(b).unwrap();
        assert!(!evicted);
        // Full again, and spread evenly: nobody holds two more than b.
        assert_eq!(take(b).err(), Some("peer_cap"));
        assert_eq!(take(c).err(), Some("connection_cap"));
        assert_eq!(slots.inner.open.lock().unwrap().by_peer.len(), 3);
    }

    /// At the cap, a peer holding two fewer than the greediest takes that
    /// peer's oldest slot; the evicted connection is told, and its drop
    /// gives nothing back twice.
    #[tokio::test]
    async fn a_newcomer_takes_the_oldest_slot_of_the_greediest_peer() {
        let slots = Slots::new(4, 4);
        let (hog, probe) = (
            Peer::of("127.0.0.2".parse().unwrap()),
            Peer::of("127.0.0.3".parse().unwrap()),
        );
        let hogs: Vec<Slot> = (0..4).map(|_| slots.take(hog).unwrap().slot).collect();
        let t = slots.take(probe).unwrap();
        assert!(t.evicted);
        assert_eq!(slots.open(), 4);
        // The oldest was told, at once; the others were not.
        tokio::time::timeout(Duration::from_secs(1), hogs[0].evicted())
            .await
            .expect("the oldest connection is told to close");
        for h in &hogs[1..] {
            assert!(tokio::time::timeout(Duration::from_millis(20), h.evicted())
                .await
                .is_err());
        }
        let mut hogs = hogs.into_iter();
        drop(hogs.next());
        assert_eq!(slots.open(), 4, "an evicted slot is not given back twice");
        // hog 3, probe 1: the probe's peer may take one more from it...
        let t2 = slots.take(probe).unwrap();
        assert!(t2.evicted);
        // ...but at 2 and 2 nobody takes from anybody.
        assert_eq!(slots.take(probe).err(), Some("connection_cap"));
        assert_eq!(slots.take(hog).err(), Some("connection_cap"));
        let rest: Vec<Slot> = hogs.collect();
        drop(rest);
        drop((t, t2));
        assert_eq!(slots.open(), 0);
        assert!(slots.inner.open.lock().unwrap().by_peer.is_empty());
    }

    /// A peer that takes nothing: the write fails once `limit` has passed,
    /// counted once; a peer that reads keeps it going.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_does_not_take_fails_after_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let timeouts = Arc::new(AtomicUsize::new(0));
        let counted = timeouts.clone();
        let mut w = WriteDeadline::new(ours, Duration::from_secs(10), move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        // The peer reads slowly: 1 KiB every 9 s is progress enough.
        let reader = tokio::spawn(async move {
            let mut buf = [0; 1024];
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(9)).await;
                theirs.read_exact(&mut buf).await.unwrap();
            }
            theirs
        });
        w.write_all(&[0; 5 * 1024]).await.unwrap();
        let _theirs = reader.await.unwrap();
        assert_eq!(timeouts.load(Ordering::Relaxed), 0);
        // Then stops reading, with the buffer full.
        let start = Instant::now();
        let e = w.write_all(&[0; 4096]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
        assert_eq!(timeouts.load(Ordering::Relaxed), 1);
        assert!(w.write_all(&[0; 10]).await.is_err());
        assert_eq!(timeouts.load(Ordering::Relaxed), 1);
    }
}
