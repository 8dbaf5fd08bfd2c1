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
//! The file is read on a blocking thread, a regular file only, within
//! `limits.max_config_bytes` (`Server::read_config_file`): a FIFO, a device
//! or a huge file put in its place is refused and the running config kept.

use std::ffi::OsString;
use std::path::PathBuf;
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

fn classify(event: &notify::Event, name: &OsString) -> Option<Change> {
    let ours = event
        .paths
        .iter()
        .any(|p| p.file_name() == Some(name.as_os_str()));
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) if ours => Some(Change::Closed),
        // Reads (ours included) are not changes; reacting to them would loop.
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) if ours => Some(Change::Writing),
        _ => Some(Change::Other),
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
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Some(change) = event.ok().and_then(|e| classify(&e, &name)) {
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
            // Debounce: wait until the directory has been quiet for a while,
            // longer while a writer still has the file open.
            let mut writing = first == Change::Writing;
            loop {
                let quiet = if writing { WRITER_QUIET } else { DEBOUNCE };
                match tokio::time::timeout(quiet, rx.recv()).await {
                    Ok(Some(Change::Writing)) => writing = true,
                    Ok(Some(Change::Closed)) => writing = false,
                    Ok(Some(Change::Other)) => {}
                    Ok(None) => return,
                    Err(_) => break,
                }
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
