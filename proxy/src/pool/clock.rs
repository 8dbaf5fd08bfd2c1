//! The pool layer's clock and locks: what every part of a pool's state reads.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// Milliseconds on a process-wide monotonic clock (0 = never). It starts a
/// day in, so "a while ago" is always a valid time.
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 86_400_000
}

/// A poisoned lock only means a thread panicked holding it; the data is fine.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
