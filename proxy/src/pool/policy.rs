//! Balancing policies: how one failover tier's backends are ordered for one
//! call. Round robin, nginx's smooth weighted round robin, least sessions
//! per unit of weight, and weighted rendezvous hashing.

use std::sync::atomic::Ordering;

use agiproxy_config::Balance;

use super::backend::Backend;
use super::hash::stable_hash;

/// Appends one tier's backends (`idx`, with its smooth weighted schedule)
/// in `balance`'s order. `start` is the pool's rotation cursor;
/// `hash_value` the call's key for `hash`.
pub(crate) fn order_tier(
    balance: &Balance,
    idx: &[usize],
    schedule: &[u16],
    backends: &[Backend],
    hash_value: Option<&str>,
    start: u64,
    order: &mut Vec<usize>,
) {
    let k = idx.len();
    let rotate = |i: usize| idx[(start as usize + i) % k];
    match balance {
        Balance::RoundRobin => order.extend((0..k).map(rotate)),
        Balance::Weighted => {
            let first = schedule[(start % schedule.len() as u64) as usize] as usize;
            order.extend((0..k).map(|i| idx[(first + i) % k]));
        }
        Balance::LeastSessions => least_sessions(backends, (0..k).map(rotate), order),
        Balance::Hash { .. } => match hash_value {
            Some(v) => {
                // Weighted rendezvous hashing: removing a backend moves
                // only the keys it owned; the ranking doubles as the
                // failover order.
                let mut scored: Vec<(f64, usize)> = idx
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

/// Entries of a smooth weighted schedule at most: weights whose sum is
/// larger are scaled down to it (each at least 1).
pub(super) const MAX_SCHEDULE: u64 = 1 << 16;

/// nginx's algorithm costs a step over every backend per entry; past this
/// many, a tier is scheduled by virtual finish times instead (a heap: a
/// logarithm per entry), so a rebuild of a large tier stays in milliseconds.
const NGINX_WORK: u64 = 1 << 20;

/// A tier's smooth weighted round-robin schedule: each backend's share of
/// the entries is its share of the weight, spread out rather than in runs.
/// Its length is the sum of the weights divided by their greatest common
/// divisor (equal weights: one entry a backend), scaled down to
/// [`MAX_SCHEDULE`] when larger. Small tiers (all real ones) get nginx's
/// exact order. A tier has at most `Pool::MAX_MEMBERS` backends, so
/// positions fit `u16`.
pub(super) fn smooth_wrr(weights: &[u32]) -> Vec<u16> {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let sum: u64 = weights.iter().map(|&w| u64::from(w / g)).sum();
    let weights: Vec<u64> = weights
        .iter()
        .map(|&w| {
            let w = u64::from(w / g);
            if sum > MAX_SCHEDULE {
                (w * MAX_SCHEDULE / sum).max(1)
            } else {
                w
            }
        })
        .collect();
    let total: u64 = weights.iter().sum();
    let mut out = if total * weights.len() as u64 <= NGINX_WORK {
        nginx(&weights, total)
    } else {
        finish_times(&weights, total)
    };
    if out.is_empty() {
        out.push(0);
    }
    out
}

/// nginx's smooth weighted round robin, unrolled.
fn nginx(weights: &[u64], total: u64) -> Vec<u16> {
    let total = total as i64;
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += w as i64;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
            .expect("a tier has backends");
        current[best] -= total;
        out.push(best as u16);
    }
    out
}

/// Each entry to the backend whose next turn, `(n + 1/2) / weight` after
/// `n` turns so far, comes first (ties: the lower position).
fn finish_times(weights: &[u64], total: u64) -> Vec<u16> {
    use std::cmp::{Ordering as Order, Reverse};
    #[derive(PartialEq, Eq)]
    struct Turn {
        n: u64,
        weight: u64,
        at: usize,
    }
    impl Ord for Turn {
        fn cmp(&self, o: &Turn) -> Order {
            // (2n+1)/w against (2m+1)/v without division.
            (u128::from(2 * self.n + 1) * u128::from(o.weight))
                .cmp(&(u128::from(2 * o.n + 1) * u128::from(self.weight)))
                .then(self.at.cmp(&o.at))
        }
    }
    impl PartialOrd for Turn {
        fn partial_cmp(&self, o: &Turn) -> Option<Order> {
            Some(self.cmp(o))
        }
    }
    let mut heap: std::collections::BinaryHeap<Reverse<Turn>> = weights
        .iter()
        .enumerate()
        .map(|(at, &weight)| Reverse(Turn { n: 0, weight, at }))
        .collect();
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let Some(Reverse(mut t)) = heap.pop() else {
            break;
        };
        out.push(t.at as u16);
        t.n += 1;
        heap.push(Reverse(t));
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
