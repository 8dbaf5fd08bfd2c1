//! The readable state of pools and backends, for the control API and
//! metrics. Reading takes no lock on the session path.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::backend::{Backend, BackendLive, BackendState, CheckResult};
use super::clock::{lock, now_ms};
use super::live::key;
use super::state::{ejection_cap, PoolState};

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
    /// Checks that could not run for the proxy's own want of descriptors
    /// or memory (no verdict on the backend).
    pub checks_not_run: u64,
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
    /// Failures since the last good answer (`last_error` outlives them).
    pub failing: u32,
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

impl PoolState {
    /// Every member's state, in member order; then each backend that left
    /// the pool (a reload or DNS removed it) and still holds sessions, as
    /// `draining` from source `removed`, until they end. Without those the
    /// pool's sessions did not add up: an audit saw 10 active in a pool
    /// whose listed backends held none.
    pub fn snapshot_state(&self) -> Vec<BackendStatus> {
        let now = now_ms();
        let members = self.members();
        let mut out: Vec<BackendStatus> = members
            .backends
            .iter()
            .map(|b| {
                let mut st = live_status(&b.live, b.source.to_string(), now);
                (st.weight, st.tier, st.max_sessions) = (b.weight, b.tier, b.max_sessions);
                st
            })
            .collect();
        // Looked up by hash, and upgraded once the lock is let go: a scrape
        // of a pool of 4,096 holds up a DNS change's rebuild no longer.
        let listed: HashSet<SocketAddr> = members.backends.iter().map(|b| b.addr).collect();
        let others: Vec<Weak<BackendLive>> = lock(&self.live.registry)
            .iter()
            .filter(|(addr, _)| !listed.contains(*addr))
            .map(|(_, w)| w.clone())
            .collect();
        let mut departed: Vec<Arc<BackendLive>> = others
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|l| l.active.load(Ordering::Relaxed) > 0)
            .collect();
        departed.sort_by_key(|l| l.addr);
        out.extend(departed.iter().map(|l| {
            let mut st = live_status(l, "removed".to_string(), now);
            (st.state, st.draining) = (BackendState::Draining, true);
            st
        }));
        out
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
        let unhealthy = counted.iter().filter(|b| b.live.is_unhealthy()).count();
        let pct = self.shared.config.max_ejection_percent;
        let cap = ejection_cap(counted.len(), unhealthy, pct);
        let discovery = {
            let map = lock(&self.live.discovery);
            self.shared
                .config
                .backends
                .iter()
                .filter(|b| b.target.static_addr().is_none())
                .map(|b| {
                    let key = key(&b.target);
                    let d = map.get(&key);
                    DiscoveryStatus {
                        target: b.target.to_string(),
                        addresses: d
                            .map_or_else(Vec::new, |d| d.found.iter().map(|f| f.addr).collect()),
                        last_success: d.and_then(|d| d.last_success),
                        ttl: d.map_or(Duration::ZERO, |d| d.ttl),
                        lookups: d.map_or(0, |d| d.lookups),
                        failures: d.map_or(0, |d| d.failures),
                        failing: d.map_or(0, |d| d.failing),
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

/// A backend's live state; weight, tier and `max_sessions` (the member's
/// settings) left at 0, 0 and none.
fn live_status(l: &BackendLive, source: String, now: u64) -> BackendStatus {
    let (check_passes, check_failures) = l.check_streak();
    BackendStatus {
        address: l.addr,
        source,
        state: l.state_at(now),
        weight: 0,
        tier: 0,
        max_sessions: None,
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
        checks_not_run: l.checks_not_run.load(Ordering::Relaxed),
        slow_start_share: l.share_at(now),
    }
}
