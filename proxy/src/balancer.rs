//! Pools and balancing: per-backend live state (active sessions, health
//! verdicts, passive ejection with growing backoff, slow start, draining),
//! the policies that order a pool's backends for one call, and the readable
//! state the control API and metrics expose. Picking never takes a lock:
//! everything on the session path is atomics.
//!
//! Who changes what:
//! - sessions ([`crate::connect`]): active/total counts, passive failures
//!   and successes ([`PoolState::passive_failure`], [`PoolState::passive_success`]);
//! - active checks ([`crate::health`]): the health verdict, through
//!   [`BackendLive::record_check`];
//! - DNS discovery ([`crate::discovery`]): the member set, replaced whole;
//! - the control API: [`BackendLive::set_draining`].
//!
//! Every state change is logged once, with its reason (see [`BackendLive::note`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use agiproxy_config::{BackendTarget, Backoff, Balance, Pool};
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::discovery::{self, Discovered};
use crate::header::Header;

/// A stable 64-bit hash: the same on every replica and every release, so
/// replicas agree on consistent-hash and split decisions.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

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

/// The share of new sessions a backend in slow start gets at first.
const SLOW_START_FLOOR: f64 = 0.1;

/// Loud pool warnings (panic, no healthy backend) at most this often.
const WARN_EVERY_MS: u64 = 10_000;

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

    fn from_u8(v: u8) -> BackendState {
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
    ejected_until: AtomicU64,
    /// Ejected in a pool with active checks: readmitted only by a check
    /// that passes once the backoff is over.
    awaiting_check: AtomicBool,
    /// Set through the control API: no new sessions, existing ones finish.
    draining: AtomicBool,
    /// The active checks' verdict: UNCHECKED, PASSING or FAILING.
    health: AtomicU8,
    check_passes: AtomicU32,
    check_failures: AtomicU32,
    /// Active checks run so far.
    pub checks: AtomicU64,
    last_check: Mutex<Option<CheckResult>>,
    /// `now_ms()` when the backend came back (slow start from there); 0: never.
    ramp_from: AtomicU64,
    /// The pool's slow-start window in ms; 0: off.
    ramp_ms: AtomicU64,
    /// The state last logged, so each change is logged once.
    reported: AtomicU8,
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
            last_check: Mutex::new(None),
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

    fn share_at(&self, now: u64) -> Option<f64> {
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

    fn state_at(&self, now: u64) -> BackendState {
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
    fn begin_ramp(&self, now: u64) {
        self.ramp_from.store(now, Ordering::Relaxed);
    }

    /// Logs the state if it changed since last logged. `reason` says why;
    /// without one it is inferred from the change (a backoff or slow start
    /// running out). `pool` names the pool in the log line.
    pub fn note(&self, pool: &str, reason: Option<&str>) {
        self.note_change(Some(pool), reason);
    }

    fn note_change(&self, pool: Option<&str>, reason: Option<&str>) {
        let now = self.state();
        let was = BackendState::from_u8(self.reported.swap(now as u8, Ordering::Relaxed));
        if was == now {
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
    pub fn record_check(&self, result: CheckResult, rise: u32, fall: u32, pool: &str) {
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
        *lock(&self.last_check) = Some(result);
        self.note(pool, reason.as_deref());
    }

    /// Forgets the active checks' verdict (the pool no longer checks).
    fn clear_checks(&self) {
        self.health.store(UNCHECKED, Ordering::Relaxed);
        self.awaiting_check.store(false, Ordering::Relaxed);
        self.check_passes.store(0, Ordering::Relaxed);
        self.check_failures.store(0, Ordering::Relaxed);
        // No stale `check_up` series (and alerts on it) after checks go.
        self.checks.store(0, Ordering::Relaxed);
        *lock(&self.last_check) = None;
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
    identity: u64,
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

    fn is_full(&self) -> bool {
        self.max_sessions
            .is_some_and(|m| self.live.active.load(Ordering::Relaxed) >= m)
    }
}

/// Live state of a pool, carried across reloads like a backend's.
#[derive(Debug, Default)]
pub struct PoolLive {
    pub active: AtomicU32,
    cursor: AtomicU64,
    /// Counter behind the pseudo-random slow-start draws.
    draws: AtomicU64,
    last_warn_ms: AtomicU64,
    /// Every backend of the pool still referenced anywhere (members of a
    /// running or retired snapshot, sessions), so an address that leaves and
    /// comes back finds its state again.
    registry: Mutex<HashMap<SocketAddr, Weak<BackendLive>>>,
    /// The last good DNS answer of each name, keyed by [`discovery::key`].
    pub(crate) discovery: Mutex<HashMap<String, Discovered>>,
    /// Serialises member-set rebuilds.
    rebuild: Mutex<()>,
}

impl PoolLive {
    /// True at most once per [`WARN_EVERY_MS`]: for loud, rate-limited warnings.
    fn warn_due(&self, now: u64) -> bool {
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        (last == 0 || now >= last + WARN_EVERY_MS)
            && self
                .last_warn_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// A uniform draw in [0, 1).
    fn draw(&self) -> f64 {
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        (stable_hash(&n.to_le_bytes(), 0x51_0e5a) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Holds a backend's (and its pool's) active-session count for as long as a
/// session uses it; dropping it releases both.
#[derive(Debug)]
pub struct Lease {
    pub backend: Arc<BackendLive>,
    pool: Arc<PoolLive>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
        self.pool.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a pool offered no backend at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// Every backend is down (failing checks, ejected beyond what the
    /// ejection cap keeps, draining), or the pool has none (yet).
    AllEjected,
    /// Every eligible backend, or the pool, is at its session limit.
    Full,
}

/// One failover tier of a member set.
#[derive(Debug)]
struct Tier {
    /// Indices into `Members::backends`.
    idx: Vec<usize>,
    /// Smooth weighted round-robin schedule over `idx` (positions in it).
    schedule: Vec<u16>,
}

/// A pool's current backends. Replaced whole (never edited) when the set
/// changes, so a session's view stays consistent while it tries them.
#[derive(Debug)]
pub struct Members {
    pub backends: Vec<Backend>,
    /// By ascending tier.
    tiers: Vec<Tier>,
}

impl Members {
    pub fn new(backends: Vec<Backend>) -> Members {
        let mut levels: Vec<u16> = backends.iter().map(|b| b.tier).collect();
        levels.sort_unstable();
        levels.dedup();
        let tiers = levels
            .into_iter()
            .map(|level| {
                let idx: Vec<usize> = (0..backends.len())
                    .filter(|&i| backends[i].tier == level)
                    .collect();
                let weights: Vec<u32> = idx.iter().map(|&i| backends[i].weight).collect();
                Tier {
                    schedule: smooth_wrr(&weights),
                    idx,
                }
            })
            .collect();
        Members { backends, tiers }
    }
}

/// One call's candidates: the member set it was chosen from, best first.
#[derive(Debug)]
pub struct Candidates {
    pub members: Arc<Members>,
    pub order: Vec<usize>,
}

/// What background tasks of a pool share with it.
#[derive(Debug)]
pub(crate) struct PoolShared {
    pub name: String,
    pub config: Pool,
    pub live: Arc<PoolLive>,
    pub members: ArcSwap<Members>,
    /// Cancelled when the pool's snapshot retires: stops its tasks.
    pub cancel: CancellationToken,
}

impl PoolShared {
    /// Rebuilds the member set from the config and the last good DNS
    /// answers. Sessions keep the set they were given.
    pub(crate) fn rebuild_members(&self) {
        let _serial = lock(&self.live.rebuild);
        let previous = self.members.load_full();
        let members = build_members(&self.config, &self.live, Some(&previous), true);
        self.members.store(Arc::new(members));
    }
}

/// Readable state of one backend, for the control API and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStatus {
    pub address: SocketAddr,
    /// `static`, `dns NAME:PORT` or `srv NAME`.
    pub source: String,
    pub state: BackendState,
    pub weight: u32,
    /// Failover tier (SRV priority rank; 0 otherwise).
    pub tier: u16,
    pub max_sessions: Option<u32>,
    pub active_sessions: u32,
    pub total_sessions: u64,
    /// Passive failures in a row.
    pub consecutive_failures: u32,
    pub ejections: u64,
    /// Time left in the passive backoff.
    pub ejected_for: Option<Duration>,
    pub draining: bool,
    /// Active checks: the verdict (None before the first one or without
    /// checks), the last result, passes and failures in a row, checks run.
    pub check_verdict: Option<bool>,
    pub last_check: Option<CheckResult>,
    pub check_passes: u32,
    pub check_failures: u32,
    pub checks: u64,
    /// Share of new sessions while in slow start.
    pub slow_start_share: Option<f64>,
}

/// Readable state of one DNS name of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryStatus {
    /// `NAME:PORT` (A/AAAA) or `srv NAME`.
    pub target: String,
    /// Addresses in the last good answer.
    pub addresses: Vec<SocketAddr>,
    /// When the last good answer came.
    pub last_success: Option<SystemTime>,
    /// The TTL it was re-resolved on (bounded by min_ttl and max_ttl).
    pub ttl: Duration,
    pub lookups: u64,
    /// Failed or empty lookups (the last good set was kept).
    pub failures: u64,
    pub last_error: Option<String>,
}

/// Readable state of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolStatus {
    pub name: String,
    pub balance: String,
    pub active_sessions: u32,
    pub backends: Vec<BackendStatus>,
    /// More backends are ejected than `max_ejection_percent` allows: some
    /// ejected ones are kept in rotation.
    pub panic: bool,
    pub discovery: Vec<DiscoveryStatus>,
}

#[derive(Debug)]
pub struct PoolState {
    /// Shared text: every session's record names its pool without a copy.
    pub name: Arc<str>,
    pub balance: Balance,
    pub backoff: Backoff,
    pub max_sessions: Option<u32>,
    pub live: Arc<PoolLive>,
    shared: Arc<PoolShared>,
    activated: AtomicBool,
}

impl PoolState {
    /// Builds a pool from config, reusing live state from `previous` (the
    /// same pool in the config being replaced) so a reload keeps it: backend
    /// state, active sessions, and the last good answer of each DNS name.
    pub fn new(pool: &Pool, previous: Option<&PoolState>) -> PoolState {
        let live: Arc<PoolLive> = previous.map_or_else(Default::default, |p| p.live.clone());
        let prev_members = previous.map(|p| p.members());
        // Building changes nothing that a running pool uses: a snapshot that
        // is built but never runs (a dry run, a refused reload) leaves no
        // trace. `activate` applies this config to the carried state.
        let members = build_members(pool, &live, prev_members.as_deref(), false);
        let shared = Arc::new(PoolShared {
            name: pool.name.clone(),
            config: pool.clone(),
            live: live.clone(),
            members: ArcSwap::from_pointee(members),
            cancel: CancellationToken::new(),
        });
        PoolState {
            name: pool.name.as_str().into(),
            balance: pool.balance.clone(),
            backoff: pool.backoff,
            max_sessions: pool.max_sessions,
            live,
            shared,
            activated: AtomicBool::new(false),
        }
    }

    /// Starts the pool's background work: the state watcher and active
    /// checks ([`crate::health`]) and one resolver loop per DNS name
    /// ([`crate::discovery`]). Needs a Tokio runtime; idempotent.
    pub fn activate(&self) {
        if self.activated.swap(true, Ordering::Relaxed) {
            return;
        }
        let config = &self.shared.config;
        let window = config.slow_start.map_or(0, |d| d.as_millis() as u64);
        for b in &self.members().backends {
            b.live.ramp_ms.store(window, Ordering::Relaxed);
            if config.health.is_none() {
                // No checks any more: an old verdict would never be revised.
                b.live.clear_checks();
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(pool = %self.name, "no async runtime: health checks and DNS discovery not started");
            return;
        };
        rt.spawn(crate::health::supervise(self.shared.clone()));
        for (i, b) in self.shared.config.backends.iter().enumerate() {
            if b.target.static_addr().is_none() {
                rt.spawn(discovery::follow(self.shared.clone(), i));
            }
        }
    }

    /// Stops the pool's background work (see `Snapshot::retire`). Probes in
    /// flight still end politely.
    pub fn retire(&self) {
        self.shared.cancel.cancel();
    }

    /// The pool's config.
    pub fn config(&self) -> &Pool {
        &self.shared.config
    }

    /// The current member set.
    pub fn members(&self) -> Arc<Members> {
        self.shared.members.load_full()
    }

    /// Replaces the member set. Sessions keep the set they were given; a
    /// removed backend's sessions run to their end.
    pub fn set_members(&self, members: Members) {
        self.shared.members.store(Arc::new(members));
    }

    /// The backend at `addr`, if it is a member.
    pub fn backend(&self, addr: SocketAddr) -> Option<Arc<BackendLive>> {
        self.members()
            .backends
            .iter()
            .find(|b| b.addr == addr)
            .map(|b| b.live.clone())
    }

    /// Drains (or un-drains) the member at `addr`; false when there is none.
    pub fn set_draining(&self, addr: SocketAddr, draining: bool) -> bool {
        match self.backend(addr) {
            Some(live) => {
                live.draining.store(draining, Ordering::Relaxed);
                let reason = if draining {
                    "drain requested"
                } else {
                    "drain lifted"
                };
                live.note(&self.name, Some(reason));
                true
            }
            None => false,
        }
    }

    /// A passive failure of `backend` (connect failed, closed or reset
    /// before its first byte, first-command deadline missed; `what` says
    /// which). After `passive.consecutive_failures` in a row the backend is
    /// ejected for a backoff that doubles with each further failure; in a
    /// pool with active checks it then waits for a passing check too.
    /// Returns the backoff when it was ejected.
    ///
    /// A backend already ejected is left as it is: the failure comes from a
    /// session that chose it before the ejection (or from the ejection cap
    /// keeping it), and must not stretch the backoff.
    pub fn passive_failure(&self, backend: &BackendLive, what: &str) -> Option<Duration> {
        let cfg = &self.shared.config;
        if backend.is_ejected(now_ms()) {
            tracing::debug!(pool = %self.name, backend = %backend.addr, what, "passive failure of an ejected backend");
            return None;
        }
        let n = backend.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < cfg.eject_after {
            tracing::debug!(pool = %self.name, backend = %backend.addr, failures = n, what, "passive failure");
            return None;
        }
        let factor = 1u32 << (n - cfg.eject_after).min(16);
        let wait = self
            .backoff
            .base
            .saturating_mul(factor)
            .min(self.backoff.max);
        let until = now_ms() + wait.as_millis() as u64;
        backend.ejected_until.store(until, Ordering::Relaxed);
        // Slow start runs from the end of the backoff (or from the check
        // that readmits it).
        backend.ramp_from.store(until, Ordering::Relaxed);
        if cfg.health.is_some() {
            backend.awaiting_check.store(true, Ordering::Relaxed);
        }
        backend.ejections.fetch_add(1, Ordering::Relaxed);
        let reason = format!("{what} ({n} in a row); ejected for {wait:?}");
        backend.note(&self.name, Some(&reason));
        Some(wait)
    }

    /// A session committed on `backend`: its passive record is clean again.
    pub fn passive_success(&self, backend: &BackendLive) {
        if backend.consecutive_failures.load(Ordering::Relaxed) == 0 {
            return;
        }
        backend.consecutive_failures.store(0, Ordering::Relaxed);
        backend.ejected_until.store(0, Ordering::Relaxed);
        backend.awaiting_check.store(false, Ordering::Relaxed);
        let now = now_ms();
        if backend.ramp_from.load(Ordering::Relaxed) > now {
            // It served while its backoff ran (kept by the ejection cap).
            backend.ramp_from.store(0, Ordering::Relaxed);
        }
        backend.note(&self.name, Some("served a session"));
    }

    /// The eligible backends for one call, best first. The caller tries them
    /// in order; an error means fail at once.
    ///
    /// The policy orders each failover tier; then backends that are
    /// draining, failing checks or full are dropped, and ejected ones too,
    /// except that no more than `max_ejection_percent` of the pool is ever
    /// treated as ejected: beyond it the least-bad ejected backends are kept
    /// (last) and the pool is "in panic". A backend in slow start goes to
    /// the end of its tier for a share of calls that shrinks over the window
    /// (not for `hash`, whose point is to keep a key on its backend).
    pub fn candidates(&self, header: &Header) -> Result<Candidates, NoBackend> {
        if self
            .max_sessions
            .is_some_and(|m| self.live.active.load(Ordering::Relaxed) >= m)
        {
            return Err(NoBackend::Full);
        }
        let members = self.members();
        let backends = &members.backends;
        let n = backends.len();
        let now = now_ms();
        if n == 0 {
            if self.live.warn_due(now) {
                tracing::warn!(pool = %self.name, "pool has no backends (its DNS names have not resolved yet?): failing calls at once");
            }
            return Err(NoBackend::AllEjected);
        }
        let start = self.live.cursor.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for tier in &members.tiers {
            self.policy_order(tier, backends, header, start, &mut order);
        }

        let mut counted = 0usize;
        let mut unhealthy = 0usize;
        let mut full = false;
        let mut ejected: Vec<usize> = Vec::new();
        // Filtered in place: one list per call, not two.
        order.retain(|&i| {
            let b = &backends[i];
            if b.live.is_draining() {
                return false;
            }
            counted += 1;
            if b.live.is_unhealthy() {
                unhealthy += 1;
            } else if b.live.is_ejected(now) {
                ejected.push(i);
            } else if b.is_full() {
                full = true;
            } else {
                return true;
            }
            false
        });
        let mut kept = order;

        // The ejection cap: beyond it, the least-bad ejected stay eligible.
        let pct = self.shared.config.max_ejection_percent as usize;
        let cap = if pct == 0 {
            0
        } else {
            (counted * pct / 100).max(1)
        };
        let mut reinstated: Vec<usize> = Vec::new();
        if ejected.len() > cap {
            let keep = ejected.len() - cap;
            ejected.sort_by_key(|&i| {
                let l = &backends[i].live;
                (
                    l.consecutive_failures.load(Ordering::Relaxed),
                    l.ejected_until.load(Ordering::Relaxed),
                )
            });
            for &i in &ejected[..keep] {
                if backends[i].is_full() {
                    full = true;
                } else {
                    reinstated.push(i);
                }
            }
            if pct > 0 && self.live.warn_due(now) {
                tracing::warn!(
                    pool = %self.name,
                    ejected = ejected.len(),
                    backends = counted,
                    max_ejection_percent = pct,
                    kept_in_rotation = keep,
                    "pool in panic: too many backends failing; keeping the least bad of them in rotation"
                );
            }
        }

        if self.shared.config.slow_start.is_some()
            && !matches!(self.balance, Balance::Hash { .. })
            && kept
                .iter()
                .any(|&i| backends[i].live.share_at(now).is_some())
        {
            // Stable: the policy order holds within each (tier, demoted) group.
            let demoted: Vec<bool> = kept
                .iter()
                .map(|&i| {
                    backends[i]
                        .live
                        .share_at(now)
                        .is_some_and(|share| self.live.draw() >= share)
                })
                .collect();
            let mut keyed: Vec<(u16, bool, usize)> = kept
                .iter()
                .zip(demoted)
                .map(|(&i, d)| (backends[i].tier, d, i))
                .collect();
            keyed.sort_by_key(|&(tier, d, _)| (tier, d));
            kept = keyed.into_iter().map(|(_, _, i)| i).collect();
        }
        kept.extend(reinstated);

        if kept.is_empty() {
            if full {
                return Err(NoBackend::Full);
            }
            if self.live.warn_due(now) {
                tracing::warn!(
                    pool = %self.name,
                    backends = n,
                    unhealthy,
                    ejected = ejected.len(),
                    draining = n - counted,
                    "pool has no healthy backend: failing calls at once"
                );
            }
            return Err(NoBackend::AllEjected);
        }
        Ok(Candidates {
            members,
            order: kept,
        })
    }

    /// Appends `tier`'s backends in the pool's policy order.
    fn policy_order(
        &self,
        tier: &Tier,
        backends: &[Backend],
        header: &Header,
        start: u64,
        order: &mut Vec<usize>,
    ) {
        let k = tier.idx.len();
        let rotate = |i: usize| tier.idx[(start as usize + i) % k];
        match &self.balance {
            Balance::RoundRobin => order.extend((0..k).map(rotate)),
            Balance::Weighted => {
                let first = tier.schedule[(start % tier.schedule.len() as u64) as usize] as usize;
                order.extend((0..k).map(|i| tier.idx[(first + i) % k]));
            }
            Balance::LeastSessions => least_sessions(backends, (0..k).map(rotate), order),
            Balance::Hash { key } => match header.get(key) {
                Some(v) => {
                    // Weighted rendezvous hashing: removing a backend moves
                    // only the keys it owned; the ranking doubles as the
                    // failover order.
                    let mut scored: Vec<(f64, usize)> = tier
                        .idx
                        .iter()
                        .map(|&i| {
                            let b = &backends[i];
                            let h = stable_hash(v.as_bytes(), b.identity);
                            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                            (-f64::from(b.weight) / u.ln(), i)
                        })
                        .collect();
                    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                    order.extend(scored.into_iter().map(|(_, i)| i));
                }
                None => least_sessions(backends, (0..k).map(rotate), order),
            },
        }
    }

    /// Takes a session slot on `backend` for the duration of an attempt
    /// (and, if it commits, of the session). None when it filled up meanwhile.
    pub fn lease(&self, backend: &Backend) -> Option<Lease> {
        let prev = backend.live.active.fetch_add(1, Ordering::Relaxed);
        self.live.active.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            backend: backend.live.clone(),
            pool: self.live.clone(),
        };
        if backend.max_sessions.is_some_and(|m| prev >= m) {
            return None; // dropping the lease gives the slot back
        }
        Some(lease)
    }

    /// Every member's state, in member order.
    pub fn snapshot_state(&self) -> Vec<BackendStatus> {
        let now = now_ms();
        self.members()
            .backends
            .iter()
            .map(|b| {
                let l = &b.live;
                let (check_passes, check_failures) = l.check_streak();
                BackendStatus {
                    address: b.addr,
                    source: b.source.to_string(),
                    state: l.state_at(now),
                    weight: b.weight,
                    tier: b.tier,
                    max_sessions: b.max_sessions,
                    active_sessions: l.active.load(Ordering::Relaxed),
                    total_sessions: l.total.load(Ordering::Relaxed),
                    consecutive_failures: l.consecutive_failures.load(Ordering::Relaxed),
                    ejections: l.ejections.load(Ordering::Relaxed),
                    ejected_for: l.ejected_for(),
                    draining: l.is_draining(),
                    check_verdict: l.check_verdict(),
                    last_check: l.last_check(),
                    check_passes,
                    check_failures,
                    checks: l.checks.load(Ordering::Relaxed),
                    slow_start_share: l.share_at(now),
                }
            })
            .collect()
    }

    /// The whole pool's state: backends, panic, DNS names.
    pub fn status(&self) -> PoolStatus {
        let backends = self.snapshot_state();
        let now = now_ms();
        let members = self.members();
        let counted: Vec<&Backend> = members
            .backends
            .iter()
            .filter(|b| !b.live.is_draining())
            .collect();
        let ejected = counted
            .iter()
            .filter(|b| !b.live.is_unhealthy() && b.live.is_ejected(now))
            .count();
        let pct = self.shared.config.max_ejection_percent as usize;
        let cap = if pct == 0 {
            0
        } else {
            (counted.len() * pct / 100).max(1)
        };
        let discovery = {
            let map = lock(&self.live.discovery);
            self.shared
                .config
                .backends
                .iter()
                .filter(|b| b.target.static_addr().is_none())
                .map(|b| {
                    let key = discovery::key(&b.target);
                    let d = map.get(&key);
                    DiscoveryStatus {
                        target: b.target.to_string(),
                        addresses: d
                            .map_or_else(Vec::new, |d| d.found.iter().map(|f| f.addr).collect()),
                        last_success: d.and_then(|d| d.last_success),
                        ttl: d.map_or(Duration::ZERO, |d| d.ttl),
                        lookups: d.map_or(0, |d| d.lookups),
                        failures: d.map_or(0, |d| d.failures),
                        last_error: d.and_then(|d| d.last_error.clone()),
                    }
                })
                .collect()
        };
        PoolStatus {
            name: self.name.to_string(),
            balance: self.balance.to_string(),
            active_sessions: self.live.active.load(Ordering::Relaxed),
            backends,
            panic: pct > 0 && ejected > cap,
            discovery,
        }
    }
}

impl Drop for PoolState {
    fn drop(&mut self) {
        // A snapshot dropped without being retired must not leave tasks behind.
        self.shared.cancel.cancel();
    }
}

/// The member set for `pool`: its static addresses, then each DNS name's
/// last good answer, in config order; an address listed twice is taken
/// once (its first listing wins). Live state comes from `previous` or the
/// pool's registry, so a backend keeps it across reloads and DNS changes;
/// one that DNS adds (after the name's first answer) starts slow. `running`:
/// the pool serves (a DNS change), so its settings apply to every member;
/// else only to backends seen for the first time.
pub(crate) fn build_members(
    pool: &Pool,
    live: &PoolLive,
    previous: Option<&Members>,
    running: bool,
) -> Members {
    let window = pool.slow_start.map_or(0, |d| d.as_millis() as u64);
    let now = now_ms();
    let discovered = lock(&live.discovery);
    let mut registry = lock(&live.registry);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for entry in &pool.backends {
        let found: Vec<(SocketAddr, u32, u16, bool)> = match &entry.target {
            BackendTarget::Static(addr) => vec![(*addr, entry.weight, 0, false)],
            target => discovered
                .get(&discovery::key(target))
                .map(|d| {
                    d.found
                        .iter()
                        .map(|f| (f.addr, f.weight.unwrap_or(entry.weight), f.tier, f.new))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let source: Arc<str> = match &entry.target {
            BackendTarget::Static(_) => Arc::from("static"),
            BackendTarget::Host { .. } => Arc::from(format!("dns {}", entry.target)),
            BackendTarget::Srv { .. } => Arc::from(entry.target.to_string()),
        };
        for (addr, weight, tier, new) in found {
            if !seen.insert(addr) {
                continue;
            }
            let was_member = previous
                .and_then(|m| m.backends.iter().find(|b| b.addr == addr))
                .map(|b| b.live.clone());
            let known = was_member
                .clone()
                .or_else(|| registry.get(&addr).and_then(Weak::upgrade));
            let fresh = known.is_none();
            let backend_live = known.unwrap_or_else(|| Arc::new(BackendLive::new(addr)));
            if running || fresh {
                backend_live.ramp_ms.store(window, Ordering::Relaxed);
            }
            if new && was_member.is_none() {
                backend_live.begin_ramp(now);
            }
            registry.insert(addr, Arc::downgrade(&backend_live));
            let mut b = Backend::new(addr, weight, entry.max_sessions, backend_live);
            b.tier = tier;
            b.source = source.clone();
            out.push(b);
        }
    }
    registry.retain(|_, w| w.strong_count() > 0);
    Members::new(out)
}

/// Orders `idx` by active sessions per unit of weight; ties keep the given
/// (rotating) order so equal backends share evenly.
fn least_sessions(backends: &[Backend], idx: impl Iterator<Item = usize>, order: &mut Vec<usize>) {
    let from = order.len();
    order.extend(idx);
    order[from..].sort_by_key(|&i| {
        let b = &backends[i];
        // Scaled integer ratio: no float; the stable sort keeps the rotation.
        u64::from(b.live.active.load(Ordering::Relaxed)) * 1_000_000 / u64::from(b.weight)
    });
}

/// nginx's smooth weighted round robin, unrolled into a schedule whose
/// length is the sum of the weights (bounded by the config's weight range).
fn smooth_wrr(weights: &[u32]) -> Vec<u16> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
            .expect("a tier has backends");
        current[best] -= total;
        out.push(best as u16);
    }
    if out.is_empty() {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_with(yaml_balance: &str, n: usize, extra: &str) -> PoolState {
        let backends: String = (0..n)
            .map(|i| {
                format!(
                    "      - {{ address: \"127.0.0.1:{}\", weight: {} }}\n",
                    6000 + i,
                    i + 1
                )
            })
            .collect();
        let text = format!(
            "version: 1\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    balance: {yaml_balance}\n{extra}    backends:\n{backends}"
        );
        let cfg = agiproxy_config::from_yaml_str(&text).unwrap();
        PoolState::new(&cfg.pools[0], None)
    }

    fn pool(yaml_balance: &str, n: usize) -> PoolState {
        pool_with(yaml_balance, n, "")
    }

    fn order(p: &PoolState, h: &Header) -> Result<Vec<usize>, NoBackend> {
        p.candidates(h).map(|c| c.order)
    }

    fn lease(p: &PoolState, i: usize) -> Option<Lease> {
        p.lease(&p.members().backends[i])
    }

    fn live(p: &PoolState, i: usize) -> Arc<BackendLive> {
        p.members().backends[i].live.clone()
    }

    fn fail(p: &PoolState, i: usize) -> Option<Duration> {
        p.passive_failure(&live(p, i), "connect refused")
    }

    fn header(uid: &str) -> Header {
        Header::parse(
            format!("agi_network: yes\nagi_uniqueid: {uid}\n\n").into_bytes(),
            16,
        )
        .unwrap()
    }

    fn check(ok: bool) -> CheckResult {
        CheckResult {
            ok,
            latency: Duration::from_millis(1),
            at: SystemTime::now(),
            detail: if ok {
                "first command \"NOOP\""
            } else {
                "refused"
            }
            .into(),
        }
    }

    #[test]
    fn smooth_wrr_interleaves() {
        assert_eq!(smooth_wrr(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr(&[1, 2, 3]).len(), 6);
    }

    #[test]
    fn weighted_follows_weights() {
        let p = pool("weighted", 3);
        let h = header("1");
        let mut counts = [0; 3];
        for _ in 0..600 {
            counts[order(&p, &h).unwrap()[0]] += 1;
        }
        assert_eq!(counts, [100, 200, 300]);
    }

    #[test]
    fn round_robin_rotates() {
        let p = pool("round_robin", 3);
        let h = header("1");
        let firsts: Vec<usize> = (0..6).map(|_| order(&p, &h).unwrap()[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_sessions_prefers_idle_per_weight() {
        let p = pool("least_sessions", 2);
        let _l1 = lease(&p, 0).unwrap();
        let h = header("1");
        assert_eq!(order(&p, &h).unwrap()[0], 1);
        let _l2 = lease(&p, 1).unwrap();
        // 1 session on weight 1 vs 1 on weight 2: backend 1 still lighter.
        assert_eq!(order(&p, &h).unwrap()[0], 1);
    }

    #[test]
    fn ejection_backs_off_and_empty_pool_fails_at_once() {
        let p = pool_with(
            "round_robin",
            2,
            "    max_ejection_percent: 100\n    passive: { backoff: 5ms, max_backoff: 60s }\n",
        );
        assert_eq!(fail(&p, 0), Some(Duration::from_millis(5)));
        // Already ejected: a late failure does not stretch the backoff.
        assert_eq!(fail(&p, 0), None);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(live(&p, 0).state(), BackendState::Healthy);
        assert_eq!(fail(&p, 0), Some(Duration::from_millis(10)));
        assert_eq!(fail(&p, 0), None);
        assert_eq!(live(&p, 0).state(), BackendState::Ejected);
        let h = header("1");
        assert_eq!(order(&p, &h).unwrap(), vec![1]);
        fail(&p, 1);
        assert_eq!(order(&p, &h), Err(NoBackend::AllEjected));
        p.passive_success(&live(&p, 0));
        assert_eq!(order(&p, &h).unwrap(), vec![0]);
        assert_eq!(live(&p, 0).state(), BackendState::Healthy);
        assert_eq!(live(&p, 0).ejections.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn ejection_threshold_counts_failures_in_a_row() {
        let p = pool_with(
            "round_robin",
            2,
            "    passive: { consecutive_failures: 3, backoff: 10s }\n",
        );
        assert_eq!(fail(&p, 0), None);
        assert_eq!(fail(&p, 0), None);
        assert_eq!(fail(&p, 0), Some(Duration::from_secs(10)));
        assert_eq!(live(&p, 0).consecutive_failures.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn ejection_cap_keeps_the_least_bad_in_rotation() {
        // 4 backends, default 50%: at most 2 are ever treated as ejected.
        let p = pool_with(
            "round_robin",
            4,
            "    passive: { backoff: 10s, max_backoff: 60s }\n",
        );
        let h = header("1");
        fail(&p, 0);
        fail(&p, 1);
        assert!(!p.status().panic);
        let mut o = order(&p, &h).unwrap();
        o.sort_unstable();
        assert_eq!(o, vec![2, 3]);
        // Backends 2 and 3 have failed more often before (their failure
        // streaks are longer): 0 and 1 are the least bad.
        live(&p, 2).consecutive_failures.store(1, Ordering::Relaxed);
        live(&p, 3).consecutive_failures.store(2, Ordering::Relaxed);
        fail(&p, 2);
        fail(&p, 3);
        let o = order(&p, &h).unwrap();
        assert_eq!(o.len(), 2, "the pool is never emptied by ejection: {o:?}");
        let mut o2 = o.clone();
        o2.sort_unstable();
        assert_eq!(o2, vec![0, 1], "least bad (one failure each) kept: {o:?}");
        assert!(p.status().panic);
        // A one-backend pool can still be emptied (at least one ejection).
        let one = pool("round_robin", 1);
        fail(&one, 0);
        assert_eq!(order(&one, &h), Err(NoBackend::AllEjected));
        // 0% never treats any backend as ejected.
        let none = pool_with("round_robin", 1, "    max_ejection_percent: 0\n");
        fail(&none, 0);
        assert_eq!(order(&none, &h).unwrap(), vec![0]);
    }

    #[test]
    fn active_checks_rise_and_fall_and_unhealthy_is_never_offered() {
        let p = pool_with(
            "round_robin",
            2,
            "    health: { type: tcp, interval: 1s, timeout: 500ms, rise: 2, fall: 3 }\n",
        );
        let b = live(&p, 0);
        let h = header("1");
        b.record_check(check(true), 2, 3, "p");
        assert_eq!(b.check_verdict(), Some(true));
        b.record_check(check(false), 2, 3, "p");
        b.record_check(check(false), 2, 3, "p");
        assert_eq!(b.state(), BackendState::Healthy);
        b.record_check(check(false), 2, 3, "p");
        assert_eq!(b.state(), BackendState::Unhealthy);
        // Unhealthy is out even past the ejection cap: it is known down.
        assert_eq!(order(&p, &h).unwrap(), vec![1]);
        live(&p, 1).record_check(check(false), 2, 3, "p");
        assert_eq!(order(&p, &h), Err(NoBackend::AllEjected));
        b.record_check(check(true), 2, 3, "p");
        assert_eq!(b.state(), BackendState::Unhealthy);
        b.record_check(check(true), 2, 3, "p");
        assert_eq!(b.state(), BackendState::Healthy);
        assert_eq!(order(&p, &h).unwrap(), vec![0]);
        let s = &p.snapshot_state()[0];
        assert_eq!((s.checks, s.check_passes, s.check_failures), (6, 2, 0));
        assert!(s.last_check.as_ref().unwrap().ok);
    }

    #[test]
    fn with_checks_an_ejected_backend_waits_for_a_passing_check() {
        let p = pool_with(
            "round_robin",
            2,
            "    health: { type: tcp, interval: 1s, timeout: 500ms }\n    passive: { backoff: 1ms, max_backoff: 1ms }\n",
        );
        let b = live(&p, 0);
        fail(&p, 0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            b.state(),
            BackendState::Ejected,
            "backoff over, no check yet"
        );
        b.record_check(check(true), 2, 3, "p");
        assert_eq!(b.state(), BackendState::Healthy);
        assert_eq!(order(&p, &header("1")).unwrap().len(), 2);
    }

    #[test]
    fn draining_is_never_offered() {
        let p = pool("round_robin", 2);
        assert!(p.set_draining("127.0.0.1:6000".parse().unwrap(), true));
        assert_eq!(live(&p, 0).state(), BackendState::Draining);
        assert_eq!(order(&p, &header("1")).unwrap(), vec![1]);
        assert!(!p.set_draining("127.0.0.1:1".parse().unwrap(), true));
        live(&p, 0).set_draining(false);
        assert_eq!(order(&p, &header("1")).unwrap().len(), 2);
    }

    #[test]
    fn slow_start_share_rises_over_the_window() {
        let p = pool_with("round_robin", 2, "    slow_start: 10s\n");
        let b = live(&p, 0);
        let h = header("1");
        // Came back 1 s ago: 10% of the window, so a share of about 10%.
        b.begin_ramp(now_ms() - 1000);
        assert_eq!(b.state(), BackendState::SlowStart);
        let first = (0..2000).filter(|_| order(&p, &h).unwrap()[0] == 0).count();
        // Round robin puts it first in half the orders; it keeps ~10% of those.
        assert!((50..160).contains(&first), "{first}");
        // Always still a candidate (a fallback), never dropped.
        assert_eq!(order(&p, &h).unwrap().len(), 2);
        // 9 s in: about 90%.
        b.begin_ramp(now_ms() - 9000);
        let first = (0..2000).filter(|_| order(&p, &h).unwrap()[0] == 0).count();
        assert!((800..1000).contains(&first), "{first}");
        b.begin_ramp(now_ms() - 10_001);
        assert_eq!(b.state(), BackendState::Healthy);
    }

    #[test]
    fn tiers_fail_over_in_order() {
        let text = "version: 1\npools:\n  - name: p\n    balance: round_robin\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n      - { address: \"127.0.0.1:7002\" }\n      - { address: \"127.0.0.1:7003\" }\n";
        let p = PoolState::new(
            &agiproxy_config::from_yaml_str(text).unwrap().pools[0],
            None,
        );
        let mut bs: Vec<Backend> = p.members().backends.clone();
        bs[0].tier = 1;
        p.set_members(Members::new(bs));
        let h = header("1");
        for _ in 0..4 {
            let o = order(&p, &h).unwrap();
            assert_eq!(o[2], 0, "the tier-1 backend comes last: {o:?}");
        }
        p.passive_failure(&live(&p, 1), "x");
        p.passive_failure(&live(&p, 2), "x");
        // Cap 50% of 3 = 1: one of them is kept, after the tier-1 backend.
        assert_eq!(order(&p, &h).unwrap()[0], 0);
    }

    #[test]
    fn hash_is_sticky_and_moves_only_removed_keys() {
        let text4 = "version: 1\npools:\n  - name: p\n    balance: hash\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n      - { address: \"127.0.0.1:7002\" }\n      - { address: \"127.0.0.1:7003\" }\n      - { address: \"127.0.0.1:7004\" }\n";
        let text3 = text4.replace("      - { address: \"127.0.0.1:7003\" }\n", "");
        let p4 = PoolState::new(
            &agiproxy_config::from_yaml_str(text4).unwrap().pools[0],
            None,
        );
        let p3 = PoolState::new(
            &agiproxy_config::from_yaml_str(&text3).unwrap().pools[0],
            None,
        );
        let mut moved = 0;
        for k in 0..2000 {
            let h = header(&format!("17000000{k}.{k}"));
            let a = p4.members().backends[order(&p4, &h).unwrap()[0]].addr;
            assert_eq!(a, p4.members().backends[order(&p4, &h).unwrap()[0]].addr);
            let b = p3.members().backends[order(&p3, &h).unwrap()[0]].addr;
            if a != b {
                assert_eq!(
                    a.port(),
                    7003,
                    "a key moved that was not on the removed backend"
                );
                moved += 1;
            }
        }
        assert!(
            (350..650).contains(&moved),
            "about a quarter should move: {moved}"
        );
    }

    #[test]
    fn max_sessions_is_a_hard_cap() {
        let text = "version: 1\npools:\n  - name: p\n    backends:\n      - { address: \"127.0.0.1:7001\", max_sessions: 1 }\n";
        let p = PoolState::new(
            &agiproxy_config::from_yaml_str(text).unwrap().pools[0],
            None,
        );
        let h = header("1");
        let l = lease(&p, 0).unwrap();
        assert_eq!(order(&p, &h), Err(NoBackend::Full));
        assert!(lease(&p, 0).is_none());
        drop(l);
        assert_eq!(live(&p, 0).active.load(Ordering::Relaxed), 0);
        assert!(lease(&p, 0).is_some());
    }

    #[test]
    fn reload_carries_backend_state_and_drops_stale_verdicts() {
        let with = "version: 1\npools:\n  - name: p\n    health: { type: tcp }\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n";
        let without = "version: 1\npools:\n  - name: p\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n";
        let a = PoolState::new(
            &agiproxy_config::from_yaml_str(with).unwrap().pools[0],
            None,
        );
        live(&a, 0).record_check(check(false), 2, 3, "p");
        let _l = lease(&a, 0).unwrap();
        let b = PoolState::new(
            &agiproxy_config::from_yaml_str(with).unwrap().pools[0],
            Some(&a),
        );
        assert!(Arc::ptr_eq(&live(&a, 0), &live(&b, 0)));
        assert_eq!(live(&b, 0).state(), BackendState::Unhealthy);
        let c = PoolState::new(
            &agiproxy_config::from_yaml_str(without).unwrap().pools[0],
            Some(&b),
        );
        // Built but not running (a dry run): nothing changes.
        assert_eq!(live(&c, 0).state(), BackendState::Unhealthy);
        // Running (no runtime here, so no tasks): the stale verdict goes.
        c.activate();
        assert_eq!(live(&c, 0).state(), BackendState::Healthy);
        assert_eq!(live(&c, 0).active.load(Ordering::Relaxed), 1);
    }
}
