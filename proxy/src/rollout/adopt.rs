//! At start, before the first call: the rollout overrides the peers run
//! and the config file lacks. An override written through `ctl` lives in
//! the running config of the replicas, not in the file; a replica that
//! restarted used to run the file's schedule while the others kept the
//! override (after `ctl rollout rollback`, green got calls again on the
//! restarted replica). Now it asks the peers its rollouts name
//! (`judge.peers`) for their running configs and starts with the overrides
//! of the same rollout it lacks, as a reload from the file keeps them
//! ([`carried_overrides`]), and with the judged rollbacks they know (which
//! live in memory only): every replica then runs what the fleet runs.
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
use futures_util::stream::{FuturesUnordered, StreamExt};

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
/// replica's own address (an address of this host with its control port)
/// is not asked: its control port does not listen yet, and its refusal was
/// a WARN at every start (walkthrough).
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
    if let Some(own) = config.control.address {
        let host = host_addresses();
        addrs.retain(|a| !is_own(*a, own, &host));
    }
    let no_answer = || format!("no answer within {budget:?}");
    let firsts = addrs.iter().map(|&addr| async move {
        // A judged rollback lives in memory only: the peers' rollouts say
        // it. Judgement would adopt it too, but only once it has read the
        // peers after the start (up to an eighth of `judge.interval` later
        // when the start falls early in a tick): calls meanwhile went green.
        let rollouts = async {
            let body = get_ok(access, addr, "/v1/rollouts").await.ok()?;
            serde_json::from_slice::<Vec<RolloutView>>(&body).ok()
        };
        let hash = async {
            let body = get_ok(access, addr, "/v1/status").await?;
            // Only the hash, typed: a `Value` of the whole answer took 17
            // times its size (audit).
            #[derive(serde::Deserialize)]
            struct Status {
                hash: Option<String>,
            }
            let status: Status =
                serde_json::from_slice(&body).map_err(|e| format!("{addr}: not a status: {e}"))?;
            status
                .hash
                .filter(|h| h.len() <= super::eval::PEER_FIELD_BYTES)
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
    let now = crate::session::rollout::now_ms();
    // Config texts by hash: parsed, or being fetched from one peer with
    // others that said the same hash kept to try if it fails.
    let mut parsed: Vec<String> = Vec::new();
    let mut pending: Vec<(String, Vec<SocketAddr>)> = Vec::new();
    let fetch = |addr: SocketAddr, hash: String| async move {
        let read = get_ok(access, addr, "/v1/config");
        // Half the budget at most: a peer whose text stalls (overloaded, or
        // large packets lost on the way) leaves time to fetch the same text
        // from another peer that said the same hash.
        let until = deadline.min(tokio::time::Instant::now() + budget / 2);
        let body = tokio::time::timeout_at(until, read)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{addr}: its config did not come within {:?}",
                    budget / 2
                ))
            });
        (addr, hash, body)
    };
    // Taken as they come: a peer that never answers must not hold back
    // the text of one that did. Bodies are fetched side by side (one that
    // stalls must not hold back the others); they are parsed one at a time.
    let mut firsts: FuturesUnordered<_> = firsts.collect();
    let mut bodies = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some((addr, hash, views)) = firsts.next() => {
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
                } else if let Some((_, others)) = pending.iter_mut().find(|(h, _)| *h == hash) {
                    others.push(addr);
                } else {
                    pending.push((hash.clone(), Vec::new()));
                    bodies.push(fetch(addr, hash));
                }
            }
            Some((addr, hash, body)) = bodies.next() => {
                let parse = async {
                    let body = body?;
                    // Up to `max` bytes of JSON, then YAML: off the runtime's
                    // workers. One past the deadline runs on to its end
                    // alone, as nothing follows it.
                    tokio::task::spawn_blocking(move || {
                        let view: ConfigView = serde_json::from_slice(&body)
                            .map_err(|e| format!("{addr}: not a config view: {e}"))?;
                        let config = agiproxy_config::from_yaml_str_within(&view.text, max)
                            .map_err(|e| format!("{addr}: its running config does not validate here (another release?): {e}"))?;
                        Ok((view.hash, config))
                    })
                    .await
                    .map_err(|e| format!("{addr}: {e}"))?
                };
                let parsed_now = tokio::time::timeout_at(deadline, parse)
                    .await
                    .unwrap_or_else(|_| Err(format!("{addr}: {}", no_answer())));
                let others = pending
                    .iter()
                    .position(|(h, _)| *h == hash)
                    .map(|i| pending.swap_remove(i).1)
                    .unwrap_or_default();
                match parsed_now {
                    Ok((text_hash, peer)) => {
                        // The text's own hash: a change between the two
                        // answers must not pass for the status's text.
                        out.answered += 1 + others.len();
                        parsed.push(text_hash);
                        let carried = carried_overrides(&peer, config)
                            .into_iter()
                            .map(|c| in_force_as_on(&peer, config, c, now))
                            .collect();
                        merge(&mut out.adopted, addr, carried);
                    }
                    Err(e) => {
                        out.unanswered.push(e);
                        // Another peer that said the same hash, if any.
                        let mut others = others.into_iter();
                        if let Some(next) = others.next() {
                            pending.push((hash.clone(), others.collect()));
                            bodies.push(fetch(next, hash));
                        }
                    }
                }
            }
            else => break,
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

/// The body of `GET path` on the peer `addr`, if it answered 200; else
/// what happened, naming it.
async fn get_ok(access: &PeerAccess, addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let resp = access.get(addr, path).await.map_err(|e| e.to_string())?;
    if resp.status != 200 {
        return Err(format!("{addr}: HTTP {} to {path}", resp.status));
    }
    Ok(resp.body)
}

/// A carried override's written time, in Unix ms (`ctl` writes it in
/// RFC 3339 UTC; texts compare only when spelled alike).
fn at_ms(c: &Carried) -> i64 {
    agiproxy_config::parse_time(&c.at).unwrap_or(i64::MAX)
}

/// `c` as `peer` wrote it (its `at`, before `peer`'s skew) for this
/// replica, whose skew is `file`'s. Kept as written, as a reload keeps it,
/// unless the two skews put it on two sides of `now` (one in force, the
/// other not yet): the peers then refused that skew, as a reload refuses a
/// change that moves an override across now, and it is rewritten to take
/// effect when it does on `peer`.
fn in_force_as_on(peer: &Config, file: &Config, c: Carried, now: i64) -> Carried {
    let skew = |config: &Config| {
        config
            .routes
            .iter()
            .find(|r| r.name == c.route)
            .and_then(|r| r.rollout.as_deref())
            .map_or(0, |ro| ro.skew.as_millis() as i64)
    };
    let (theirs, ours) = (skew(peer), skew(file));
    let at = at_ms(&c);
    if (at + theirs <= now) == (at + ours <= now) {
        return c;
    }
    Carried {
        at: agiproxy_config::format_ms(at + theirs - ours),
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
    if super::eval::overlong_decision(d).is_some() {
        // Not an agiproxy's: not adopted, nor served on to the others.
        return;
    }
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

/// Whether the peer `addr` is this replica, whose control API binds
/// `own`: that address, or with `own` unspecified (`[::]:9090`, a pod's),
/// its port on a loopback address or one of `host`'s, in a family `own`
/// takes (`[::]` takes IPv4 too, `0.0.0.0` not IPv6). Not "any address a
/// socket can bind": with `ip_nonlocal_bind` (keepalived hosts) that is
/// every address, and every peer would have been taken for this one
/// (review).
fn is_own(addr: SocketAddr, own: SocketAddr, host: &[std::net::IpAddr]) -> bool {
    if !own.ip().is_unspecified() {
        return addr == own;
    }
    let ip = addr.ip().to_canonical();
    if own.is_ipv4() && ip.is_ipv6() {
        return false;
    }
    addr.port() == own.port() && (ip.is_loopback() || host.contains(&ip))
}

/// This host's interface addresses (none when they cannot be read: then
/// only loopback peers are known as this replica).
fn host_addresses() -> Vec<std::net::IpAddr> {
    if_addrs::get_if_addrs()
        .map(|ifs| ifs.iter().map(|i| i.ip().to_canonical()).collect())
        .unwrap_or_default()
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
            if let Some(i) = into
                .iter()
                .position(|a| a.carried.route == c.route && a.carried.action == c.action)
            {
                if at_ms(&c) < at_ms(&into[i].carried) {
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

    /// An override the peer runs under its skew is kept as written, as a
    /// reload keeps it, unless the file's skew would put it on the other
    /// side of now: then it takes effect here when it does on the peer.
    #[test]
    fn an_adopted_override_moves_only_when_the_skews_put_it_across_now() {
        let with_skew = |skew: &str| {
            agiproxy_config::from_yaml_str(&TEXT.replace(
                "  - name: ivr\n    rollout: { from: blue",
                &format!("  - name: ivr\n    rollout: {{ skew: {skew}, from: blue"),
            ))
            .unwrap()
        };
        let (peer, file) = (with_skew("2s"), with_skew("30s"));
        let rollback = |at: &str| c("ivr", OverrideAction::Rollback, at);
        let written = rollback("2026-12-06T09:00:00.000Z");
        let ms = |t: &str| agiproxy_config::parse_time(t).unwrap();
        // Now 09:00:10: in force on the peer (09:00:02), not yet under the
        // file's skew (09:00:30). Moved: 09:00:02 - 30 s is written.
        let now = ms("2026-12-06T09:00:10Z");
        assert_eq!(
            in_force_as_on(&peer, &file, written.clone(), now),
            rollback("2026-12-06T08:59:32.000Z")
        );
        // Both in force, or both ahead: as written (the peers would take
        // the file's skew on their next reload and keep it so).
        for now in ["2026-12-06T09:01:00Z", "2026-12-06T08:59:00Z"] {
            assert_eq!(
                in_force_as_on(&peer, &file, written.clone(), ms(now)),
                written,
                "{now}"
            );
        }
        // The same skew: as written.
        assert_eq!(in_force_as_on(&peer, &peer, written.clone(), now), written);
        // A reload of the file then keeps the moved one as it is: the text
        // it runs, no new generation.
        let p: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let file_text = TEXT.replace(
            "  - name: ivr\n    rollout: { from: blue",
            "  - name: ivr\n    rollout: { skew: 30s, from: blue",
        );
        let adopted = vec![Adopted {
            carried: in_force_as_on(&peer, &file, written, now),
            peer: p,
        }];
        let (running_text, running) = apply(&file_text, &adopted, 1 << 24).unwrap();
        let again = carried_overrides(&running, &file);
        assert_eq!(with_carried(&file_text, &again).unwrap(), &*running_text);
        let ro = running.routes[1].rollout.as_deref().unwrap();
        assert_eq!(ro.overrides[0].at_ms, ms("2026-12-06T09:00:02Z"));
    }

    /// Adopted overrides are written as a reload writes carried ones: the
    /// file's routes in order, then time.
    #[test]
    fn this_replica_is_known_among_its_peers() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        let host = host_addresses();
        let own = |a: &str, o: &str| is_own(at(a), at(o), &host);
        assert!(own("127.0.0.1:9090", "127.0.0.1:9090"));
        assert!(!own("127.0.0.2:9090", "127.0.0.1:9090"));
        assert!(own("127.0.0.2:9090", "[::]:9090"));
        assert!(own("[::1]:9090", "[::]:9090"));
        assert!(!own("[::1]:9090", "0.0.0.0:9090"), "0.0.0.0 takes no IPv6");
        assert!(!own("127.0.0.1:9091", "[::]:9090"));
        // TEST-NET-3: never an address of this host, bindable or not.
        assert!(!own("203.0.113.7:9090", "[::]:9090"));
        // An interface address of this host, with the port.
        let first = host.iter().find(|ip| !ip.is_loopback()).copied();
        if let Some(ip) = first {
            assert!(is_own(SocketAddr::new(ip, 9090), at("[::]:9090"), &host));
        }
    }

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

    /// A fake peer's control API: `/v1/status` says `hash` after `delay`;
    /// `/v1/config` answers `text` (or never, when None); `/v1/rollouts`
    /// has none.
    async fn fake_peer(hash: &'static str, delay: Duration, text: Option<String>) -> SocketAddr {
        chaos_tests::http::serve(move |head: String| {
            let text = text.clone();
            async move {
                if head.starts_with("GET /v1/status ") {
                    tokio::time::sleep(delay).await;
                    Some(format!("{{\"hash\":\"{hash}\"}}"))
                } else if head.starts_with("GET /v1/config ") {
                    let view = |text| ConfigView {
                        generation: 1,
                        hash: hash.into(),
                        source: "test".into(),
                        text,
                    };
                    text.map(|t| serde_json::to_string(&view(t)).unwrap())
                } else {
                    Some("[]".into())
                }
            }
        })
        .await
    }

    /// A peer whose status answers first but whose config text stalls does
    /// not hold back the same text from another peer: it is given half the
    /// budget, then the other is asked.
    #[tokio::test]
    async fn a_peer_whose_text_stalls_gives_way_to_another_with_the_same_hash() {
        let pause = "{ action: pause, at: \"2026-12-06T09:10:00Z\" }";
        let with_peers = |peers: &str, overrides: &str| {
            TEXT.replace(
                "start: \"2026-12-06T09:00:00Z\" }\npools",
                &format!("start: \"2026-12-06T09:00:00Z\", judge: {{ peers: [{peers}] }}{overrides} }}\npools"),
            )
        };
        let theirs = with_peers("\"127.0.0.1:1\"", &format!(", overrides: [{pause}]"));
        let stalls = fake_peer("h1", Duration::ZERO, None).await;
        let answers = fake_peer("h1", Duration::from_millis(200), Some(theirs)).await;
        let ours = with_peers(&format!("\"{stalls}\", \"{answers}\""), "");
        let config = agiproxy_config::from_yaml_str(&ours).unwrap();
        let started = std::time::Instant::now();
        let got = ask_peers(&config, &PeerAccess::plain(None), Duration::from_secs(3)).await;
        assert_eq!(
            got.adopted
                .iter()
                .map(|a| (&a.carried, a.peer))
                .collect::<Vec<_>>(),
            vec![(
                &c("ivr", OverrideAction::Pause, "2026-12-06T09:10:00.000Z"),
                answers
            )],
            "{got:?}"
        );
        assert_eq!(got.answered, 1, "{got:?}");
        assert!(got.unanswered[0].contains("did not come within"), "{got:?}");
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{:?}",
            started.elapsed()
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
