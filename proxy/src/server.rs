//! Listeners and the accept loop: one task per session, a cap on sessions
//! (enforced with FAILURE, never by refusing to read), backoff on accept
//! errors, and a drain that closes listeners first.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agiproxy_config::Config;
use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::session::{self, SessionRecord};
use crate::snapshot::Snapshot;

/// Pending connections the kernel may queue per listener.
const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listeners[{index}] ({name}): cannot listen on {addr}: {source}; is another process using it?")]
    Bind {
        index: usize,
        name: String,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// State every session shares.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub drain: Drain,
    active: AtomicUsize,
    records: broadcast::Sender<SessionRecord>,
}

impl Shared {
    pub(crate) fn publish(&self, rec: SessionRecord) {
        if self.records.receiver_count() > 0 {
            let _ = self.records.send(rec);
        }
    }
}

/// A running proxy: its listeners are bound and accepting.
pub struct Server {
    shared: Arc<Shared>,
    addrs: Vec<(String, SocketAddr)>,
}

impl Server {
    /// Binds every listener (all or none) and starts accepting.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let mut bound = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let listener = bind(l.address).map_err(|source| ServerError::Bind {
                index,
                name: l.name.clone(),
                addr: l.address,
                source,
            })?;
            let addr = listener.local_addr().unwrap_or(l.address);
            bound.push((l.name.clone(), addr, listener));
        }
        let (records, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config, 1, None)),
            metrics: Metrics::new(),
            drain: Drain::new(),
            active: AtomicUsize::new(0),
            records,
        });
        shared.snapshot.load().activate();
        let mut addrs = Vec::new();
        for (name, addr, listener) in bound {
            tracing::info!(listener = %name, %addr, "listening for Asterisk");
            addrs.push((name.clone(), addr));
            tokio::spawn(accept_loop(
                shared.clone(),
                Arc::from(name.as_str()),
                listener,
            ));
        }
        Ok(Server { shared, addrs })
    }

    /// Bound addresses (a port 0 in the config is resolved here).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.iter().map(|(_, a)| *a).collect()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// A feed of finished sessions (for tests, the demo and tooling).
    pub fn subscribe(&self) -> broadcast::Receiver<SessionRecord> {
        self.shared.records.subscribe()
    }

    pub fn active_sessions(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Stops accepting at once; sessions in flight go on.
    pub fn stop_accepting(&self) {
        self.shared.drain.start();
    }

    /// Drains: stop accepting, wait for sessions up to `deadline`, then cut
    /// the rest. True when every session finished by itself.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.shared.drain.finish(deadline).await
    }

    /// Ends every session now (a second signal).
    pub fn abort(&self) {
        self.shared.drain.start();
        self.shared.drain.force.cancel();
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(shared: Arc<Shared>, name: Arc<str>, listener: TcpListener) {
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            biased;
            _ = shared.drain.stop_accepting.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    spawn_session(&shared, &name, stream, peer);
                }
                Err(e) => {
                    // Out of descriptors or memory: slow down rather than spin.
                    tracing::warn!(listener = %name, error = %e, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    // Connections already queued by the kernel would be reset when the
    // listener closes, which Asterisk reads as SUCCESS: serve them too.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while let std::task::Poll::Ready(Ok((stream, peer))) = listener.poll_accept(&mut cx) {
        spawn_session(&shared, &name, stream, peer);
    }
    tracing::info!(listener = %name, "listener closed");
}

fn spawn_session(shared: &Arc<Shared>, name: &Arc<str>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let snap = shared.snapshot.load_full();
    let max = snap.config.limits.max_sessions;
    let sh = shared.clone();
    let name = name.clone();
    if shared.active.fetch_add(1, Ordering::Relaxed) >= max {
        shared.active.fetch_sub(1, Ordering::Relaxed);
        shared
            .drain
            .sessions
            .spawn(session::reject_overloaded(sh, snap, name, stream, peer));
        return;
    }
    shared.metrics.active_sessions.inc();
    shared.drain.sessions.spawn(async move {
        let guard = ActiveGuard(sh.clone());
        session::serve(sh, snap, name, stream, peer).await;
        drop(guard);
    });
}

/// Counts a session as active until it ends, however it ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active_sessions.dec();
    }
}
