//! At start, before the first call: the rollout overrides the peers run
//! and the config file lacks. An override written through `ctl` lives in
//! the running config of the replicas, not in the file; a replica that
//! restarted used to run the file's schedule while the others kept the
//! override (after `ctl rollout rollback`, green got calls again on the
//! restarted replica). Now it asks the peers its rollouts name
//! (`judge.peers`) for their running configs and starts with the overrides
//! of the same rollout it lacks, as a reload from the file keeps them
//! ([`carried_overrides`]): every replica then runs what the fleet runs.
//!
//! Peers are asked once, within [`BUDGET`]; one that does not answer, or
//! runs another rollout, adds nothing, and the replica starts with what it
//! has. The union of what the peers run is taken: an override is written to
//! every replica by `ctl` at once, so a peer lacking one missed it (`ctl`
//! said `NOT CONVERGED`), and a replica never learns one from a peer that
//! its fleet did not run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agiproxy_config::{Config, OverrideAction, Peers};
use agiproxy_control::api::{ConfigView, RolloutView};
use futures_util::StreamExt;

use crate::session::rollout::live::identity;
use crate::session::rollout::Decision;

use super::eval::{peers, PeerAccess};
use super::overrides::{carried_overrides, with_carried, Carried};

/// How long a start waits for its peers' answers, all of them together:
/// a peer that does not answer must not hold a replica back from serving
/// for long (a cold start of the whole fleet asks addresses no one serves).
pub const BUDGET: Duration = Duration::from_secs(3);

/// An override one of the peers runs and the file lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    pub carried: Carried,
    /// The peer's control API it was read from.
    pub peer: SocketAddr,
}

/// What asking the peers at start gave.
#[derive(Debug, Default)]
pub struct AtStart {
    /// The overrides to start with, each once.
    pub adopted: Vec<Adopted>,
    /// Judged rollbacks of the same rollouts, the earliest of each route
    /// (`source`: `adopted from PEER at start`), by route name.
    pub decisions: Vec<(String, Decision)>,
    /// Peers asked that gave nothing usable, and why.
    pub unanswered: Vec<String>,
    /// How many peers answered with a config.
    pub answered: usize,
}

/// The distinct peer lists of `config`'s rollouts (most configs name one
/// list for all of them, or none).
fn peer_lists(config: &Config) -> Vec<&Peers> {
    let mut lists: Vec<&Peers> = Vec::new();
    for ro in config.routes.iter().filter_map(|r| r.rollout.as_deref()) {
        let p = &ro.judge.peers;
        if *p != Peers::None && !lists.contains(&p) {
            lists.push(p);
        }
    }
    lists
}

/// Whether any rollout of `config` names peers to ask.
pub fn names_peers(config: &Config) -> bool {
    !peer_lists(config).is_empty()
}

/// Asks every peer `config`'s rollouts name, within `budget`, for the
/// overrides of the same rollouts that `config` lacks and for their judged
/// rollbacks. Nothing is asked when no rollout names peers.
///
/// Every peer at once for what is small (its config's hash, its rollouts);
/// then, as those answers come, one config text per distinct hash (peers
/// mostly run the same one), fetched and parsed one at a time off the
/// runtime: parses of large configs at once could take gigabytes, and one
/// still running when the budget ends must not be followed by others. This
/// replica's own address needs no care: its control port does not listen
/// yet, so it refuses.
pub async fn ask_peers(config: &Config, access: &PeerAccess, budget: Duration) -> AtStart {
    let lists = peer_lists(config);
    if lists.is_empty() {
        return AtStart::default();
    }
    let deadline = tokio::time::Instant::now() + budget;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for list in lists {
        let found = tokio::time::timeout_at(deadline, peers(list)).await;
        for a in found.unwrap_or_default() {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }
    let no_answer = || format!("no answer within {budget:?}");
    let firsts = addrs.iter().map(|&addr| async move {
        // A judged rollback lives in memory only: the peers' rollouts say
        // it. Judgement would adopt it too, but only once it has read the
        // peers after the start (up to an eighth of `judge.interval` later
        // when the start falls early in a tick): calls meanwhile went green.
        let rollouts = async {
            let resp = access.get(addr, "/v1/rollouts").await.ok()?;
            (resp.status == 200).then_some(())?;
            serde_json::from_slice::<Vec<RolloutView>>(&resp.body).ok()
        };
        let hash = async {
            let resp = access
                .get(addr, "/v1/status")
                .await
                .map_err(|e| e.to_string())?;
            if resp.status != 200 {
                return Err(format!("{addr}: HTTP {}", resp.status));
            }
            let status: serde_json::Value = serde_json::from_slice(&resp.body)
                .map_err(|e| format!("{addr}: not a status: {e}"))?;
            status["hash"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{addr}: its status has no config hash"))
        };
        let (hash, views) = tokio::time::timeout_at(deadline, async {
            futures_util::future::join(hash, rollouts).await
        })
        .await
        .unwrap_or_else(|_| (Err(format!("{addr}: {}", no_answer())), None));
        (addr, hash, views.unwrap_or_default())
    });
    let mut out = AtStart::default();
    let max = config.limits.max_config_bytes;
    let mut parsed: Vec<String> = Vec::new();
    // Taken as they come: a peer that never answers must not hold back
    // the text of one that did.
    let mut firsts: futures_util::stream::FuturesUnordered<_> = firsts.collect();
    while let Some((addr, hash, views)) = firsts.next().await {
        for v in views {
            take_decision(&mut out.decisions, config, addr, &v);
        }
        let hash = match hash {
            Ok(h) => h,
            Err(e) => {
                out.unanswered.push(e);
                continue;
            }
        };
        if parsed.contains(&hash) {
            // The same text as a peer already read: the same overrides.
            out.answered += 1;
            continue;
        }
        let read = async {
            let resp = access
                .get(addr, "/v1/config")
                .await
                .map_err(|e| e.to_string())?;
            if resp.status != 200 {
                return Err(format!("{addr}: HTTP {}", resp.status));
            }
            // Up to `max` bytes of JSON, then YAML: off the runtime's workers.
            tokio::task::spawn_blocking(move || {
                let view: ConfigView = serde_json::from_slice(&resp.body)
                    .map_err(|e| format!("{addr}: not a config view: {e}"))?;
                agiproxy_config::from_yaml_str_within(&view.text, max).map_err(|e| {
                    format!(
                        "{addr}: its running config does not validate here (another release?): {e}"
                    )
                })
            })
            .await
            .map_err(|e| format!("{addr}: {e}"))?
        };
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(peer)) => {
                out.answered += 1;
                parsed.push(hash);
                let carried = carried_overrides(&peer, config)
                    .into_iter()
                    .map(|c| in_force_as_on(&peer, config, c))
                    .collect();
                merge(&mut out.adopted, addr, carried);
            }
            Ok(Err(e)) => out.unanswered.push(e),
            Err(_) => out.unanswered.push(format!("{addr}: {}", no_answer())),
        }
    }
    in_reload_order(config, &mut out.adopted);
    out
}

/// Puts `adopted` in the order a reload writes carried overrides (the
/// file's routes in order, then time), so that a reload of the same file
/// later finds the text it runs: no new generation.
fn in_reload_order(config: &Config, adopted: &mut [Adopted]) {
    let position = |route: &str| config.routes.iter().position(|r| r.name == route);
    adopted.sort_by_key(|a| (position(&a.carried.route), at_ms(&a.carried)));
}

/// A carried override's written time, in Unix ms (`ctl` writes it in
/// RFC 3339 UTC; texts compare only when spelled alike).
fn at_ms(c: &Carried) -> i64 {
    agiproxy_config::parse_time(&c.at).unwrap_or(i64::MAX)
}

/// `c` (as `peer` wrote it: its `at` without `peer`'s skew) rewritten to
/// take effect when it does on `peer` under `file`'s skew: a skew the file
/// changed but the running replicas refused (it would have moved an
/// override across now) must not move it here either.
fn in_force_as_on(peer: &Config, file: &Config, c: Carried) -> Carried {
    let skew = |config: &Config| {
        config
            .routes
            .iter()
            .find(|r| r.name == c.route)
            .and_then(|r| r.rollout.as_deref())
            .map_or(0, |ro| ro.skew.as_millis() as i64)
    };
    let shift = skew(peer) - skew(file);
    if shift == 0 {
        return c;
    }
    Carried {
        at: agiproxy_config::format_ms(at_ms(&c) + shift),
        ..c
    }
}

/// Adds the judged rollback of the peer's rollout `v` to `into` when it is
/// the same rollout as `config`'s on that route (the same identity) and the
/// earliest known for it.
fn take_decision(
    into: &mut Vec<(String, Decision)>,
    config: &Config,
    peer: SocketAddr,
    v: &RolloutView,
) {
    let Some(d) = &v.decision else { return };
    let Some(route) = config.routes.iter().find(|r| r.name == v.route) else {
        return;
    };
    let Some(ro) = route.rollout.as_deref() else {
        return;
    };
    if v.identity.as_deref() != Some(identity(&route.name, ro, &config.pools).as_str()) {
        return;
    }
    let decision = Decision {
        at_ms: d.at_ms,
        tick: d.tick,
        reason: d.reason.clone(),
        source: format!("adopted from {peer} at start"),
    };
    match into.iter_mut().find(|(r, _)| *r == v.route) {
        Some((_, known)) if known.at_ms <= decision.at_ms => {}
        Some((_, known)) => *known = decision,
        None => into.push((v.route.clone(), decision)),
    }
}

/// Adds `carried` (read from `peer`) to `into`, each override once. Of
/// final overrides (promote, rollback) of one route only the earliest is
/// kept: a later one changes nothing once the first is in force.
fn merge(into: &mut Vec<Adopted>, peer: SocketAddr, carried: Vec<Carried>) {
    for c in carried {
        if into.iter().any(|a| a.carried == c) {
            continue;
        }
        let final_action = matches!(c.action, OverrideAction::Promote | OverrideAction::Rollback);
        if final_action {
            // Times as written by `ctl` (RFC 3339 UTC, milliseconds): they
            // compare as text only when spelled alike, so parse them.
            let at = at_ms;
            if let Some(i) = into
                .iter()
                .position(|a| a.carried.route == c.route && a.carried.action == c.action)
            {
                if at(&c) < at(&into[i].carried) {
                    into[i] = Adopted { carried: c, peer };
                }
                continue;
            }
        }
        into.push(Adopted { carried: c, peer });
    }
}

/// `text` (the file's) with `adopted` written in, parsed: the config to
/// start with. An error says why the file's own is used instead.
pub fn apply(
    text: &str,
    adopted: &[Adopted],
    max_bytes: usize,
) -> Result<(Arc<str>, Config), String> {
    let carried: Vec<Carried> = adopted.iter().map(|a| a.carried.clone()).collect();
    let edited = with_carried(text, &carried).map_err(|e| e.to_string())?;
    let config = agiproxy_config::from_yaml_str_within(&edited, max_bytes)
        .map_err(|e| format!("the file with the peers' overrides does not validate: {e}"))?;
    Ok((Arc::from(edited), config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(route: &str, action: OverrideAction, at: &str) -> Carried {
        Carried {
            route: route.into(),
            action,
            at: at.into(),
        }
    }

    const TEXT: &str = "version: 1\nroutes:\n  - name: menu\n    rollout: { from: blue, to: green, steps: [10, 100], step_duration: 1h, start: \"2026-12-06T09:00:00Z\" }\n  - name: ivr\n    rollout: { from: blue, to: green, steps: [10, 100], step_duration: 1h, start: \"2026-12-06T09:00:00Z\" }\npools:\n  - name: blue\n    backends: [{ address: \"127.0.0.1:1\" }]\n  - name: green\n    backends: [{ address: \"127.0.0.1:2\" }]\n";

    /// An override the peer runs under its skew takes effect at the same
    /// time here under the file's (a skew change the peers refused, as it
    /// would move it across now, must not move it here).
    #[test]
    fn an_adopted_override_takes_effect_when_it_does_on_the_peer() {
        let with_skew = |skew: &str| {
            agiproxy_config::from_yaml_str(&TEXT.replace(
                "  - name: ivr\n    rollout: { from: blue",
                &format!("  - name: ivr\n    rollout: {{ skew: {skew}, from: blue"),
            ))
            .unwrap()
        };
        let (peer, file) = (with_skew("2s"), with_skew("30s"));
        let rollback = |at: &str| c("ivr", OverrideAction::Rollback, at);
        // In force on the peer at 09:00:02; here 09:00:02 - 30 s is written.
        let adopted = in_force_as_on(&peer, &file, rollback("2026-12-06T09:00:00.000Z"));
        assert_eq!(adopted, rollback("2026-12-06T08:59:32.000Z"));
        // The same skew: as written.
        let same = in_force_as_on(&peer, &peer, rollback("2026-12-06T09:00:00.000Z"));
        assert_eq!(same, rollback("2026-12-06T09:00:00.000Z"));
    }

    /// Adopted overrides are written as a reload writes carried ones: the
    /// file's routes in order, then time.
    #[test]
    fn adopted_overrides_are_put_in_reload_order() {
        let config = agiproxy_config::from_yaml_str(TEXT).unwrap();
        let p: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = |route: &str, at: &str| Adopted {
            carried: c(route, OverrideAction::Pause, at),
            peer: p,
        };
        let mut list = vec![
            a("ivr", "2026-12-06T09:20:00.000Z"),
            a("menu", "2026-12-06T09:30:00.000Z"),
            a("ivr", "2026-12-06T09:10:00.000Z"),
        ];
        in_reload_order(&config, &mut list);
        let got: Vec<(&str, &str)> = list
            .iter()
            .map(|a| (a.carried.route.as_str(), a.carried.at.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("menu", "2026-12-06T09:30:00.000Z"),
                ("ivr", "2026-12-06T09:10:00.000Z"),
                ("ivr", "2026-12-06T09:20:00.000Z"),
            ]
        );
    }

    /// Each override once; of final ones of a route, the earliest; pauses
    /// and resumes all (their order is their times').
    #[test]
    fn the_peers_overrides_are_merged_once_each_and_the_earliest_final_one_wins() {
        let (p1, p2): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.2:1".parse().unwrap(),
        );
        let pause = c("ivr", OverrideAction::Pause, "2026-12-06T09:10:00.000Z");
        let resume = c("ivr", OverrideAction::Resume, "2026-12-06T09:12:00.000Z");
        let late = c("ivr", OverrideAction::Rollback, "2026-12-06T09:20:00.500Z");
        let early = c("ivr", OverrideAction::Rollback, "2026-12-06T09:20:00Z");
        let other = c("menu", OverrideAction::Rollback, "2026-12-06T09:30:00.000Z");
        let mut into = Vec::new();
        merge(&mut into, p1, vec![pause.clone(), late.clone()]);
        merge(
            &mut into,
            p2,
            vec![pause.clone(), resume.clone(), early.clone(), other.clone()],
        );
        let got: Vec<(&Carried, SocketAddr)> = into.iter().map(|a| (&a.carried, a.peer)).collect();
        assert_eq!(
            got,
            vec![(&pause, p1), (&early, p2), (&resume, p2), (&other, p2)]
        );
        // The later one after the earlier: still the earlier.
        merge(&mut into, p1, vec![late]);
        assert_eq!(into.len(), 4);
        assert_eq!(into[1].carried, early);
    }
}
