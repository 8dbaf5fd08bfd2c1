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

/// Keeps the watch alive; dropping it stops watching.
pub struct ConfigWatch {
    _watcher: notify::RecommendedWatcher,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
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
}

/// Runs on notify's thread, never on the runtime: `readlink` is allowed.
fn classify(event: &notify::Event, file: &Path, name: &OsStr) -> Option<Change> {
    // An event without paths (the kernel's queue overflowed): look.
    if event.paths.is_empty() {
        return Some(Change::Other);
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
async fn settle(rx: &mut mpsc::UnboundedReceiver<Change>, first: Change) -> bool {
    use tokio::time::Instant;
    let settle_by = Instant::now() + MAX_SETTLE;
    let mut writing = first == Change::Writing;
    let mut until = Instant::now() + if writing { WRITER_QUIET } else { DEBOUNCE };
    loop {
        let by = if writing { until } else { until.min(settle_by) };
        match tokio::time::timeout_at(by, rx.recv()).await {
            Err(_) => return true,
            Ok(None) => return false,
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

/// Reloads `server` from its config file whenever the file changes.
pub fn watch(server: Server) -> Result<Option<ConfigWatch>, WatchError> {
    let Some(file) = server.config_file().cloned() else {
        return Ok(None);
    };
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file.file_name().map(OsString::from).unwrap_or_default();
    let path = file.clone();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Some(change) = event.ok().and_then(|e| classify(&e, &path, &name)) {
            let _ = tx.send(change);
        }
    })
    .map_err(|source| WatchError {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError {
            path: dir.clone(),
            source,
        })?;
    tokio::spawn(async move {
        // Reload only when the file's content changes: a change made through
        // the API lasts until the file itself changes (or a reload is asked
        // for), not until the next unrelated event in the directory.
        let mut last = server.file_hash();
        let source = server.file_source();
        while let Some(first) = rx.recv().await {
            if !settle(&mut rx, first).await {
                return;
            }
            // Refused reads are counted and logged by the server.
            let text = server.read_config_file().await.ok();
            let now = text.as_deref().map(text_hash);
            if now != last {
                last = now;
                if let Some(text) = text {
                    let _ = server.apply(&text, &source, false, None).await;
                }
            }
        }
    });
    tracing::info!(file = %file.display(), "watching the config file");
    Ok(Some(ConfigWatch { _watcher: watcher }))
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
            classify(&event(write, &[&file]), &file, name),
            Some(Change::Writing)
        );
        assert_eq!(
            classify(&event(closed, &[&file]), &file, name),
            Some(Change::Closed)
        );
        let tmp = at(".agiproxy.yaml.new");
        assert_eq!(
            classify(&event(renamed, &[&tmp, &file]), &file, name),
            Some(Change::Other)
        );
        // A ConfigMap swap, and a rescan without paths.
        let data = at("..data");
        assert_eq!(
            classify(&event(renamed, &[&at("..data_tmp"), &data]), &file, name),
            Some(Change::Other)
        );
        assert_eq!(
            classify(&event(created, &[&at("..2026_12_06")]), &file, name),
            Some(Change::Other)
        );
        assert_eq!(
            classify(&event(EventKind::Any, &[]), &file, name),
            Some(Change::Other)
        );
        // Neighbours: a log, an editor's scratch file, the new file before
        // its rename.
        for n in ["agiproxy.log", "4913", ".agiproxy.yaml.swp"] {
            assert_eq!(classify(&event(write, &[&at(n)]), &file, name), None, "{n}");
            assert_eq!(
                classify(&event(created, &[&at(n)]), &file, name),
                None,
                "{n}"
            );
        }
        assert_eq!(classify(&event(write, &[&tmp]), &file, name), None);

        // A symlink to a file beside it: writing the target writes the config.
        std::fs::write(at("v2.yaml"), "version: 1").unwrap();
        std::os::unix::fs::symlink("v2.yaml", &file).unwrap();
        assert_eq!(
            classify(&event(write, &[&at("v2.yaml")]), &file, name),
            Some(Change::Writing)
        );
        assert_eq!(
            classify(&event(closed, &[&at("v2.yaml")]), &file, name),
            Some(Change::Closed)
        );
        assert_eq!(
            classify(&event(write, &[&at("agiproxy.log")]), &file, name),
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
        assert!(settle(&mut rx, Change::Other).await);
        let waited = t0.elapsed();
        assert!(
            waited >= MAX_SETTLE && waited < MAX_SETTLE + DEBOUNCE,
            "{waited:?}"
        );

        // A writer's open file: WRITER_QUIET after its last write, however
        // busy the rest of the directory.
        let t0 = tokio::time::Instant::now();
        assert!(settle(&mut rx, Change::Writing).await);
        let waited = t0.elapsed();
        assert!(
            waited >= WRITER_QUIET && waited < WRITER_QUIET + DEBOUNCE,
            "{waited:?}"
        );
        noise.abort();

        // A quiet directory: DEBOUNCE after the last event.
        let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
        let t0 = tokio::time::Instant::now();
        let settled = tokio::spawn(async move { settle(&mut rx, Change::Other).await });
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
}
