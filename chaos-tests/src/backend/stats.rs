//! What a [`FakeBackend`](super::FakeBackend) saw, shared with the test.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{timeout_at, Instant};

/// One finished session, as the backend saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionLog {
    /// The header byte-exact, blank line included (empty if none arrived).
    pub header: Vec<u8>,
    /// Each reply's text; a `520-` block is one entry with inner `\n`s.
    pub replies: Vec<String>,
    /// Number of replies (also counted when texts are not kept).
    pub reply_count: usize,
    /// `HANGUP` lines received, unsolicited and end-of-session alike.
    pub hangups: usize,
    /// Files received with `GET SOUNDFILE` (decoded).
    pub files: Vec<(String, Vec<u8>)>,
    pub bytes_received: u64,
    /// The I/O error that ended the session, if one did.
    pub error: Option<String>,
}

/// Counters and logs of one backend, across restarts.
#[derive(Debug, Default)]
pub struct BackendStats {
    accepted: AtomicU64,
    active: AtomicU64,
    completed: AtomicU64,
    pub(super) hangups: AtomicU64,
    pub(super) replies: AtomicU64,
    pub(super) bytes_received: AtomicU64,
    headers: Mutex<Vec<Vec<u8>>>,
    sessions: Mutex<Vec<SessionLog>>,
    changed: Notify,
}

/// A poisoned lock only means a test thread panicked; the data is still fine.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BackendStats {
    /// Connections accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// Connections open right now.
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// Connections finished (also those cut by `stop()`).
    pub fn sessions_completed(&self) -> u64 {
        self.completed.load(Relaxed)
    }

    /// `HANGUP` lines received, all sessions together.
    pub fn hangups(&self) -> u64 {
        self.hangups.load(Relaxed)
    }

    /// Replies received, all sessions together.
    pub fn replies(&self) -> u64 {
        self.replies.load(Relaxed)
    }

    /// Bytes received, all sessions together.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Relaxed)
    }

    /// Every header received, byte-exact, in arrival order (recorded as soon
    /// as the blank line arrives, so also for sessions still running).
    pub fn headers(&self) -> Vec<Vec<u8>> {
        lock(&self.headers).clone()
    }

    /// Logs of the finished sessions, in the order they finished. The
    /// benchmark backend ([`Behaviour::Echo`](super::Behaviour::Echo)) keeps
    /// none.
    pub fn sessions(&self) -> Vec<SessionLog> {
        lock(&self.sessions).clone()
    }

    /// Waits until at least `n` sessions have finished; `false` if `within`
    /// ran out first.
    pub async fn wait_completed(&self, n: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.sessions_completed() >= n {
                return true;
            }
            if timeout_at(deadline, changed).await.is_err() {
                return self.sessions_completed() >= n;
            }
        }
    }

    pub(super) fn session_started(&self) {
        self.accepted.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
    }

    pub(super) fn record_header(&self, header: Vec<u8>) {
        lock(&self.headers).push(header);
    }

    pub(super) fn session_ended(&self, log: Option<SessionLog>) {
        if let Some(log) = log {
            lock(&self.sessions).push(log);
        }
        self.active.fetch_sub(1, Relaxed);
        self.completed.fetch_add(1, Relaxed);
        self.changed.notify_waiters();
    }
}
