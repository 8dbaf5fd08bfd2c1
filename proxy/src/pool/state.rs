//! A pool: its live state carried across reloads, leases on backends, passive
//! ejection, and the candidate list for one call. Picking never takes a lock:
//! everything on the session path is atomics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agiproxy_config::{Backoff, Balance, Pool};
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::backend::{Backend, BackendLive, CheckEpoch};
use super::clock::{lock, now_ms};
use super::live::PoolLive;
use super::members::{build_members, Candidates, Members};
use super::policy::order_tier;

/// Holds a backend's (and its pool's) active-session count for as long as a
/// session uses it; dropping it releases both.
#[derive(Debug)]
pub struct Lease {
    pub backend: Arc<BackendLive>,
    pub(super) pool: Arc<PoolLive>,
    /// The backend's passive ejections when it was picked (see
    /// [`PoolState::lease_failed`]).
    ejections_at_pick: u64,
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

/// What background tasks of a pool share with it.
#[derive(Debug)]
pub(crate) struct PoolShared {
    pub name: String,
    pub config: Pool,
    pub live: Arc<PoolLive>,
    pub members: ArcSwap<Members>,
    /// Cancelled when the pool's snapshot retires: stops its tasks.
    pub cancel: CancellationToken,
    /// The check epoch this pool started when activated (0 before).
    pub epoch: AtomicU64,
    /// The member set of the pool this one replaces, until activated: the
    /// static backends it removes are retired ([`super::members::retire`]).
    pub replaced: std::sync::Mutex<Option<Arc<Members>>>,
}

impl super::live::Owner for PoolShared {
    fn live(&self) -> &Arc<PoolLive> {
        &self.live
    }
    fn config(&self) -> &Pool {
        &self.config
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn rebuild_members(&self) {
        PoolShared::rebuild_members(self);
    }
}

impl PoolShared {
    /// Rebuilds the member set from the config and the last good DNS
    /// answers. Sessions keep the set they were given.
    pub(crate) fn rebuild_members(&self) {
        let _serial = lock(&self.live.rebuild);
        let previous = self.members.load_full();
        super::members::prune_retired(&self.live, now_ms());
        let members = build_members(&self.config, &self.live, Some(&previous), true);
        self.members.store(Arc::new(members));
    }

    /// The epoch whose check results apply to this pool's backends.
    pub(crate) fn check_epoch(&self) -> CheckEpoch {
        CheckEpoch::new(
            self.live.check_epoch.clone(),
            self.epoch.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug)]
pub struct PoolState {
    /// Shared text: every session's record names its pool without a copy.
    pub name: Arc<str>,
    pub balance: Balance,
    pub backoff: Backoff,
    pub max_sessions: Option<u32>,
    pub live: Arc<PoolLive>,
    pub(super) shared: Arc<PoolShared>,
    pub(super) activated: AtomicBool,
    /// [`PoolLive::answers_changed`] when the member set was built.
    answers_seen: u64,
}

impl PoolState {
    /// Builds a pool from config, reusing live state from `previous` (the
    /// same pool in the config being replaced) so a reload keeps it: backend
    /// state, active sessions, and the last good answer of each DNS name.
    pub fn new(pool: &Pool, previous: Option<&PoolState>) -> PoolState {
        let live: Arc<PoolLive> = previous.map_or_else(Default::default, |p| p.live.clone());
        let prev_members = previous.map(|p| p.members());
        // Before the build reads the answers: one that changes meanwhile
        // makes `activate` rebuild (needlessly at worst).
        let answers_seen = live.answers_changed.load(Ordering::Relaxed);
        super::members::prune_retired(&live, now_ms());
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
            epoch: AtomicU64::new(0),
            replaced: std::sync::Mutex::new(prev_members),
        });
        PoolState {
            name: pool.name.as_str().into(),
            balance: pool.balance.clone(),
            backoff: pool.backoff,
            max_sessions: pool.max_sessions,
            live,
            shared,
            activated: AtomicBool::new(false),
            answers_seen,
        }
    }

    /// Makes this pool's config the one that applies to its carried state
    /// (slow-start windows; stale check verdicts dropped when checks are
    /// gone; results of the previous config's checks dropped from now on
    /// when this one changes them, see [`CheckEpoch`]). True the first time
    /// only: the caller then starts the pool's background work
    /// ([`super::health::supervise`], and [`super::discovery::start`] for
    /// the DNS names without a lookup running) with [`PoolState::shared`].
    pub fn activate(&self) -> bool {
        if self.activated.swap(true, Ordering::Relaxed) {
            return false;
        }
        let config = &self.shared.config;
        // The DNS names' lookups: those this config keeps go on, the others
        // end. An answer that changed since this pool was built was applied
        // to the config then running: apply it here too.
        if super::discovery::hand_over(&self.shared) != self.answers_seen {
            self.shared.rebuild_members();
        }
        let epoch = {
            let mut checks = lock(&self.live.epoch_checks);
            let current = self.live.check_epoch.load(Ordering::Relaxed);
            if current != 0 && *checks == config.health {
                // The same checks: their epoch, schedule and results in
                // flight carry on. Restarting them at every reload probed
                // every backend within `jitter` of it, from every replica
                // at once when a change reaches them all.
                current
            } else {
                *checks = config.health.clone();
                // Before the clear below, which a late result must not undo.
                self.live.check_epoch.fetch_add(1, Ordering::Relaxed) + 1
            }
        };
        self.shared.epoch.store(epoch, Ordering::Relaxed);
        let window = config.slow_start.map_or(0, |d| d.as_millis() as u64);
        for b in &self.members().backends {
            b.live.ramp_ms.store(window, Ordering::Relaxed);
            if config.health.is_none() {
                // No checks any more: an old verdict would never be revised.
                b.live.clear_checks();
            }
        }
        if let Some(replaced) = lock(&self.shared.replaced).take() {
            super::members::retire(&self.live, &replaced, &self.members(), now_ms());
        }
        true
    }

    /// What the pool's background tasks work on.
    pub(crate) fn shared(&self) -> &Arc<PoolShared> {
        &self.shared
    }

    /// The header variable whose value `balance: hash` hashes, if any.
    pub fn hash_key(&self) -> Option<&str> {
        match &self.balance {
            Balance::Hash { key } => Some(key),
            _ => None,
        }
    }

    /// Stops the pool's background work (see `Snapshot::retire`). Probes in
    /// flight still end politely.
    pub fn retire(&self) {
        self.shared.cancel.cancel();
        // Its DNS lookups, unless a newer config has taken them over.
        super::discovery::stop(&self.shared);
    }

    /// The pool's config.
    pub fn config(&self) -> &Pool {
        &self.shared.config
    }

    /// Calls `f` with the label of each backend of this pool that holds a
    /// session now, member or not (one that left while holding calls).
    pub fn in_use(&self, mut f: impl FnMut(&str)) {
        // Upgraded once the lock is let go, as `status` does: a pool of
        // 4,096 does not hold up a DNS change's rebuild.
        let held: Vec<std::sync::Weak<BackendLive>> =
            lock(&self.live.registry).values().cloned().collect();
        for b in held.iter().filter_map(std::sync::Weak::upgrade) {
            if b.active.load(Ordering::Relaxed) > 0 {
                f(&b.label);
            }
        }
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
    /// The session holding `lease` failed on its backend: a passive failure
    /// (see [`passive_failure`](Self::passive_failure)), unless the backend
    /// has been ejected since this session picked it. With `first_command`
    /// (3 s) longer than the backoff (1 s), such late failures came after
    /// the backoff had ended and doubled it again and again (audit: one
    /// stall of a backend kept it out 500 ms, 1 s, then 2 s).
    pub fn lease_failed(&self, lease: &Lease, what: &str) -> Option<Duration> {
        if lease.backend.ejections.load(Ordering::Relaxed) != lease.ejections_at_pick {
            tracing::debug!(pool = %self.name, backend = %lease.backend.addr, what, "passive failure of a session that picked the backend before its last ejection");
            return None;
        }
        self.passive_failure(&lease.backend, what)
    }

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
        {
            // Whether the pool checks *now*, under the lock a reload's
            // clear takes: a reload may have removed the checks since this
            // session began, and with none left nothing would readmit it.
            let _last = lock(&backend.last_check);
            if lock(&self.live.epoch_checks).is_some() {
                backend.awaiting_check.store(true, Ordering::Relaxed);
            }
        }
        backend.ejections.fetch_add(1, Ordering::Relaxed);
        let reason = format!("{what} ({n} in a row); ejected for {wait:?}");
        backend.note_ejection(&self.name, &reason);
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
    ///
    /// `hash_value`: the value of the pool's [`PoolState::hash_key`] in this
    /// call's header (only `balance: hash` reads it).
    pub fn candidates(&self, hash_value: Option<&str>) -> Result<Candidates, NoBackend> {
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
            order_tier(
                &self.balance,
                &tier.idx,
                &tier.schedule,
                backends,
                hash_value,
                start,
                &mut order,
            );
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
        let pct = self.shared.config.max_ejection_percent;
        let cap = ejection_cap(counted, unhealthy, pct);
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
                    "pool in panic: passive ejection would take out more than max_ejection_percent, or every backend; keeping the least bad of them in rotation"
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

    /// Takes a session slot on `backend` for the duration of an attempt
    /// (and, if it commits, of the session). None when it filled up meanwhile.
    pub fn lease(&self, backend: &Backend) -> Option<Lease> {
        let prev = backend.live.active.fetch_add(1, Ordering::Relaxed);
        let pool_prev = self.live.active.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            backend: backend.live.clone(),
            pool: self.live.clone(),
            ejections_at_pick: backend.live.ejections.load(Ordering::Relaxed),
        };
        // The pool's cap too: `candidates` only looked, and calls that
        // looked at once could all pass it (audit).
        if backend.max_sessions.is_some_and(|m| prev >= m)
            || self.max_sessions.is_some_and(|m| pool_prev >= m)
        {
            return None; // dropping the lease gives the slots back
        }
        Some(lease)
    }
}

impl Drop for PoolState {
    fn drop(&mut self) {
        // A snapshot dropped without being retired must not leave tasks behind.
        self.retire();
    }
}

/// How many of a pool's `counted` backends (those not draining; `unhealthy`
/// of them failing active checks) passive ejection may keep out of rotation.
///
/// `max_ejection_percent` of them, at least one; but passive ejection alone
/// never empties a pool: at least one backend that passes its checks (or has
/// none) stays in rotation, so one bad connection costs only the calls it
/// failed, also in a pool of one address (a Kubernetes Service). Only `100`,
/// an explicit opt-in, lets passive ejection take out every backend (then a
/// pool whose backends all failed fails calls at once, without a connect).
/// `0` turns passive ejection off.
pub(super) fn ejection_cap(counted: usize, unhealthy: usize, max_ejection_percent: u32) -> usize {
    let pct = max_ejection_percent as usize;
    if pct == 0 {
        return 0;
    }
    let share = (counted * pct / 100).max(1);
    if pct >= 100 {
        return share;
    }
    share.min(counted.saturating_sub(unhealthy).saturating_sub(1))
}
