//! Local resources: file descriptors, socket buffers, memory.
//!
//! Running out of them is the proxy's own fault, never a backend's: a
//! connect that fails with `EMFILE` must not count towards that backend's
//! ejection (a healthy pool was once ejected backend by backend this way,
//! and every call got `no_backend`). Calls are answered FAILURE
//! `local_resources` instead.
//!
//! **The reserve.** Calls may not use the last [`reserve`] descriptors:
//! those are kept for the control API (whose connections are capped below
//! the reserve) and health checks, so that an operator can still see and
//! act on a proxy at its limit. The check costs nothing: the kernel always
//! hands out the lowest free descriptor number, so a new descriptor
//! numbered `n` means every number below `n` is taken; when `n` reaches
//! `limit - reserve`, fewer than `reserve` remain, and the call (an accepted
//! connection, or a backend socket) is refused rather than spend them.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::throttle::Throttle;

/// `RLIMIT_NOFILE` (soft) as read at start; `usize::MAX`: no limit known.
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Descriptor numbers at or above this are the reserve.
static RESERVE_FROM: AtomicUsize = AtomicUsize::new(usize::MAX);
/// At most one warning per this span: at the limit every call would log one.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The warning's throttle: the line says where the count is, so no summary.
static WARNINGS: Throttle = Throttle::new(WARN_EVERY, 1, &[], None);

/// The reserve for a limit: an eighth of it, at least 16 (the control API's
/// connection cap is below the reserve of any limit of 1,024 and more),
/// at most 256.
pub fn reserve(limit: usize) -> usize {
    (limit / 8).clamp(16, 256)
}

/// Reads the descriptor limit; called once at start (and by tests).
pub fn init() {
    // SAFETY: getrlimit writes into the struct we pass.
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0
        || rl.rlim_cur == libc::RLIM_INFINITY
    {
        return;
    }
    let limit = usize::try_from(rl.rlim_cur).unwrap_or(usize::MAX);
    LIMIT.store(limit, Relaxed);
    RESERVE_FROM.store(limit.saturating_sub(reserve(limit)), Relaxed);
}

/// The limit read by [`init`], if any.
pub fn limit() -> Option<usize> {
    Some(LIMIT.load(Relaxed)).filter(|l| *l != usize::MAX)
}

/// Whether a descriptor just created by a call eats into the reserve.
pub fn in_reserve(fd: RawFd) -> bool {
    usize::try_from(fd).is_ok_and(|fd| fd >= RESERVE_FROM.load(Relaxed))
}

/// An error that says the proxy itself is out of a resource (descriptors,
/// socket buffers, kernel memory), not that the peer failed.
pub fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The error a call gets when its descriptor fell in the reserve.
pub fn reserve_error() -> io::Error {
    io::Error::other("descriptor reserve reached")
}

/// Logs a warning about local exhaustion, at most once per [`WARN_EVERY`]
/// (the metric counts every occurrence).
pub fn warn(op: &'static str, error: &io::Error) {
    if !WARNINGS.admit(op) {
        return;
    }
    tracing::warn!(
        op,
        error = %error,
        limit = ?limit(),
        reserve = limit().map(reserve),
        "out of local resources (descriptors or memory): calls get FAILURE local_resources; raise the descriptor limit (ulimit -n, LimitNOFILE) or lower limits.max_sessions (further warnings within 10 s suppressed; see agiproxy_local_resource_errors_total)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_errors_are_told_from_the_peers() {
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_local(&io::Error::from_raw_os_error(code)), "{code}");
        }
        for code in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
        ] {
            assert!(!is_local(&io::Error::from_raw_os_error(code)), "{code}");
        }
        assert!(!is_local(&reserve_error()));
    }

    #[test]
    fn the_reserve_scales_with_the_limit() {
        assert_eq!(reserve(64), 16);
        assert_eq!(reserve(1024), 128);
        assert_eq!(reserve(1 << 20), 256);
        // Above the control API's connection cap for any usual limit.
        assert!(reserve(1024) > 64);
    }
}
