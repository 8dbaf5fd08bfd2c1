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

/// nginx's smooth weighted round robin, unrolled into a schedule whose
/// length is the sum of the weights (bounded by the config's weight range).
pub(super) fn smooth_wrr(weights: &[u32]) -> Vec<u16> {
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
