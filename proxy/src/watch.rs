//! Watching the config file. The directory is watched, not the file: a
//! Kubernetes ConfigMap update swaps a symlink (`..data`) atomically, which
//! a watch on the old file would never see. Events are debounced, and a
//! change is applied only when the file's content differs from the running
//! config.
//!
//! A file written in place can be read half-written: its valid prefix
//! would be applied for a moment. So while the file itself is being written
//! (a write seen, its close not yet), the watcher waits for the close, or
//! for [`WRITER_QUIET`] without events. Replacing the file atomically
//! (write a temporary file, rename it over the config, as the ConfigMap
//! does) is the safe way, and what the docs ask for.
//!
//! Only events that can change what the path reads count: on the file
//! itself, on a `..`-name (a ConfigMap's `..data` and its timestamped
//! directories), or on the name the file links to when it is a symlink
//! into its own directory. Anything else in the directory (a log written
//! beside the config, say) is ignored: it once kept the directory from ever
//! being quiet, and no edit was applied while it was being written. The
//! wait for quiet is bounded too ([`MAX_SETTLE`]).
//!
//! inotify follows the directory's inode, not its name: when the directory
//! is removed or moved (`rm -rf etc && mv etc.new etc`) the watch is lost,
//! and the path is watched again. A symlink above it swapped (`current ->
//! rel2`) sends no event at all: every [`EVERY`] the file and its directory
//! are `stat`ed through symlinks, and another directory is watched again,
//! a changed file read. The watch is best-effort (inotify's limits): without
//! it the look every [`EVERY`] and SIGHUP still read the file. Each loss is
//! a WARN and counted (`config_watch_losses_total`).
//!
//! A change is judged against the content last read well: a failed read
//! (the file moved away for a moment) forgets nothing, so the same file back
//! is no change. The file is read once more when the watch is set up: a
//! change made while the process started sent no event anyone saw.
//!
//! The file is read on a blocking thread, a regular file only, within
//! `limits.max_config_bytes` (`Server::read_config_file`): a FIFO, a device
//! or a huge file put in its place is refused and the running config kept.

use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::server::Server;
use crate::snapshot::text_hash;

/// Quiet time after the last event before the file is read: editors and
/// ConfigMap updates write in several steps.
const DEBOUNCE: Duration = Duration::from_millis(250);
/// Quiet time while a writer still has the file open (a write was seen,
/// its close was not).
const WRITER_QUIET: Duration = Duration::from_secs(2);
/// Longest wait for quiet after the first event, unless a writer still has
/// the file open: a directory that never settles still gets its file read.
const MAX_SETTLE: Duration = Duration::from_secs(10);

/// How often the file is looked at without an event (a `stat` of it and
/// of its directory, through symlinks): what a lost watch misses, such as
/// a symlink to the directory swapped (`current -> rel2`), is seen within
/// this. As the credential files' ([`crate::credentials::EVERY`]).
pub const EVERY: Duration = Duration::from_secs(30);
/// First wait before watching again after the watch was lost and the
/// directory could not be watched (it was gone for a moment); doubled up
/// to [`EVERY`].
const RETRY: Duration = Duration::from_secs(1);

/// Keeps the watch alive; dropping it stops watching.
pub struct ConfigWatch {
    task: tokio::task::AbortHandle,
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the directory could not be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
struct WatchError {
    path: PathBuf,
    source: notify::Error,
}

/// What an event in the directory says about the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The file itself was written, and may still be open for writing.
    Writing,
    /// A writer closed the file.
    Closed,
    /// Anything else in the directory (a rename over the file, a
    /// ConfigMap's symlink swap, a removal).
    Other,
    /// The watch no longer sees the directory the path names.
    Lost(Loss),
}

/// Why the watch was lost: `config_watch_losses_total`'s `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// The watched directory was removed or moved (inotify follows its
    /// inode, not its name), or the path now leads to another one.
    Directory,
    /// The watch could not be set up, or reported an error.
    Error,
}

impl Loss {
    fn as_str(self) -> &'static str {
        match self {
            Loss::Directory => "directory",
            Loss::Error => "error",
        }
    }
}

/// Runs on notify's thread, never on the runtime: `readlink` is allowed.
/// `dir` is the watched directory, as it was given to the watch.
fn classify(event: &notify::Event, dir: &Path, file: &Path, name: &OsStr) -> Option<Change> {
    // An event without paths (the kernel's queue overflowed): look.
    if event.paths.is_empty() {
        return Some(Change::Other);
    }
    // The directory itself: removed or moved away, the watch sees nothing
    // more of the path (its other events, an `ls` or a `chmod`, say nothing).
    if event.paths.iter().any(|p| p == dir) {
        return match event.kind {
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                Some(Change::Lost(Loss::Directory))
            }
            _ => None,
        };
    }
    let mut target = None;
    let mut ours = false;
    let mut relevant = false;
    for n in event.paths.iter().filter_map(|p| p.file_name()) {
        if n == name || target.get_or_insert_with(|| link_head(file)).as_deref() == Some(n) {
            ours = true;
        } else if n.as_encoded_bytes().starts_with(b"..") {
            relevant = true;
        }
    }
    if !ours && !relevant {
        return None;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) if ours => Some(Change::Closed),
        // Reads (ours included) are not changes; reacting to them would loop.
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) if ours => Some(Change::Writing),
        _ => Some(Change::Other),
    }
}

/// The first component of the file's symlink target when it points into
/// the same directory (`..data/agiproxy.yaml` → `..data`, `v2.yaml` →
/// `v2.yaml`): writing there writes the config.
fn link_head(file: &Path) -> Option<OsString> {
    let target = std::fs::read_link(file).ok()?;
    if target.is_absolute() {
        return None;
    }
    target.components().find_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        _ => None,
    })
}

/// Debounce: waits until the directory has been quiet for [`DEBOUNCE`],
/// and no longer than [`MAX_SETTLE`] in all; while a writer still has the
/// file open, until it closes it or has not written for [`WRITER_QUIET`]
/// (other events do not prolong that). `false` when the watcher is gone.
/// A loss of the watch seen meanwhile is kept in `lost`.
async fn settle(
    rx: &mut mpsc::UnboundedReceiver<Change>,
    first: Change,
    lost: &mut Option<Loss>,
) -> bool {
    use tokio::time::Instant;
    let settle_by = Instant::now() + MAX_SETTLE;
    let mut writing = first == Change::Writing;
    if let Change::Lost(l) = first {
        *lost = Some(l);
    }
    let mut until = Instant::now() + if writing { WRITER_QUIET } else { DEBOUNCE };
    loop {
        let by = if writing { until } else { until.min(settle_by) };
        match tokio::time::timeout_at(by, rx.recv()).await {
            Err(_) => return true,
            Ok(None) => return false,
            Ok(Some(Change::Lost(l))) => {
                *lost = Some(l);
                if !writing {
                    until = Instant::now() + DEBOUNCE;
                }
            }
            Ok(Some(Change::Writing)) => {
                writing = true;
                until = Instant::now() + WRITER_QUIET;
            }
            Ok(Some(Change::Closed)) => {
                writing = false;
                until = Instant::now() + DEBOUNCE;
            }
            Ok(Some(Change::Other)) if !writing => until = Instant::now() + DEBOUNCE,
            Ok(Some(Change::Other)) => {}
        }
    }
}

/// What a `stat` through symlinks says of a file: another inode, size,
/// modification or change time is another file, or the same one written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// Blocking: a `stat`.
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// The same directory (or file), whatever was written in it.
    fn same_inode(&self, other: &Stamp) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// Where the file is, and how events reach the watcher's task.
#[derive(Clone)]
struct Place {
    file: PathBuf,
    dir: PathBuf,
    name: OsString,
    tx: mpsc::UnboundedSender<Change>,
}

impl Place {
    /// Blocking: watches the directory anew (a watch, which inotify
    /// resolves through symlinks now), and `stat`s it. One inotify instance
    /// (and notify's thread) for the process's life, made here the first
    /// time: one per re-watch took an instance each time (128 per user by
    /// default), and a failed thread spawn in a new one panics twice in
    /// notify, which aborts the process (review). Given back whatever
    /// happens, so that a failed watch keeps the instance for the next try.
    fn install(
        &self,
        existing: Option<notify::RecommendedWatcher>,
    ) -> (
        Option<notify::RecommendedWatcher>,
        Result<Option<Stamp>, WatchError>,
    ) {
        let failed = |source| WatchError {
            path: self.dir.clone(),
            source,
        };
        let mut watcher = match existing {
            Some(w) => w,
            None => {
                let tx = self.tx.clone();
                let (dir, file, name) = (self.dir.clone(), self.file.clone(), self.name.clone());
                let made =
                    notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                        let change = match event {
                            Ok(e) => classify(&e, &dir, &file, &name),
                            Err(_) => Some(Change::Lost(Loss::Error)),
                        };
                        if let Some(change) = change {
                            let _ = tx.send(change);
                        }
                    });
                match made {
                    Ok(w) => w,
                    Err(e) => return (None, Err(failed(e))),
                }
            }
        };
        // The old watch (of a directory gone or replaced) goes first: notify
        // drops events of a watch it no longer has. One queued before that
        // (the directory's removal, say) asks for one more re-watch.
        let _ = watcher.unwatch(&self.dir);
        // Before the watch: a swap between the two is seen as another
        // directory at the next look (watched again), never missed.
        let stamp = Stamp::of(&self.dir);
        match watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
            Ok(()) => (Some(watcher), Ok(stamp)),
            Err(e) => (Some(watcher), Err(failed(e))),
        }
    }
}

/// The watcher's task: the watch, what it last saw, and the server it
/// reloads.
struct Follow {
    server: Server,
    place: Place,
    source: String,
    /// The inotify instance, once made (kept for the process's life).
    watcher: Option<notify::RecommendedWatcher>,
    /// Whether the directory the path names is watched now.
    watched: bool,
    /// The watched directory, as `stat`ed when the watch was set up.
    dir: Option<Stamp>,
    /// The file as last looked at by the periodic look.
    stamp: Option<Stamp>,
    /// The hash of the file's content as last read (a failed read leaves
    /// it: the same file back is no change).
    last: Option<u64>,
    /// When to try watching again, after the watch was lost.
    retry: Option<(tokio::time::Instant, Duration)>,
}

impl Follow {
    /// Watches the directory anew, off the runtime. `why`: the loss that
    /// asked for it (logged and counted), None at start.
    async fn rewatch(&mut self, why: Option<Loss>) {
        self.watched = false;
        let installed = self.install().await;
        let metrics = self.server.metrics();
        if let Some(loss) = why {
            metrics
                .config_watch_losses
                .with_label_values(&[loss.as_str()])
                .inc();
        }
        let dir = self.place.dir.display();
        match (installed, why) {
            (Ok(stamp), why) => {
                self.watched = true;
                self.dir = stamp;
                self.retry = None;
                metrics.config_watch_up.set(1);
                match why {
                    None => {
                        tracing::info!(file = %self.place.file.display(), "watching the config file")
                    }
                    Some(loss) => {
                        tracing::warn!(file = %self.place.file.display(), %dir, reason = loss.as_str(), "the config file's watch was lost (its directory was removed, moved or replaced, or the watch failed): watching the directory the path names now, and reading the file")
                    }
                }
            }
            (Err(e), why) => {
                metrics.config_watch_up.set(0);
                if why.is_none() {
                    metrics
                        .config_watch_losses
                        .with_label_values(&[Loss::Error.as_str()])
                        .inc();
                }
                let wait = self.retry.map_or(RETRY, |(_, w)| (w * 2).min(EVERY));
                self.retry = Some((tokio::time::Instant::now() + wait, wait));
                let reason = why.unwrap_or(Loss::Error).as_str();
                tracing::warn!(error = %e, reason, "file watch off: SIGHUP or `ctl reload` still reload; the periodic look (every 30 s) still runs, and watching is tried again");
            }
        }
    }

    /// [`Place::install`] off the runtime, with this task's instance.
    async fn install(&mut self) -> Result<Option<Stamp>, WatchError> {
        let place = self.place.clone();
        let existing = self.watcher.take();
        match tokio::task::spawn_blocking(move || place.install(existing)).await {
            Ok((watcher, result)) => {
                self.watcher = watcher;
                result
            }
            Err(e) => Err(WatchError {
                path: self.place.dir.clone(),
                source: notify::Error::generic(&e.to_string()),
            }),
        }
    }

    /// Tried again while the watch is off; logged once, when it is back.
    /// Whether it is.
    async fn retry(&mut self) -> bool {
        if let Ok(stamp) = self.install().await {
            self.watched = true;
            self.dir = stamp;
            self.retry = None;
            self.server.metrics().config_watch_up.set(1);
            tracing::info!(file = %self.place.file.display(), "watching the config file again");
            return true;
        }
        if let Some((_, wait)) = self.retry {
            let wait = (wait * 2).min(EVERY);
            self.retry = Some((tokio::time::Instant::now() + wait, wait));
        }
        false
    }

    /// Reads the file and applies it when its content changed.
    async fn read(&mut self) {
        // Refused reads are counted and logged by the server; the last
        // good content stays what a change is judged against: a file moved
        // away and back, unchanged, is no change (an API change stays).
        // What the server last read of the file, by anyone (SIGHUP, `ctl
        // reload`): a file already read and applied there is no change here
        // (review: the look re-applied it over a later API change).
        let before = self.server.file_hash().or(self.last);
        let Ok(text) = self.server.read_config_file().await else {
            return;
        };
        let now = text_hash(&text);
        self.last = before;
        if self.last != Some(now) {
            self.last = Some(now);
            let _ = self
                .server
                .apply_text(text.into(), &self.source, false, None)
                .await;
        }
    }

    /// The periodic look: the directory the path names (another one: the
    /// watch is lost), and the file (another inode, size or time: read).
    async fn look(&mut self) {
        let (file, dir) = (self.place.file.clone(), self.place.dir.clone());
        let Ok((file, dir)) =
            tokio::task::spawn_blocking(move || (Stamp::of(&file), Stamp::of(&dir))).await
        else {
            return;
        };
        if !self.watched {
            // The file is looked at below.
            self.retry().await;
        } else if match (&self.dir, &dir) {
            (Some(was), Some(now)) => !was.same_inode(now),
            (_, None) => true,
            // Not there when watched (it was being replaced): there now,
            // maybe another one (review: a later swap was never seen).
            (None, Some(_)) => true,
        } {
            self.rewatch(Some(Loss::Directory)).await;
        }
        if file != self.stamp {
            // Without the events' close, a writer may be between two
            // writes (`cat new > file` writes in pieces): read once the file
            // has been still for `WRITER_QUIET` (review: a half-written file
            // was applied). Bounded; the next look sees what is left.
            let mut seen = file;
            let mut still = false;
            let waited = tokio::time::Instant::now();
            while !still && waited.elapsed() < MAX_SETTLE {
                tokio::time::sleep(WRITER_QUIET).await;
                let path = self.place.file.clone();
                let again = tokio::task::spawn_blocking(move || Stamp::of(&path))
                    .await
                    .ok()
                    .flatten();
                still = again == seen;
                seen = again;
            }
            if still {
                self.stamp = seen;
                self.read().await;
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Change>, every: Duration) {
        // The file as it is now, read once the watch is set up: a change
        // made while the process started (after the file was read for the
        // start) sent no event anyone saw.
        self.stamp = {
            let file = self.place.file.clone();
            tokio::task::spawn_blocking(move || Stamp::of(&file))
                .await
                .ok()
                .flatten()
        };
        self.read().await;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry.map(|(at, _)| at);
            tokio::select! {
                first = rx.recv() => {
                    // `self.place` keeps a sender: never None.
                    let Some(first) = first else { return };
                    let mut lost = None;
                    if !settle(&mut rx, first, &mut lost).await {
                        return;
                    }
                    if let Some(loss) = lost {
                        self.rewatch(Some(loss)).await;
                    }
                    self.read().await;
                }
                _ = tick.tick() => self.look().await,
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                    if retry_at.is_some() && !self.watched =>
                {
                    // What changed while nothing was watched.
                    if self.retry().await {
                        self.read().await;
                    }
                }
            }
        }
    }
}

/// Reloads `server` from its config file whenever the file changes: the
/// directory is watched, and the file looked at every `every` too. The
/// watch is best-effort: when it cannot be set up (inotify's limits) or is
/// lost, a WARN says so, `config_watch_losses_total` counts it, and the
/// file is still looked at every `every` and on SIGHUP. None without a
/// config file.
pub async fn watch(server: Server, every: Duration) -> Option<ConfigWatch> {
    let file = server.config_file().cloned()?;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // As notify reports it (`current_dir` joined): a relative path's
    // directory was never recognised in its events (review).
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let name = file.file_name().map(OsString::from).unwrap_or_default();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut follow = Follow {
        // Reload only when the file's content changes: a change made through
        // the API lasts until the file itself changes (or a reload is asked
        // for), not until the next unrelated event in the directory. What
        // the process started with (read at start) is the first content.
        last: server.file_hash(),
        source: server.file_source(),
        server,
        place: Place {
            file,
            dir,
            name,
            tx,
        },
        watcher: None,
        watched: false,
        dir: None,
        stamp: None,
        retry: None,
    };
    follow.rewatch(None).await;
    let task = tokio::spawn(follow.run(rx, every));
    Some(ConfigWatch {
        task: task.abort_handle(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, ModifyKind, RenameMode};

    fn event(kind: EventKind, paths: &[&Path]) -> notify::Event {
        let mut e = notify::Event::new(kind);
        for p in paths {
            e = e.add_path(p.to_path_buf());
        }
        e
    }

    #[test]
    fn only_events_that_can_change_the_file_count() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = d.join("agiproxy.yaml");
        let name = OsStr::new("agiproxy.yaml");
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let created = EventKind::Create(CreateKind::File);
        let at = |n: &str| d.join(n);

        assert_eq!(
            classify(&event(write, &[&file]), d, &file, name),
            Some(Change::Writing)
        );
        assert_eq!(
            classify(&event(closed, &[&file]), d, &file, name),
            Some(Change::Closed)
        );
        let tmp = at(".agiproxy.yaml.new");
        assert_eq!(
            classify(&event(renamed, &[&tmp, &file]), d, &file, name),
            Some(Change::Other)
        );
        // A ConfigMap swap, and a rescan without paths.
        let data = at("..data");
        assert_eq!(
            classify(&event(renamed, &[&at("..data_tmp"), &data]), d, &file, name),
            Some(Change::Other)
        );
        assert_eq!(
            classify(&event(created, &[&at("..2026_12_06")]), d, &file, name),
            Some(Change::Other)
        );
        assert_eq!(
            classify(&event(EventKind::Any, &[]), d, &file, name),
            Some(Change::Other)
        );
        // The directory itself: removed or moved away, the watch is lost;
        // listed or its mode changed, nothing.
        let removed = EventKind::Remove(notify::event::RemoveKind::Folder);
        let moved = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        for kind in [removed, moved] {
            assert_eq!(
                classify(&event(kind, &[d]), d, &file, name),
                Some(Change::Lost(Loss::Directory))
            );
        }
        let opened = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let chmod = EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any));
        for kind in [opened, chmod] {
            assert_eq!(classify(&event(kind, &[d]), d, &file, name), None);
        }
        // Neighbours: a log, an editor's scratch file, the new file before
        // its rename.
        for n in ["agiproxy.log", "4913", ".agiproxy.yaml.swp"] {
            assert_eq!(
                classify(&event(write, &[&at(n)]), d, &file, name),
                None,
                "{n}"
            );
            assert_eq!(
                classify(&event(created, &[&at(n)]), d, &file, name),
                None,
                "{n}"
            );
        }
        assert_eq!(classify(&event(write, &[&tmp]), d, &file, name), None);

        // A symlink to a file beside it: writing the target writes the config.
        std::fs::write(at("v2.yaml"), "version: 1").unwrap();
        std::os::unix::fs::symlink("v2.yaml", &file).unwrap();
        assert_eq!(
            classify(&event(write, &[&at("v2.yaml")]), d, &file, name),
            Some(Change::Writing)
        );
        assert_eq!(
            classify(&event(closed, &[&at("v2.yaml")]), d, &file, name),
            Some(Change::Closed)
        );
        assert_eq!(
            classify(&event(write, &[&at("agiproxy.log")]), d, &file, name),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_directory_that_never_quiets_is_read_within_max_settle() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let noise = tokio::spawn(async move {
            loop {
                tokio::time::sleep(DEBOUNCE / 2).await;
                if tx.send(Change::Other).is_err() {
                    return;
                }
            }
        });
        let t0 = tokio::time::Instant::now();
        assert!(settle(&mut rx, Change::Other, &mut None).await);
        let waited = t0.elapsed();
        assert!(
            waited >= MAX_SETTLE && waited < MAX_SETTLE + DEBOUNCE,
            "{waited:?}"
        );

        // A writer's open file: WRITER_QUIET after its last write, however
        // busy the rest of the directory.
        let t0 = tokio::time::Instant::now();
        assert!(settle(&mut rx, Change::Writing, &mut None).await);
        let waited = t0.elapsed();
        assert!(
            waited >= WRITER_QUIET && waited < WRITER_QUIET + DEBOUNCE,
            "{waited:?}"
        );
        noise.abort();

        // A quiet directory: DEBOUNCE after the last event.
        let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
        let t0 = tokio::time::Instant::now();
        let settled = tokio::spawn(async move { settle(&mut rx, Change::Other, &mut None).await });
        tokio::time::sleep(DEBOUNCE / 2).await;
        tx.send(Change::Other).unwrap();
        assert!(settled.await.unwrap());
        let waited = t0.elapsed();
        assert!(
            waited >= DEBOUNCE + DEBOUNCE / 2 && waited < 2 * DEBOUNCE,
            "{waited:?}"
        );
        drop(tx);
    }

    /// A config in `dir/agiproxy.yaml` whose one listener is on loopback,
    /// routing to `pool` (named `route`).
    fn config_text(route: &str) -> String {
        format!(
            "version: 1\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: {route}\n    pool: a\npools:\n  - name: a\n    backends: [{{ address: \"127.0.0.1:9\" }}]\n"
        )
    }

    async fn serve(file: &Path) -> Server {
        let text = std::fs::read_to_string(file).unwrap();
        let config = agiproxy_config::from_yaml_str(&text).unwrap();
        let origin = crate::server::Origin {
            text: text.into(),
            source: format!("file:{}", file.display()),
            file: Some(file.to_path_buf()),
        };
        Server::start_with(config, origin).await.unwrap()
    }

    async fn generation_reaches(server: &Server, g: u64, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let now = server.snapshot().meta.generation;
            if now >= g || tokio::time::Instant::now() > deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replaces `file` with `text` atomically.
    fn replace(file: &Path, text: &str) {
        let tmp = file.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, file).unwrap();
    }

    /// Two releases, `rel1` (config "one") and `rel2` ("two"), and
    /// `current -> rel1`; a server of `current/agiproxy.yaml`.
    async fn two_releases() -> (tempfile::TempDir, Server) {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for (rel, name) in [("rel1", "one"), ("rel2", "two")] {
            std::fs::create_dir(r.join(rel)).unwrap();
            std::fs::write(r.join(rel).join("agiproxy.yaml"), config_text(name)).unwrap();
        }
        std::os::unix::fs::symlink("rel1", r.join("current")).unwrap();
        let server = serve(&r.join("current/agiproxy.yaml")).await;
        (root, server)
    }

    /// The periodic look has no close event to tell when a writer is done:
    /// it reads a file once it has been still for `WRITER_QUIET` (review:
    /// a file found between two writes was applied half-written).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_look_reads_a_file_once_it_is_still() {
        let (root, server) = two_releases().await;
        let r = root.path();
        let every = Duration::from_millis(300);
        let _watch = watch(server.clone(), every).await.unwrap();
        tokio::time::sleep(every / 2).await;
        // A release no event shows (the watch is on rel1), its file
        // written in two steps 700 ms apart.
        std::fs::create_dir(r.join("rel3")).unwrap();
        std::fs::write(r.join("rel3/agiproxy.yaml"), config_text("partial")).unwrap();
        std::os::unix::fs::symlink("rel3", r.join("current.new")).unwrap();
        std::fs::rename(r.join("current.new"), r.join("current")).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        std::fs::write(r.join("rel3/agiproxy.yaml"), config_text("full")).unwrap();
        assert_eq!(generation_reaches(&server, 2, 4 * WRITER_QUIET).await, 2);
        // Only the whole file was applied.
        tokio::time::sleep(WRITER_QUIET).await;
        let snap = server.snapshot();
        assert_eq!(snap.meta.generation, 2);
        assert_eq!(&*snap.meta.text, config_text("full").as_str());
    }

    /// A file already read and applied by someone else (SIGHUP, `ctl
    /// reload`) is no change to the watcher: the look that finds it later
    /// does not apply it again over an API change made since (review).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_read_by_sighup_is_not_applied_again_over_a_later_api_change() {
        let (root, server) = two_releases().await;
        let r = root.path();
        let every = Duration::from_millis(300);
        let _watch = watch(server.clone(), every).await.unwrap();
        tokio::time::sleep(every / 2).await;
        // A swap no event shows, read at once by a SIGHUP...
        std::os::unix::fs::symlink("rel2", r.join("current.new")).unwrap();
        std::fs::rename(r.join("current.new"), r.join("current")).unwrap();
        server.reload_file().await.unwrap();
        assert_eq!(server.snapshot().meta.generation, 2);
        // ...then a change through the API.
        let api = config_text("api");
        server
            .apply(&api, crate::server::API_SOURCE, false, None)
            .await
            .unwrap();
        assert_eq!(server.snapshot().meta.generation, 3);
        // The look finds the swap (and the file's new stamp), past the
        // writer's quiet time: the API's change stays.
        tokio::time::sleep(10 * every + WRITER_QUIET).await;
        assert_eq!(server.snapshot().meta.generation, 3);
        assert_eq!(&*server.snapshot().meta.text, api.as_str());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn regression_a_symlinked_directory_swapped_is_seen_and_watched_again() {
        // A Capistrano-style release: the config is `current/agiproxy.yaml`,
        // `current -> rel1` swapped to `rel2`. inotify watched rel1's inode:
        // the swap, and every edit after it, was never seen.
        let (root, server) = two_releases().await;
        let r = root.path();
        let every = Duration::from_millis(300);
        let _watch = watch(server.clone(), every).await.unwrap();
        assert_eq!(server.metrics().config_watch_up.get(), 1);
        // Past the first read, which would see the swap on its own.
        tokio::time::sleep(every / 2).await;

        std::os::unix::fs::symlink("rel2", r.join("current.new")).unwrap();
        std::fs::rename(r.join("current.new"), r.join("current")).unwrap();
        assert_eq!(generation_reaches(&server, 2, 10 * every).await, 2);
        let lost = |reason| {
            server
                .metrics()
                .config_watch_losses
                .with_label_values(&[reason])
                .get()
        };
        assert_eq!((lost("directory"), lost("error")), (1, 0));
        // rel2 is watched now: an edit in it is applied on its event.
        replace(&r.join("rel2/agiproxy.yaml"), &config_text("three"));
        assert_eq!(generation_reaches(&server, 3, 10 * every).await, 3);
        // Nothing changes in rel1 any more.
        replace(&r.join("rel1/agiproxy.yaml"), &config_text("four"));
        tokio::time::sleep(3 * every).await;
        assert_eq!(server.snapshot().meta.generation, 3);
        assert_eq!(lost("directory"), 1);
    }
}
