//! Pools and balancing: per-backend live state (active sessions, passive
//! ejection with growing backoff) and the policies that order a pool's
//! backends for one call. All state is atomics: picking never takes a lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use agiproxy_config::{Backoff, Balance, Pool};

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

/// Live state of one backend, shared by every session that uses it.
#[derive(Debug)]
pub struct BackendState {
    pub pool: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_sessions: Option<u32>,
    /// Sessions holding this backend (attempts in progress included).
    pub active: AtomicU32,
    pub total: AtomicU64,
    pub consecutive_failures: AtomicU32,
    pub ejections: AtomicU64,
    /// `now_ms()` until which the backend is skipped; 0 when eligible.
    ejected_until: AtomicU64,
    identity: u64,
}

impl BackendState {
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    fn is_full(&self) -> bool {
        self.max_sessions
            .is_some_and(|m| self.active.load(Ordering::Relaxed) >= m)
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

/// Holds a backend's (and its pool's) active-session count for as long as a
/// session uses it; dropping it releases both.
#[derive(Debug)]
pub struct Lease {
    pub backend: Arc<BackendState>,
    pool_active: Arc<AtomicU32>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
        self.pool_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a pool offered no backend at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// Every backend is in its passive backoff.
    AllEjected,
    /// Every eligible backend, or the pool, is at its session limit.
    Full,
}

#[derive(Debug)]
pub struct PoolState {
    pub name: String,
    pub balance: Balance,
    pub backoff: Backoff,
    pub max_sessions: Option<u32>,
    pub backends: Vec<Arc<BackendState>>,
    pub active: Arc<AtomicU32>,
    cursor: AtomicU64,
    /// Smooth weighted round-robin schedule, computed once at load: a
    /// lock-free counter indexes it.
    schedule: Vec<u16>,
}

impl PoolState {
    pub fn new(pool: &Pool) -> PoolState {
        let backends: Vec<Arc<BackendState>> = pool
            .backends
            .iter()
            .map(|b| {
                Arc::new(BackendState {
                    pool: pool.name.clone(),
                    addr: b.address,
                    weight: b.weight.max(1),
                    max_sessions: b.max_sessions,
                    active: AtomicU32::new(0),
                    total: AtomicU64::new(0),
                    consecutive_failures: AtomicU32::new(0),
                    ejections: AtomicU64::new(0),
                    ejected_until: AtomicU64::new(0),
                    identity: stable_hash(b.address.to_string().as_bytes(), 0),
                })
            })
            .collect();
        let schedule = smooth_wrr(&backends.iter().map(|b| b.weight).collect::<Vec<_>>());
        PoolState {
            name: pool.name.clone(),
            balance: pool.balance.clone(),
            backoff: pool.backoff,
            max_sessions: pool.max_sessions,
            backends,
            active: Arc::new(AtomicU32::new(0)),
            cursor: AtomicU64::new(0),
            schedule,
        }
    }

    /// The eligible backends for one call, best first. The caller tries them
    /// in order; an empty list means fail at once.
    pub fn candidates(&self, header: &Header) -> Result<Vec<usize>, NoBackend> {
        if self
            .max_sessions
            .is_some_and(|m| self.active.load(Ordering::Relaxed) >= m)
        {
            return Err(NoBackend::Full);
        }
        let now = now_ms();
        let n = self.backends.len();
        let mut order: Vec<usize> = Vec::with_capacity(n);
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        match &self.balance {
            Balance::RoundRobin => order.extend((0..n).map(|i| (start as usize + i) % n)),
            Balance::Weighted => {
                let first = self.schedule[(start % self.schedule.len() as u64) as usize] as usize;
                order.push(first);
                order.extend((1..n).map(|i| (first + i) % n));
            }
            Balance::LeastSessions => self.least_sessions(start, &mut order),
            Balance::Hash { key } => match header.get(key) {
                Some(v) => {
                    // Weighted rendezvous hashing: removing a backend moves
                    // only the keys it owned; the ranking doubles as the
                    // failover order.
                    let mut scored: Vec<(f64, usize)> = self
                        .backends
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
                None => self.least_sessions(start, &mut order),
            },
        }
        let mut ejected = 0;
        order.retain(|&i| {
            let b = &self.backends[i];
            if b.is_ejected(now) {
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
        Ok(order)
    }

    /// Orders by active sessions per unit of weight; ties broken by a
    /// rotating start so equal backends share evenly.
    fn least_sessions(&self, start: u64, order: &mut Vec<usize>) {
        let n = self.backends.len();
        order.extend((0..n).map(|i| (start as usize + i) % n));
        order.sort_by_key(|&i| {
            let b = &self.backends[i];
            // Scaled integer ratio: no float, stable sort keeps the rotation.
            u64::from(b.active.load(Ordering::Relaxed)) * 1_000_000 / u64::from(b.weight)
        });
    }

    /// Takes a session slot on backend `i` for the duration of an attempt
    /// (and, if it commits, of the session). None when it filled up meanwhile.
    pub fn lease(&self, i: usize) -> Option<Lease> {
        let b = &self.backends[i];
        let prev = b.active.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            backend: b.clone(),
            pool_active: self.active.clone(),
        };
        if b.max_sessions.is_some_and(|m| prev >= m) {
            return None; // dropping the lease gives the slot back
        }
        Some(lease)
    }
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
        PoolState::new(&cfg.pools[0])
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
            counts[p.candidates(&h).unwrap()[0]] += 1;
        }
        assert_eq!(counts, [100, 200, 300]);
    }

    #[test]
    fn round_robin_rotates() {
        let p = pool("round_robin", 3);
        let h = header("1");
        let firsts: Vec<usize> = (0..6).map(|_| p.candidates(&h).unwrap()[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_sessions_prefers_idle_per_weight() {
        let p = pool("least_sessions", 2);
        let _l1 = p.lease(0).unwrap();
        let h = header("1");
        assert_eq!(p.candidates(&h).unwrap()[0], 1);
        let _l2 = p.lease(1).unwrap();
        // 1 session on weight 1 vs 1 on weight 2: backend 1 still lighter.
        assert_eq!(p.candidates(&h).unwrap()[0], 1);
    }

    #[test]
    fn ejection_backs_off_and_empty_pool_fails_at_once() {
        let p = pool("round_robin", 2);
        let b = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
        };
        assert_eq!(p.backends[0].record_failure(&b), Duration::from_secs(10));
        assert_eq!(p.backends[0].record_failure(&b), Duration::from_secs(20));
        let h = header("1");
        assert_eq!(p.candidates(&h).unwrap(), vec![1]);
        p.backends[1].record_failure(&b);
        assert_eq!(p.candidates(&h), Err(NoBackend::AllEjected));
        p.backends[0].record_success();
        assert_eq!(p.candidates(&h).unwrap(), vec![0]);
    }

    #[test]
    fn hash_is_sticky_and_moves_only_removed_keys() {
        let text4 = "version: 1\npools:\n  - name: p\n    balance: hash\n    backends:\n      - { address: \"127.0.0.1:7001\" }\n      - { address: \"127.0.0.1:7002\" }\n      - { address: \"127.0.0.1:7003\" }\n      - { address: \"127.0.0.1:7004\" }\n";
        let text3 = text4.replace("      - { address: \"127.0.0.1:7003\" }\n", "");
        let p4 = PoolState::new(&agiproxy_config::from_yaml_str(text4).unwrap().pools[0]);
        let p3 = PoolState::new(&agiproxy_config::from_yaml_str(&text3).unwrap().pools[0]);
        let mut moved = 0;
        for k in 0..2000 {
            let h = header(&format!("17000000{k}.{k}"));
            let a = p4.backends[p4.candidates(&h).unwrap()[0]].addr;
            assert_eq!(a, p4.backends[p4.candidates(&h).unwrap()[0]].addr);
            let b = p3.backends[p3.candidates(&h).unwrap()[0]].addr;
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
        let p = PoolState::new(&agiproxy_config::from_yaml_str(text).unwrap().pools[0]);
        let h = header("1");
        let l = p.lease(0).unwrap();
        assert_eq!(p.candidates(&h), Err(NoBackend::Full));
        assert!(p.lease(0).is_none());
        drop(l);
        assert_eq!(p.backends[0].active.load(Ordering::Relaxed), 0);
        assert!(p.lease(0).is_some());
    }
}
