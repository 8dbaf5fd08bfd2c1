//! The judgement loop of one replica. Ticks fall at `start + k * interval`
//! on every replica's clock. At tick k each replica freezes its counters of
//! the step in force ("publishes" tick k); an eighth of an interval later it
//! reads tick k from every peer (control API, `GET
//! /v1/rollouts/{route}/counts?tick=k`), sums what it got and judges. The
//! same published counters give every replica the same sum and so the same
//! verdict; a bad one takes effect at `tick + interval / 2` on all of them.
//! Peers' decisions are adopted too (the earliest wins), so a replica that
//! missed a peer, or restarted, converges at its next tick.

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
pub fn tick_view(live: &RolloutLive, tick: i64) -> RolloutTick {
    let p = live.published(tick);
    RolloutTick {
        replica: live.id.clone(),
        tick,
        step: p.as_ref().map(|p| p.step),
        blue: p.as_ref().map(|p| to_api(&p.blue)).unwrap_or_default(),
        green: p.as_ref().map(|p| to_api(&p.green)).unwrap_or_default(),
        decision: live.decision().as_ref().map(decision_view),
    }
}

/// How judgement reads its peers' control APIs: with the bearer token
/// every replica shares, and over TLS when they serve it (as this
/// replica's own control API does: one config for the whole fleet).
pub struct PeerAccess {
    /// The control API's tokens: the one in use is presented.
    token: Option<Arc<Tokens>>,
    tls: Option<PeerTls>,
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
        PeerAccess { token, tls: None }
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
        // that read peers then, so there is nothing to read.
        let Some(ca) = &tls.peers.ca else {
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
    async fn get(&self, addr: SocketAddr, path: &str) -> Result<Response, ClientError> {
        let target = self.target(addr);
        let current = self.token.as_ref().map(|t| t.current());
        let r = self
            .client(current)
            .call(&target, "GET", path, &[], None)
            .await;
        let previous = self.token.as_ref().and_then(|t| t.previous());
        match (&r, previous) {
            (Ok(resp), Some(old)) if resp.status == 401 => {
                self.client(Some(old))
                    .call(&target, "GET", path, &[], None)
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
                    step(&cr.name, &ro.plan, &ro.live, &client);
                }
                pause
            };
            tokio::time::sleep(pause.max(Duration::from_millis(10))).await;
        }
    })
}

fn step(route: &Arc<str>, plan: &Rollout, live: &Arc<RolloutLive>, client: &Arc<PeerAccess>) {
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
            plan.clone(),
            live.clone(),
            client.clone(),
            k,
            t_k,
        ));
    }
}

async fn peers(plan: &Rollout) -> Vec<SocketAddr> {
    match &plan.judge.peers {
        Peers::None => Vec::new(),
        Peers::Static(list) => list.clone(),
        Peers::Dns { target, dns } => {
            let found = match crate::pool::discovery::resolver(dns) {
                Ok(r) => crate::pool::discovery::lookup(&r, target, dns).await,
                Err(e) => Err(e),
            };
            match found {
                Ok((found, _ttl)) => found.into_iter().map(|f| f.addr).collect(),
                Err(e) => {
                    tracing::warn!(peers = %target, error = %e, "rollout: cannot find the peer replicas; judging on this replica's counters alone");
                    Vec::new()
                }
            }
        }
    }
}

async fn evaluate(
    route: Arc<str>,
    plan: Rollout,
    live: Arc<RolloutLive>,
    client: Arc<PeerAccess>,
    k: i64,
    t_k: i64,
) {
    let iv = plan.judge.interval;
    let own = live.published(k);
    let addrs = peers(&plan).await;
    let path = format!("/v1/rollouts/{route}/counts?tick={k}");
    let asks = addrs.iter().map(|a| {
        let (client, path) = (&client, &path);
        async move {
            let r = tokio::time::timeout(iv / 4, client.get(*a, path)).await;
            (*a, r)
        }
    });
    let answers = futures_util::future::join_all(asks).await;

    let mut seen: HashSet<String> = HashSet::from([live.id.clone()]);
    let (mut blue, mut green, mut replicas) = match &own {
        Some(p) => (p.blue, p.green, 1),
        None => (Counts::default(), Counts::default(), 0),
    };
    let mut missing = Vec::new();
    for (addr, answer) in answers {
        let tick: RolloutTick = match answer {
            Ok(Ok(resp)) if resp.status == 200 => match serde_json::from_slice(&resp.body) {
                Ok(t) => t,
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
                missing.push(format!("{addr}: no answer within {:?}", iv / 4));
                continue;
            }
        };
        if !seen.insert(tick.replica.clone()) {
            continue;
        }
        if let Some(d) = &tick.decision {
            let adopted = live.decide(Decision {
                at_ms: d.at_ms,
                tick: d.tick,
                reason: d.reason.clone(),
                source: format!("adopted from {addr}"),
            });
            if adopted {
                tracing::warn!(route = %route, peer = %addr, at = %d.at, reason = %d.reason, "rollout rolled back: decision adopted from a peer");
            }
        }
        if let (Some(own), Some(step)) = (&own, tick.step) {
            if step == own.step {
                blue.add(&from_api(&tick.blue));
                green.add(&from_api(&tick.green));
                replicas += 1;
            }
        }
    }
    if !missing.is_empty() {
        tracing::warn!(route = %route, tick = k, missing = ?missing, "rollout: some peers' counters are missing from this judgement");
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
            let at_ms = t_k + iv.as_millis() as i64 / 2;
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
