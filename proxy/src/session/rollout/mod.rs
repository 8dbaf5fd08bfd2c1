//! Blue-green rollouts declared on routes: a schedule every replica
//! computes from the clock and the config alone ([`schedule`]), calls kept
//! on one colour by the time in their key ([`sticky`]), canaries, and a
//! judgement of green against blue on every replica's counters
//! ([`judge`]; the loop that reads peers is `crate::rollout::eval`) that
//! rolls back on bad outcomes.

pub mod judge;
pub mod live;
pub mod schedule;
pub mod sticky;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agiproxy_config::{Pool, Rollout};

use crate::session::header::Header;
pub use live::{Decision, InFlight, RolloutLive, Side};
pub use schedule::{now_ms, position, Position, State};

/// One line for `agiproxy check`: where the rollout stands at `now_ms`
/// by the file alone (a judged rollback lives in the running replicas).
pub fn explain(ro: &Rollout, now_ms: i64) -> String {
    let p = schedule::position(ro, now_ms, None);
    let step = match p.step {
        Some(s) => format!("step {} of {}", s + 1, ro.steps.len()),
        None => "not started".into(),
    };
    let next = match p.next_change_ms {
        Some(t) => format!(
            "; the next step begins at {} (in {})",
            agiproxy_config::format_ms(t),
            humanize(t - now_ms)
        ),
        None => String::new(),
    };
    let judge = if ro.judge.enabled {
        format!(
            "judged every {} on {} sessions a colour at least",
            humanize(ro.judge.interval.as_millis() as i64),
            ro.judge.min_sessions
        )
    } else {
        "not judged".into()
    };
    format!(
        "rollout now: {}, {step}, green {}% of new calls{next}; {judge}",
        p.state.as_str(),
        f64::from(p.weight_bp) / 100.0
    )
}

fn humanize(ms: i64) -> String {
    let d = std::time::Duration::from_secs((ms.max(0) as u64).div_ceil(1000));
    humantime_like(d)
}

/// `1h 5m 3s` without a dependency for it.
fn humantime_like(d: std::time::Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h "));
    }
    if m > 0 {
        out.push_str(&format!("{m}m "));
    }
    out.push_str(&format!("{s}s"));
    out
}

/// A route's rollout, compiled once per config.
#[derive(Debug)]
pub struct CompiledRollout {
    pub plan: Rollout,
    pub live: Arc<RolloutLive>,
    /// `agi_arg_N` names of the canary's argument criteria.
    canary_args: Vec<(String, agiproxy_config::Pattern)>,
    /// Drives the weights for calls without the key at all.
    fallback: AtomicU64,
}

/// Where one session of a rollout route went, and how it is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub pool: usize,
    pub side: Side,
    /// The step in force when the session ran (its counters); None when
    /// no step is being judged (pending, rolled back, promoted).
    pub step: Option<usize>,
    pub canary: bool,
    /// The key held no creation time.
    pub unkeyed: bool,
}

impl CompiledRollout {
    pub fn new(
        route: &str,
        plan: &Rollout,
        pools: &[Pool],
        previous: Option<&CompiledRollout>,
    ) -> Self {
        CompiledRollout {
            plan: plan.clone(),
            live: RolloutLive::new(route, plan, pools, previous.map(|p| &p.live)),
            canary_args: plan
                .canary
                .args
                .iter()
                .map(|(n, re)| (format!("agi_arg_{n}"), re.clone()))
                .collect(),
            fallback: AtomicU64::new(0),
        }
    }

    /// Where the rollout stands at `t_ms`.
    pub fn position(&self, t_ms: i64) -> Position {
        schedule::position(&self.plan, t_ms, self.live.judged_ms())
    }

    fn is_canary(&self, h: &Header, source: IpAddr) -> bool {
        let m = &self.plan.canary;
        m.query
            .iter()
            .any(|(k, v)| h.query_param(k).is_some_and(|got| got == v.as_str()))
            || self
                .canary_args
                .iter()
                .any(|(name, re)| h.get(name).is_some_and(|v| re.is_match(v)))
            || m.vars
                .iter()
                .any(|(name, re)| h.get(name).is_some_and(|v| re.is_match(v)))
            || m.source.iter().any(|net| net.contains(&source))
    }

    /// The colour of one session: canaries to green; otherwise the key's
    /// hash point against the weight in force when the key was created.
    pub fn pick(&self, key: Option<&str>, h: &Header, source: IpAddr, now_ms: i64) -> Pick {
        let now = self.position(now_ms);
        let step = match now.state {
            State::Progressing | State::Halted => now.step,
            _ => None,
        };
        // No call is created in the future: a key ahead of this clock by
        // more than the tolerated skew (a forged or far-off time) is taken
        // as made now, not in a later step.
        let latest = now_ms.saturating_add(self.plan.skew.as_millis() as i64);
        let (green, canary, unkeyed) = if self.is_canary(h, source) {
            // Green at every step, until a rollback: a canary call made once
            // it is in force goes to blue (green was judged or found bad:
            // test phones too hear blue); one made before stays on green.
            let made = key
                .and_then(sticky::key_time_ms)
                .map_or(now_ms, |created| created.min(latest));
            (self.position(made).state != State::RolledBack, true, false)
        } else {
            match key {
                Some(k) => match sticky::key_time_ms(k) {
                    Some(created) => {
                        let w = self.position(created.min(latest)).weight_bp;
                        (
                            sticky::goes_green(sticky::point(k.as_bytes()), w),
                            false,
                            false,
                        )
                    }
                    None => (
                        sticky::goes_green(sticky::point(k.as_bytes()), now.weight_bp),
                        false,
                        true,
                    ),
                },
                None => {
                    let n = self.fallback.fetch_add(1, Ordering::Relaxed);
                    let p = sticky::point(&n.to_le_bytes());
                    (sticky::goes_green(p, now.weight_bp), false, true)
                }
            }
        };
        if unkeyed {
            self.live.unkeyed.fetch_add(1, Ordering::Relaxed);
        }
        let (pool, side) = if green {
            (self.plan.to, Side::Green)
        } else {
            (self.plan.from, Side::Blue)
        };
        Pick {
            pool,
            side,
            step,
            canary,
            unkeyed,
        }
    }
}

/// Changes of a route's `split_key` while its rollout (the same rollout:
/// `live::same_rollouts`) splits calls: `position` gives where the running
/// one stands now (its judged rollback included). Every call in progress
/// would be hashed on the other key, and about 2w(1 - w) of them change
/// colour on their next AGI (an audit: 133 of 300 at 30 %, with nothing
/// logged). One error per route.
pub fn split_key_changes(
    old: &agiproxy_config::Config,
    new: &agiproxy_config::Config,
    position: impl Fn(&str) -> Option<Position>,
) -> Vec<agiproxy_config::ConfigError> {
    let mut errors = Vec::new();
    for (i, was, _, _) in live::same_rollouts(old, new) {
        let name = was.name.as_str();
        let is = &new.routes[i];
        if was.split_key == is.split_key {
            continue;
        }
        let Some(p) = position(name) else { continue };
        let splitting = matches!(p.state, State::Progressing | State::Halted)
            && p.weight_bp > 0
            && p.weight_bp < 10_000;
        if splitting {
            errors.push(agiproxy_config::ConfigError::new(
                format!("routes[{i}].split_key"),
                format!(
                    "changing it from {:?} to {:?} while the rollout sends {}% of calls to \
                     green re-colours calls in progress: each is hashed on the new key, and \
                     about {:.0}% of them would change colour on their next AGI; change it \
                     with a new rollout (a new start), or before start, or once it is \
                     promoted or rolled back and the calls made before then have ended; \
                     a refused file is not read again until it changes, so reload then",
                    was.split_key,
                    is.split_key,
                    f64::from(p.weight_bp) / 100.0,
                    {
                        let w = f64::from(p.weight_bp) / 10_000.0;
                        200.0 * w * (1.0 - w)
                    },
                ),
            ));
        }
    }
    errors
}

/// Where `p` sends new calls: green's share, and whether it is rolled back
/// (canaries go green until then). Pending and halted, progressing and
/// promoted at 100 %, send calls alike.
fn placement(p: Position) -> (u32, bool) {
    (p.weight_bp, p.state == State::RolledBack)
}

/// The first time in `from..=to` (Unix ms) at which `a` and `b`, each with
/// its judged rollback, place a call made then differently, if any. Exact:
/// both are constant between their change points (steps, overrides, judged
/// rollbacks), and those are all visited.
pub fn first_difference(
    (a, judged_a): (&Rollout, Option<i64>),
    (b, judged_b): (&Rollout, Option<i64>),
    from: i64,
    to: i64,
) -> Option<i64> {
    let mut t = from;
    // Each turn passes at least one change point of either.
    let turns = 2 * (a.steps.len() + b.steps.len() + a.overrides.len() + b.overrides.len()) + 8;
    for _ in 0..turns {
        if t > to {
            return None;
        }
        let (pa, pb) = (position(a, t, judged_a), position(b, t, judged_b));
        if placement(pa) != placement(pb) {
            return Some(t);
        }
        let points = [pa.next_change_ms, pb.next_change_ms, judged_a, judged_b];
        let overrides = a.overrides.iter().chain(&b.overrides).map(|o| o.at_ms);
        let next = points
            .into_iter()
            .flatten()
            .chain(overrides)
            .filter(|c| *c > t)
            .min()?;
        t = next;
    }
    None
}

/// A change of the same rollout's overrides (`live::same_rollouts`) that
/// changes where calls already placed went: a new override whose time is
/// past, or one in force deleted (a `pause` deleted instead of a `resume`
/// written). Every call made since changes colour on its next AGI, on this
/// replica when it reads the file (an audit: 162 of 300, nothing said). It
/// is applied and warned of, not refused: every replica then runs the file,
/// a rollback written late still takes effect, and a replica that wrote a
/// later time of the same action comes back in line with the fleet's
/// (`carried_overrides`' moot case). The API refuses a past time, where the
/// command can simply be run again. `judged`: a route's judged rollback,
/// which the new config keeps. One warning per route.
pub fn past_changes(
    old: &agiproxy_config::Config,
    new: &agiproxy_config::Config,
    now_ms: i64,
    judged: impl Fn(&str) -> Option<i64>,
) -> Vec<agiproxy_config::ConfigError> {
    let mut errors = Vec::new();
    for (i, was, before, ro) in live::same_rollouts(old, new) {
        let j = judged(&was.name);
        // A new skew moves overrides alike; `skew_changes` judges that.
        let shift = before.skew.as_millis() as i64 - ro.skew.as_millis() as i64;
        let mut shifted;
        let ro = if shift == 0 {
            ro
        } else {
            shifted = ro.clone();
            for o in &mut shifted.overrides {
                o.at_ms = o.at_ms.saturating_add(shift);
            }
            &shifted
        };
        let from = before
            .overrides
            .iter()
            .chain(&ro.overrides)
            .map(|o| o.at_ms)
            .fold(before.start_ms, i64::min);
        let Some(t) = first_difference((before, j), (ro, j), from, now_ms) else {
            continue;
        };
        let (was, is) = (position(before, t, j), position(ro, t, j));
        let show = |p: Position| match p.state {
            State::RolledBack => "rolled back".to_string(),
            _ => format!("{}% to green", f64::from(p.weight_bp) / 100.0),
        };
        errors.push(agiproxy_config::ConfigError::new(
            format!("routes[{i}].rollout.overrides"),
            format!(
                "rollout overrides changed in the past: calls made since {} change colour on \
                 their next AGI ({} then before this change, {} now); applied, so that every \
                 replica runs the same rollout. Write overrides for a time later than every \
                 replica reads the file (a ConfigMap takes a minute or two: leave room, or \
                 raise skew, now {:?}), end a pause with a resume instead of deleting it, and \
                 copy the time `ctl rollout status` prints for a rollback in force",
                agiproxy_config::format_ms(t),
                show(was),
                show(is),
                ro.skew,
            ),
        ));
    }
    errors
}

/// A new `skew` moves every override of a rollout by the difference, past
/// ones included (they are stored with the skew added). A change that would
/// move one across `now_ms` is refused: an override in force would stop
/// being (a `promote` undone until later, calls made green since then sent
/// back to blue on their next AGI: an audit saw 282 of 300), or one not due
/// would apply at once. One error per rollout that would.
pub fn skew_changes(
    old: &agiproxy_config::Config,
    new: &agiproxy_config::Config,
    now_ms: i64,
) -> Vec<agiproxy_config::ConfigError> {
    let mut errors = Vec::new();
    for (i, _, before, ro) in live::same_rollouts(old, new) {
        if before.skew == ro.skew {
            continue;
        }
        let (was, is) = (before.skew.as_millis() as i64, ro.skew.as_millis() as i64);
        let moved = ro.overrides.iter().find(|o| {
            let written = o.at_ms - is;
            let old_at = written + was;
            before
                .overrides
                .iter()
                .any(|b| b.action == o.action && b.at_ms == old_at)
                && (old_at <= now_ms) != (o.at_ms <= now_ms)
        });
        if let Some(o) = moved {
            let written = agiproxy_config::format_ms(o.at_ms - is);
            errors.push(agiproxy_config::ConfigError::new(
                format!("routes[{i}].rollout.skew"),
                format!(
                    "changing it from {:?} to {:?} moves the {} override written for {written} \
                     across now (each override takes effect skew after its time, past ones \
                     included); keep the skew while an override lies within either value of \
                     now, or rewrite that override's time with the change",
                    before.skew, ro.skew, o.action,
                ),
            ));
        }
    }
    errors
}
