//! A pool's member set: the backends it offers now, grouped in failover
//! tiers, rebuilt whole from the config and the last good DNS answers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use agiproxy_config::{BackendTarget, Balance, Pool};

use super::live::key;

use super::backend::{Backend, BackendLive};
use super::clock::{lock, now_ms};
use super::live::PoolLive;
use super::policy::smooth_wrr;

/// One failover tier of a member set.
#[derive(Debug)]
pub(crate) struct Tier {
    /// Indices into `Members::backends`.
    pub(crate) idx: Vec<usize>,
    /// Smooth weighted round-robin schedule over `idx` (positions in it).
    pub(crate) schedule: Vec<u16>,
}

/// A pool's current backends. Replaced whole (never edited) when the set
/// changes, so a session's view stays consistent while it tries them.
#[derive(Debug)]
pub struct Members {
    pub backends: Vec<Backend>,
    /// By ascending tier.
    pub(crate) tiers: Vec<Tier>,
}

impl Members {
    /// `weighted`: the pool balances by smooth weighted round robin, the
    /// one policy that reads a tier's schedule (the others skip building it).
    pub fn new(backends: Vec<Backend>, weighted: bool) -> Members {
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
                    schedule: if weighted {
                        smooth_wrr(&weights)
                    } else {
                        vec![0]
                    },
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

/// How long a backend that left the pool keeps its state for when its
/// address comes back: as long as the metric series of a backend gone.
pub(crate) const RETIRED_MS: u64 = 10 * 60 * 1000;

/// Holds the state of the static backends of `replaced` (the member set a
/// reload replaced) that `members` lacks, for [`RETIRED_MS`], the latest
/// [`Pool::MAX_MEMBERS`] of them: an address that a later reload brings
/// back (a config that flaps, a revert) gets its check verdict, ejection
/// and drain again. Before, only a backend still held by a session did: a
/// dead backend re-added was offered as healthy until its first check
/// (soak: 47 calls of 10,675 got `connect_failed`). Not those of DNS: an
/// address DNS drops may come back as another host (a pod's IP reused),
/// which must not inherit a drain.
pub(crate) fn retire(live: &PoolLive, replaced: &Members, members: &Members, now: u64) {
    let listed: HashSet<SocketAddr> = members.backends.iter().map(|b| b.addr).collect();
    let mut retired = lock(&live.retired);
    retired.retain(|(at, b)| now.saturating_sub(*at) < RETIRED_MS && !listed.contains(&b.addr));
    let mut held: HashSet<SocketAddr> = retired.iter().map(|(_, b)| b.addr).collect();
    for b in &replaced.backends {
        if &*b.source == "static" && !listed.contains(&b.addr) && held.insert(b.addr) {
            retired.push_back((now, b.live.clone()));
        }
    }
    while retired.len() > Pool::MAX_MEMBERS {
        retired.pop_front();
    }
}

/// Lets go of the retired backends held longer than [`RETIRED_MS`]: before
/// a member set is built, so that one comes back new after that time even
/// when no reload came in between.
pub(crate) fn prune_retired(live: &PoolLive, now: u64) {
    lock(&live.retired).retain(|(at, _)| now.saturating_sub(*at) < RETIRED_MS);
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
    let mut seen = HashSet::new();
    // A static backend a reload retired, held by nothing else, is not an
    // address DNS answers now: the same IP may be another host (a pod's IP
    // reused), which must not inherit a drain or a verdict.
    let retired: HashSet<SocketAddr> = lock(&live.retired)
        .iter()
        .filter(|(_, b)| Arc::strong_count(b) == 1)
        .map(|(_, b)| b.addr)
        .collect();
    let mut out = Vec::new();
    let mut left_out = 0usize;
    for entry in &pool.backends {
        let found: Vec<(SocketAddr, u32, u16, bool)> = match &entry.target {
            BackendTarget::Static(addr) => vec![(*addr, entry.weight, 0, false)],
            target => discovered
                .get(&key(target))
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
            if out.len() == Pool::MAX_MEMBERS {
                left_out += 1;
                continue;
            }
            if !seen.insert(addr) {
                continue;
            }
            let was_member = previous
                .and_then(|m| m.backends.iter().find(|b| b.addr == addr))
                .map(|b| b.live.clone());
            let from_dns = !matches!(entry.target, BackendTarget::Static(_));
            let known = was_member.clone().or_else(|| {
                if from_dns && retired.contains(&addr) {
                    return None;
                }
                registry.get(&addr).and_then(Weak::upgrade)
            });
            let fresh = known.is_none();
            let backend_live = known.unwrap_or_else(|| Arc::new(BackendLive::new(addr)));
            if running || fresh {
                backend_live.ramp_ms.store(window, Ordering::Relaxed);
            }
            if new && was_member.is_none() {
                backend_live.begin_ramp(now);
            }
            if fresh {
                // Its first state is no change: DNS's change line names it
                // (an audit's churn logged 1,572 "from healthy to
                // slow_start" lines for addresses never in the pool).
                backend_live.reported_as_is();
            }
            if running && was_member.is_none() && pool.health.is_none() {
                // Back from the registry (a session held it) with a verdict
                // from checks since removed: nothing would revise it.
                // (A reload's activation clears the members it starts with.)
                backend_live.clear_checks();
            }
            registry.insert(addr, Arc::downgrade(&backend_live));
            let mut b = Backend::new(addr, weight, entry.max_sessions, backend_live);
            b.tier = tier;
            b.source = source.clone();
            out.push(b);
        }
    }
    registry.retain(|_, w| w.strong_count() > 0);
    if left_out > 0 {
        tracing::warn!(
            pool = %pool.name,
            offered = Pool::MAX_MEMBERS,
            left_out,
            "more backend addresses than a pool offers at once; split the pool"
        );
    }
    Members::new(out, matches!(pool.balance, Balance::Weighted))
}
