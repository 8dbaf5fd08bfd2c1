//! The config file as last read: its hash and rollouts, for status calls
//! that must not read it.

use std::sync::Arc;

use agiproxy_config::Config;

use super::{ApplyError, FileRollouts, Server};
use crate::snapshot::text_hash;

impl Server {
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
    pub(super) fn note_parsed(&self, hash: u64, config: &Config) {
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
}
