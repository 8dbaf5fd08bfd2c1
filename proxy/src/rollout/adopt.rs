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

/// Asks every peer `config`'s rollouts name for its running config, within
/// `budget`, and returns the overrides of the same rollouts that `config`
/// lacks. Nothing is asked when no rollout names peers. `own`: this
/// replica's control API, never asked (it is not serving yet).
pub async fn ask_peers(
    config: &Config,
    access: &PeerAccess,
    own: Option<SocketAddr>,
    budget: Duration,
) -> AtStart {
    let lists = peer_lists(config);
    if lists.is_empty() {
        return AtStart::default();
    }
    let deadline = tokio::time::Instant::now() + budget;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for list in lists {
        let found = tokio::time::timeout_at(deadline, peers(list)).await;
        for a in found.unwrap_or_default() {
            if !own.is_some_and(|own| is_own(a, own)) && !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }
    let max = config.limits.max_config_bytes;
    let asks = addrs.iter().map(|&addr| async move {
        // A judged rollback lives in memory only: the peers' rollouts say
        // it. Judgement would adopt it too, but only once it has read the
        // peers after the start (up to an eighth of `judge.interval` later
        // when the start falls early in a tick): calls meanwhile went green.
        let rollouts = async {
            let resp = access.get(addr, "/v1/rollouts").await.ok()?;
            (resp.status == 200).then_some(())?;
            serde_json::from_slice::<Vec<RolloutView>>(&resp.body).ok()
        };
        let read = async {
            let resp = access
                .get(addr, "/v1/config")
                .await
                .map_err(|e| e.to_string())?;
            if resp.status != 200 {
                return Err(format!("{addr}: HTTP {}", resp.status));
            }
            let view: ConfigView = serde_json::from_slice(&resp.body)
                .map_err(|e| format!("{addr}: not a config view: {e}"))?;
            // A config of up to `max` bytes may take a second to parse:
            // off the runtime's workers.
            tokio::task::spawn_blocking(move || {
                agiproxy_config::from_yaml_str_within(&view.text, max)
            })
            .await
            .map_err(|e| format!("{addr}: {e}"))?
            .map_err(|e| {
                format!("{addr}: its running config does not parse here (another release?): {e}")
            })
        };
        let (r, views) = tokio::time::timeout_at(deadline, async {
            futures_util::future::join(read, rollouts).await
        })
        .await
        .unwrap_or_else(|_| (Err(format!("{addr}: no answer within {budget:?}")), None));
        (addr, r, views.unwrap_or_default())
    });
    let mut out = AtStart::default();
    for (addr, r, views) in futures_util::future::join_all(asks).await {
        for v in views {
            take_decision(&mut out.decisions, config, addr, &v);
        }
        match r {
            Ok(peer) => {
                out.answered += 1;
                let carried = carried_overrides(&peer, config);
                merge(&mut out.adopted, addr, carried);
            }
            Err(e) => out.unanswered.push(e),
        }
    }
    out
}

/// Whether the peer address `a` is this replica's control API, bound at
/// `own`: asked, it would not answer before this start is over (it is
/// bound, not served yet), and hold the start for the whole budget. Bound
/// to all addresses, any address of this host on its port is it (an
/// address binds only where the host has it: no packet is sent).
fn is_own(a: SocketAddr, own: SocketAddr) -> bool {
    if own.ip().is_unspecified() {
        a.port() == own.port()
            && (a.ip().is_loopback() || std::net::UdpSocket::bind((a.ip(), 0)).is_ok())
    } else {
        a == own
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
            let at = |c: &Carried| agiproxy_config::parse_time(&c.at).unwrap_or(i64::MAX);
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

    #[test]
    fn this_replicas_own_control_api_is_not_asked() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert!(is_own(a("127.0.0.2:9090"), a("127.0.0.2:9090")));
        assert!(!is_own(a("127.0.0.3:9090"), a("127.0.0.2:9090")));
        // Bound to all addresses: this host's addresses on that port.
        assert!(is_own(a("127.0.0.5:9090"), a("0.0.0.0:9090")));
        assert!(is_own(a("[::1]:9090"), a("[::]:9090")));
        assert!(!is_own(a("127.0.0.5:9091"), a("0.0.0.0:9090")));
        // An address this host does not have (TEST-NET-3: never routed).
        assert!(!is_own(a("203.0.113.7:9090"), a("0.0.0.0:9090")));
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
