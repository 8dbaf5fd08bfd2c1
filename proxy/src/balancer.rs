//! Pools and balancing: per-backend live state (active sessions, passive
//! ejection with growing backoff) and the policies that order a pool's
//! backends for one call. All state is atomics: picking never takes a lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use agiproxy_config::{Backoff, Balance, Pool};
use arc_swap::ArcSwap;

use crate::header::Header;

/// A stable 64-bit hash: the same on every replica and every release, so
/// replicas agree on consistent-hash and split decisions.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

/// Milliseconds on a process-wide monotonic clock (0 = never).
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Live state of one backend: shared by every session that uses it, and
/// carried across config reloads (keyed by pool name and address), so a
/// reload neither forgets active sessions nor forgives a failing backend.
#[derive(Debug)]
pub struct BackendLive {
    pub addr: SocketAddr,
    /// Sessions holding this backend (attempts in progress included).
    pub active: AtomicU32,
    pub total: AtomicU64,
    pub consecutive_failures: AtomicU32,
    pub ejections: AtomicU64,
    /// `now_ms()` until which the backend is skipped; 0 when eligible.
    ejected_until: AtomicU64,
}

impl BackendLive {
    pub fn new(addr: SocketAddr) -> BackendLive {
        BackendLive {
            addr,
            active: AtomicU32::new(0),
            total: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            ejected_until: AtomicU64::new(0),
        }
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// A connect failed, or the backend closed/stalled before its first
    /// command: skip it for a backoff that doubles on each repeat.
    pub fn record_failure(&self, backoff: &Backoff) -> Duration {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let factor = 1u32 << (n - 1).min(16);
        let wait = backoff.base.saturating_mul(factor).min(backoff.max);
        self.ejected_until
            .store(now_ms() + wait.as_millis() as u64, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        wait
    }

    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejected_until.store(0, Ordering::Relaxed);
        }
    }
}

/// A backend as the running config describes it, with its live state.
#[derive(Debug, Clone)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_sessions: Option<u32>,
    pub live: Arc<BackendLive>,
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
    /// Every backend is in its passive backoff (or the pool has none).
    AllEjected,
    /// Every eligible backend, or the pool, is at its session limit.
    Full,
}

/// A pool's current backends. Replaced whole (never edited) when the set
/// changes, so a session's view stays consistent while it tries them.
#[derive(Debug)]
pub struct Members {
    pub backends: Vec<Backend>,
    /// Smooth weighted round-robin schedule, computed once per set: a
    /// lock-free counter indexes it.
    schedule: Vec<u16>,
}

impl Members {
    pub fn new(backends: Vec<Backend>) -> Members {
        let schedule = smooth_wrr(&backends.iter().map(|b| b.weight).collect::<Vec<_>>());
        Members { backends, schedule }
    }
}

/// One call's candidates: the member set it was chosen from, best first.
#[derive(Debug)]
pub struct Candidates {
    pub members: Arc<Members>,
    pub order: Vec<usize>,
}

#[derive(Debug)]
pub struct PoolState {
    pub name: String,
    pub balance: Balance,
    pub backoff: Backoff,
    pub max_sessions: Option<u32>,
    pub live: Arc<PoolLive>,
    members: ArcSwap<Members>,
}

impl PoolState {
    /// Builds a pool from config, reusing live state from `previous` (the
    /// same pool in the config being replaced) so a reload keeps it.
    pub fn new(pool: &Pool, previous: Option<&PoolState>) -> PoolState {
        let prev_members = previous.map(|p| p.members());
        let backends = pool
            .backends
            .iter()
            .map(|b| {
                let live = prev_members
                    .as_ref()
                    .and_then(|m| m.backends.iter().find(|x| x.addr == b.address))
                    .map_or_else(|| Arc::new(BackendLive::new(b.address)), |x| x.live.clone());
                Backend::new(b.address, b.weight, b.max_sessions, live)
            })
            .collect();
        PoolState {
            name: pool.name.clone(),
            balance: pool.balance.clone(),
            backoff: pool.backoff,
            max_sessions: pool.max_sessions,
            live: previous.map_or_else(Default::default, |p| p.live.clone()),
            members: ArcSwap::from_pointee(Members::new(backends)),
        }
    }

    /// Starts the pool's background work (health checks, discovery).
    /// Static pools without active checks have none.
    pub fn activate(&self) {}

    /// Stops the pool's background work (see `Snapshot::retire`).
    pub fn retire(&self) {}

    /// The current member set.
    pub fn members(&self) -> Arc<Members> {
        self.members.load_full()
    }

    /// Replaces the member set (DNS discovery). Sessions keep the set they
    /// were given; a removed backend's sessions run to their end.
    pub fn set_members(&self, members: Members) {
        self.members.store(Arc::new(members));
    }

    /// The eligible backends for one call, best first. The caller tries them
    /// in order; an error means fail at once.
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
        if n == 0 {
            return Err(NoBackend::AllEjected);
        }
        let now = now_ms();
        let mut order: Vec<usize> = Vec::with_capacity(n);
        let start = self.live.cursor.fetch_add(1, Ordering::Relaxed);
        match &self.balance {
            Balance::RoundRobin => order.extend((0..n).map(|i| (start as usize + i) % n)),
            Balance::Weighted => {
                let first =
                    members.schedule[(start % members.schedule.len() as u64) as usize] as usize;
                order.push(first);
                order.extend((1..n).map(|i| (first + i) % n));
            }
            Balance::LeastSessions => least_sessions(backends, start, &mut order),
            Balance::Hash { key } => match header.get(key) {
                Some(v) => {
                    // Weighted rendezvous hashing: removing a backend moves
                    // only the keys it owned; the ranking doubles as the
                    // failover order.
                    let mut scored: Vec<(f64, usize)> = backends
                        .iter()
                        .enumerate()
                        .map(|(i, b)| {
                            let h = stable_hash(v.as_bytes(), b.identity);
                            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                            (-f64::from(b.weight) / u.ln(), i)
                        })
                        .collect();
                    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                    order.extend(scored.into_iter().map(|(_, i)| i));
                }
                None => least_sessions(backends, start, &mut order),
            },
        }
        let mut ejected = 0;
        order.retain(|&i| {
            let b = &backends[i];
            if b.live.is_ejected(now) {
                ejected += 1;
                false
            } else {
                !b.is_full()
            }
        });
        if order.is_empty() {
            return Err(if ejected == n {
                NoBackend::AllEjected
            } else {
                NoBackend::Full
            });
        }
        Ok(Candidates { members, order })
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
}

/// Orders by active sessions per unit of weight; ties broken by a rotating
/// start so equal backends share evenly.
fn least_sessions(backends: &[Backend], start: u64, order: &mut Vec<usize>) {
    let n = backends.len();
    order.extend((0..n).map(|i| (start as usize + i) % n));
    order.sort_by_key(|&i| {
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
            .expect("a pool has backends");
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

    fn pool(yaml_balance: &str, n: usize) -> PoolState {
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
            "version: 1\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    balance: {yaml_balance}\n    backends:\n{backends}"
        );
        let cfg = agiproxy_config::from_yaml_str(&text).unwrap();
        PoolState::new(&cfg.pools[0], None)
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

    fn header(uid: &str) -> Header {
        Header::parse(
            format!("agi_network: yes\nagi_uniqueid: {uid}\n\n").into_bytes(),
            16,
        )
        .unwrap()
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
        let p = pool("round_robin", 2);
        let b = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
        };
        assert_eq!(live(&p, 0).record_failure(&b), Duration::from_secs(10));
        assert_eq!(live(&p, 0).record_failure(&b), Duration::from_secs(20));
        let h = header("1");
        assert_eq!(order(&p, &h).unwrap(), vec![1]);
        live(&p, 1).record_failure(&b);
        assert_eq!(order(&p, &h), Err(NoBackend::AllEjected));
        live(&p, 0).record_success();
        assert_eq!(order(&p, &h).unwrap(), vec![0]);
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
}
