//! The running proxy and config changes at run time (listeners and the
//! accept loop: [`crate::listener`]).
//!
//! One task per session; a cap on sessions (enforced with FAILURE, never by
//! refusing to read); a drain that closes listeners first. A config change is validated and compiled off to the
//! side, new listeners are bound before removed ones close (a bind failure
//! refuses the whole change), and the new snapshot is swapped in atomically:
//! sessions in flight keep the snapshot they started with.
//!
//! Config text is untrusted (an API body, a file anyone with write access
//! can replace), so it is read and parsed on blocking threads, one parse at
//! a time, within `limits.max_config_bytes` and the parser's bounds; the
//! change lock is taken only to swap. A caller that gives up (the API's
//! request timeout) stops waiting; the parse it started runs out, bounded.

mod apply;
mod file;
mod series;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agiproxy_config::Config;
use tokio::sync::{broadcast, Semaphore};

pub use crate::listener::ServerError;
use crate::listener::{bind_all, spawn_listener, ListenerEntry};
use crate::metrics::Metrics;
use crate::session::{SessionRecord, Shared};
use crate::snapshot::{text_hash, ConfigMeta, Snapshot};

/// Why a config change was refused. The running config is untouched.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid config:\n{0}")]
    Invalid(agiproxy_config::ConfigErrors),
    /// `expected`: the generation `If-Match` named; None for an edit that
    /// lost to other changes three times.
    #[error("the running generation is {current}, not {}", expected.map_or("the one edited".into(), |g| g.to_string()))]
    Stale { current: u64, expected: Option<u64> },
    #[error(transparent)]
    Bind(#[from] ServerError),
    #[error("no config file to reload from (the config came from {0})")]
    NoFile(String),
    #[error(transparent)]
    File(#[from] agiproxy_config::FileError),
    /// A parse that could not finish (a bug: it panicked).
    #[error("the config could not be parsed: {0}")]
    Internal(String),
    /// An edit of the running config (e.g. a split) found nothing to edit.
    #[error("{0}")]
    NotFound(String),
    /// The running config text cannot be edited (it is not a YAML mapping).
    #[error("{0}")]
    Uneditable(String),
    /// What the change was made for is no longer what runs (a rollout
    /// action whose rollout a reload replaced).
    #[error("{0}")]
    Conflict(String),
}

impl From<crate::rollout::overrides::EditError> for ApplyError {
    fn from(e: crate::rollout::overrides::EditError) -> ApplyError {
        use crate::rollout::overrides::EditError;
        match e {
            EditError::NotFound(m) => ApplyError::NotFound(m),
            EditError::Uneditable(m) => ApplyError::Uneditable(m),
        }
    }
}

/// Makes the text of a change from the running config's text. Shared: a
/// whole text given is handed on as it is, not copied (a body waiting for
/// its parse was held twice, beside the budget that counts it once).
type Edit = Arc<dyn Fn(&str) -> Result<Arc<str>, ApplyError> + Send + Sync>;

/// What a change must still meet when it is swapped in, given the running
/// config and the new one:
/// building a large config takes a second or more after the text was made
/// (a rollout override checked only then could take effect before the
/// swap: audit).
pub type SwapCheck = Arc<
    dyn Fn(&agiproxy_config::Config, &agiproxy_config::Config) -> Result<(), ApplyError>
        + Send
        + Sync,
>;

/// The result of a config change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub generation: u64,
    pub hash: u64,
    pub dry_run: bool,
    /// False when the text equals the running config's (nothing was done).
    pub changed: bool,
    /// A text sent whole through the API: the running rollouts' overrides
    /// it lacks, of the same rollout, which applying it drops (a dry run:
    /// would drop). A reload from the file keeps them instead.
    pub dropped: Vec<crate::rollout::overrides::Carried>,
}

/// The source of a config text sent through the control API. Any other
/// text given to [`Server::apply`] is the file's (a reload, SIGHUP, the
/// watch; `test` in tests).
pub const API_SOURCE: &str = "api";

/// How a change makes its text, and what it keeps of the running config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A whole text from the API, taken as it is.
    Text,
    /// A whole text from the file: keeps the overrides of the running
    /// rollouts it lacks while they stay the same rollout.
    File,
    /// An edit of the running text.
    Edit,
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

pub use crate::rollout::file::FileRollouts;

/// Each listener of `snap` with the address it is bound to in `table`
/// (both of one config: read under the table's lock). The n-th listener of
/// an address (several may ask for port 0) is the n-th entry of it.
fn listing(table: &[ListenerEntry], snap: &Snapshot) -> Vec<(String, SocketAddr)> {
    let listeners = &snap.config.listeners;
    listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let n = listeners[..i]
                .iter()
                .filter(|o| o.address == l.address)
                .count();
            let mut of_address = table.iter().filter(|e| e.configured == l.address);
            let bound = of_address.nth(n).map_or(l.address, |e| e.bound);
            (l.name.clone(), bound)
        })
        .collect()
}

/// Records the peers' judged rollbacks in the rollouts of `snap`, before
/// any call (the identities were compared when they were read).
fn adopt_decisions(snap: &Snapshot, decisions: &[(String, crate::session::rollout::Decision)]) {
    for (route, d) in decisions {
        let live = snap
            .router
            .routes()
            .iter()
            .find(|r| &*r.name == route.as_str())
            .and_then(|r| r.rollout.as_deref());
        if let Some(ro) = live {
            if ro.live.decide(d.clone()) {
                tracing::warn!(route = %route, at = %agiproxy_config::format_ms(d.at_ms), reason = %d.reason, source = %d.source, "rollout rolled back: decision adopted from a peer at start");
            }
        }
    }
}

/// What config changes share: serialised by the lock, which also holds the
/// bound listeners.
struct Changes {
    listeners: tokio::sync::Mutex<Vec<ListenerEntry>>,
    /// The control API's address, bound at start (see
    /// [`Server::note_control_address`]).
    control: std::sync::OnceLock<SocketAddr>,
    /// The `control:` block the process started with: the one in effect
    /// until a restart, whatever later configs say.
    control_in_effect: agiproxy_config::Control,
    /// Each listener's name and bound address, as of the last change.
    listing: Mutex<Vec<(String, SocketAddr)>>,
    /// Listeners a change removed, until their sockets are closed (they
    /// serve what the kernel queued first).
    retiring: Mutex<Vec<(SocketAddr, tokio::sync::oneshot::Receiver<()>)>>,
    /// One parse of a config text at a time, edits' included: each may take
    /// a few hundred MB and a second for the largest text allowed.
    parses: Arc<Semaphore>,
    /// Edits of the running text, one at a time from reading it to applying
    /// the result: concurrent edits (splits, overrides) then never find the
    /// text changed under them by another edit (an audit saw 7 of 10 at
    /// once refused as stale after three tries).
    edits: tokio::sync::Mutex<()>,
    file: Option<PathBuf>,
    /// Content hash of the config file as last read (None: not readable),
    /// so that a status call never reads the file.
    file_hash: Mutex<Option<u64>>,
    /// The rollouts of the last text parsed whose hash was then the
    /// file's, with that hash: the file's rollouts while it still is (see
    /// [`Server::file_rollouts`]).
    file_rollouts: Mutex<Option<(u64, Arc<FileRollouts>)>>,
    /// The rollouts of the file text last applied (or found to be the
    /// running text): an override they had and a new text of the file lacks
    /// was deleted from the file. Not the last parsed: a text refused, or
    /// read while another waited its turn, is no history (review).
    file_applied: Mutex<Option<Arc<FileRollouts>>>,
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
        let file = origin
            .file
            .as_ref()
            .map(|_| (text_hash(&origin.text), Arc::new(FileRollouts::of(&config))));
        Server::start_inner(config, origin, file, &[]).await
    }

    /// [`Server::start_with`] what the peers run (`crate::rollout::adopt`):
    /// `config` is the file's (`file_text`, declaring `file_rollouts`) with
    /// the rollout overrides adopted from them written in (the status then
    /// says that the running config differs from the file, and how), and
    /// the peers' judged rollbacks `decisions` (by route) are known before
    /// the first call.
    pub async fn start_adopted(
        config: Config,
        origin: Origin,
        file_text: &str,
        file_rollouts: FileRollouts,
        decisions: &[(String, crate::session::rollout::Decision)],
    ) -> Result<Server, ServerError> {
        let file = origin
            .file
            .as_ref()
            .map(|_| (text_hash(file_text), Arc::new(file_rollouts)));
        Server::start_inner(config, origin, file, decisions).await
    }

    async fn start_inner(
        config: Config,
        origin: Origin,
        file: Option<(u64, Arc<FileRollouts>)>,
        decisions: &[(String, crate::session::rollout::Decision)],
    ) -> Result<Server, ServerError> {
        let bound = bind_all(&config, &[], &[])?;
        let meta = ConfigMeta::new(1, &origin.source, origin.text);
        crate::fds::init();
        let file_hash = file.as_ref().map(|(h, _)| *h);
        let file_applied = file.as_ref().map(|(_, r)| r.clone());
        let file_rollouts = file;
        let control_in_effect = config.control.clone();
        let shared = Arc::new(Shared::new(Snapshot::build(config, meta, None)));
        let changes = Arc::new(Changes {
            listeners: tokio::sync::Mutex::new(Vec::new()),
            retiring: Mutex::new(Vec::new()),
            listing: Mutex::new(Vec::new()),
            control: std::sync::OnceLock::new(),
            control_in_effect,
            parses: Arc::new(Semaphore::new(1)),
            edits: tokio::sync::Mutex::new(()),
            file: origin.file,
            file_hash: Mutex::new(file_hash),
            file_rollouts: Mutex::new(file_rollouts),
            file_applied: Mutex::new(file_applied),
            started: Instant::now(),
        });
        shared.snapshot.load().activate();
        adopt_decisions(&shared.snapshot.load(), decisions);
        shared.metrics.config_generation.set(1);
        let mut table = changes.listeners.lock().await;
        for b in bound {
            table.push(spawn_listener(&shared, b));
        }
        *changes.listing.lock().unwrap_or_else(|p| p.into_inner()) =
            listing(&table, &shared.snapshot.load());
        drop(table);
        tokio::spawn(series::retire_session_series(Arc::downgrade(&shared)));
        Ok(Server { shared, changes })
    }

    /// Bound addresses, in config order (a port 0 in the config is resolved here).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound_listeners().into_iter().map(|(_, a)| a).collect()
    }

    /// Each listener's name and bound address, in config order, as the
    /// last change (or the start) left them: both of one config (see
    /// [`listing`]). While a change holds the table, the listing before it:
    /// its new listeners are not serving yet.
    pub fn bound_listeners(&self) -> Vec<(String, SocketAddr)> {
        // Kept by the last change (or the start) under the table's lock:
        // read at any time, also while a change holds the table (review:
        // a status at start, while the watch's first read applied a
        // change, fell back to the configured port 0).
        self.changes
            .listing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

    /// Where the control API listens (bound at start, kept to the exit):
    /// a reload that adds a listener on its port is refused naming it.
    pub fn note_control_address(&self, addr: SocketAddr) {
        let _ = self.changes.control.set(addr);
    }

    pub fn active_sessions(&self) -> usize {
        self.shared.active()
    }

    pub fn is_draining(&self) -> bool {
        self.shared.drain.is_draining()
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
    /// Announces a stop ahead of the drain: not ready any more (`/readyz`
    /// answers 503), calls still served.
    pub fn announce_stop(&self) {
        self.shared.drain.announce_stop();
    }

    /// Announced to stop, or draining: not ready.
    pub fn is_stopping(&self) -> bool {
        self.shared.drain.is_stopping()
    }

    /// Waits (at most 2 s) for the listeners a change removed on the
    /// addresses `config` opens to have closed: their accept loops serve the
    /// kernel's queue first, and a change that put the address back at once
    /// failed to bind it, blaming "another process" (reload audit: 5 of 60
    /// quick flips refused).
    async fn retired_closed(&self, config: &Config, kept: &[SocketAddr]) {
        let waits: Vec<_> = {
            let mut retiring = self
                .changes
                .retiring
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            retiring.retain_mut(|(_, closed)| {
                !matches!(
                    closed.try_recv(),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed)
                )
            });
            let (wanted, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *retiring)
                .into_iter()
                .partition(|(a, _)| {
                    !kept.contains(a) && config.listeners.iter().any(|l| l.address == *a)
                });
            *retiring = rest;
            wanted
        };
        if waits.is_empty() {
            return;
        }
        let all = futures_util::future::join_all(waits.into_iter().map(|(_, closed)| closed));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), all).await;
    }

    pub fn stop_accepting(&self) {
        self.shared.drain.start();
    }

    /// Drains: stop accepting, wait for sessions up to `deadline`, then cut
    /// the rest. True when every session finished by itself.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let at = std::time::SystemTime::now() + deadline;
        let at = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().try_into().unwrap_or(i64::MAX));
        self.shared.metrics.drain_deadline.set(at);
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

#[cfg(test)]
mod tests {
    use super::apply::{errors_for_log, LOG_ERRORS_BYTES};
    use super::series::live_labels;
    use super::*;
    use agiproxy_config::{ConfigError, ConfigErrors};

    /// A listener removed and put back at once is bound again: the change
    /// waits for the removed one's socket to close (reload audit: 5 of 60
    /// quick flips were refused, "is another process using it?").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listener_removed_and_put_back_at_once_is_bound_again() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let text = |extra: bool| {
            let extra = if extra {
                format!("  - {{ name: extra, address: \"127.0.0.1:{port}\" }}\n")
            } else {
                String::new()
            };
            format!(
                "version: 1\nlisteners:\n  - {{ name: a, address: \"127.0.0.1:0\" }}\n{extra}\
                 routes: [{{ name: all, pool: p }}]\n\
                 pools: [{{ name: p, backends: [{{ address: \"127.0.0.1:1\" }}] }}]\n"
            )
        };
        let config = agiproxy_config::from_yaml_str(&text(true)).unwrap();
        let server = Server::start(config).await.unwrap();
        for round in 0..100 {
            for extra in [false, true] {
                if let Err(e) = server.apply(&text(extra), "test", false, None).await {
                    panic!("round {round}, extra {extra}: {e}");
                }
            }
        }
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    }

    /// Errors as long as the keys they quote are cut to `LOG_ERRORS_BYTES`
    /// on a character boundary, with a note; ordinary ones are kept whole.
    #[test]
    fn the_errors_of_a_refusal_fit_one_bounded_log_line() {
        let few = ConfigErrors(vec![ConfigError::new("a", "x"), ConfigError::new("", "y")]);
        assert_eq!(errors_for_log(&few), "a: x; y");
        let key = "é".repeat(5_000);
        let long = ConfigErrors(
            (0..101)
                .map(|_| ConfigError::new("", format!("unknown field `{key}`")))
                .collect(),
        );
        let line = errors_for_log(&long);
        assert!(line.len() < LOG_ERRORS_BYTES + 100, "{}", line.len());
        assert!(line.ends_with(" … (cut; the API's answer and `agiproxy check` have them all)"));
    }

    /// A route, pool or backend a reload removed keeps its `sessions_total`
    /// labels live while a session still runs on it (metrics audit: a call
    /// of hours lost its series after 10 minutes, and its end was counted
    /// in a new one `rate()` never saw); once the session ends, they go.
    #[tokio::test]
    async fn labels_of_a_replaced_config_stay_live_while_its_sessions_run() {
        let text = |route: &str, pool: &str, backend: &str| {
            format!(
                "version: 1\nlisteners:\n  - name: a\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: {route}\n    pool: {pool}\npools:\n  - name: {pool}\n    backends: [{{ address: \"{backend}\" }}]\n"
            )
        };
        let config = agiproxy_config::from_yaml_str(&text("old", "p", "127.0.0.1:1")).unwrap();
        let server = Server::start(config).await.unwrap();
        // A session on the first config, holding its backend.
        let held = server.snapshot();
        let pool = held.pool("p").unwrap();
        let lease = pool.lease(&pool.members().backends[0]).unwrap();
        server
            .apply(&text("new", "p", "127.0.0.1:2"), "test", false, None)
            .await
            .unwrap();
        let live = live_labels(&server.shared);
        for (set, old, new) in [
            (&live.routes, "old", "new"),
            (&live.backends, "127.0.0.1:1", "127.0.0.1:2"),
        ] {
            assert!(set.contains(old) && set.contains(new), "{set:?}");
        }
        // The old config is let go of (the replaced config is then freed on
        // a blocking thread: a moment); the backend that left the pool still
        // holds a session (as after a DNS change, with no old config).
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(2);
        let live = loop {
            let live = live_labels(&server.shared);
            if !live.routes.contains("old") || Instant::now() > deadline {
                break live;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(!live.routes.contains("old"), "{:?}", live.routes);
        assert!(live.backends.contains("127.0.0.1:1"), "{:?}", live.backends);
        // Its session ends.
        drop(lease);
        let live = live_labels(&server.shared);
        assert!(
            !live.backends.contains("127.0.0.1:1"),
            "{:?}",
            live.backends
        );
    }

    /// A reload that changes `split_key` while the rollout splits calls is
    /// refused whole, through the same path as every change (file, API),
    /// and the running config is kept; the same change with a new rollout
    /// (another start) is applied.
    #[tokio::test]
    async fn a_split_key_change_mid_rollout_is_refused_on_apply() {
        let now = crate::session::rollout::now_ms();
        let text = |start_ms: i64, key: &str| {
            format!(
                "version: 1\nlisteners:\n  - name: a\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: ivr\n    split_key: {key}\n    rollout:\n      from: blue\n      to: green\n      steps: [30, 100]\n      step_duration: 1h\n      start: \"{}\"\npools:\n  - name: blue\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n  - name: green\n    backends: [{{ address: \"127.0.0.1:2\" }}]\n",
                agiproxy_config::format_ms(start_ms)
            )
        };
        let started = now - 60_000;
        let config = agiproxy_config::from_yaml_str(&text(started, "agi_uniqueid")).unwrap();
        let server = Server::start(config).await.unwrap();
        let e = server
            .apply(&text(started, "agi_arg_1"), "test", false, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[0].split_key"), "{e}");
        assert_eq!(server.snapshot().meta.generation, 1);
        let applied = server
            .apply(&text(started + 1_000, "agi_arg_1"), "test", false, None)
            .await
            .unwrap();
        assert!(applied.changed);
    }

    /// The warning compares a config's `control:` block with the one in
    /// effect (the start's), not the previous config's: putting the start's
    /// block back is not a change that waits for a restart (audit: it
    /// warned again).
    #[tokio::test]
    async fn restoring_the_control_block_in_effect_does_not_warn() {
        let text = |port: u16, route: &str| {
            format!(
                "version: 1\ncontrol:\n  address: \"127.0.0.1:{port}\"\nlisteners:\n  - name: a\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: {route}\n    pool: p\npools:\n  - name: p\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n"
            )
        };
        let sink = crate::test_log::LogSink::default();
        let _guard = sink.install();
        let warned = || sink.text().matches("the control block changed").count();
        let config = agiproxy_config::from_yaml_str(&text(4574, "r")).unwrap();
        let server = Server::start(config).await.unwrap();
        // (control port, route name, warnings so far)
        for (port, route, want) in [
            // Another block: it waits for a restart.
            (4575, "r", 1),
            // The start's block again: nothing waits.
            (4574, "r", 1),
            // Another change with the start's block: still nothing.
            (4574, "s", 1),
            // A change made while another block is in the config still says so.
            (4575, "s", 2),
            (4575, "r", 3),
        ] {
            server
                .apply(&text(port, route), "test", false, None)
                .await
                .unwrap();
            assert_eq!(warned(), want, "{port} {route}");
        }
        server.abort();
    }

    /// A whole text (a request body) is parsed and kept as it was given:
    /// no copy of it is made on the way, so a body waiting its turn for
    /// the parse is held once, as the control API's budget counts it (a
    /// copy was made when the change began, and held beside the body).
    #[tokio::test]
    async fn a_whole_text_is_applied_without_a_copy() {
        let text = |route: &str| {
            format!(
                "version: 1\nlisteners:\n  - name: a\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: {route}\n    pool: p\npools:\n  - name: p\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n"
            )
        };
        let config = agiproxy_config::from_yaml_str(&text("r")).unwrap();
        let server = Server::start(config).await.unwrap();
        for (route, source) in [("s", API_SOURCE), ("t", "test")] {
            let body: Arc<str> = Arc::from(text(route));
            let applied = server
                .apply_text(body.clone(), source, false, None)
                .await
                .unwrap();
            assert!(applied.changed, "{source}");
            assert!(
                Arc::ptr_eq(&server.snapshot().meta.text, &body),
                "{source}: the running text is a copy of the body"
            );
        }
        server.abort();
    }
}
