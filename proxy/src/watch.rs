//! Watching the config file. The directory is watched, not the file: a
//! Kubernetes ConfigMap update swaps a symlink (`..data`) atomically, which
//! a watch on the old file would never see. Events are debounced, and a
//! change is applied only when the file's content differs from the running
//! config.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::server::Server;

/// Quiet time after the last event before the file is read: editors and
/// ConfigMap updates write in several steps.
const DEBOUNCE: Duration = Duration::from_millis(250);

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

/// The content hash of the file, or None when it cannot be read.
fn file_hash(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()
        .map(|t| crate::snapshot::text_hash(&t))
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
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours included: every status call reads the file) are not
        // changes; reacting to them would loop.
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
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
    let watched = file.clone();
    tokio::spawn(async move {
        let file = watched;
        // Reload only when the file's content changes: a change made through
        // the API lasts until the file itself changes (or a reload is asked
        // for), not until the next unrelated event in the directory.
        let mut last = file_hash(&file);
        while rx.recv().await.is_some() {
            // Debounce: wait until the directory has been quiet for a while.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            let now = file_hash(&file);
            if now != last {
                last = now;
                let _ = server.reload_file().await;
            }
        }
    });
    tracing::info!(file = %file.display(), "watching the config file");
    Ok(Some(ConfigWatch { _watcher: watcher }))
}
