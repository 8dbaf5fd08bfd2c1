//! Config changes: a text or an edit validated and compiled off to the side,
//! then swapped in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agiproxy_config::Config;

use super::{
    listing, Applied, ApplyError, Edit, FileRollouts, Mode, Server, SwapCheck, API_SOURCE,
};
use crate::listener::{bind_all, spawn_listener, Held, ListenerEntry};
use crate::snapshot::{text_hash, ConfigMeta, Snapshot};

/// A change ready to be swapped in, the listener table locked (see
/// [`Server::commit`]).
struct Ready<'a> {
    table: tokio::sync::MutexGuard<'a, Vec<ListenerEntry>>,
    /// The snapshot it replaces.
    current: Arc<Snapshot>,
    config: Config,
    text: Arc<str>,
    hash: u64,
    /// Overrides kept from the running config (a text from the file).
    carried: Vec<crate::rollout::overrides::Carried>,
    /// Overrides a whole text from the API drops.
    dropped: Vec<crate::rollout::overrides::Carried>,
}

/// What [`Server::prepare`] came to.
enum Prepared<'a> {
    /// Boxed: a config is large beside an answer.
    Ready(Box<Ready<'a>>),
    /// Nothing to swap in: the answer.
    Done(Applied),
}

impl Server {
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
    /// copy is made of it.
    pub async fn apply_text(
        &self,
        text: Arc<str>,
        source: &str,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        let edit: Edit = Arc::new(move |_: &str| Ok(text.clone()));
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
        self.edit_change(source, if_match, edit, None).await
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
        self.edit_change(source, if_match, edit, Some(check)).await
    }

    async fn edit_change(
        &self,
        source: &str,
        if_match: Option<u64>,
        edit: impl Fn(&str) -> Result<String, ApplyError> + Send + Sync + 'static,
        check: Option<SwapCheck>,
    ) -> Result<Applied, ApplyError> {
        let edit: Edit = Arc::new(move |running: &str| edit(running).map(Arc::from));
        self.change(source, false, if_match, Mode::Edit, edit, check)
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
        let ready = match self
            .prepare(
                text,
                dry_run,
                if_match,
                mode,
                file_had.as_deref(),
                &mut file_parsed,
            )
            .await?
        {
            Prepared::Done(applied) => {
                noted(file_parsed);
                return Ok(applied);
            }
            Prepared::Ready(ready) => ready,
        };
        let applied = self.commit(ready, source, check).await?;
        noted(file_parsed);
        Ok(applied)
    }

    /// Makes the change's text and config, until it can be swapped in:
    /// [`Prepared::Ready`] with the listener table locked, or
    /// [`Prepared::Done`] when nothing is to be swapped (the running text
    /// already; a dry run). `file_parsed`: the new file text's rollouts, for
    /// `Changes::file_applied`.
    async fn prepare(
        &self,
        text: Edit,
        dry_run: bool,
        if_match: Option<u64>,
        mode: Mode,
        file_had: Option<&FileRollouts>,
        file_parsed: &mut Option<Arc<FileRollouts>>,
    ) -> Result<Prepared<'_>, ApplyError> {
        let edit = mode == Mode::Edit;
        let mut attempts = 0;
        loop {
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
                self.parse_turn(move || f(&running.meta.text)).await??
            } else {
                text("")?
            };
            let hash = text_hash(&text);
            if hash == current.meta.hash {
                // The running text: valid, and nothing to do.
                self.note_parsed(hash, &current.config);
                if mode == Mode::File {
                    *file_parsed = Some(Arc::new(FileRollouts::of(&current.rollout_config())));
                }
                return Ok(Prepared::Done(Applied {
                    generation,
                    hash,
                    dry_run,
                    changed: false,
                    dropped: Vec::new(),
                }));
            }
            // The running rollouts (a snapshot's config has no routes).
            let running = current.rollout_config();
            let config = self
                .compile_checked(text.clone(), &current, &running)
                .await?;
            self.note_parsed(hash, &config);
            if mode == Mode::File {
                *file_parsed = Some(Arc::new(FileRollouts::of(&config)));
            }
            let carried = if mode == Mode::File {
                crate::rollout::overrides::carried_unless_from_file(&running, &config, file_had)
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
                    return Ok(Prepared::Done(Applied {
                        generation,
                        hash,
                        dry_run,
                        changed: false,
                        dropped: Vec::new(),
                    }));
                }
                // The same checks as the file's own config had: a carried
                // override moved across now by a new skew is refused.
                let config = self
                    .compile_checked(text.clone(), &current, &running)
                    .await?;
                let lost = crate::rollout::overrides::carried_unless_from_file(
                    &running, &config, file_had,
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
                return Ok(Prepared::Done(Applied {
                    generation,
                    hash,
                    dry_run,
                    changed: true,
                    dropped,
                }));
            }
            let table = self.changes.listeners.lock().await;
            let now = self.shared.snapshot.load_full();
            if now.meta.generation == generation {
                return Ok(Prepared::Ready(Box::new(Ready {
                    table,
                    current,
                    config,
                    text,
                    hash,
                    carried,
                    dropped,
                })));
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
                    return Ok(Prepared::Done(Applied {
                        generation: now.meta.generation,
                        hash,
                        dry_run,
                        changed: false,
                        dropped: Vec::new(),
                    }));
                }
                if !edit {
                    // Dropped from the config it replaces.
                    let dropped = if mode == Mode::Text {
                        crate::rollout::overrides::carried_overrides(&now.rollout_config(), &config)
                    } else {
                        dropped
                    };
                    return Ok(Prepared::Ready(Box::new(Ready {
                        table,
                        current: now,
                        config,
                        text,
                        hash,
                        carried,
                        dropped,
                    })));
                }
                return Err(ApplyError::Stale {
                    current: now.meta.generation,
                    expected: None,
                });
            }
        }
    }

    /// Swaps `ready` in: binds its new listeners (all or none), builds the
    /// snapshot off the runtime, runs the caller's `check`, swaps, and closes
    /// the listeners it no longer has.
    async fn commit(
        &self,
        ready: Box<Ready<'_>>,
        source: &str,
        check: Option<SwapCheck>,
    ) -> Result<Applied, ApplyError> {
        let Ready {
            mut table,
            current,
            config,
            text,
            hash,
            carried,
            dropped,
        } = *ready;
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
        // Moved in, not copied beside it while it waits for its parse.
        self.apply_text(text.into(), &source, false, None).await
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
pub(super) const LOG_ERRORS_BYTES: usize = 64 * 1024;

/// A refused config's errors for its one log line: `; `-separated, cut at
/// [`LOG_ERRORS_BYTES`] with a note (the API's answer and `agiproxy check`
/// have them whole).
pub(super) fn errors_for_log(errors: &agiproxy_config::ConfigErrors) -> String {
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
