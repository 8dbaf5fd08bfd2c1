//! What a new config's rollouts do to the calls the running ones placed:
//! said in a WARN when a reload is applied.

use agiproxy_config::format_ms;

use crate::session::rollout::now_ms;
use crate::snapshot::Snapshot;

/// What replacing the rollouts of `snap` with those of `new` does to calls
/// already made (rollout audit: a new `steps`, `start` or interval, even an
/// edit reverted, re-coloured calls in progress and dropped a judged
/// rollback with nothing said): one line per route whose new rollout (another
/// identity) places calls made before now otherwise, for a WARN. The same
/// rollout is `past_changes`' to judge.
pub fn replaced_rollouts(snap: &Snapshot, new: &agiproxy_config::Config) -> Vec<(String, String)> {
    let now = now_ms();
    let mut out = Vec::new();
    let fresh: std::collections::HashMap<&str, &agiproxy_config::Rollout> = new
        .routes
        .iter()
        .filter_map(|r| Some((r.name.as_str(), r.rollout.as_deref()?)))
        .collect();
    for (r, ro) in snap
        .router
        .routes()
        .iter()
        .filter_map(|r| r.rollout.as_deref().map(|ro| (r, ro)))
    {
        let Some(next) = fresh.get(&*r.name) else {
            continue;
        };
        if crate::session::rollout::live::identity(&r.name, next, &new.pools) == ro.live.identity {
            continue;
        }
        let judged = ro.live.judged_ms();
        // From the earliest time either places differently: the new one may
        // have started before the old (review: a pending rollout replaced by
        // one started 5 minutes ago moved calls with nothing said).
        let from = ro
            .plan
            .overrides
            .iter()
            .chain(&next.overrides)
            .map(|o| o.at_ms)
            .fold(ro.plan.start_ms.min(next.start_ms), i64::min);
        let Some(t) =
            crate::session::rollout::first_difference((&ro.plan, judged), (next, None), from, now)
        else {
            continue;
        };
        let dropped = match judged.filter(|j| *j <= now) {
            Some(j) => format!(
                "; its judged rollback (in force from {}) is dropped",
                format_ms(j)
            ),
            None => String::new(),
        };
        out.push((
            r.name.to_string(),
            format!(
                "the new config declares another rollout on route {} (a new start, steps, step_duration, pools or judge.interval): calls made since {} change colour on their next AGI{dropped}; if that was not meant, put the rollout back as it was",
                r.name,
                format_ms(t)
            ),
        ));
    }
    out
}

/// When the judged rollback of `route`'s rollout takes effect, if any.
pub fn judged_of(snap: &Snapshot, route: &str) -> Option<i64> {
    snap.rollout(route)?.live.judged_ms()
}
