//! One backend's live state: active sessions, the health checks' verdict,
//! passive ejection with a growing backoff, slow start, draining. Shared by
//! every session that uses the backend, and carried across reloads and DNS
//! changes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::clock::{lock, now_ms};
use super::hash::stable_hash;

/// The share of new sessions a backend in slow start gets at first.
const SLOW_START_FLOOR: f64 = 0.1;

/// What a backend is, for new sessions. In order of precedence: a draining
/// backend is `Draining` whatever its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Eligible at full share.
    Healthy,
    /// Eligible, at a share rising over the pool's `slow_start` window.
    SlowStart,
    /// Skipped after passive failures, until its backoff ends (and, with
    /// active checks, a check passes after that). The pool's
    /// `max_ejection_percent` may keep it in rotation all the same.
    Ejected,
    /// Failing active checks: never offered.
    Unhealthy,
    /// Set through the control API: no new sessions, existing ones finish.
    Draining,
}

impl BackendState {
    pub const ALL: [BackendState; 5] = [
        BackendState::Healthy,
        BackendState::SlowStart,
        BackendState::Ejected,
        BackendState::Unhealthy,
        BackendState::Draining,
    ];

    /// `healthy`, `slow_start`, `ejected`, `unhealthy`, `draining`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Healthy => "healthy",
            BackendState::SlowStart => "slow_start",
            BackendState::Ejected => "ejected",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Draining => "draining",
        }
    }

    pub(super) fn from_u8(v: u8) -> BackendState {
        BackendState::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(BackendState::Healthy)
    }
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one active check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    pub ok: bool,
    /// From the start of the connect to the verdict.
    pub latency: Duration,
    /// When the check ended.
    pub at: SystemTime,
    /// What was seen: `first command "NOOP"`, `connect refused`,
    /// `no command within 1s`, ...
    pub detail: String,
}

/// The check loops of one activation of a pool (one running config): the
/// only ones whose results apply to its backends. Each activation (a
/// reload) starts a new epoch. A probe is never cut, so one of a retired
/// loop can end after the reload: its result is dropped, as it may judge
/// the backend by checks that changed or went (and, with none left, nothing
/// would ever revise it). The new config's loops, if any, check afresh.
#[derive(Debug, Clone)]
pub struct CheckEpoch {
    /// The pool's current epoch (`PoolLive::check_epoch`).
    current: Arc<AtomicU64>,
    epoch: u64,
}

impl CheckEpoch {
    pub(super) fn new(current: Arc<AtomicU64>, epoch: u64) -> CheckEpoch {
        CheckEpoch { current, epoch }
    }

    /// Tested under a backend's `last_check` lock, which an activation
    /// takes (to clear) after it starts a new epoch: no result of an older
    /// one can land after the clear.
    fn is_current(&self) -> bool {
        self.current.load(Ordering::Relaxed) == self.epoch
    }
}

/// The active checks' verdict on a backend.
const UNCHECKED: u8 = 0;
const PASSING: u8 = 1;
const FAILING: u8 = 2;

/// Live state of one backend: shared by every session that uses it, and
/// carried across config reloads and DNS changes (keyed by pool name and
/// address), so neither forgets active sessions nor forgives a failing
/// backend.
#[derive(Debug)]
pub struct BackendLive {
    pub addr: SocketAddr,
    /// The address as text, formatted once: the `backend` metric label.
    pub label: Box<str>,
    /// Sessions holding this backend (attempts in progress included).
    pub active: AtomicU32,
    /// Sessions committed on this backend.
    pub total: AtomicU64,
    /// Passive failures in a row (reset by a session that commits).
    pub consecutive_failures: AtomicU32,
    /// Passive ejections so far.
    pub ejections: AtomicU64,
    /// `now_ms()` until which the backend is skipped; 0 when eligible.
    pub(super) ejected_until: AtomicU64,
    /// Ejected in a pool with active checks: readmitted only by a check
    /// that passes once the backoff is over.
    pub(super) awaiting_check: AtomicBool,
    /// Set through the control API: no new sessions, existing ones finish.
    pub(super) draining: AtomicBool,
    /// The active checks' verdict: UNCHECKED, PASSING or FAILING.
    pub(super) health: AtomicU8,
    pub(super) check_passes: AtomicU32,
    pub(super) check_failures: AtomicU32,
    /// Active checks run so far.
    pub checks: AtomicU64,
    /// Checks that could not run for the proxy's own want of descriptors or
    /// memory: no verdict either way.
    pub checks_not_run: AtomicU64,
    /// The last check's result. Its lock is held to apply a result and to
    /// forget the verdict, so that each is one step (see [`CheckEpoch`]).
    pub(super) last_check: Mutex<Option<CheckResult>>,
    /// When the next check is due, and the check epoch whose loop set it:
    /// the loop that takes over at a reload keeping the checks goes on
    /// from there.
    next_check: Mutex<Option<(u64, tokio::time::Instant)>>,
    /// `now_ms()` when the backend came back (slow start from there); 0: never.
    pub(super) ramp_from: AtomicU64,
    /// The pool's slow-start window in ms; 0: off.
    pub(super) ramp_ms: AtomicU64,
    /// The state last logged, so each change is logged once.
    pub(super) reported: AtomicU8,
}

impl BackendLive {
    pub fn new(addr: SocketAddr) -> BackendLive {
        BackendLive {
            addr,
            label: addr.to_string().into(),
            active: AtomicU32::new(0),
            total: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
            awaiting_check: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            health: AtomicU8::new(UNCHECKED),
            check_passes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            checks: AtomicU64::new(0),
            checks_not_run: AtomicU64::new(0),
            last_check: Mutex::new(None),
            next_check: Mutex::new(None),
            ramp_from: AtomicU64::new(0),
            ramp_ms: AtomicU64::new(0),
            reported: AtomicU8::new(BackendState::Healthy as u8),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Draining: no new sessions, existing ones finish. Logged.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
        let reason = if draining {
            "drain requested"
        } else {
            "drain lifted"
        };
        self.note_change(None, Some(reason));
    }

    /// In its passive backoff (or waiting for a passing check after it).
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
            || self.awaiting_check.load(Ordering::Relaxed)
    }

    /// Failing active checks.
    pub fn is_unhealthy(&self) -> bool {
        self.health.load(Ordering::Relaxed) == FAILING
    }

    /// The active checks' verdict: None before the first check (or without
    /// checks), else whether the backend passes.
    pub fn check_verdict(&self) -> Option<bool> {
        match self.health.load(Ordering::Relaxed) {
            PASSING => Some(true),
            FAILING => Some(false),
            _ => None,
        }
    }

    /// Passing and failing checks in a row (one of them is 0).
    pub fn check_streak(&self) -> (u32, u32) {
        (
            self.check_passes.load(Ordering::Relaxed),
            self.check_failures.load(Ordering::Relaxed),
        )
    }

    pub fn last_check(&self) -> Option<CheckResult> {
        lock(&self.last_check).clone()
    }

    /// Time left in the passive backoff.
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// The share of new sessions this backend gets while it slow-starts
    /// (0.1 rising to 1.0); None when it is not in slow start.
    pub fn slow_start_share(&self) -> Option<f64> {
        self.share_at(now_ms())
    }

    pub(super) fn share_at(&self, now: u64) -> Option<f64> {
        let window = self.ramp_ms.load(Ordering::Relaxed);
        let from = self.ramp_from.load(Ordering::Relaxed);
        if window == 0 || from == 0 || now < from || now >= from + window {
            return None;
        }
        Some(((now - from) as f64 / window as f64).max(SLOW_START_FLOOR))
    }

    /// The backend's state for new sessions.
    pub fn state(&self) -> BackendState {
        self.state_at(now_ms())
    }

    pub(super) fn state_at(&self, now: u64) -> BackendState {
        if self.is_draining() {
            BackendState::Draining
        } else if self.is_unhealthy() {
            BackendState::Unhealthy
        } else if self.is_ejected(now) {
            BackendState::Ejected
        } else if self.share_at(now).is_some() {
            BackendState::SlowStart
        } else {
            BackendState::Healthy
        }
    }

    /// Starts slow start now (a backend that came back).
    pub(super) fn begin_ramp(&self, now: u64) {
        self.ramp_from.store(now, Ordering::Relaxed);
    }

    /// Takes the state as logged: a backend new to its pool.
    pub(super) fn reported_as_is(&self) {
        self.reported.store(self.state() as u8, Ordering::Relaxed);
    }

    /// Logs the state if it changed since last logged. `reason` says why;
    /// without one it is inferred from the change (a backoff or slow start
    /// running out). `pool` names the pool in the log line.
    pub fn note(&self, pool: &str, reason: Option<&str>) {
        self.note_change(Some(pool), reason);
    }

    /// A new passive ejection, logged also when the state last reported is
    /// an ejection: the end of the one before (the clock's doing) is only
    /// reported by the watcher every 200 ms, and a re-ejection within that
    /// went unlogged (audit: three ejections, one line).
    pub(super) fn note_ejection(&self, pool: &str, reason: &str) {
        self.note_state(Some(pool), Some(reason), true);
    }

    pub(super) fn note_change(&self, pool: Option<&str>, reason: Option<&str>) {
        self.note_state(pool, reason, false);
    }

    fn note_state(&self, pool: Option<&str>, reason: Option<&str>, event: bool) {
        let now = self.state();
        let was = BackendState::from_u8(self.reported.swap(now as u8, Ordering::Relaxed));
        if was == now && !(event && now == BackendState::Ejected) {
            return;
        }
        let inferred = match (was, now) {
            (BackendState::Ejected, _) => "ejection backoff over",
            (BackendState::SlowStart, BackendState::Healthy) => "slow start over",
            (BackendState::Draining, _) => "drain lifted",
            _ => "state changed",
        };
        let reason = reason.unwrap_or(inferred);
        let pool = pool.unwrap_or("-");
        match now {
            BackendState::Unhealthy | BackendState::Ejected => tracing::warn!(
                pool,
                backend = %self.addr,
                from = was.as_str(),
                to = now.as_str(),
                reason,
                "backend state changed"
            ),
            _ => tracing::info!(
                pool,
                backend = %self.addr,
                from = was.as_str(),
                to = now.as_str(),
                reason,
                "backend state changed"
            ),
        }
    }

    /// Applies one active check's result: `fall` failures in a row make a
    /// healthy backend unhealthy, `rise` passes in a row make it healthy
    /// again (then it slow-starts). A backend never checked before goes
    /// straight to the verdict of its first check. A passing check also
    /// readmits a backend whose passive backoff is over.
    ///
    /// False, and nothing applied, when `epoch` has ended: a reload took
    /// over the pool since the check began.
    pub fn record_check(
        &self,
        result: CheckResult,
        rise: u32,
        fall: u32,
        pool: &str,
        epoch: &CheckEpoch,
    ) -> bool {
        let mut last = lock(&self.last_check);
        if !epoch.is_current() {
            return false;
        }
        self.checks.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let mut reason = None;
        if result.ok {
            let passes = self.check_passes.fetch_add(1, Ordering::Relaxed) + 1;
            self.check_failures.store(0, Ordering::Relaxed);
            match self.health.load(Ordering::Relaxed) {
                UNCHECKED => self.health.store(PASSING, Ordering::Relaxed),
                FAILING if passes >= rise => {
                    self.health.store(PASSING, Ordering::Relaxed);
                    self.begin_ramp(now);
                    reason = Some(format!("passed {passes} checks in a row"));
                }
                _ => {}
            }
            if self.awaiting_check.load(Ordering::Relaxed)
                && self.ejected_until.load(Ordering::Relaxed) <= now
            {
                self.awaiting_check.store(false, Ordering::Relaxed);
                self.begin_ramp(now);
                reason.get_or_insert_with(|| "readmitted by a passing check".to_string());
            }
        } else {
            let failures = self.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
            self.check_passes.store(0, Ordering::Relaxed);
            match self.health.load(Ordering::Relaxed) {
                UNCHECKED => {
                    self.health.store(FAILING, Ordering::Relaxed);
                    reason = Some(format!("failed its first check: {}", result.detail));
                }
                PASSING if failures >= fall => {
                    self.health.store(FAILING, Ordering::Relaxed);
                    reason = Some(format!(
                        "failed {failures} checks in a row, last: {}",
                        result.detail
                    ));
                }
                _ => {
                    tracing::debug!(pool, backend = %self.addr, detail = %result.detail, failures, "check failed")
                }
            }
        }
        *last = Some(result);
        self.note(pool, reason.as_deref());
        true
    }

    /// When the next check of `epoch` is due, if a loop of it set one.
    pub(super) fn next_check(&self, epoch: &CheckEpoch) -> Option<tokio::time::Instant> {
        lock(&self.next_check)
            .filter(|(of, _)| *of == epoch.epoch)
            .map(|(_, at)| at)
    }

    /// Notes when the next check of `epoch` is due.
    pub(super) fn schedule_check(&self, epoch: &CheckEpoch, at: tokio::time::Instant) {
        *lock(&self.next_check) = Some((epoch.epoch, at));
    }

    /// Counts a check that could not run for the proxy's own shortage; false,
    /// and not counted, when `epoch` has ended (as for [`Self::record_check`]).
    pub(crate) fn record_not_run(&self, epoch: &CheckEpoch) -> bool {
        let _last = lock(&self.last_check);
        if !epoch.is_current() {
            return false;
        }
        self.checks_not_run.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Forgets the active checks' verdict (the pool no longer checks).
    pub(super) fn clear_checks(&self) {
        let mut last = lock(&self.last_check);
        self.health.store(UNCHECKED, Ordering::Relaxed);
        self.awaiting_check.store(false, Ordering::Relaxed);
        self.check_passes.store(0, Ordering::Relaxed);
        self.check_failures.store(0, Ordering::Relaxed);
        // No stale `check_up` series (and alerts on it) after checks go.
        self.checks.store(0, Ordering::Relaxed);
        self.checks_not_run.store(0, Ordering::Relaxed);
        *last = None;
    }
}

/// A backend as the running config (or DNS) describes it, with its live state.
#[derive(Debug, Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_sessions: Option<u32>,
    pub live: Arc<BackendLive>,
    /// Failover tier: 0 for addresses and A/AAAA names; for SRV records the
    /// rank of their priority (lowest first). Higher tiers are only tried
    /// after every eligible backend of a lower one.
    pub tier: u16,
    /// Where it came from: `static`, `dns NAME:PORT` or `srv NAME`.
    pub source: Arc<str>,
    /// Seed for rendezvous hashing, from the address: stable on every replica.
    pub(super) identity: u64,
}

impl Backend {
    pub fn new(
        addr: SocketAddr,
        weight: u32,
        max_sessions: Option<u32>,
        live: Arc<BackendLive>,
    ) -> Backend {
        Backend {
            addr,
            weight: weight.max(1),
            max_sessions,
            live,
            tier: 0,
            source: Arc::from("static"),
            identity: stable_hash(addr.to_string().as_bytes(), 0),
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.max_sessions
            .is_some_and(|m| self.live.active.load(Ordering::Relaxed) >= m)
    }
}
