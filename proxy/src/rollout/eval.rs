//! The judgement loop of one replica. Ticks fall at `start + k * interval`
//! on every replica's clock. At tick k each replica freezes its counters of
//! the step in force ("publishes" tick k); an eighth of an interval later it
//! reads tick k from every peer (control API, `GET
//! /v1/rollouts/{route}/counts?tick=k`), sums what it got and judges. The
//! same published counters give every replica the same sum and so the same
//! verdict; a bad one takes effect at `tick + interval / 2` on all of them.
//! Peers' decisions are adopted too (the earliest wins), so a replica that
//! missed a peer, or restarted, converges at its next tick. A peer's
//! counters and decision are used only when it runs the same rollout (the
//! same [identity](crate::session::rollout::live::identity)): a decision of
//! a rollout since redeclared must not roll back its successor.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agiproxy_config::{Peers, Rollout};
use agiproxy_control::api::{RolloutCounts, RolloutDecisionView, RolloutTick};
use agiproxy_control::client::{Client, ClientError, Response, Target};
use agiproxy_control::tls::{Reloading, TlsConnector};
use agiproxy_control::token::Tokens;

use crate::server::Server;
use crate::session::rollout::judge::{judge, Counts, Verdict};
use crate::session::rollout::live::{Decision, Evaluation, Published, RolloutLive};
use crate::session::rollout::{now_ms, State};

pub fn to_api(c: &Counts) -> RolloutCounts {
    RolloutCounts {
        sessions: c.sessions,
        failures: c.failures,
        connect_errors: c.connect_errors,
        early_closes: c.early_closes,
        deadlines: c.deadlines,
        first_command: c.first_command,
    }
}

pub fn from_api(c: &RolloutCounts) -> Counts {
    Counts {
        sessions: c.sessions,
        failures: c.failures,
        connect_errors: c.connect_errors,
        early_closes: c.early_closes,
        deadlines: c.deadlines,
        first_command: c.first_command,
    }
}

pub fn decision_view(d: &Decision) -> RolloutDecisionView {
    RolloutDecisionView {
        at: agiproxy_config::format_ms(d.at_ms),
        at_ms: d.at_ms,
        tick: d.tick,
        reason: d.reason.clone(),
        source: d.source.clone(),
    }
}

/// This replica's answer to a peer asking for tick `tick`.
pub fn tick_view(live: &RolloutLive, tick: i64, split_key: &str) -> RolloutTick {
    let p = live.published(tick);
    RolloutTick {
        replica: live.id.clone(),
        tick,
        step: p.as_ref().map(|p| p.step),
        blue: p.as_ref().map(|p| to_api(&p.blue)).unwrap_or_default(),
        green: p.as_ref().map(|p| to_api(&p.green)).unwrap_or_default(),
        decision: live.decision().as_ref().map(decision_view),
        identity: Some(live.identity.clone()),
        split_key: Some(split_key.to_string()),
        now_ms: Some(now_ms()),
    }
}

/// A peer's clock minus this replica's, from its answer stamped `theirs`
/// to a request sent at `sent` and answered at `received` (this replica's
/// clock, ms): compared halfway, so off by at most half the round trip.
fn clock_offset(theirs: i64, sent: i64, received: i64) -> i64 {
    // A peer's clock is any i64 it sends: held to the times a config can
    // write, the offset and its `abs()` cannot overflow.
    theirs.clamp(0, agiproxy_config::MAX_RFC3339_MS) - (sent + (received - sent) / 2)
}

/// The largest clock difference judgement tolerates between replicas, or
/// between Asterisk and a replica: `skew` for overrides and call keys, an
/// eighth of the interval for ticks (a peer reads tick k that much after
/// it began).
fn clock_tolerance_ms(plan: &Rollout) -> i64 {
    (plan.skew.as_millis() as i64).min(plan.judge.interval.as_millis() as i64 / 8)
}

/// What one peer's answer brought to a judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Taken {
    /// It runs another rollout of this route (another config, or a release
    /// that sends no identity): nothing of it was used.
    pub other_rollout: bool,
    /// Its decision was adopted (earlier than the one known here, if any).
    pub adopted: bool,
    /// Its counters were added to `blue` and `green`.
    pub counted: bool,
}

/// Uses one peer's answer `peer` (read from `from`): adopts its decision and
/// adds its counters of `step` (the step this replica froze) to `blue` and
/// `green`, only when it runs the rollout `live` belongs to.
pub fn take(
    live: &RolloutLive,
    step: Option<usize>,
    peer: &RolloutTick,
    from: &str,
    blue: &mut Counts,
    green: &mut Counts,
) -> Taken {
    if peer.identity.as_deref() != Some(live.identity.as_str()) {
        return Taken {
            other_rollout: true,
            ..Taken::default()
        };
    }
    let adopted = peer.decision.as_ref().is_some_and(|d| {
        live.decide(Decision {
            at_ms: d.at_ms,
            tick: d.tick,
            reason: d.reason.clone(),
            source: format!("adopted from {from}"),
        })
    });
    let counted = step.is_some() && peer.step == step;
    if counted {
        blue.add(&from_api(&peer.blue));
        green.add(&from_api(&peer.green));
    }
    Taken {
        other_rollout: false,
        adopted,
        counted,
    }
}

/// Why a peer running this rollout gave no counters to add to this
/// replica's at its step (`own`), if it did not: left out without a word,
/// a peer whose clock was behind had the fleet judge without it and decide
/// apart (audit: two replicas said `waiting`, the third `fail`).
fn left_out(own: Option<usize>, peer: Option<usize>) -> Option<String> {
    let own = own?;
    Some(match peer {
        None => "has not published this tick (its clock behind, or it just started)".into(),
        Some(s) if s != own => format!(
            "counted step index {s}, this replica {own} (their clocks differ by more than skew?)"
        ),
        Some(_) => return None,
    })
}

/// How judgement reads its peers' control APIs: with the bearer token
/// every replica shares, and over TLS when they serve it (as this
/// replica's own control API does: one config for the whole fleet).
pub struct PeerAccess {
    /// The control API's tokens: the one in use is presented.
    token: Option<Arc<Tokens>>,
    tls: Option<PeerTls>,
    /// This replica serves TLS and nothing says which CA signed the peers'
    /// certificates: peers are not read at all. Over plain HTTP the token
    /// went to them in clear (audit: a rollout naming peers with its judge
    /// off, or a reload adding a CA the start did not have).
    unverifiable: bool,
}

struct PeerTls {
    /// Follows its files (see [`crate::credentials`]).
    connector: Arc<Reloading<TlsConnector>>,
    /// The name the peers' certificates carry; None: the peer's IP address.
    server_name: Option<String>,
}

impl PeerAccess {
    /// Plain HTTP (the control API has no `tls`).
    pub fn plain(token: Option<Arc<Tokens>>) -> PeerAccess {
        PeerAccess {
            token,
            tls: None,
            unverifiable: false,
        }
    }

    /// As `control` says: with `control.tls`, HTTPS verified against
    /// `control.tls.peers`. Reads the PEM files: call it off the runtime's
    /// workers. An error names the file and what is wrong with it.
    pub fn from_config(
        control: &agiproxy_config::Control,
        token: Option<Arc<Tokens>>,
    ) -> Result<PeerAccess, String> {
        let mut access = PeerAccess::plain(token);
        let Some(tls) = &control.tls else {
            return Ok(access);
        };
        // Without a CA nothing can be verified; validation refuses rollouts
        // that read peers then, and a reload cannot add one to this access
        // (built at start): such peers are not read, never read in clear.
        let Some(ca) = &tls.peers.ca else {
            access.unverifiable = true;
            return Ok(access);
        };
        let (cert, key) = tls.peers.client_cert.clone().unzip();
        let files = agiproxy_control::tls::ClientTls {
            ca: Some(ca.clone()),
            cert,
            key,
        };
        let connector = agiproxy_control::tls::reloading_connector(&files)
            .map_err(|e| format!("control.tls.peers: {e}"))?;
        access.tls = Some(PeerTls {
            connector: Arc::new(connector),
            server_name: tls.peers.server_name.clone(),
        });
        Ok(access)
    }

    /// Its TLS settings, which follow their files when refreshed.
    pub fn tls(&self) -> Option<Arc<Reloading<TlsConnector>>> {
        self.tls.as_ref().map(|t| t.connector.clone())
    }

    /// A client with the settings in use now, presenting `token`.
    fn client(&self, token: Option<String>) -> Client {
        Client {
            token,
            tls: self.tls.as_ref().map(|t| (*t.connector.current()).clone()),
            timeout: Duration::from_secs(5),
        }
    }

    /// Reads `path` from the peer at `addr`. A 401 while the token before
    /// the last rotation is still accepted is asked again with that one: the
    /// peer's copy of the token file may not have changed yet.
    pub(crate) async fn get(&self, addr: SocketAddr, path: &str) -> Result<Response, ClientError> {
        // Counters, status and rollouts are a few KB from an agiproxy; only
        // the config text can be large. A peer is whatever answers at its
        // address (a DNS name's answer, over plain HTTP maybe): 60 MB of
        // status once took a starting replica to 1 GB (audit).
        let limit = if path == "/v1/config" {
            agiproxy_control::client::MAX_RESPONSE_BYTES
        } else {
            PEER_ANSWER_BYTES
        };
        let target = self.target(addr);
        if self.unverifiable {
            return Err(ClientError::Tls {
                target: target.to_string(),
                msg: "not read: this replica serves its control API over TLS and started without \
                      control.tls.peers.ca (or client_ca) to verify its peers; set one and restart"
                    .into(),
            });
        }
        let current = self.token.as_ref().map(|t| t.current());
        let r = self
            .client(current)
            .call_within(limit, &target, "GET", path, &[], None)
            .await;
        let previous = self.token.as_ref().and_then(|t| t.previous());
        match (&r, previous) {
            (Ok(resp), Some(old)) if resp.status == 401 => {
                self.client(Some(old))
                    .call_within(limit, &target, "GET", path, &[], None)
                    .await
            }
            _ => r,
        }
    }

    fn target(&self, addr: SocketAddr) -> Target {
        match &self.tls {
            None => Target::http(addr),
            Some(t) => Target::https(
                addr,
                t.server_name
                    .clone()
                    .unwrap_or_else(|| addr.ip().to_string()),
            ),
        }
    }
}

/// The most read of a peer's answer other than its config text: its
/// counters (`/v1/rollouts/{route}/counts`), status and rollouts, a few KB
/// each from an agiproxy (a thousand rollouts' views fit).
pub const PEER_ANSWER_BYTES: usize = 4 << 20;

/// The longest string taken from a peer's answer (a decision's reason and
/// source, an identity, a split key, a replica id): an agiproxy's are far
/// shorter. A longer one was adopted, served on to every other replica and
/// logged at every tick (audit: 52 MB of log in 13 s).
pub const PEER_FIELD_BYTES: usize = 1024;

/// The first field of a peer's answer longer than [`PEER_FIELD_BYTES`].
pub fn overlong_field(t: &RolloutTick) -> Option<&'static str> {
    let long = |s: &str| s.len() > PEER_FIELD_BYTES;
    let opt = |s: &Option<String>| s.as_deref().is_some_and(long);
    if long(&t.replica) {
        Some("replica")
    } else if opt(&t.identity) {
        Some("identity")
    } else if opt(&t.split_key) {
        Some("split_key")
    } else {
        t.decision.as_ref().and_then(overlong_decision)
    }
}

/// The first field of a peer's decision longer than [`PEER_FIELD_BYTES`].
pub fn overlong_decision(d: &agiproxy_control::api::RolloutDecisionView) -> Option<&'static str> {
    let long = |s: &str| s.len() > PEER_FIELD_BYTES;
    if long(&d.reason) {
        Some("decision.reason")
    } else if long(&d.source) {
        Some("decision.source")
    } else if long(&d.at) {
        Some("decision.at")
    } else {
        None
    }
}

/// Runs the judgement of every rollout route of the running config, for
/// as long as the process lives, reading peers with `peers`.
pub fn spawn(server: Server, peers: PeerAccess) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = Arc::new(peers);
        loop {
            // The snapshot is let go before the sleep: a replaced one must
            // be freed where the swap frees it (then memory is given back),
            // not here a pause later.
            let pause = {
                let snap = server.snapshot();
                let mut pause = Duration::from_millis(250);
                for cr in snap.router.routes() {
                    let Some(ro) = &cr.rollout else { continue };
                    if !ro.plan.judge.enabled {
                        continue;
                    }
                    pause = pause.min(ro.plan.judge.interval / 16);
                    step(&cr.name, &cr.route.split_key, &ro.plan, &ro.live, &client);
                }
                pause
            };
            tokio::time::sleep(pause.max(Duration::from_millis(10))).await;
        }
    })
}

fn step(
    route: &Arc<str>,
    split_key: &str,
    plan: &Rollout,
    live: &Arc<RolloutLive>,
    client: &Arc<PeerAccess>,
) {
    let now = now_ms();
    let iv = (plan.judge.interval.as_millis() as i64).max(1);
    if now < plan.start_ms {
        return;
    }
    let k = (now - plan.start_ms) / iv;
    let t_k = plan.start_ms + k * iv;
    if live
        .published_tick
        .load(std::sync::atomic::Ordering::Relaxed)
        < k
    {
        let pos = crate::session::rollout::schedule::position(plan, t_k, live.judged_ms());
        match (pos.state, pos.step) {
            (State::Progressing | State::Halted, Some(step)) => {
                let (blue, green) = live.counts(step);
                live.publish(Published {
                    tick: k,
                    step,
                    blue,
                    green,
                });
            }
            _ => live
                .published_tick
                .store(k, std::sync::atomic::Ordering::Relaxed),
        }
    }
    if now >= t_k + iv / 8 && live.judged_tick.load(std::sync::atomic::Ordering::Relaxed) < k {
        live.judged_tick
            .store(k, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(evaluate(
            route.clone(),
            split_key.to_string(),
            plan.clone(),
            live.clone(),
            client.clone(),
            k,
            t_k,
        ));
    }
}

/// The control API addresses `list` names now.
pub(crate) async fn peers(list: &Peers) -> Vec<SocketAddr> {
    match list {
        Peers::None => Vec::new(),
        Peers::Static(list) => list.clone(),
        Peers::Dns { target, dns } => {
            // Built off the runtime's threads: it reads /etc/hosts (and
            // /etc/resolv.conf without `nameservers`), at every tick.
            let d = dns.clone();
            let built = tokio::task::spawn_blocking(move || crate::pool::discovery::resolver(&d))
                .await
                .unwrap_or_else(|e| Err(format!("cannot build a resolver: {e}")));
            let found = match built {
                Ok(r) => crate::pool::discovery::lookup(&r, target, dns).await,
                Err(e) => Err(e),
            };
            match found {
                Ok((found, _ttl)) => found.into_iter().map(|f| f.addr).collect(),
                Err(e) => {
                    tracing::warn!(peers = %target, error = %e, "rollout: cannot find the peer replicas; going on without them (judgement counts this replica alone, a start takes the file's overrides)");
                    Vec::new()
                }
            }
        }
    }
}

async fn evaluate(
    route: Arc<str>,
    split_key: String,
    plan: Rollout,
    live: Arc<RolloutLive>,
    client: Arc<PeerAccess>,
    k: i64,
    t_k: i64,
) {
    let iv = plan.judge.interval;
    let own = live.published(k);
    // One deadline for the lookup and the reads together: the decision is
    // made by 3/8 of the interval, before it takes effect at 1/2 (audit: a
    // lookup of iv/4 and reads of iv/4 after it decided at 5/8, after the
    // rollback it decided had taken effect). A lookup that hangs must not
    // let this tick's evaluation land after the next one's either.
    let iv_ms = iv.as_millis() as i64;
    // At least an eighth: an evaluation that starts late (a rollout applied
    // in the middle of an interval) still reads its peers, and decides no
    // earlier than it could (`at_ms` is never in the past).
    let left = (t_k + 3 * iv_ms / 8 - now_ms()).clamp(iv_ms / 8, iv_ms) as u64;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(left);
    let addrs = tokio::time::timeout_at(
        deadline.min(tokio::time::Instant::now() + iv / 4),
        peers(&plan.judge.peers),
    )
    .await
    .unwrap_or_default();
    let path = format!("/v1/rollouts/{route}/counts?tick={k}");
    let asks = addrs.iter().map(|a| {
        let (client, path) = (&client, &path);
        async move {
            let sent = now_ms();
            let r = tokio::time::timeout_at(deadline, client.get(*a, path)).await;
            (*a, r, sent, now_ms())
        }
    });
    let answers = futures_util::future::join_all(asks).await;

    let mut seen: HashSet<String> = HashSet::from([live.id.clone()]);
    let (mut blue, mut green, mut replicas) = match &own {
        Some(p) => (p.blue, p.green, 1),
        None => (Counts::default(), Counts::default(), 0),
    };
    let mut missing = Vec::new();
    let mut other_rollout = Vec::new();
    let mut other_key = Vec::new();
    // (offset, peer) of the peer clock farthest from this one.
    let mut farthest: Option<(i64, SocketAddr)> = None;
    let mut off_clocks = Vec::new();
    let tolerance = clock_tolerance_ms(&plan);
    for (addr, answer, sent, received) in answers {
        let tick: RolloutTick = match answer {
            Ok(Ok(resp)) if resp.status == 200 => match serde_json::from_slice(&resp.body) {
                Ok(t) => match overlong_field(&t) {
                    None => t,
                    Some(field) => {
                        missing.push(format!(
                            "{addr}: its answer's {field} is over {PEER_FIELD_BYTES} bytes (not an agiproxy?)"
                        ));
                        continue;
                    }
                },
                Err(e) => {
                    missing.push(format!("{addr}: {e}"));
                    continue;
                }
            },
            Ok(Ok(resp)) => {
                missing.push(format!("{addr}: HTTP {}", resp.status));
                continue;
            }
            Ok(Err(e)) => {
                missing.push(e.to_string());
                continue;
            }
            Err(_) => {
                missing.push(format!(
                    "{addr}: no answer by {} (3/8 of the interval)",
                    agiproxy_config::format_ms(t_k + 3 * iv_ms / 8)
                ));
                continue;
            }
        };
        if !seen.insert(tick.replica.clone()) {
            continue;
        }
        if let Some(theirs) = tick.now_ms {
            let off = clock_offset(theirs, sent, received);
            if farthest.is_none_or(|(f, _)| off.abs() > f.abs()) {
                farthest = Some((off, addr));
            }
            // Warned of only when beyond the tolerance whatever the
            // request's own time: `sent` is before the connect (and TLS
            // handshake), so the estimate leans late by up to half of it.
            let within = (received - sent) / 2;
            if off.abs() - within > tolerance {
                off_clocks.push(format!("{addr}: {off:+} ms (± {within} ms)"));
            }
        }
        let from = addr.to_string();
        let t = take(
            &live,
            own.as_ref().map(|p| p.step),
            &tick,
            &from,
            &mut blue,
            &mut green,
        );
        if let Some(theirs) = tick.split_key.as_deref().filter(|k| *k != split_key) {
            if !t.other_rollout {
                other_key.push(format!("{addr}: {theirs}"));
            }
        }
        if t.other_rollout {
            other_rollout.push(format!(
                "{addr}: {}",
                tick.identity.as_deref().unwrap_or("no identity")
            ));
        }
        if t.adopted {
            if let Some(d) = &tick.decision {
                tracing::warn!(route = %route, peer = %addr, at = %d.at, reason = %d.reason, "rollout rolled back: decision adopted from a peer");
            }
        }
        replicas += usize::from(t.counted);
        // One that decided a rollback publishes no step: not left out.
        if !t.other_rollout && !t.counted && tick.decision.is_none() {
            if let Some(why) = left_out(own.as_ref().map(|p| p.step), tick.step) {
                missing.push(format!("{addr}: {why}"));
            }
        }
    }
    // None measured (no peer answered, or only older releases): unknown,
    // not the last value, which would keep an alert firing on old news.
    live.set_peer_clock_offset_ms(farthest.map(|(off, _)| off));
    // Peers named and none found (their DNS name did not answer): every
    // one is missing, though none could be counted by name (review).
    let none_found = plan.judge.peers != Peers::None && addrs.is_empty();
    live.set_peers_missing(missing.len() + other_rollout.len() + usize::from(none_found));
    if !off_clocks.is_empty() {
        tracing::warn!(route = %route, tick = k, tolerance_ms = tolerance, peers = ?off_clocks, "rollout: some peers' clocks differ from this replica's by more than the rollout tolerates (skew, and an eighth of judge.interval): calls may change colour between replicas and judgement may leave them out; fix their time sync (NTP)");
    }
    if !missing.is_empty() {
        tracing::warn!(route = %route, tick = k, missing = ?missing, "rollout: some peers' counters are missing from this judgement");
    }
    if !other_key.is_empty() {
        tracing::warn!(route = %route, tick = k, split_key = %split_key, others = ?other_key, "rollout: some peers split calls by another split_key, so a call that moves between replicas can change colour (a refused split_key change comes back when a replica restarts with its file); make it the same on every replica");
    }
    if !other_rollout.is_empty() {
        tracing::warn!(route = %route, tick = k, identity = %live.identity, others = ?other_rollout, "rollout: some peers run another rollout of this route (a config not applied there yet, or an older agiproxy); their counters and decision are left out");
    }
    let Some(own) = own else { return };
    let verdict = judge(&plan.judge, &blue, &green);
    live.set_evaluation(Evaluation {
        tick: k,
        at_ms: t_k,
        step: own.step,
        replicas,
        blue,
        green,
        verdict: verdict.text(),
    });
    match &verdict {
        Verdict::Fail(reason) => {
            // The same time on every replica that decides this tick; never
            // in the past of this one (a starved runtime), where calls it
            // placed since would change colour.
            let at_ms = (t_k + iv_ms / 2).max(now_ms());
            if live.decide(Decision {
                at_ms,
                tick: k,
                reason: reason.clone(),
                source: "judged here".into(),
            }) {
                tracing::warn!(
                    route = %route,
                    tick = k,
                    step = own.step + 1,
                    replicas,
                    blue_sessions = blue.sessions,
                    green_sessions = green.sessions,
                    at = %agiproxy_config::format_ms(at_ms),
                    reason = %reason,
                    "rollout rolled back: green is worse than blue"
                );
            }
        }
        v => {
            tracing::info!(route = %route, tick = k, step = own.step + 1, replicas, blue_sessions = blue.sessions, green_sessions = green.sessions, verdict = %v.text(), "rollout judged")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::rollout::live::identity;
    use crate::session::rollout::schedule::position;
    use agiproxy_config::Pool;

    /// A replica serving TLS with no CA for its peers never reads them: it
    /// does not even connect, so its token is not sent in clear (audit).
    #[tokio::test]
    async fn peers_serving_tls_without_a_ca_are_not_read_at_all() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let control = agiproxy_config::Control {
            tls: Some(agiproxy_config::ControlTls {
                cert: "/c.pem".into(),
                key: "/k.pem".into(),
                client_ca: None,
                peers: agiproxy_config::PeerTls {
                    ca: None,
                    client_cert: None,
                    server_name: None,
                },
            }),
            ..agiproxy_config::Control::default()
        };
        let token = Some(Arc::new(Tokens::new("secret".into())));
        let access = PeerAccess::from_config(&control, token).unwrap();
        let Err(e) = access.get(addr, "/v1/status").await else {
            panic!("a peer was read");
        };
        assert!(e.to_string().contains("not read"), "{e}");
        let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "a connection was made");
    }

    /// A peer of this rollout that gave no counters for this replica's step
    /// is named with why (it was dropped without a word); one at the same
    /// step, or any while this replica has none, is not.
    #[test]
    fn a_peer_left_out_of_judgement_is_named() {
        assert_eq!(left_out(Some(1), Some(1)), None);
        assert_eq!(left_out(None, None), None);
        assert_eq!(left_out(None, Some(0)), None);
        let behind = left_out(Some(1), None).unwrap();
        assert!(behind.contains("has not published this tick"), "{behind}");
        let other = left_out(Some(1), Some(0)).unwrap();
        assert!(other.contains("step index 0, this replica 1"), "{other}");
    }

    /// A peer's clock is compared halfway through the request; the
    /// tolerance is the smaller of `skew` and an eighth of the interval.
    #[test]
    fn a_peer_clock_is_compared_halfway_through_the_request() {
        assert_eq!(clock_offset(1_000, 1_000, 1_000), 0);
        assert_eq!(clock_offset(6_050, 1_000, 1_100), 5_000);
        assert_eq!(clock_offset(50, 1_000, 1_100), -1_000);
        let (ro, _) = compiled("ivr", BASE);
        assert_eq!(clock_tolerance_ms(&ro), 2_000, "skew 2 s < 30 s / 8");
        let (ro, _) = compiled("ivr", &BASE.replace("interval: 30s", "interval: 8s"));
        assert_eq!(clock_tolerance_ms(&ro), 1_000, "8 s / 8 < skew 2 s");
    }

    /// Judged every 30 s from 09:00, one step a minute.
    const BASE: &str = "      from: blue\n      to: green\n      steps: [10, 50]\n      step_duration: 1m\n      start: \"2026-12-06T09:00:00Z\"\n      judge: { interval: 30s, peers: [\"127.0.0.1:9090\"] }\n";
    const START_MS: i64 = 1_796_547_600_000;

    /// The rollout of route `route` declared by `fields`, and the pools.
    fn compiled(route: &str, fields: &str) -> (Rollout, Vec<Pool>) {
        let text = format!(
            "version: 1\nroutes:\n  - name: {route}\n    rollout:\n{fields}pools:\n  - name: blue\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n  - name: green\n    backends: [{{ address: \"127.0.0.1:2\" }}]\n  - name: teal\n    backends: [{{ address: \"127.0.0.1:3\" }}]\n"
        );
        let cfg = agiproxy_config::from_yaml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        (*cfg.routes[0].rollout.clone().unwrap(), cfg.pools)
    }

    fn id(route: &str, fields: &str) -> String {
        let (ro, pools) = compiled(route, fields);
        identity(route, &ro, &pools)
    }

    fn live(route: &str, fields: &str, previous: Option<&Arc<RolloutLive>>) -> Arc<RolloutLive> {
        let (ro, pools) = compiled(route, fields);
        RolloutLive::new(route, &ro, &pools, previous)
    }

    /// A replica that froze `sessions` a colour of step 0 at tick `tick`.
    fn published(l: &RolloutLive, tick: i64, sessions: u64) {
        let c = Counts {
            sessions,
            ..Counts::default()
        };
        l.publish(Published {
            tick,
            step: 0,
            blue: c,
            green: c,
        });
    }

    fn rollback(at_ms: i64) -> Decision {
        Decision {
            at_ms,
            tick: 2,
            reason: "early closes: green 20.0%".into(),
            source: "judged here".into(),
        }
    }

    /// This replica's sum after reading `peer`, and what was taken.
    fn read(l: &RolloutLive, peer: &RolloutTick) -> (Taken, Counts) {
        let (mut blue, mut green) = (Counts::default(), Counts::default());
        let t = take(l, Some(0), peer, "127.0.0.1:9091", &mut blue, &mut green);
        assert_eq!(blue, green);
        (t, blue)
    }

    #[test]
    fn a_peer_on_the_same_rollout_gives_its_decision_and_counters() {
        let (here, peer) = (live("ivr", BASE, None), live("ivr", BASE, None));
        assert_ne!(here.id, peer.id);
        published(&peer, 3, 40);
        assert!(peer.decide(rollback(START_MS + 75_000)));
        let (t, sum) = read(&here, &tick_view(&peer, 3, "agi_uniqueid"));
        assert_eq!(
            t,
            Taken {
                other_rollout: false,
                adopted: true,
                counted: true
            }
        );
        assert_eq!(sum.sessions, 40);
        let d = here.decision().unwrap();
        assert_eq!(
            (d.at_ms, d.source.as_str()),
            (START_MS + 75_000, "adopted from 127.0.0.1:9091")
        );
        // Counters of another step than the one frozen here are not summed.
        let mut other_step = tick_view(&peer, 3, "agi_uniqueid");
        other_step.step = Some(1);
        assert!(!read(&here, &other_step).0.counted);
    }

    /// A peer's times are any i64 it sends (a peer found by DNS over plain
    /// HTTP need not be ours): they once overflowed the schedule's
    /// arithmetic (a panic in a debug build on every call of the route;
    /// "step 3 of 3" for a rollback before the start in a release build).
    #[test]
    fn a_peers_extreme_times_are_held_to_what_a_config_can_write() {
        let (plan, _) = compiled("ivr", BASE);
        for at in [i64::MIN, i64::MIN + 1, -1, i64::MAX] {
            let (here, peer) = (live("ivr", BASE, None), live("ivr", BASE, None));
            published(&peer, 3, 40);
            assert!(peer.decide(rollback(START_MS + 75_000)));
            let mut view = tick_view(&peer, 3, "agi_uniqueid");
            view.decision.as_mut().expect("the peer's decision").at_ms = at;
            assert!(read(&here, &view).0.adopted, "{at}");
            let judged = here.judged_ms().expect("a decision in force");
            assert!((0..=agiproxy_config::MAX_RFC3339_MS).contains(&judged));
            let p = position(&plan, START_MS + 300_000, Some(judged));
            if at < START_MS {
                assert_eq!((p.state, p.step), (State::RolledBack, None), "{at}");
            } else {
                assert_eq!(p.state, State::Progressing, "{at}: not in force yet");
            }
        }
        for theirs in [i64::MIN, i64::MAX] {
            let off = clock_offset(theirs, START_MS, START_MS + 100);
            assert!(off.checked_abs().is_some(), "{theirs}: {off}");
        }
    }

    /// What a peer answers is bounded before it is parsed (4 MiB but for
    /// its config text) and its strings after (1 KiB): 60 MB of status once
    /// took a starting replica to 1 GB, and a 5 MB decision reason was
    /// adopted, served on to every replica and logged at every tick (audit).
    #[tokio::test]
    async fn a_peers_answer_is_bounded_in_bytes_and_in_its_strings() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = vec![b'0'; PEER_ANSWER_BYTES + 1];
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        let access = PeerAccess::plain(None);
        match access.get(addr, "/v1/status").await {
            Err(ClientError::TooLarge { limit, .. }) => assert_eq!(limit, PEER_ANSWER_BYTES),
            other => panic!("{:?}", other.map(|r| r.status)),
        }
        let config = access.get(addr, "/v1/config").await.unwrap();
        assert_eq!(
            config.body.len(),
            PEER_ANSWER_BYTES + 1,
            "a config text may be large"
        );

        let peer = live("ivr", BASE, None);
        assert!(peer.decide(rollback(START_MS + 75_000)));
        let mut t = tick_view(&peer, 3, "agi_uniqueid");
        assert_eq!(overlong_field(&t), None);
        t.decision.as_mut().unwrap().reason = "x".repeat(PEER_FIELD_BYTES + 1);
        assert_eq!(overlong_field(&t), Some("decision.reason"));
        let mut t = tick_view(&peer, 3, &"k".repeat(PEER_FIELD_BYTES + 1));
        assert_eq!(overlong_field(&t), Some("split_key"));
        t.split_key = None;
        t.replica = "r".repeat(PEER_FIELD_BYTES + 1);
        assert_eq!(overlong_field(&t), Some("replica"));
    }

    /// The auditor's case: after a judged rollback the operator declares a
    /// new start; a replica already on it reads a peer still on the old one.
    #[test]
    fn a_decision_of_a_rollout_since_redeclared_is_not_adopted() {
        let old = live("ivr", BASE, None);
        published(&old, 3, 40);
        assert!(old.decide(rollback(START_MS + 75_000)));
        let again = BASE.replace("09:00:00Z", "11:00:00Z");
        let (new_plan, _) = compiled("ivr", &again);
        let new = live("ivr", &again, None);
        published(&new, 3, 5);

        let (t, sum) = read(&new, &tick_view(&old, 3, "agi_uniqueid"));
        assert_eq!(
            t,
            Taken {
                other_rollout: true,
                adopted: false,
                counted: false
            }
        );
        assert_eq!(sum.sessions, 0);
        assert_eq!(new.decision(), None);
        let p = position(&new_plan, new_plan.start_ms, new.judged_ms());
        assert_eq!((p.state, p.weight_bp), (State::Progressing, 1000));
        // Nor the other way round: the old one sums none of the new one's.
        assert!(
            read(&old, &tick_view(&new, 3, "agi_uniqueid"))
                .0
                .other_rollout
        );
    }

    #[test]
    fn a_peer_of_a_release_without_identity_is_another_rollout() {
        let here = live("ivr", BASE, None);
        let zero = "{\"sessions\":40,\"failures\":0,\"connect_errors\":0,\"early_closes\":0,\"deadlines\":0,\"first_command\":[0,0,0,0,0,0,0,0,0,0,0,0]}";
        let before = format!(
            "{{\"replica\":\"00aa\",\"tick\":3,\"step\":0,\"blue\":{zero},\"green\":{zero},\"decision\":{{\"at\":\"2026-12-06T09:01:15.000Z\",\"at_ms\":{},\"tick\":2,\"reason\":\"x\",\"source\":\"judged here\"}}}}",
            START_MS + 75_000
        );
        let peer: RolloutTick = serde_json::from_str(&before).unwrap();
        assert_eq!(peer.identity, None);
        let (t, sum) = read(&here, &peer);
        assert!(t.other_rollout && !t.adopted && !t.counted, "{t:?}");
        assert_eq!((sum.sessions, here.decision()), (0, None));
    }

    #[test]
    fn the_identity_is_what_defines_the_rollout() {
        let base = id("ivr", BASE);
        // Every replica computes the same, and every release: pinned, as a
        // change would stop adoption between releases during an upgrade.
        assert_eq!(base, id("ivr", BASE));
        assert_eq!(base, "80395223aa9f2b5f");
        for (what, route, fields) in [
            ("route", "menu", BASE.to_string()),
            ("from", "ivr", BASE.replace("from: blue", "from: teal")),
            ("to", "ivr", BASE.replace("to: green", "to: teal")),
            ("start", "ivr", BASE.replace("09:00:00Z", "09:00:01Z")),
            ("steps", "ivr", BASE.replace("[10, 50]", "[10, 60]")),
            ("step_duration", "ivr", BASE.replace("1m", "2m")),
            ("interval", "ivr", BASE.replace("30s", "20s")),
        ] {
            assert_ne!(base, id(route, &fields), "{what}");
        }
        // How it is run is not which rollout it is: the override the
        // operator writes into the file after a judged rollback, above all.
        for (what, extra) in [
            (
                "overrides",
                "      overrides: [{ action: rollback, at: \"2026-12-06T09:01:13Z\" }]\n",
            ),
            ("skew", "      skew: 5s\n"),
            ("canary", "      canary: { query: { canary: \"1\" } }\n"),
        ] {
            assert_eq!(base, id("ivr", &format!("{BASE}{extra}")), "{what}");
        }
        let thresholds = BASE.replace("30s,", "30s, min_sessions: 7, max_failures: 3,");
        assert_eq!(base, id("ivr", &thresholds));
    }

    #[test]
    fn a_new_start_starts_clean_and_a_written_override_keeps_the_rollback() {
        let old = live("ivr", BASE, None);
        assert!(old.decide(rollback(START_MS + 75_000)));
        let kept = format!(
            "{BASE}      overrides: [{{ action: rollback, at: \"2026-12-06T09:01:13Z\" }}]\n"
        );
        let same = live("ivr", &kept, Some(&old));
        assert!(Arc::ptr_eq(&same, &old));
        let again = live("ivr", &BASE.replace("09:00:00Z", "11:00:00Z"), Some(&old));
        assert_eq!((again.decision(), again.judged_ms()), (None, None));
        assert_ne!(again.identity, old.identity);
    }
}
