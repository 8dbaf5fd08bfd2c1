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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agiproxy_config::Config;
use tokio::sync::{broadcast, Semaphore};

pub use crate::listener::ServerError;
use crate::listener::{bind_all, spawn_listener, Held, ListenerEntry};
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

/// Makes the text of a change from the running config's text.
type Edit = Arc<dyn Fn(&str) -> Result<String, ApplyError> + Send + Sync>;

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

/// Counts a config change dropped before it finished (`abandoned`).
struct Unfinished<'a>(Option<&'a crate::metrics::Metrics>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.0 {
            m.config_reloads.with_label_values(&["abandoned"]).inc();
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
        tokio::spawn(retire_session_series(Arc::downgrade(&shared)));
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

    /// Validates and applies a config text. With `dry_run`, validates only.
    /// `if_match`: refuse unless this generation is the running one.
    ///
    /// A text from anywhere but the API ([`API_SOURCE`]: the file, read by a
    /// reload, SIGHUP or the watch) keeps the rollout overrides written
    /// through the API that it lacks, while the rollout is the same (see
    /// [`crate::rollout::overrides::carried_overrides`]); a dry run shows the
    /// text with them. A text sent through the API is taken as it is.
    pub async fn apply(
        &self,
        text: &str,
        source: &str,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        self.apply_text(Arc::from(text), source, dry_run, if_match)
            .await
    }

    /// [`Server::apply`] of a text already shared (a request body): no
    /// copy is kept beside it. (The change still makes its own from it:
    /// an [`Edit`] returns a `String`.)
    pub async fn apply_text(
        &self,
        text: Arc<str>,
        source: &str,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        let edit: Edit = Arc::new(move |_: &str| Ok(text.to_string()));
        let mode = if source == API_SOURCE {
            Mode::Text
        } else {
            Mode::File
        };
        self.change(source, dry_run, if_match, mode, edit, None)
            .await
    }

    /// Applies an edit of the running config text, made while no other
    /// change can slip in between (no lost update, even without `If-Match`).
    pub async fn apply_edit(
        &self,
        source: &str,
        if_match: Option<u64>,
        edit: impl Fn(&str) -> Result<String, ApplyError> + Send + Sync + 'static,
    ) -> Result<Applied, ApplyError> {
        self.change(source, false, if_match, Mode::Edit, Arc::new(edit), None)
            .await
    }

    /// [`Server::apply_edit`], refused if the new config fails `check` when
    /// it is about to be swapped in.
    pub async fn apply_edit_checked(
        &self,
        source: &str,
        if_match: Option<u64>,
        edit: impl Fn(&str) -> Result<String, ApplyError> + Send + Sync + 'static,
        check: SwapCheck,
    ) -> Result<Applied, ApplyError> {
        self.change(
            source,
            false,
            if_match,
            Mode::Edit,
            Arc::new(edit),
            Some(check),
        )
        .await
    }

    async fn change(
        &self,
        source: &str,
        dry_run: bool,
        if_match: Option<u64>,
        mode: Mode,
        text: Edit,
        check: Option<SwapCheck>,
    ) -> Result<Applied, ApplyError> {
        // A change whose caller gave up (the control API's request
        // timeout drops this future) is counted too, as `abandoned`.
        let mut unfinished = Unfinished(Some(&self.shared.metrics));
        let result = self
            .apply_inner(text, source, dry_run, if_match, mode, check)
            .await;
        unfinished.0 = None;
        let label = match &result {
            Ok(a) if a.dry_run => "dry_run",
            Ok(a) if !a.changed => "unchanged",
            Ok(_) => "applied",
            Err(ApplyError::Invalid(_)) => "invalid",
            Err(ApplyError::Stale { .. } | ApplyError::Conflict(_)) => "stale",
            Err(ApplyError::Bind(_)) => "bind_failed",
            // A split naming a route that does not exist: a request error,
            // not a refused config.
            Err(ApplyError::NotFound(_)) => "not_found",
            Err(_) => "error",
        };
        debug_assert!(crate::metrics::RELOAD_RESULTS.contains(&label), "{label}");
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(a) if a.changed && !a.dry_run => {
                tracing::info!(generation = a.generation, hash = %format!("{:016x}", a.hash), source, "config applied");
                let snap = self.shared.snapshot.load();
                if let Some(w) = crate::memory::check(&snap.config.limits, crate::memory::limit()) {
                    tracing::warn!(generation = a.generation, "{w}");
                }
            }
            // The mistakes, on the log line itself: a text log line is one line.
            Err(ApplyError::Invalid(errors)) => {
                tracing::warn!(source, error = "invalid config", errors = %errors_for_log(errors), "config change refused; the running config is unchanged")
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
        text: Edit,
        source: &str,
        dry_run: bool,
        if_match: Option<u64>,
        mode: Mode,
        check: Option<SwapCheck>,
    ) -> Result<Applied, ApplyError> {
        let edit = mode == Mode::Edit;
        // Edits take turns (see `Changes::edits`). One that finds another
        // change (a new text, the file) applied while it was parsed is made
        // again on the newer text, a bounded number of times: no lost
        // update, and no lock held while parsing. A text from the file
        // takes its turn too, and is made again likewise: the overrides it
        // keeps are the running config's (an override written between would
        // be lost).
        let _turn = if mode != Mode::Text {
            Some(self.changes.edits.lock().await)
        } else {
            None
        };
        // The rollouts of the file text last applied: an override they had
        // and the new text lacks was deleted from the file.
        let file_had = match mode {
            Mode::File => self
                .changes
                .file_applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            _ => None,
        };
        // The new file text's rollouts, kept as `file_applied` once it is.
        let mut file_parsed: Option<Arc<FileRollouts>> = None;
        let noted = |rollouts: Option<Arc<FileRollouts>>| {
            if mode == Mode::File && !dry_run {
                *self
                    .changes
                    .file_applied
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = rollouts;
            }
        };
        let mut attempts = 0;
        let (mut table, current, config, text, hash, carried, dropped) = loop {
            attempts += 1;
            let current = self.shared.snapshot.load_full();
            let generation = current.meta.generation;
            if let Some(expected) = if_match.filter(|g| *g != generation) {
                return Err(ApplyError::Stale {
                    current: generation,
                    expected: Some(expected),
                });
            }
            let text: Arc<str> = if edit {
                // Editing parses the running text: off the runtime threads,
                // and as one of the parses (a large config's parse takes
                // hundreds of MB: eight edits at once took 1.35 GB).
                let (f, running) = (text.clone(), current.clone());
                self.parse_turn(move || f(&running.meta.text))
                    .await??
                    .into()
            } else {
                text("")?.into()
            };
            let hash = text_hash(&text);
            if hash == current.meta.hash {
                // The running text: valid, and nothing to do.
                self.note_parsed(hash, &current.config);
                if mode == Mode::File {
                    noted(Some(Arc::new(FileRollouts::of(&current.rollout_config()))));
                }
                return Ok(Applied {
                    generation,
                    hash,
                    dry_run,
                    changed: false,
                    dropped: Vec::new(),
                });
            }
            // The running rollouts (a snapshot's config has no routes).
            let running = current.rollout_config();
            let config = self
                .compile_checked(text.clone(), &current, &running)
                .await?;
            self.note_parsed(hash, &config);
            if mode == Mode::File {
                file_parsed = Some(Arc::new(FileRollouts::of(&config)));
            }
            let carried = if mode == Mode::File {
                crate::rollout::overrides::carried_unless_from_file(
                    &running,
                    &config,
                    file_had.as_deref(),
                )
            } else {
                Vec::new()
            };
            // The same comparison for a text sent whole: what it drops.
            let dropped = if mode == Mode::Text {
                crate::rollout::overrides::carried_overrides(&running, &config)
            } else {
                Vec::new()
            };
            let (config, text, hash) = if carried.is_empty() {
                (config, text, hash)
            } else {
                release(config);
                let text = self.with_carried(&text, &carried).await?;
                let hash = text_hash(&text);
                if hash == current.meta.hash {
                    // The running text already: the file plus these.
                    if !dry_run {
                        warn_carried(&carried);
                    }
                    noted(file_parsed);
                    return Ok(Applied {
                        generation,
                        hash,
                        dry_run,
                        changed: false,
                        dropped: Vec::new(),
                    });
                }
                // The same checks as the file's own config had: a carried
                // override moved across now by a new skew is refused.
                let config = self
                    .compile_checked(text.clone(), &current, &running)
                    .await?;
                let lost = crate::rollout::overrides::carried_unless_from_file(
                    &running,
                    &config,
                    file_had.as_deref(),
                );
                if !lost.is_empty() {
                    release(config);
                    return Err(ApplyError::Uneditable(format!(
                        "the config file lacks rollout overrides written through the API, and \
                         its text with them written in does not read back with them: {}; \
                         nothing was changed: write them into the file",
                        carried_list(&lost)
                    )));
                }
                (config, text, hash)
            };
            if dry_run {
                release(config);
                return Ok(Applied {
                    generation,
                    hash,
                    dry_run,
                    changed: true,
                    dropped,
                });
            }
            let table = self.changes.listeners.lock().await;
            let now = self.shared.snapshot.load_full();
            if now.meta.generation == generation {
                break (table, current, config, text, hash, carried, dropped);
            }
            // Another change went in while this one was parsed.
            if let Some(expected) = if_match {
                return Err(ApplyError::Stale {
                    current: now.meta.generation,
                    expected: Some(expected),
                });
            }
            if mode == Mode::File && attempts < 3 {
                // The overrides to keep are the newer config's.
                release(config);
                continue;
            }
            if !edit || attempts >= 3 {
                // A whole new text does not depend on the running one: the
                // last one applied wins, as when changes queued on the lock.
                if now.meta.hash == hash {
                    noted(file_parsed);
                    return Ok(Applied {
                        generation: now.meta.generation,
                        hash,
                        dry_run,
                        changed: false,
                        dropped: Vec::new(),
                    });
                }
                if !edit {
                    // Dropped from the config it replaces.
                    let dropped = if mode == Mode::Text {
                        crate::rollout::overrides::carried_overrides(&now.rollout_config(), &config)
                    } else {
                        dropped
                    };
                    break (table, now, config, text, hash, carried, dropped);
                }
                return Err(ApplyError::Stale {
                    current: now.meta.generation,
                    expected: None,
                });
            }
        };
        let generation = current.meta.generation;
        let replaced = crate::rollout::replaced::replaced_rollouts(&current, &config);
        // Applied, and said: a file read late must still converge with the
        // replicas that read it in time (a refusal left a replica out for
        // good, and one started later took the file: review), and a
        // rollback must take effect.
        let past = crate::session::rollout::past_changes(
            &current.rollout_config(),
            &config,
            crate::session::rollout::now_ms(),
            |route| crate::rollout::replaced::judged_of(&current, route),
        );
        // New listeners first: a bind failure refuses the whole change.
        // Draining, none is opened: it would accept calls and close at once
        // (resets, which Asterisk reads as SUCCESS), where a port nobody
        // listens on refuses them and Asterisk moves on.
        let kept: Vec<SocketAddr> = table.iter().map(|e| e.configured).collect();
        let bound = if self.shared.drain.is_draining() {
            let new = config
                .listeners
                .iter()
                .filter(|l| !kept.contains(&l.address))
                .count();
            if new > 0 {
                tracing::info!(new, "draining: the change's new listeners are not opened");
            }
            Vec::new()
        } else {
            let mut held: Vec<Held> = table.iter().map(|e| Held::Listener(e.bound)).collect();
            held.extend(self.changes.control.get().copied().map(Held::ControlApi));
            self.retired_closed(&config, &kept).await;
            bind_all(&config, &kept, &held)?
        };
        let meta = ConfigMeta::new(generation + 1, source, text);
        // Compiling the routes (regexes) of a large config takes seconds:
        // off the runtime threads.
        let previous = current.clone();
        let next = tokio::task::spawn_blocking(move || {
            Arc::new(Snapshot::build(config, meta, Some(&previous)))
        })
        .await
        .map_err(|e| ApplyError::Internal(e.to_string()))?;
        if let Some(refused) =
            check.and_then(|c| c(&current.rollout_config(), &next.rollout_config()).err())
        {
            // Nothing was swapped: the new listeners close as `bound` drops.
            release(next);
            return Err(refused);
        }
        // Against the block in effect, not the previous config's: a block
        // put back as it was at start waits for nothing (audit: restoring it
        // warned again).
        if next.config.control != self.changes.control_in_effect {
            tracing::warn!("the control block changed; it takes effect at the next restart");
        }
        let old = self.shared.snapshot.swap(next.clone());
        {
            let mut replaced = self
                .shared
                .replaced
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            replaced.retain(|w| w.strong_count() > 0);
            replaced.push(Arc::downgrade(&old));
        }
        next.activate();
        old.retire();
        // The last reference here goes to `release`, so that the replaced
        // config is freed there, before the trim.
        drop(current);
        release_snapshot(old);
        for b in bound {
            table.push(spawn_listener(&self.shared, b));
        }
        // Then close the listeners the new config no longer has.
        let (kept, gone): (Vec<ListenerEntry>, Vec<ListenerEntry>) =
            std::mem::take(&mut *table).into_iter().partition(|e| {
                next.config
                    .listeners
                    .iter()
                    .any(|l| l.address == e.configured)
            });
        *table = kept;
        let mut retiring = self
            .changes
            .retiring
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for e in gone {
            tracing::info!(address = %e.bound, "listener removed by config change");
            e.stop.cancel();
            retiring.push((e.configured, e.closed));
        }
        drop(retiring);
        *self
            .changes
            .listing
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = listing(&table, &next);
        self.shared
            .metrics
            .config_generation
            .set(generation as i64 + 1);
        warn_carried(&carried);
        warn_dropped(&dropped);
        for (route, what) in replaced {
            tracing::warn!(route = %route, "{what}");
        }
        for e in past {
            tracing::warn!(path = %e.path, "{}", e.message);
        }
        noted(file_parsed);
        Ok(Applied {
            generation: generation + 1,
            hash,
            dry_run: false,
            changed: true,
            dropped,
        })
    }

    /// Parses and compiles a config text on a blocking thread, one at a
    /// time. Refused at once when over `max_bytes` (the running config's
    /// `limits.max_config_bytes`). Dropping the future stops only the wait.
    /// [`Server::compile`], refused as any change is when its `skew` would
    /// move an override of a `running` rollout across now, or its
    /// `split_key` change while that rollout splits calls.
    async fn compile_checked(
        &self,
        text: Arc<str>,
        current: &Snapshot,
        running: &Config,
    ) -> Result<Config, ApplyError> {
        let config = self
            .compile(text, current.config.limits.max_config_bytes)
            .await?;
        let now = crate::session::rollout::now_ms();
        let mut moved = crate::session::rollout::skew_changes(running, &config, now);
        moved.extend(crate::session::rollout::split_key_changes(
            running,
            &config,
            |route| {
                let r = current.router.routes().iter().find(|r| &*r.name == route)?;
                Some(r.rollout.as_deref()?.position(now))
            },
        ));
        if !moved.is_empty() {
            release(config);
            return Err(ApplyError::Invalid(agiproxy_config::ConfigErrors(moved)));
        }
        Ok(config)
    }

    /// Runs `work` (a parse of a config text) on a blocking thread, as one
    /// of the parses at a time: a large config's parse takes hundreds of MB.
    async fn parse_turn<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApplyError> {
        let permit = self
            .changes
            .parses
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ApplyError::Internal(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _one_at_a_time = permit;
            work()
        })
        .await
        .map_err(|e| ApplyError::Internal(e.to_string()))
    }

    async fn compile(&self, text: Arc<str>, max_bytes: usize) -> Result<Config, ApplyError> {
        if text.len() > max_bytes {
            return agiproxy_config::from_yaml_str_within(&text, max_bytes)
                .map_err(ApplyError::Invalid);
        }
        self.parse_turn(move || {
            let config = agiproxy_config::from_yaml_str_within(&text, max_bytes);
            // The parse's intermediate values are gone by now.
            give_back_memory();
            config
        })
        .await?
        .map_err(ApplyError::Invalid)
    }

    /// `text` with the `carried` overrides written in, on a blocking thread
    /// as one of the parses. A text that cannot take them is refused: the
    /// running config (which has them) is kept.
    async fn with_carried(
        &self,
        text: &Arc<str>,
        carried: &[crate::rollout::overrides::Carried],
    ) -> Result<Arc<str>, ApplyError> {
        let (text, list) = (text.clone(), carried.to_vec());
        let edited = self
            .parse_turn(move || crate::rollout::overrides::with_carried(&text, &list))
            .await?;
        edited.map(Arc::from).map_err(|e| {
            ApplyError::Uneditable(format!(
                "the config file lacks rollout overrides written through the API ({}), and \
                 they could not be written into its text ({e}); nothing was changed: write \
                 them into the file",
                carried_list(carried)
            ))
        })
    }

    /// Re-reads the config file and applies it.
    pub async fn reload_file(&self) -> Result<Applied, ApplyError> {
        let text = self.read_config_file().await?;
        let source = self.file_source();
        self.apply(&text, &source, false, None).await
    }

    /// `file:PATH`, the source of a config read from the file.
    pub(crate) fn file_source(&self) -> String {
        match &self.changes.file {
            Some(path) => format!("file:{}", path.display()),
            None => "file".into(),
        }
    }

    /// Reads the config file on a blocking thread: a regular file only, of
    /// at most the running `limits.max_config_bytes` (see
    /// [`agiproxy_config::read_file`]). Remembers its hash for
    /// [`Server::differs_from_file`]. A failure is counted and logged.
    pub async fn read_config_file(&self) -> Result<String, ApplyError> {
        let Some(path) = self.changes.file.clone() else {
            let source = self.shared.snapshot.load().meta.source.to_string();
            return Err(ApplyError::NoFile(source));
        };
        let max = self.shared.snapshot.load().config.limits.max_config_bytes;
        let read = tokio::task::spawn_blocking(move || agiproxy_config::read_file(&path, max))
            .await
            .map_err(|e| ApplyError::Internal(e.to_string()))
            .and_then(|r| r.map_err(ApplyError::File));
        let hash = read.as_ref().ok().map(|t| text_hash(t));
        *self
            .changes
            .file_hash
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = hash;
        if let Err(e) = &read {
            self.shared
                .metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
            tracing::warn!(error = %e, "config file not read; the running config is unchanged");
        }
        read
    }

    /// Content hash of the config file when last read (None: unreadable).
    pub fn file_hash(&self) -> Option<u64> {
        *self
            .changes
            .file_hash
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the rollouts of `config`, parsed from a text of `hash`, when
    /// that is the file's content as last read: what [`Self::file_rollouts`]
    /// returns until the file is read again.
    fn note_parsed(&self, hash: u64, config: &Config) {
        if self.changes.file.is_none() || self.file_hash() != Some(hash) {
            return;
        }
        let kept = || {
            self.changes
                .file_rollouts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if kept().as_ref().is_some_and(|(h, _)| *h == hash) {
            return;
        }
        // Made outside the lock, which status calls take.
        let rollouts = Arc::new(FileRollouts::of(config));
        *kept() = Some((hash, rollouts));
    }

    /// The rollouts the config file declares, as last read (at start, by
    /// the watcher or a reload) and parsed; None without a file, or when
    /// its content as last read did not read or validate. Never reads the
    /// file: a status call must not block, buffer or parse.
    pub fn file_rollouts(&self) -> Option<Arc<FileRollouts>> {
        let hash = self.file_hash()?;
        self.changes
            .file_rollouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(h, _)| *h == hash)
            .map(|(_, r)| r.clone())
    }

    /// Whether the config file's content, as last read (at start, by the
    /// watcher or a reload), differs from the running config. Never reads
    /// the file: a status call must not block or buffer.
    pub fn differs_from_file(&self) -> bool {
        if self.changes.file.is_none() {
            return false;
        }
        self.file_hash() != Some(self.shared.snapshot.load().meta.hash)
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

/// One WARN line per override a text from the file lacked and the running
/// config kept (the route, the action and `at`, and what to write).
fn warn_carried(carried: &[crate::rollout::overrides::Carried]) {
    for c in carried {
        tracing::warn!(
            route = %c.route,
            action = %c.action,
            at = %c.at,
            "rollout override kept: the config file does not have it, and the running rollout is the same; write overrides: [{}] into the file (route {}) to keep it across a restart of every replica",
            c.entry(),
            c.route
        );
    }
}

fn warn_dropped(dropped: &[crate::rollout::overrides::Carried]) {
    for c in dropped {
        tracing::warn!(
            route = %c.route,
            action = %c.action,
            at = %c.at,
            "rollout override dropped: the config sent through the API does not have it (a reload from the file would have kept it); to restore it as it was, write overrides: [{}] into the config (route {}) and apply it (`ctl rollout` again would give it a new time)",
            c.entry(),
            c.route
        );
    }
}

/// `route ivr: { action: rollback, at: "..." }, ...`, for an error.
fn carried_list(carried: &[crate::rollout::overrides::Carried]) -> String {
    carried
        .iter()
        .map(|c| format!("route {}: {}", c.route, c.entry()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes of errors on the log line of a refused change: room for the 101
/// errors the config crate reports at most, of ordinary length; but one can
/// be as long as a key of the text. The line stays well within what the log
/// writer takes by default (a line over its bound is dropped whole, and
/// 300,000 errors on one line were).
const LOG_ERRORS_BYTES: usize = 64 * 1024;

/// A refused config's errors for its one log line: `; `-separated, cut at
/// [`LOG_ERRORS_BYTES`] with a note (the API's answer and `agiproxy check`
/// have them whole).
fn errors_for_log(errors: &agiproxy_config::ConfigErrors) -> String {
    let mut out = String::new();
    for (i, e) in errors.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&e.to_string());
        if out.len() > LOG_ERRORS_BYTES {
            let mut end = LOG_ERRORS_BYTES;
            while !out.is_char_boundary(end) {
                end -= 1;
            }
            out.truncate(end);
            out.push_str(" … (cut; the API's answer and `agiproxy check` have them all)");
            break;
        }
    }
    out
}

/// Lets go of a replaced snapshot (or a config validated only) off the
/// runtime threads (dropping 100,000 routes takes a while), then gives the
/// memory freed back to the system. Sessions still holding a snapshot free
/// it when they end, without a trim.
fn release<T: Send + 'static>(old: T) {
    tokio::task::spawn_blocking(move || {
        drop(old);
        give_back_memory();
    });
}

/// [`release`] for a replaced snapshot, which a status request or the
/// rollout judge may still be reading for a moment: wait (briefly, on the
/// blocking thread) to hold the last reference, so that the snapshot is
/// freed before the trim rather than by that reader after it. A session
/// still running on it frees it when it ends.
fn release_snapshot(old: Arc<Snapshot>) {
    tokio::task::spawn_blocking(move || {
        let mut old = old;
        let until = Instant::now() + Duration::from_millis(200);
        loop {
            match Arc::try_unwrap(old) {
                Ok(snapshot) => {
                    drop(snapshot);
                    break;
                }
                Err(shared) if Instant::now() < until => {
                    old = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(shared) => {
                    drop(shared);
                    break;
                }
            }
        }
        give_back_memory();
    });
}

/// Returns free memory of every malloc arena to the system. glibc keeps
/// what a large config's parse and snapshot freed (fragmented, in the
/// arenas of the threads that built them): swapping a 100,000-route config
/// for a small one left the process at its peak for good.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; callable from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The labels a session can still end with: the running config's, and
/// those of the configs it replaced that sessions still run on (a call may
/// last hours: its series must not be dropped under it, to come back at 1,
/// a count `rate()` never sees; metrics audit).
fn live_labels(shared: &Shared) -> crate::metrics::retention::LiveLabels {
    let mut live = shared.snapshot.load().live_labels();
    let older: Vec<Arc<Snapshot>> = {
        let mut replaced = shared
            .replaced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        replaced.retain(|w| w.strong_count() > 0);
        replaced
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    };
    for snap in &older {
        live.extend(snap.live_labels());
    }
    live
}

/// Drops `sessions_total` series of routes, pools and backends gone for a
/// while (`metrics::retention`); ends with the server.
async fn retire_session_series(shared: std::sync::Weak<Shared>) {
    use crate::metrics::retention::{Retention, EVERY};
    let mut retention = Retention::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let live = live_labels(&shared);
        let dropped = retention.prune(&shared.metrics.sessions, &live, Instant::now());
        if dropped > 0 {
            tracing::debug!(
                dropped,
                "sessions_total: series of vanished routes, pools or backends dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
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
}
