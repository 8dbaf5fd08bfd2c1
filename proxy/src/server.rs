//! Listeners, the accept loop and config changes at run time.
//!
//! One task per session; a cap on sessions (enforced with FAILURE, never by
//! refusing to read); backoff on accept errors; a drain that closes
//! listeners first. A config change is validated and compiled off to the
//! side, new listeners are bound before removed ones close (a bind failure
//! refuses the whole change), and the new snapshot is swapped in atomically:
//! sessions in flight keep the snapshot they started with.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agiproxy_config::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::session::{self, SessionRecord, Shared};
use crate::snapshot::{text_hash, ConfigMeta, Snapshot};

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

/// Why a config change was refused. The running config is untouched.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid config:\n{0}")]
    Invalid(agiproxy_config::ConfigErrors),
    #[error("the running generation is {current}, not {expected}")]
    Stale { current: u64, expected: u64 },
    #[error(transparent)]
    Bind(#[from] ServerError),
    #[error("no config file to reload from (the config came from {0})")]
    NoFile(String),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// An edit of the running config (e.g. a split) found nothing to edit.
    #[error("{0}")]
    NotFound(String),
    /// The running config text cannot be edited (it is not a YAML mapping).
    #[error("{0}")]
    Uneditable(String),
}

/// The result of a config change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub generation: u64,
    pub hash: u64,
    pub dry_run: bool,
    /// False when the text equals the running config's (nothing was done).
    pub changed: bool,
}

/// Where the starting config came from.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The config text (YAML or JSON), for `GET /v1/config` and the hash.
    pub text: Arc<str>,
    /// `file:PATH`, `embedded`, ...
    pub source: String,
    /// The file that reloads read.
    pub file: Option<PathBuf>,
}

struct ListenerEntry {
    configured: SocketAddr,
    bound: SocketAddr,
    stop: CancellationToken,
}

/// What config changes share: serialised by the lock, which also holds the
/// bound listeners.
struct Changes {
    listeners: tokio::sync::Mutex<Vec<ListenerEntry>>,
    file: Option<PathBuf>,
    started: Instant,
}

/// A running proxy: its listeners are bound and accepting. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    changes: Arc<Changes>,
}

impl Server {
    /// Binds every listener (all or none) and starts accepting.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let origin = Origin {
            text: Arc::from(""),
            source: "embedded".into(),
            file: None,
        };
        Server::start_with(config, origin).await
    }

    pub async fn start_with(config: Config, origin: Origin) -> Result<Server, ServerError> {
        let bound = bind_all(&config, &[])?;
        let meta = ConfigMeta::new(1, &origin.source, origin.text);
        let shared = Arc::new(Shared::new(Snapshot::build(config, meta, None)));
        let changes = Arc::new(Changes {
            listeners: tokio::sync::Mutex::new(Vec::new()),
            file: origin.file,
            started: Instant::now(),
        });
        shared.snapshot.load().activate();
        shared.metrics.config_generation.set(1);
        let mut table = changes.listeners.lock().await;
        for (configured, listener) in bound {
            table.push(spawn_listener(&shared, configured, listener));
        }
        drop(table);
        Ok(Server { shared, changes })
    }

    /// Bound addresses, in config order (a port 0 in the config is resolved here).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let snap = self.shared.snapshot.load();
        let table = self.changes.listeners.try_lock();
        snap.config
            .listeners
            .iter()
            .map(|l| match &table {
                Ok(t) => t
                    .iter()
                    .find(|e| e.configured == l.address)
                    .map_or(l.address, |e| e.bound),
                Err(_) => l.address,
            })
            .collect()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    pub fn uptime(&self) -> Duration {
        self.changes.started.elapsed()
    }

    pub fn config_file(&self) -> Option<&PathBuf> {
        self.changes.file.as_ref()
    }

    /// A feed of finished sessions (for tests, the demo and tooling).
    pub fn subscribe(&self) -> broadcast::Receiver<SessionRecord> {
        self.shared.subscribe()
    }

    pub fn active_sessions(&self) -> usize {
        self.shared.active()
    }

    pub fn is_draining(&self) -> bool {
        self.shared.drain.is_draining()
    }

    /// Validates and applies a config text. With `dry_run`, validates only.
    /// `if_match`: refuse unless this generation is the running one.
    pub async fn apply(
        &self,
        text: &str,
        source: &str,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        self.change(source, dry_run, if_match, |_| Ok(text.to_string()))
            .await
    }

    /// Applies an edit of the running config text, made while no other
    /// change can slip in between (no lost update, even without `If-Match`).
    pub async fn apply_edit(
        &self,
        source: &str,
        if_match: Option<u64>,
        edit: impl FnOnce(&str) -> Result<String, ApplyError>,
    ) -> Result<Applied, ApplyError> {
        self.change(source, false, if_match, edit).await
    }

    async fn change(
        &self,
        source: &str,
        dry_run: bool,
        if_match: Option<u64>,
        text: impl FnOnce(&str) -> Result<String, ApplyError>,
    ) -> Result<Applied, ApplyError> {
        let result = self.apply_inner(text, source, dry_run, if_match).await;
        let label = match &result {
            Ok(a) if a.dry_run => "dry_run",
            Ok(a) if !a.changed => "unchanged",
            Ok(_) => "applied",
            Err(ApplyError::Invalid(_)) => "invalid",
            Err(ApplyError::Stale { .. }) => "stale",
            Err(ApplyError::Bind(_)) => "bind_failed",
            // A split naming a route that does not exist: a request error,
            // not a refused config.
            Err(ApplyError::NotFound(_)) => "not_found",
            Err(_) => "error",
        };
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(a) if a.changed && !a.dry_run => {
                tracing::info!(generation = a.generation, hash = %format!("{:016x}", a.hash), source, "config applied")
            }
            Err(e) => {
                tracing::warn!(source, error = %e, "config change refused; the running config is unchanged")
            }
            _ => {}
        }
        result
    }

    async fn apply_inner(
        &self,
        text: impl FnOnce(&str) -> Result<String, ApplyError>,
        source: &str,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        let mut table = self.changes.listeners.lock().await;
        let current = self.shared.snapshot.load_full();
        let generation = current.meta.generation;
        if let Some(expected) = if_match.filter(|g| *g != generation) {
            return Err(ApplyError::Stale {
                current: generation,
                expected,
            });
        }
        let text = text(&current.meta.text)?;
        let text = text.as_str();
        let config = agiproxy_config::from_yaml_str(text).map_err(ApplyError::Invalid)?;
        let hash = text_hash(text);
        if dry_run || hash == current.meta.hash {
            return Ok(Applied {
                generation,
                hash,
                dry_run,
                changed: hash != current.meta.hash,
            });
        }
        // New listeners first: a bind failure refuses the whole change.
        let kept: Vec<SocketAddr> = table.iter().map(|e| e.configured).collect();
        let bound = bind_all(&config, &kept)?;
        let meta = ConfigMeta::new(generation + 1, source, Arc::from(text));
        let next = Arc::new(Snapshot::build(config, meta, Some(&current)));
        if next.config.control != current.config.control {
            tracing::warn!("the control block changed; it takes effect at the next restart");
        }
        let old = self.shared.snapshot.swap(next.clone());
        next.activate();
        old.retire();
        for (configured, listener) in bound {
            table.push(spawn_listener(&self.shared, configured, listener));
        }
        // Then close the listeners the new config no longer has.
        table.retain(|e| {
            let keep = next
                .config
                .listeners
                .iter()
                .any(|l| l.address == e.configured);
            if !keep {
                tracing::info!(address = %e.bound, "listener removed by config change");
                e.stop.cancel();
            }
            keep
        });
        self.shared
            .metrics
            .config_generation
            .set(generation as i64 + 1);
        Ok(Applied {
            generation: generation + 1,
            hash,
            dry_run: false,
            changed: true,
        })
    }

    /// Re-reads the config file and applies it.
    pub async fn reload_file(&self) -> Result<Applied, ApplyError> {
        let Some(path) = self.changes.file.clone() else {
            let source = self.shared.snapshot.load().meta.source.to_string();
            return Err(ApplyError::NoFile(source));
        };
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(source) => {
                self.shared
                    .metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                let e = ApplyError::Read { path, source };
                tracing::warn!(error = %e, "config reload refused; the running config is unchanged");
                return Err(e);
            }
        };
        let source = format!("file:{}", path.display());
        self.apply(&text, &source, false, None).await
    }

    /// Whether the config file's content differs from the running config.
    pub fn differs_from_file(&self) -> bool {
        let Some(path) = &self.changes.file else {
            return false;
        };
        match std::fs::read_to_string(path) {
            Ok(text) => text_hash(&text) != self.shared.snapshot.load().meta.hash,
            Err(_) => true,
        }
    }

    /// Listener names and bound addresses.
    pub async fn listeners(&self) -> Vec<(String, SocketAddr)> {
        let table = self.changes.listeners.lock().await;
        let snap = self.shared.snapshot.load();
        table
            .iter()
            .map(|e| {
                let name = snap
                    .config
                    .listeners
                    .iter()
                    .find(|l| l.address == e.configured)
                    .map_or("?", |l| &l.name);
                (name.to_string(), e.bound)
            })
            .collect()
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
        self.shared.drain.force.fire();
    }

    /// Resolves when a drain has started (signal or control API).
    pub async fn draining(&self) {
        self.shared.drain.stop_accepting.cancelled().await
    }
}

/// Binds the listeners of `config` not already bound (`kept`), all or none.
fn bind_all(
    config: &Config,
    kept: &[SocketAddr],
) -> Result<Vec<(SocketAddr, TcpListener)>, ServerError> {
    let mut bound = Vec::new();
    for (index, l) in config.listeners.iter().enumerate() {
        if kept.contains(&l.address) {
            continue;
        }
        let listener = bind(l.address).map_err(|source| ServerError::Bind {
            index,
            name: l.name.clone(),
            addr: l.address,
            source,
        })?;
        bound.push((l.address, listener));
    }
    Ok(bound)
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
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux): set
    // once here rather than with a system call per session.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

fn spawn_listener(
    shared: &Arc<Shared>,
    configured: SocketAddr,
    listener: TcpListener,
) -> ListenerEntry {
    let bound = listener.local_addr().unwrap_or(configured);
    let stop = shared.drain.stop_accepting.child_token();
    tracing::info!(address = %bound, "listening for Asterisk");
    tokio::spawn(accept_loop(
        shared.clone(),
        configured,
        listener,
        stop.clone(),
    ));
    ListenerEntry {
        configured,
        bound,
        stop,
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    configured: SocketAddr,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    // Made once: a new `cancelled()` per accept would register and drop a
    // waiter under the token's lock for every call.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    spawn_session(&shared, configured, stream, peer);
                }
                Err(e) => {
                    // Out of descriptors or memory: slow down rather than spin.
                    tracing::warn!(address = %configured, error = %e, ?backoff, "accept failed");
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
        spawn_session(&shared, configured, stream, peer);
    }
    tracing::info!(address = %configured, "listener closed");
}

fn spawn_session(
    shared: &Arc<Shared>,
    configured: SocketAddr,
    stream: TcpStream,
    peer: SocketAddr,
) {
    // TCP_NODELAY: inherited from the listener (see `bind`).
    // The one snapshot load of this session: it keeps this config to its end.
    let snap = shared.snapshot.load_full();
    let name = snap.listener_name(configured);
    let max = snap.config.limits.max_sessions;
    let sh = shared.clone();
    let Some(guard) = shared.admit(max) else {
        shared
            .drain
            .sessions
            .spawn(session::reject_overloaded(sh, snap, name, stream, peer));
        return;
    };
    shared
        .drain
        .sessions
        .spawn(session::serve(sh, snap, name, stream, peer, guard));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions rely on it: without TCP_NODELAY every command to Asterisk
    /// could wait for Nagle's algorithm.
    #[tokio::test]
    async fn accepted_sessions_have_nodelay_without_a_call_per_session() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
