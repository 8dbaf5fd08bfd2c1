//! What a pool carries across reloads besides its backends' own state: the
//! rotation cursor, rate-limited warnings, the registry of every backend
//! still referenced, and the last good answer of each DNS name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use agiproxy_config::{BackendTarget, Dns, HealthCheck, Pool};
use tokio_util::sync::CancellationToken;

use super::backend::BackendLive;
use super::hash::stable_hash;

/// One address of a DNS name's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub addr: SocketAddr,
    /// The SRV record's weight (scaled into 1..=1000); None for A/AAAA,
    /// which take the entry's weight.
    pub weight: Option<u32>,
    /// Failover tier: the rank of the SRV priority (0 for A/AAAA).
    pub tier: u16,
    /// Not in the previous good answer (and this is not the first answer):
    /// a backend that just appeared, so it slow-starts.
    pub new: bool,
}

/// What is known of one DNS name of a pool: carried across reloads, so a
/// reload neither forgets the last good set nor waits for a new lookup.
#[derive(Debug, Clone, Default)]
pub struct Discovered {
    /// The last good answer.
    pub found: Vec<Found>,
    pub last_success: Option<SystemTime>,
    /// The TTL of the last good answer, bounded by min_ttl and max_ttl.
    pub ttl: Duration,
    pub lookups: u64,
    pub failures: u64,
    /// Failures since the last good answer.
    pub failing: u32,
    pub last_error: Option<String>,
    /// The SRV targets the last good answer looked up (by lower-case name
    /// without the final dot; not those its additional section answered):
    /// what each held, and whether AAAA was asked of it.
    pub targets: Arc<HashMap<String, TargetKnown>>,
}

/// One SRV target of a name's last good answer: see [`Discovered::targets`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetKnown {
    pub v4: bool,
    pub v6: bool,
    pub v6_asked: bool,
}

/// The key of a DNS entry in [`PoolLive`]: case and a
/// final dot do not matter.
pub(crate) fn key(target: &BackendTarget) -> String {
    let norm = |n: &str| n.trim_end_matches('.').to_ascii_lowercase();
    match target {
        BackendTarget::Static(a) => a.to_string(),
        BackendTarget::Host { name, port } => format!("{}:{port}", norm(name)),
        BackendTarget::Srv { name } => format!("srv {}", norm(name)),
    }
}

/// The lookup task of one DNS name (`discovery::follow`): it
/// belongs to the pool, not to one config, so that a reload that keeps the
/// name with the same `dns` settings hands it over as it is (its lookup in
/// flight, its schedule, its backoff) rather than asking again.
#[derive(Debug)]
pub(crate) struct Follower {
    /// The name as the config that started it spells it (the key folds
    /// case and the final `.`).
    pub target: BackendTarget,
    /// The settings it resolves with.
    pub dns: Dns,
    /// Ends it: at the activation of a config that drops the name, spells
    /// it otherwise or changes its settings, or when the pool goes.
    pub cancel: CancellationToken,
    /// Reloads that took it over: it builds its resolver anew (the system's
    /// configuration read again) before its next lookup.
    pub reloads: Arc<std::sync::atomic::AtomicU64>,
}

/// The pool of one config as its DNS lookups see it (`state::PoolShared`:
/// a trait, so that `state` and `discovery` depend on this module and not
/// on each other).
pub(crate) trait Owner: Send + Sync {
    fn live(&self) -> &Arc<PoolLive>;
    fn config(&self) -> &Pool;
    fn name(&self) -> &str;
    /// Rebuilds the member set from the config and the last good answers.
    fn rebuild_members(&self);
}

impl Followers {
    /// Whether the lookups work for the pool at `pool` (its `Arc`'s pointer).
    pub fn work_for<T>(&self, pool: *const T) -> bool {
        self.current
            .as_ref()
            .is_some_and(|w| std::ptr::addr_eq(w.as_ptr(), pool))
    }
}

/// A pool's DNS lookup tasks and the config they work for.
#[derive(Debug, Default)]
pub(crate) struct Followers {
    /// The pool of the running config: where a changed answer is applied.
    /// (A trait object: `state` depends on this module, not the reverse.)
    pub current: Option<Weak<dyn Owner>>,
    /// By [`key`].
    pub by_name: HashMap<String, Follower>,
}

/// Loud pool warnings (panic, no healthy backend) at most this often.
const WARN_EVERY_MS: u64 = 10_000;

/// Live state of a pool, carried across reloads like a backend's.
#[derive(Debug, Default)]
pub struct PoolLive {
    pub active: AtomicU32,
    pub(super) cursor: AtomicU64,
    /// Counter behind the pseudo-random slow-start draws.
    pub(super) draws: AtomicU64,
    pub(super) last_warn_ms: AtomicU64,
    /// Every backend of the pool still referenced anywhere (members of a
    /// running or retired snapshot, sessions), so an address that leaves and
    /// comes back finds its state again.
    pub(super) registry: Mutex<HashMap<SocketAddr, Weak<BackendLive>>>,
    /// Static backends a reload removed, held (so the registry keeps them)
    /// for [`super::members::RETIRED_MS`] with the time they left: see
    /// [`super::members::retire`].
    pub(super) retired: Mutex<std::collections::VecDeque<(u64, Arc<BackendLive>)>>,
    /// The last good DNS answer of each name, keyed by [`discovery::key`].
    pub(crate) discovery: Mutex<HashMap<String, Discovered>>,
    /// Changes of a DNS answer so far (counted under the `discovery`
    /// lock): a pool built before one is rebuilt when activated.
    pub(crate) answers_changed: AtomicU64,
    /// The running lookup of each name. Locked before `discovery` when
    /// both are.
    pub(crate) followers: Mutex<Followers>,
    /// Serialises member-set rebuilds.
    pub(super) rebuild: Mutex<()>,
    /// The current [`super::backend::CheckEpoch`]: one more at each
    /// activation of the pool that changes its checks (0: never activated).
    pub(super) check_epoch: Arc<AtomicU64>,
    /// The checks of the current epoch (None: the pool has none).
    pub(super) epoch_checks: Mutex<Option<HealthCheck>>,
}

impl PoolLive {
    /// True at most once per [`WARN_EVERY_MS`]: for loud, rate-limited warnings.
    pub(super) fn warn_due(&self, now: u64) -> bool {
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        (last == 0 || now >= last + WARN_EVERY_MS)
            && self
                .last_warn_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// A uniform draw in [0, 1).
    pub(super) fn draw(&self) -> f64 {
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        (stable_hash(&n.to_le_bytes(), 0x51_0e5a) >> 11) as f64 / (1u64 << 53) as f64
    }
}
