//! A rollout's live state on this replica: session counters per step and
//! colour (atomics: the session path takes no lock), sessions in flight
//! per colour, the judged rollback, and the counters published at each
//! evaluation tick for the other replicas to read. Carried across reloads
//! while the rollout's [`identity`] stays.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use agiproxy_config::{Config, Pool, Rollout, Route};

use super::judge::{Counts, BUCKETS_MS};
use crate::session::outcome::{Outcome, Reason};

/// Published ticks kept for peers that ask late.
const KEEP_TICKS: usize = 8;
const NO_DECISION: i64 = i64::MIN;

/// A session in flight on one side of a rollout
/// ([`RolloutLive::session_started`]).
#[must_use = "the session counts as in flight only while this is held"]
pub struct InFlight {
    live: Arc<RolloutLive>,
    side: Side,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.live.active[self.side as usize].fetch_sub(1, Relaxed);
    }
}

/// Blue or green.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Blue = 0,
    Green = 1,
}

#[derive(Debug, Default)]
struct SideCounters {
    sessions: AtomicU64,
    failures: AtomicU64,
    connect_errors: AtomicU64,
    early_closes: AtomicU64,
    deadlines: AtomicU64,
    first_command: [AtomicU64; 12],
}

impl SideCounters {
    fn read(&self) -> Counts {
        let mut c = Counts {
            sessions: self.sessions.load(Relaxed),
            failures: self.failures.load(Relaxed),
            connect_errors: self.connect_errors.load(Relaxed),
            early_closes: self.early_closes.load(Relaxed),
            deadlines: self.deadlines.load(Relaxed),
            first_command: [0; 12],
        };
        for (out, a) in c.first_command.iter_mut().zip(&self.first_command) {
            *out = a.load(Relaxed);
        }
        c
    }
}

/// A decision to roll back, reached by judgement here or adopted from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// When it takes effect (Unix ms): calls created from then go to blue.
    pub at_ms: i64,
    /// The tick whose counters showed it.
    pub tick: i64,
    pub reason: String,
    /// `judged here` or `adopted from <replica>`.
    pub source: String,
}

/// This replica's counters of one step, frozen at a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub tick: i64,
    pub step: usize,
    pub blue: Counts,
    pub green: Counts,
}

/// The last judgement, for `ctl rollout status`.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub tick: i64,
    pub at_ms: i64,
    pub step: usize,
    /// Replicas whose counters were summed (this one included).
    pub replicas: usize,
    pub blue: Counts,
    pub green: Counts,
    pub verdict: String,
}

#[derive(Debug)]
pub struct RolloutLive {
    /// See [`identity`]: a peer's counters and decision count only when
    /// its identity is this one.
    pub identity: String,
    /// This replica among its peers (random: a replica listed twice, or
    /// itself, is counted once).
    pub id: String,
    /// `[step][side]`.
    counters: Box<[[SideCounters; 2]]>,
    active: [AtomicI64; 2],
    /// Sessions whose key held no creation time (routed by the weight now).
    pub unkeyed: AtomicU64,
    judged_ms: AtomicI64,
    decision: Mutex<Option<Decision>>,
    published: Mutex<VecDeque<Published>>,
    evaluation: Mutex<Option<Evaluation>>,
    /// Last tick published / judged here.
    pub(crate) published_tick: AtomicI64,
    pub(crate) judged_tick: AtomicI64,
    /// The peer clock farthest from this one at the last judgement that
    /// read a peer (theirs minus ours, ms); [`NO_OFFSET`] before.
    peer_clock_offset_ms: AtomicI64,
    /// Peers the last judgement could not count (no answer, an error, a
    /// step apart), for `agiproxy_rollout_peers_missing`.
    peers_missing: AtomicI64,
}

const NO_OFFSET: i64 = i64::MIN;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rollout's identity: what must stay equal for counters and a judged
/// rollback to carry over a reload, and for a peer's to be used. The
/// interval is in it because ticks are numbered by it. Overrides, canaries,
/// thresholds and skew are not: they change how it is run, not which
/// rollout it is. Sent to peers, so the encoding and the seed must stay the
/// same across releases (a change would only stop adoption while an upgrade
/// is under way).
pub fn identity(route: &str, ro: &Rollout, pools: &[Pool]) -> String {
    let mut key = Vec::with_capacity(128);
    for s in [route, &pools[ro.from].name, &pools[ro.to].name] {
        // Length-prefixed: no name can imitate another field.
        key.extend_from_slice(&(s.len() as u64).to_le_bytes());
        key.extend_from_slice(s.as_bytes());
    }
    key.extend_from_slice(&ro.start_ms.to_le_bytes());
    key.extend_from_slice(&(ro.steps.len() as u64).to_le_bytes());
    for bp in &ro.steps {
        key.extend_from_slice(&bp.to_le_bytes());
    }
    for d in [ro.step_duration, ro.judge.interval] {
        key.extend_from_slice(&(d.as_millis() as u64).to_le_bytes());
    }
    format!(
        "{:016x}",
        crate::pool::hash::stable_hash(&key, IDENTITY_SEED)
    )
}

const IDENTITY_SEED: u64 = 0x1d_e7;

/// A new id for this replica's state of a rollout, by which peers tell it
/// from themselves: random (std's `RandomState` keys come from the OS). A
/// hash of the pid and the time collided between containers, where the
/// proxy is pid 1, started in the same millisecond (audit: a peer's
/// counters and rollback were then skipped as this replica's own).
fn replica_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static MADE: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(MADE.fetch_add(1, Relaxed));
    format!("{:016x}", h.finish())
}

/// The rollouts of `new` that are the same rollout (the same [`identity`])
/// as `old`'s on the route of that name: the index of the route in `new`,
/// its name, `old`'s rollout and `new`'s. `old` must have its routes (not a
/// snapshot's config: `Snapshot::rollout_config`). `old`'s routes are
/// indexed by name once: looking each up by a scan made every reload of a
/// large table O(rollouts × routes), several times over.
pub fn same_rollouts<'a>(
    old: &'a Config,
    new: &'a Config,
) -> impl Iterator<Item = (usize, &'a Route, &'a Rollout, &'a Rollout)> + 'a {
    let before: HashMap<&str, &Route> = old
        .routes
        .iter()
        .filter(|r| r.rollout.is_some())
        .map(|r| (r.name.as_str(), r))
        .collect();
    new.routes.iter().enumerate().filter_map(move |(i, route)| {
        let ro = route.rollout.as_deref()?;
        let was = *before.get(route.name.as_str())?;
        let before = was.rollout.as_deref()?;
        (identity(&route.name, before, &old.pools) == identity(&route.name, ro, &new.pools))
            .then_some((i, was, before, ro))
    })
}

impl RolloutLive {
    /// The live state for the rollout `ro` of `route`: `previous` when it is
    /// the same rollout.
    pub fn new(
        route: &str,
        ro: &Rollout,
        pools: &[Pool],
        previous: Option<&Arc<RolloutLive>>,
    ) -> Arc<Self> {
        let identity = identity(route, ro, pools);
        if let Some(p) = previous.filter(|p| p.identity == identity) {
            return p.clone();
        }
        Arc::new(RolloutLive {
            identity,
            id: replica_id(),
            counters: (0..ro.steps.len()).map(|_| Default::default()).collect(),
            active: Default::default(),
            unkeyed: AtomicU64::new(0),
            judged_ms: AtomicI64::new(NO_DECISION),
            decision: Mutex::new(None),
            published: Mutex::new(VecDeque::new()),
            evaluation: Mutex::new(None),
            published_tick: AtomicI64::new(-1),
            judged_tick: AtomicI64::new(-1),
            peer_clock_offset_ms: AtomicI64::new(NO_OFFSET),
            peers_missing: AtomicI64::new(0),
        })
    }

    /// See `peers_missing`.
    pub fn peers_missing(&self) -> i64 {
        self.peers_missing.load(Relaxed)
    }

    pub(crate) fn set_peers_missing(&self, n: usize) {
        self.peers_missing.store(n as i64, Relaxed);
    }

    /// See `peer_clock_offset_ms`.
    pub fn peer_clock_offset_ms(&self) -> Option<i64> {
        Some(self.peer_clock_offset_ms.load(Relaxed)).filter(|v| *v != NO_OFFSET)
    }

    pub(crate) fn set_peer_clock_offset_ms(&self, ms: Option<i64>) {
        let v = ms.map_or(NO_OFFSET, |ms| ms.max(NO_OFFSET + 1));
        self.peer_clock_offset_ms.store(v, Relaxed);
    }

    /// When the judged rollback takes effect, if there is one.
    pub fn judged_ms(&self) -> Option<i64> {
        Some(self.judged_ms.load(Relaxed)).filter(|v| *v != NO_DECISION)
    }

    pub fn decision(&self) -> Option<Decision> {
        lock(&self.decision).clone()
    }

    /// Records a rollback unless an earlier one is known: every replica
    /// ends on the earliest, whichever it heard first.
    pub fn decide(&self, mut d: Decision) -> bool {
        // A peer's time is any i64 it sends: held to the times a config can
        // write, the schedule's arithmetic on it cannot overflow, and no
        // time is `NO_DECISION`.
        d.at_ms = d.at_ms.clamp(0, agiproxy_config::MAX_RFC3339_MS);
        let mut cur = lock(&self.decision);
        if cur.as_ref().is_some_and(|c| c.at_ms <= d.at_ms) {
            return false;
        }
        self.judged_ms.store(d.at_ms, Relaxed);
        *cur = Some(d);
        true
    }

    /// Counts a session in flight on `side` until the guard drops: at the
    /// session's end, or when its task unwinds from a panic (a decrement in
    /// `session_ended` alone left the gauge high for good then).
    ///
    /// A session is counted for judgement here, when its colour is picked:
    /// its failures come later, as they happen. Counted at their end, the
    /// sessions of the colour whose calls last longer were missing from the
    /// rates that its quick failures were already in (audit: green's calls
    /// of 4.5 s against blue's of 0.5 s, both closing 5 % early, read 7.4 %
    /// against 3.8 % and were rolled back). A canary is not counted: test
    /// phones say nothing of green's share of the traffic.
    pub fn session_started(self: &Arc<Self>, pick: &super::Pick) -> InFlight {
        let side = pick.side;
        self.active[side as usize].fetch_add(1, Relaxed);
        if !pick.canary {
            if let Some(c) = pick.step.and_then(|s| self.counters.get(s)) {
                c[side as usize].sessions.fetch_add(1, Relaxed);
            }
        }
        InFlight {
            live: Arc::clone(self),
            side,
        }
    }

    pub fn active(&self, side: Side) -> i64 {
        self.active[side as usize].load(Relaxed)
    }

    /// Counts how a session counted at its start ended (its [`InFlight`]
    /// ends it in the in-flight count). One the proxy itself ended (a
    /// drain's deadline, its own descriptors, a bug) says nothing of its
    /// colour: it is taken out of the count again.
    pub fn session_ended(
        &self,
        pick: &super::Pick,
        outcome: Outcome,
        reason: Option<Reason>,
        first_command_ms: Option<u64>,
    ) {
        if pick.canary {
            return;
        }
        let Some(c) = pick.step.and_then(|s| self.counters.get(s)) else {
            return;
        };
        let c = &c[pick.side as usize];
        if matches!(
            reason,
            Some(
                Reason::ShuttingDown
                    | Reason::LocalResources
                    | Reason::Overloaded
                    | Reason::Internal
            )
        ) {
            c.sessions.fetch_sub(1, Relaxed);
            return;
        }
        if outcome == Outcome::Failed {
            c.failures.fetch_add(1, Relaxed);
        }
        match reason {
            Some(
                Reason::ConnectFailed
                | Reason::BudgetExhausted
                | Reason::NoBackend
                | Reason::BackendReset,
            ) => {
                c.connect_errors.fetch_add(1, Relaxed);
            }
            Some(Reason::BackendClosed) => {
                c.early_closes.fetch_add(1, Relaxed);
            }
            Some(Reason::FirstCommandTimeout | Reason::NextCommandTimeout) => {
                c.deadlines.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        if let Some(ms) = first_command_ms {
            let b = BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(11);
            c.first_command[b].fetch_add(1, Relaxed);
        }
    }

    /// This replica's counters of `step`, now.
    pub fn counts(&self, step: usize) -> (Counts, Counts) {
        match self.counters.get(step) {
            Some(c) => (c[0].read(), c[1].read()),
            None => (Counts::default(), Counts::default()),
        }
    }

    pub fn publish(&self, p: Published) {
        let mut q = lock(&self.published);
        self.published_tick.store(p.tick, Relaxed);
        q.push_back(p);
        while q.len() > KEEP_TICKS {
            q.pop_front();
        }
    }

    pub fn published(&self, tick: i64) -> Option<Published> {
        lock(&self.published)
            .iter()
            .find(|p| p.tick == tick)
            .cloned()
    }

    pub fn set_evaluation(&self, e: Evaluation) {
        *lock(&self.evaluation) = Some(e);
    }

    pub fn evaluation(&self) -> Option<Evaluation> {
        lock(&self.evaluation).clone()
    }
}
