//! Blue-green rollouts on three replicas in one process, each with its own
//! control API, reading each other's counters: a bad green is rolled back
//! at its first step on all of them; a healthy green is promoted through
//! every step, blue's calls in flight finish and blue gets no new call.
//! Schedules are compressed to seconds.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agiproxy::control::ControlHandle;
use agiproxy::rollout::eval::PeerAccess;
use agiproxy::rollout::{now_ms, sticky};
use agiproxy::server::Origin;
use agiproxy::Server;
use agiproxy_control::api::RolloutView;
use agiproxy_control::client::{Client, Target};
use agiproxy_control::server::{PreparedControl, ServeOptions};
use agiproxy_control::tls::TlsFiles;
use agiproxy_control::ControlServer;
use chaos_tests::{AgiStatus, Behaviour, FakeBackend, FakeDns, SrvRecord};
use common::*;

const TOKEN: &str = "rollout-test-token";
/// The token a replica rotated to first.
const NEW_TOKEN: &str = "rollout-test-token-rotated";

struct Replica {
    /// Kept for the length of the test (the API and tasks hold it too).
    server: Server,
    api: Target,
    /// Reads `api` (over TLS with a client certificate when it serves TLS).
    client: Client,
    addr: SocketAddr,
}

fn free_port() -> u16 {
    chaos_tests::ports::free_port("127.0.0.1")
}

fn config(rollout: &str, blue: SocketAddr, green: SocketAddr) -> String {
    format!(
        "version: 1\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: ivr\n    match: {{ script: {{ prefix: ivr/ }} }}\n    rollout:\n{rollout}pools:\n  - name: blue\n    passive: {{ consecutive_failures: 100 }}\n    backends: [{{ address: \"{blue}\" }}]\n  - name: green\n    passive: {{ consecutive_failures: 100 }}\n    backends: [{{ address: \"{green}\" }}]\n"
    )
}

/// Three replicas of `text`, each with a control API on `ports`.
async fn replicas(text: &str, ports: &[u16]) -> Vec<Replica> {
    let mut out = Vec::new();
    for port in ports {
        out.push(replica(text, *port, None, false).await);
    }
    out
}

/// One replica of `text` with its control API on `port`, serving TLS as the
/// config's `control.tls` says when `tls` gives the name its certificate
/// carries; judgement reads the peers as `main` sets it up. `rotated`: its
/// token was rotated to [`NEW_TOKEN`] a moment ago (its peers still know
/// only [`TOKEN`]).
async fn replica(text: &str, port: u16, tls: Option<&str>, rotated: bool) -> Replica {
    let config = agiproxy_config::from_yaml_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    // The operator's client trusts the fleet CA and presents a replica's
    // certificate, as peers do.
    let operator = config.control.tls.as_ref().map(|t| {
        let (cert, key) = t.peers.client_cert.clone().unzip();
        let files = agiproxy_control::tls::ClientTls {
            ca: t.peers.ca.clone(),
            cert,
            key,
        };
        let mut c = client();
        c.tls = Some(agiproxy_control::tls::connector(&files).unwrap());
        c
    });
    let files = config.control.tls.as_ref().map(|t| TlsFiles {
        cert: t.cert.clone(),
        key: t.key.clone(),
        client_ca: t.client_ca.clone(),
    });
    let prepared = PreparedControl::bind(ServeOptions {
        address: Some(SocketAddr::from(([127, 0, 0, 1], port))),
        socket: None,
        token: Some(TOKEN.into()),
        tls: files,
        max_body_bytes: 1 << 20,
        request_timeout: Duration::from_secs(5),
    })
    .await
    .unwrap();
    // One set of tokens for the API and for reading peers, as in `main`.
    let tokens = prepared.tokens();
    if rotated {
        let t = tokens.as_ref().unwrap();
        assert!(t.rotate(NEW_TOKEN.into(), agiproxy_control::token::GRACE));
    }
    let peers = match tls {
        Some(_) => PeerAccess::from_config(&config.control, tokens).unwrap(),
        None => PeerAccess::plain(tokens),
    };
    let origin = Origin {
        text: text.into(),
        source: "test".into(),
        file: None,
    };
    let server = Server::start_with(config, origin).await.unwrap();
    agiproxy::rollout::eval::spawn(server.clone(), peers);
    let api = prepared.with_plane(ControlHandle::new(server.clone()));
    let local = api.local_addr().expect("a TCP listener");
    let (api_target, client) = match (tls, operator) {
        (Some(name), Some(c)) => (Target::https(local, name), c),
        _ => (Target::http(local), client()),
    };
    tokio::spawn(api.serve(std::future::pending()));
    let addr = server.local_addrs()[0];
    Replica {
        server,
        api: api_target,
        client,
        addr,
    }
}

fn client() -> Client {
    Client {
        token: Some(TOKEN.into()),
        tls: None,
        timeout: Duration::from_secs(5),
    }
}

async fn view(r: &Replica) -> RolloutView {
    let resp = r
        .client
        .call(&r.api, "GET", "/v1/rollouts/ivr", &[], None)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    serde_json::from_slice(&resp.body).unwrap()
}

/// `n` calls spread over the replicas, `conc` at a time, each with a fresh
/// Asterisk-style uniqueid of the current second.
async fn traffic(rs: &[Replica], first: usize, n: usize, conc: usize) -> Vec<AgiStatus> {
    let addrs: Arc<Vec<SocketAddr>> = Arc::new(rs.iter().map(|r| r.addr).collect());
    let mut out = Vec::new();
    for chunk in (first..first + n).collect::<Vec<_>>().chunks(conc) {
        let mut calls = tokio::task::JoinSet::new();
        for &i in chunk {
            let addrs = addrs.clone();
            calls.spawn(async move {
                let uid = format!("pbx-{}.{i}", now_ms() / 1000);
                caller("ivr/menu", &uid)
                    .run(addrs[i % addrs.len()])
                    .await
                    .status
            });
        }
        out.extend(calls.join_all().await);
    }
    out
}

/// Blue that always works, and green that closes the first of every five
/// sessions right after the header.
async fn green_closing_early_on_a_fifth() -> (FakeBackend, FakeBackend) {
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let good = Behaviour::script(&["NOOP"]);
    let green = FakeBackend::start(Behaviour::closing_early_one_in(5, good)).await;
    (blue, green)
}

/// A rollout started just now, judged every `interval_ms` on the counters
/// of the replicas whose control APIs are on `ports`.
fn judged_rollout(ports: &[u16], interval_ms: u64) -> String {
    let peers: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!(
        "      from: blue\n      to: green\n      steps: [25, 50, 100]\n      step_duration: 10m\n      start: \"{}\"\n      judge: {{ interval: {interval_ms}ms, min_sessions: 15, peers: [{}] }}\n",
        agiproxy_config::format_ms(now_ms() - 100),
        peers.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_closing_early_on_a_fifth_of_sessions_is_rolled_back_on_every_replica() {
    let (blue, green) = green_closing_early_on_a_fifth().await;
    let ports = [free_port(), free_port(), free_port()];
    let interval_ms = 2000;
    let rollout = judged_rollout(&ports, interval_ms);
    let rs = replicas(&config(&rollout, blue.addr(), green.addr()), &ports).await;

    let known_at = until_every_replica_decides(&rs).await;
    let views = futures_views(&rs).await;
    let at: Vec<i64> = views
        .iter()
        .map(|v| v.decision.as_ref().unwrap().at_ms)
        .collect();
    // One decision, in force at the same moment on every replica...
    assert!(at.iter().all(|a| *a == at[0]), "{at:?}");
    // ...known to all of them within one evaluation interval of each other.
    let first = known_at.iter().min().unwrap();
    let last = known_at.iter().max().unwrap();
    assert!(
        *last - *first <= Duration::from_millis(interval_ms),
        "{:?}",
        known_at
    );
    // Decided for a moment half an interval after the tick: in force then.
    while now_ms() < at[0] {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let views = futures_views(&rs).await;
    for v in &views {
        assert_eq!(v.state, "rolled_back", "{v:?}");
        assert_eq!(
            v.last_evaluation.as_ref().map(|e| e.replicas),
            Some(3),
            "{v:?}"
        );
        assert_eq!(v.step, Some(1), "rolled back at the first step: {v:?}");
        let d = v.decision.as_ref().unwrap();
        assert!(d.reason.starts_with("early closes: green"), "{d:?}");
        let printed = agiproxy_control::ctl::format_rollout(v);
        assert!(
            printed.contains("ROLLED BACK") && printed.contains("early closes: green"),
            "{printed}"
        );
    }
    let metrics = client()
        .call(&rs[2].api, "GET", "/metrics", &[], None)
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body);
    for line in [
        "agiproxy_rollout_state{route=\"ivr\",state=\"rolled_back\"} 1",
        "agiproxy_rollout_state{route=\"ivr\",state=\"progressing\"} 0",
        "agiproxy_rollout_step{route=\"ivr\"} 1",
        "agiproxy_rollout_weight_percent{route=\"ivr\"} 0",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    // From the decision on, new calls go to blue only.
    while now_ms() < at[0] + 1_000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let green_before = green.stats().accepted();
    let statuses = traffic(&rs, 100_000, 60, 6).await;
    assert!(
        statuses.iter().all(|s| *s == AgiStatus::Success),
        "{statuses:?}"
    );
    assert_eq!(
        green.stats().accepted(),
        green_before,
        "green got new calls"
    );
}

/// After a judged rollback the operator declares a new start, and the
/// config reaches the replicas one after the other. The one on the new
/// rollout must not adopt the decision of the old from the one still on it
/// (it would be rolled back from its start, and hand that on); once both
/// run the new rollout, they judge it together, clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_start_is_not_rolled_back_by_the_decision_of_the_rollout_before() {
    let (blue, green) = green_closing_early_on_a_fifth().await;
    let ports = [free_port(), free_port()];
    let interval = Duration::from_millis(1000);
    let text = |start_ms| {
        let rollout = judged_rollout(&ports, interval.as_millis() as u64).replacen(
            &agiproxy_config::format_ms(now_ms() - 100),
            &agiproxy_config::format_ms(start_ms),
            1,
        );
        config(&rollout, blue.addr(), green.addr())
    };
    let rs = replicas(&text(now_ms() - 100), &ports).await;
    until_every_replica_decides(&rs).await;
    let at_ms = view(&rs[1]).await.decision.unwrap().at_ms;
    while now_ms() <= at_ms {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = view(&rs[1]).await;
    assert_eq!(before.state, "rolled_back", "{before:?}");

    // The new start is now: the judgement loop reads the peer at once.
    let again = text(now_ms() - 100);
    rs[0]
        .server
        .apply(&again, "test", false, None)
        .await
        .unwrap();
    let mut judged = 0;
    let until = Instant::now() + 3 * interval;
    while Instant::now() < until {
        let v = view(&rs[0]).await;
        assert!(
            v.identity.is_some() && v.identity != before.identity,
            "{v:?}"
        );
        assert!(
            v.decision.is_none() && v.state == "progressing",
            "the new rollout took the old one's decision: {v:?}"
        );
        if let Some(e) = &v.last_evaluation {
            // The peer runs another rollout: its counters are left out.
            assert_eq!(e.replicas, 1, "{v:?}");
            judged = judged.max(e.tick + 1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(judged >= 2, "judged {judged} ticks of the new rollout");
    assert_eq!(view(&rs[1]).await.state, "rolled_back");

    // The config reaches the other replica: both run the new rollout.
    rs[1]
        .server
        .apply(&again, "test", false, None)
        .await
        .unwrap();
    let until = Instant::now() + 5 * interval;
    loop {
        let views = futures_views(&rs).await;
        for v in &views {
            assert!(
                v.decision.is_none() && v.state == "progressing",
                "{views:?}"
            );
            assert_eq!(v.identity, views[0].identity);
        }
        if views
            .iter()
            .all(|v| v.last_evaluation.as_ref().is_some_and(|e| e.replicas == 2))
        {
            break;
        }
        assert!(Instant::now() < until, "not judged together: {views:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A rollout on several replicas takes an override only with one time
    // for all of them (each replica's clock would give each its own config).
    let resp = rs[0]
        .client
        .call(&rs[0].api, "POST", "/v1/rollouts/ivr/pause", &[], None)
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, 400, "{body}");
    assert!(body.contains("\"at\"") && body.contains("ctl"), "{body}");
    assert!(
        body.contains("override refused; nothing was changed"),
        "{body}"
    );
    assert_eq!(view(&rs[0]).await.overrides, Vec::<String>::new());
    // A route without a rollout (a typo): the answer names those with one.
    let resp = rs[0]
        .client
        .call(&rs[0].api, "GET", "/v1/rollouts/ivrr", &[], None)
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, 404, "{body}");
    assert!(body.contains("routes with a rollout: ivr"), "{body}");
}

/// Calls until every replica has a decision (bounded: 1,500 calls, 40 s);
/// when each learnt of it.
async fn until_every_replica_decides(rs: &[Replica]) -> Vec<Instant> {
    let started = Instant::now();
    let mut sent = 0;
    let mut known_at: Vec<Option<Instant>> = vec![None; rs.len()];
    while known_at.iter().any(Option::is_none) {
        assert!(
            sent < 1500 && started.elapsed() < Duration::from_secs(40),
            "not rolled back on every replica after {sent} calls: {:?}",
            futures_views(rs).await
        );
        if sent < 1500 {
            traffic(rs, sent, 12, 6).await;
            sent += 12;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        for (i, r) in rs.iter().enumerate() {
            if known_at[i].is_none() && view(r).await.decision.is_some() {
                known_at[i] = Some(Instant::now());
            }
        }
    }
    known_at.into_iter().flatten().collect()
}

/// The same judgement with the control APIs on TLS asking for client
/// certificates (`control.tls` with `client_ca`), one config for all: the
/// replicas read each other over HTTPS, verify the name every replica's
/// certificate carries (`peers.server_name`; the certificate has no IP
/// address) and present their own certificate. Each judges on all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_whose_control_apis_serve_tls_read_each_other() {
    let dir = tempfile::TempDir::with_prefix("agiproxy-rollout-tls").unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let fleet = TestCa::new();
    let (cert, key) = fleet.issue(&["agiproxy-control"]);
    let (ca, cert, key) = (
        write("ca.pem", fleet.pem()),
        write("replica.pem", cert),
        write("replica.key", key),
    );
    let (blue, green) = green_closing_early_on_a_fifth().await;
    let ports = [free_port(), free_port(), free_port()];
    let rollout = judged_rollout(&ports, 2000);
    let base = config(&rollout, blue.addr(), green.addr());
    let mut rs = Vec::new();
    for port in ports {
        let text = format!(
            "{base}control:\n  address: \"127.0.0.1:{port}\"\n  tls:\n    cert: {cert}\n    key: {key}\n    client_ca: {ca}\n    peers: {{ server_name: agiproxy-control }}\n"
        );
        rs.push(replica(&text, port, Some("agiproxy-control"), false).await);
    }

    rolled_back_on_every_replicas_counters(&rs).await;
}

/// Mid-way through a token rotation: one replica has the new token (its
/// copy of the Secret changed first), the other two only the old. Each
/// still judges on all three: the rotated one is asked with the old token
/// (within its grace), and when a peer refuses its new token it asks again
/// with the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_mid_token_rotation_still_read_each_other() {
    let (blue, green) = green_closing_early_on_a_fifth().await;
    let ports = [free_port(), free_port(), free_port()];
    let text = config(&judged_rollout(&ports, 2000), blue.addr(), green.addr());
    let mut rs = Vec::new();
    for (i, port) in ports.into_iter().enumerate() {
        rs.push(replica(&text, port, None, i == 0).await);
    }
    rolled_back_on_every_replicas_counters(&rs).await;
}

/// Drives calls until every replica has decided, then checks that each
/// judged on the counters of all of them and rolled back for green's early
/// closes.
async fn rolled_back_on_every_replicas_counters(rs: &[Replica]) {
    until_every_replica_decides(rs).await;
    for v in futures_views(rs).await {
        assert_eq!(
            v.last_evaluation.as_ref().map(|e| e.replicas),
            Some(rs.len()),
            "judged on every replica's counters: {v:?}"
        );
        let d = v.decision.as_ref().unwrap();
        assert!(d.reason.starts_with("early closes: green"), "{d:?}");
        // One clock for all three: their offsets are what a request takes.
        let off = v.peer_clock_offset_ms.expect("a judgement read peers");
        assert!(off.abs() < 1000, "{off} ms");
    }
}

/// A peer whose clock is 5 s ahead (its answers say when it answered) is
/// measured, warned of (beyond `skew`, 2 s by default), and shown on
/// `GET /v1/rollouts/{route}` and in the metrics: clocks apart by more than
/// the rollout tolerates change calls' colours between replicas, and were
/// invisible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_clock_beyond_the_tolerance_is_measured_and_warned_of() {
    warnings();
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    // The peer: answers every request with its tick, stamped 5 s ahead.
    let fake_addr = chaos_tests::http::serve(|_head: String| async {
        let none = agiproxy_control::api::RolloutCounts::default();
        let tick = agiproxy_control::api::RolloutTick {
            replica: "fake-peer".into(),
            tick: 0,
            step: None,
            blue: none,
            green: none,
            decision: None,
            identity: None,
            split_key: None,
            now_ms: Some(now_ms() + 5000),
        };
        Some(serde_json::to_string(&tick).unwrap())
    })
    .await;
    let port = free_port();
    // And one that is down: counted in `rollout_peers_missing`.
    let dead = free_port();
    let rollout = judged_rollout(&[port], 1000).replace(
        &format!("peers: [\"127.0.0.1:{port}\"]"),
        &format!("peers: [\"127.0.0.1:{port}\", \"{fake_addr}\", \"127.0.0.1:{dead}\"]"),
    );
    assert!(rollout.contains(&fake_addr.to_string()), "{rollout}");
    let r = replica(
        &config(&rollout, blue.addr(), green.addr()),
        port,
        None,
        false,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let off = loop {
        if let Some(off) = view(&r).await.peer_clock_offset_ms {
            break off;
        }
        assert!(Instant::now() < deadline, "no judgement read the peer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!((4000..6000).contains(&off), "{off} ms");
    let log = warnings();
    assert!(
        log.contains(
            "some peers' clocks differ from this replica's by more than the rollout tolerates"
        ) && log.contains(&format!("{fake_addr}: +")),
        "{log}"
    );
    let metrics = r
        .client
        .call(&r.api, "GET", "/metrics", &[], None)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("agiproxy_rollout_peer_clock_offset_seconds{route=\"ivr\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((4.0..6.0).contains(&secs), "{line}");
    let line = text
        .lines()
        .find(|l| l.starts_with("agiproxy_rollout_peers_missing{route=\"ivr\"}"))
        .unwrap_or_else(|| panic!("{text}"));
    // The dead peer, and the fake one, which names no rollout identity.
    assert_eq!(line.rsplit(' ').next(), Some("2"), "{line}\n{log}");
}

/// `agiproxy_rollout_peers_missing{route}` when the peers' DNS name finds
/// nobody (every peer missing, though none can be named: 1), and 0 once a
/// reload turns the judge off (the last count would keep an alert firing
/// on old news).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_missing_counts_a_name_that_finds_none_and_is_0_with_the_judge_off() {
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let dns = FakeDns::start().await; // knows no name: NXDOMAIN
    let port = free_port();
    // One rollout (one `start`): the reload keeps its live state.
    let judged = judged_rollout(&[port], 300);
    let text = |enabled: bool| {
        let rollout = judged.replace(
            &format!("peers: [\"127.0.0.1:{port}\"]"),
            &format!("enabled: {enabled}, peers: \"dns:_control._tcp.nobody.test\""),
        );
        config(&rollout, blue.addr(), green.addr()).replacen(
            "version: 1\n",
            &format!(
                "version: 1\ndns: {{ nameservers: [\"{}\"], timeout: 200ms }}\n",
                dns.addr()
            ),
            1,
        )
    };
    let on = text(true);
    assert!(on.contains("enabled: true, peers: \"dns:"), "{on}");
    let r = replica(&on, port, None, false).await;
    let identity = view(&r).await.identity;
    let missing = || async {
        let m = r
            .client
            .call(&r.api, "GET", "/metrics", &[], None)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&m.body).into_owned();
        text.lines()
            .find(|l| l.starts_with("agiproxy_rollout_peers_missing{route=\"ivr\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while missing().await != Some(1.0) {
        assert!(Instant::now() < deadline, "{:?}", missing().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dns.queries() > 0);
    let applied = r
        .server
        .apply(&text(false), "test", false, None)
        .await
        .unwrap();
    assert!(applied.changed);
    assert_eq!(view(&r).await.identity, identity, "the same rollout");
    assert_eq!(missing().await, Some(0.0));
}

async fn futures_views(rs: &[Replica]) -> Vec<RolloutView> {
    let mut out = Vec::new();
    for r in rs {
        out.push(view(r).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_green_is_promoted_and_blue_finishes_its_calls_and_gets_no_new_one() {
    let blue = FakeBackend::start(Behaviour::script(&["NOOP", "EXEC Wait 1"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let ports = [free_port(), free_port(), free_port()];
    // Peers found as `ctl --cluster` finds them: SRV records of the
    // headless Service, here served by a loopback FakeDns.
    let dns = FakeDns::start().await;
    let records: Vec<SrvRecord> = ports
        .iter()
        .map(|p| SrvRecord::new(0, 1, *p, "replica.agiproxy.test"))
        .collect();
    dns.set_srv("_control._tcp.agiproxy.test", &records, 1);
    dns.set_addrs("replica.agiproxy.test", &["127.0.0.1".parse().unwrap()], 1);
    let start = now_ms() + 300;
    // Steps long enough, and a minimum low enough, that step 1 (10 %) is
    // judged on a loaded CI host too: at 1.5 s and 5 sessions a colour it
    // once saw 1 green session and never judged (CI, under parallel builds).
    let rollout = format!(
        "      from: blue\n      to: green\n      steps: [10, 50, 100]\n      step_duration: 2500ms\n      start: \"{}\"\n      judge: {{ interval: 500ms, min_sessions: 3, peers: \"dns:_control._tcp.agiproxy.test\" }}\n",
        agiproxy_config::format_ms(start),
    );
    let text = config(&rollout, blue.addr(), green.addr()).replacen(
        "version: 1\n",
        &format!(
            "version: 1\ndns: {{ nameservers: [\"{}\"], timeout: 500ms }}\n",
            dns.addr()
        ),
        1,
    );
    let rs = replicas(&text, &ports).await;
    while now_ms() < start + 200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A long call on blue made in step 1 (a key green only at 100 %).
    let uid = (0..)
        .map(|i| format!("pbx-{}.{i}", now_ms() / 1000))
        .find(|u| sticky::point(u.as_bytes()) >= 9000)
        .unwrap();
    let long_addr = rs[1].addr;
    let long = tokio::spawn(async move {
        caller("ivr/long", &uid)
            .exec_takes(Duration::from_millis(12_000))
            .run(long_addr)
            .await
    });
    // Traffic through every step until promoted (bounded: 2,000 calls, 30 s).
    let started = Instant::now();
    let mut sent = 0;
    // (judged step, verdict) of every replica's last judgement, on each pass.
    let mut judgements: Vec<(usize, String)> = Vec::new();
    loop {
        let views = futures_views(&rs).await;
        for v in &views {
            if let Some(e) = &v.last_evaluation {
                judgements.push((e.step, e.verdict.clone()));
            }
        }
        if views.iter().all(|v| v.state == "promoted") {
            for v in &views {
                assert!(v.decision.is_none(), "{v:?}");
                assert_eq!(v.step, Some(3));
            }
            break;
        }
        assert!(
            sent < 2000 && started.elapsed() < Duration::from_secs(30),
            "not promoted: {views:?}"
        );
        // No call fails while the colours change under it.
        let statuses = traffic(&rs, sent, 9, 3).await;
        assert!(
            statuses.iter().all(|s| *s == AgiStatus::Success),
            "calls {sent}..{} during the promotion: {statuses:?}",
            sent + 9
        );
        sent += 9;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every step before the last was judged and passed on the way (the last,
    // at 100 %, sends blue no new session, so it may only be waiting when
    // promotion is seen), and no judgement on any replica failed.
    assert!(
        judgements.iter().all(|(_, v)| !v.starts_with("fail")),
        "{judgements:?}"
    );
    for step in 1..3 {
        assert!(
            judgements.iter().any(|(s, v)| *s == step && v == "pass"),
            "step {step} never judged \"pass\": {judgements:?}"
        );
    }
    let judged = view(&rs[0]).await.last_evaluation.expect("judged");
    // Judged on the counters of all three replicas, found through DNS.
    assert_eq!(judged.replicas, 3, "{judged:?}");

    // Blue's call in flight is still there, shown per replica, then ends well.
    assert_eq!(view(&rs[1]).await.active_blue, 1);
    assert_eq!(view(&rs[0]).await.active_blue, 0);
    // Keys carry whole seconds: a call made in the second promotion began
    // counts at that second's start, under the step before.
    while now_ms() < start + 3 * 2500 + 1000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(view(&rs[1]).await.active_blue, 1);
    let blue_before = blue.stats().accepted();
    let statuses = traffic(&rs, 100_000, 45, 5).await;
    assert!(
        statuses.iter().all(|s| *s == AgiStatus::Success),
        "{statuses:?}"
    );
    assert_eq!(blue.stats().accepted(), blue_before, "blue got a new call");
    let out = long.await.unwrap();
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert!(
        out.commands.iter().any(|c| c.starts_with("EXEC")),
        "{out:?}"
    );
    // The caller has its result when the backend closes; the proxy's
    // session ends a moment later, after Asterisk's HANGUP.
    let deadline = Instant::now() + Duration::from_secs(5);
    while view(&rs[1]).await.active_blue != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(view(&rs[1]).await.active_blue, 0);
}

#[tokio::test]
async fn canaries_reach_green_at_zero_percent_and_api_overrides_are_guarded_and_flagged() {
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    // Not started for an hour: 0 % on green.
    let start = agiproxy_config::format_ms(now_ms() + 3_600_000);
    let rollout = format!(
        "      from: blue\n      to: green\n      steps: [10, 100]\n      step_duration: 1h\n      start: \"{start}\"\n      skew: 1s\n      canary: {{ query: {{ canary: \"1\" }}, vars: {{ agi_accountcode: \"^qa$\" }} }}\n"
    );
    let text = config(&rollout, blue.addr(), green.addr());
    // Held to the end: the server compares its config with this file.
    let (r, _dir) = replica_of_a_file(&text).await;

    let uid = |i: u32| format!("{}.{i}", now_ms() / 1000);
    for i in 0..10 {
        let out = caller("ivr/menu", &uid(i)).run(r.addr).await;
        assert_eq!(out.status, AgiStatus::Success);
    }
    assert_eq!((blue.stats().accepted(), green.stats().accepted()), (10, 0));
    let out = caller("ivr/menu?canary=1", &uid(11)).run(r.addr).await;
    assert_eq!(out.status, AgiStatus::Success);
    let mut qa = chaos_tests::AgiHeader::realistic("ivr/menu", &[], &uid(12));
    qa.set("agi_accountcode", "qa");
    let out = chaos_tests::FakeAsterisk::new()
        .header(qa)
        .run(r.addr)
        .await;
    assert_eq!(out.status, AgiStatus::Success);
    assert_eq!((blue.stats().accepted(), green.stats().accepted()), (10, 2));
    let v = view(&r).await;
    assert_eq!(
        (v.state.as_str(), v.step, v.weight_percent),
        ("pending", None, 0.0)
    );

    // An override whose effect (its time plus the skew, 1 s here) is past
    // would change the colour of calls already placed: refused (audit).
    let old = br#"{"at": "2026-01-01T00:00:00Z"}"#.to_vec();
    let resp = client()
        .call(&r.api, "POST", "/v1/rollouts/ivr/promote", &[], Some(old))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, 400, "{answer}");
    assert!(answer.contains("reach back"), "{answer}");

    // Overrides change state: the token is required.
    // The next whole second: in force 1-2 s from now, whatever the
    // request's own delay.
    let next = std::time::SystemTime::now() + Duration::from_secs(1);
    let at = humantime::format_rfc3339_seconds(next).to_string();
    let body = format!("{{\"at\": \"{at}\"}}").into_bytes();
    let anonymous = Client {
        token: None,
        tls: None,
        timeout: Duration::from_secs(5),
    };
    let resp = anonymous
        .call(
            &r.api,
            "POST",
            "/v1/rollouts/ivr/promote",
            &[],
            Some(body.clone()),
        )
        .await
        .unwrap();
    // 401 or 403, whichever the guard answers a request without a token.
    assert!(matches!(resp.status, 401 | 403), "{}", resp.status);
    let resp = client()
        .call(&r.api, "POST", "/v1/rollouts/ivr/promote", &[], Some(body))
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    // In force one skew after its time.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let v = view(&r).await;
    assert_eq!(v.state, "promoted");
    // Whole seconds: ".000Z", as the override is written.
    let ms = |t: std::time::SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let whole = humantime::parse_rfc3339(&at).unwrap();
    assert_eq!(
        v.overrides,
        vec![format!(
            "promote in force from {} (at: {})",
            ms(whole + Duration::from_secs(1)),
            ms(whole)
        )]
    );
    let note = v.differs_from_file.expect("differs from the file");
    assert!(
        note.contains(&format!(
            "write overrides: [{{ action: promote, at: \"{}\" }}]",
            ms(whole)
        )),
        "{note}"
    );
    let status = client()
        .call(&r.api, "GET", "/v1/status", &[], None)
        .await
        .unwrap();
    let status: agiproxy_control::api::Status = serde_json::from_slice(&status.body).unwrap();
    assert!(status.differs_from_file);
    assert_eq!(status.rollouts_differ, vec![note]);
    // Promoted is final: a rollback (or another promote) changes nothing,
    // and is not written (each one grew the running config for good).
    for action in ["rollback", "promote"] {
        let resp = client()
            .call(
                &r.api,
                "POST",
                &format!("/v1/rollouts/ivr/{action}"),
                &[],
                None,
            )
            .await
            .unwrap();
        let a: agiproxy_control::api::Applied = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(
            (resp.status, a.changed, a.generation),
            (200, false, status.generation)
        );
        // And says why (`ctl` prints it after `unchanged`).
        let answer: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(
            answer["reason"],
            format!(
                "the rollout is final by then: promote in force from {}",
                ms(whole + Duration::from_secs(1))
            ),
            "{answer}"
        );
    }
    let resp = client()
        .call(&r.api, "POST", "/v1/rollouts/ivr/undo", &[], None)
        .await
        .unwrap();
    assert_eq!(resp.status, 404);
    let out = caller("ivr/menu", &uid(13)).run(r.addr).await;
    assert_eq!(out.status, AgiStatus::Success);
    assert_eq!(green.stats().accepted(), 3);
}

/// A skew change that would move an override across now is refused when a
/// whole config is applied (`PUT /v1/config`, a reload from the file), not
/// only in a unit test: the check was given the running snapshot's config,
/// whose routes live in its router, saw no running rollout and refused
/// nothing (walkthrough: a pause not due went into force at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skew_change_that_moves_an_override_across_now_is_refused_when_applied() {
    let now = now_ms();
    let written = agiproxy_config::format_ms((now - 30_000) / 1000 * 1000);
    let start = agiproxy_config::format_ms(now - 600_000);
    let body = |skew: &str, action: &str| {
        format!(
            "routes:\n  - name: ivr\n    rollout:\n      from: b\n      to: g\n      steps: [1, 5]\n      step_duration: 15m\n      start: \"{start}\"\n      skew: {skew}\n      overrides: [{{ action: {action}, at: \"{written}\" }}]\n      judge: {{ enabled: false }}\npools:\n  - name: b\n    backends: [{{ address: \"127.0.0.1:1\" }}]\n  - name: g\n    backends: [{{ address: \"127.0.0.1:2\" }}]\n"
        )
    };
    let text = |skew: &str, action: &str| {
        format!(
            "version: 1\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\n{}",
            body(skew, action)
        )
    };
    // A pause written 30 s ago under a 60 s skew: due in 30 s.
    let p = proxy(&body("60s", "pause")).await;
    for dry_run in [true, false] {
        let e = p
            .server
            .apply(&text("1s", "pause"), "test", dry_run, None)
            .await
            .expect_err("refused");
        assert!(
            e.to_string().contains("routes[0].rollout.skew")
                && e.to_string().contains("pause override"),
            "{e}"
        );
    }
    // The running config is as it was; a skew that keeps it ahead is taken.
    assert_eq!(p.server.snapshot().meta.generation, 1);
    p.server
        .apply(&text("50s", "pause"), "test", false, None)
        .await
        .unwrap();
}

/// One replica started from a config file holding `text` (the returned
/// directory holds the file: keep it to the end), with a control API on a
/// free port.
async fn replica_of_a_file(text: &str) -> (Replica, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("agiproxy-rollout-")
        .tempdir()
        .unwrap();
    let file = dir.path().join("agiproxy.yaml");
    std::fs::write(&file, text).unwrap();
    let server = Server::start_with(
        agiproxy_config::from_yaml_str(text).unwrap(),
        Origin {
            text: text.into(),
            source: format!("file:{}", file.display()),
            file: Some(file),
        },
    )
    .await
    .unwrap();
    let opts = ServeOptions {
        address: Some("127.0.0.1:0".parse().unwrap()),
        socket: None,
        token: Some(TOKEN.into()),
        tls: None,
        max_body_bytes: 1 << 20,
        request_timeout: Duration::from_secs(5),
    };
    let api = ControlServer::bind(ControlHandle::new(server.clone()), opts)
        .await
        .unwrap();
    let r = Replica {
        api: Target::http(api.local_addr().expect("a TCP listener")),
        client: client(),
        addr: server.local_addrs()[0],
        server,
    };
    tokio::spawn(api.serve(std::future::pending()));
    (r, dir)
}

/// The log lines of this test binary at WARN and above (every test's: look
/// for what only one test logs).
fn warnings() -> String {
    static LOG: std::sync::OnceLock<LogSink> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let sink = LogSink::default();
        sink.install_global(tracing_subscriber::filter::LevelFilter::WARN);
        sink
    })
    .text()
}

/// An override written through the API lives in the running config only.
/// A reload from a file that does not have it yet (SIGHUP, the watch,
/// `POST /v1/reload`: in Kubernetes every ConfigMap change) keeps it while
/// the rollout is the same, says so, and calls placed on blue by a rollback
/// stay there; a new rollout (a new `start`) drops it, as the doc says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_from_the_file_keeps_an_api_override_of_the_same_rollout() {
    warnings();
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let start = |ms| agiproxy_config::format_ms(ms);
    let rollout = |start: &str| {
        format!(
            "      from: blue\n      to: green\n      steps: [25, 50, 100]\n      step_duration: 10m\n      start: \"{start}\"\n      skew: 1s\n"
        )
    };
    let first = start(now_ms() - 100);
    let text = config(&rollout(&first), blue.addr(), green.addr());
    let (r, dir) = replica_of_a_file(&text).await;
    let file = dir.path().join("agiproxy.yaml");
    let identity = view(&r).await.identity;

    // `ctl rollout rollback ivr`: one time for every replica.
    let at = agiproxy_config::format_ms(now_ms());
    let resp = act(&r, "ivr", "rollback", &at).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    // In force one skew after `at`; keys carry whole seconds: a call of the
    // next second on is placed after the rollback.
    let effect = agiproxy_config::parse_time(&at).unwrap() + 1_000;
    while now_ms() / 1000 <= effect / 1000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(view(&r).await.state, "rolled_back");
    // Calls created after the rollback whose keys green would take at 25 %.
    let second = now_ms() / 1000;
    let uids: Vec<String> = (0..)
        .map(|i| format!("pbx-{second}.{i}"))
        .filter(|u| sticky::point(u.as_bytes()) < 2000)
        .take(5)
        .collect();
    let addr = r.addr;
    let calls = |uids: Vec<String>| async move {
        for uid in &uids {
            let out = caller("ivr/menu", uid).run(addr).await;
            assert_eq!(out.status, AgiStatus::Success, "{uid}");
        }
    };
    calls(uids.clone()).await;
    assert_eq!((blue.stats().accepted(), green.stats().accepted()), (5, 0));

    // An unrelated change to the file, the same rollout, without the
    // override, reloaded from the file.
    let edited = text.replacen("consecutive_failures: 100", "consecutive_failures: 99", 1);
    assert_ne!(edited, text);
    std::fs::write(&file, &edited).unwrap();
    // A dry run shows what the reload applies.
    let dry = r
        .server
        .apply(&edited, &format!("file:{}", file.display()), true, None)
        .await
        .unwrap();
    let resp = r
        .client
        .call(&r.api, "POST", "/v1/reload", &[], None)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let applied: agiproxy_control::api::Applied = serde_json::from_slice(&resp.body).unwrap();
    assert!(applied.changed, "{applied:?}");
    assert_eq!(applied.hash, format!("{:016x}", dry.hash));
    // The next AGI of each call the rollback placed on blue stays there
    // (before: the override was dropped and they moved to green).
    calls(uids.clone()).await;
    assert_eq!(
        (blue.stats().accepted(), green.stats().accepted()),
        (10, 0),
        "calls placed on blue by the rollback moved"
    );
    let snap = r.server.snapshot();
    assert_eq!(
        snap.config.pools[0].eject_after, 99,
        "the file's change is applied"
    );
    let v = view(&r).await;
    assert_eq!(v.state, "rolled_back", "{v:?}");
    assert_eq!(v.identity, identity);
    assert_eq!(v.overrides.len(), 1, "{v:?}");
    assert_eq!(
        v.overrides[0],
        format!(
            "rollback in force from {} (at: {at})",
            agiproxy_config::format_ms(effect)
        ),
        "{v:?}"
    );
    // The running text has it, as the API writes it; the file does not.
    assert!(snap.meta.text.contains(&at), "{}", snap.meta.text);
    let note = v.differs_from_file.expect("differs from the file");
    assert!(
        note.contains(&format!("{{ action: rollback, at: \"{at}\" }}")),
        "{note}"
    );
    let log = warnings();
    let line = log
        .lines()
        .find(|l| l.contains("rollout override kept"))
        .unwrap_or_else(|| panic!("no WARN line: {log}"));
    for part in [
        "WARN",
        "route=ivr",
        "action=rollback",
        &format!("at={at}"),
        "into the file",
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }
    // The calls' later AGIs, and new calls, stay on blue.
    calls(uids.clone()).await;
    let later: Vec<String> = (0..)
        .map(|i| format!("pbx-{}.{i}", now_ms() / 1000))
        .filter(|u| sticky::point(u.as_bytes()) < 2000)
        .take(5)
        .collect();
    calls(later).await;
    assert_eq!((blue.stats().accepted(), green.stats().accepted()), (20, 0));
    // The checks an override through the API meets hold for one kept: a
    // new skew that would move it across now (undo the rollback until
    // later) is refused, and the running config stays.
    std::fs::write(&file, edited.replacen("skew: 1s", "skew: 10m", 1)).unwrap();
    let resp = r
        .client
        .call(&r.api, "POST", "/v1/reload", &[], None)
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, 400, "{body}");
    assert!(body.contains("moves the rollback override"), "{body}");
    assert_eq!(view(&r).await.state, "rolled_back");
    std::fs::write(&file, &edited).unwrap();
    // The same file again changes nothing, and still says so.
    let resp = r
        .client
        .call(&r.api, "POST", "/v1/reload", &[], None)
        .await
        .unwrap();
    let again: agiproxy_control::api::Applied = serde_json::from_slice(&resp.body).unwrap();
    assert!(!again.changed, "{again:?}");
    assert_eq!(again.hash, applied.hash);
    let kept = warnings().matches("rollout override kept").count();
    assert_eq!(kept, 2, "{}", warnings());

    // The same text sent whole through the API (`ctl config apply`) is
    // taken as it is: the rollback is dropped, and the answer and a WARN
    // name it (a dry run first: it would be, and nothing changes).
    let entry = format!("route ivr: {{ action: rollback, at: \"{at}\" }}");
    for dry in [true, false] {
        let path = if dry {
            "/v1/config?dry_run=true"
        } else {
            "/v1/config"
        };
        let resp = r
            .client
            .call(&r.api, "PUT", path, &[], Some(edited.clone().into_bytes()))
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let put: agiproxy_control::api::Applied = serde_json::from_slice(&resp.body).unwrap();
        assert!(put.changed, "{put:?}");
        assert_eq!(put.dropped_overrides, vec![entry.clone()], "{put:?}");
        let state = view(&r).await.state;
        assert_eq!(state == "rolled_back", dry, "{state}");
    }
    let log = warnings();
    let line = log
        .lines()
        .find(|l| l.contains("rollout override dropped"))
        .unwrap_or_else(|| panic!("no WARN line: {log}"));
    for part in ["WARN", "route=ivr", "action=rollback", &format!("at={at}")] {
        assert!(line.contains(part), "{part}: {line}");
    }
    assert_eq!(log.matches("rollout override dropped").count(), 1, "{log}");
    // Sent again, nothing is dropped: the running config has no override.
    let resp = r
        .client
        .call(
            &r.api,
            "PUT",
            "/v1/config",
            &[],
            Some(edited.clone().into_bytes()),
        )
        .await
        .unwrap();
    let put: agiproxy_control::api::Applied = serde_json::from_slice(&resp.body).unwrap();
    assert!(!put.changed && put.dropped_overrides.is_empty(), "{put:?}");

    // A new rollout (a new start) takes none of the old one's overrides.
    let renewed = edited.replacen(&first, &start(now_ms() - 100), 1);
    std::fs::write(&file, &renewed).unwrap();
    let resp = r
        .client
        .call(&r.api, "POST", "/v1/reload", &[], None)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let v = view(&r).await;
    assert_eq!(v.state, "progressing", "{v:?}");
    assert_ne!(v.identity, identity);
    assert!(v.overrides.is_empty(), "{v:?}");
    assert_eq!(v.differs_from_file, None, "{v:?}");
    assert_eq!(&*r.server.snapshot().meta.text, renewed.as_str());
    // Green takes its share of new calls again.
    let fresh: Vec<String> = (0..)
        .map(|i| format!("pbx-{}.{i}", now_ms() / 1000 + 1))
        .filter(|u| sticky::point(u.as_bytes()) < 2000)
        .take(3)
        .collect();
    while now_ms() / 1000
        < fresh[0]
            .split(['-', '.'])
            .nth(1)
            .unwrap()
            .parse::<i64>()
            .unwrap()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    calls(fresh).await;
    assert_eq!(green.stats().accepted(), 3);
}

/// A replica of the same rollout split by another key (a refused
/// `split_key` change comes back when a replica restarts with its file)
/// colours the same call differently; nothing said so (a verification run:
/// 54 of 300 calls mixed, `ctl` converged). Its peers' judgement now warns,
/// naming it and its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_splitting_by_another_key_is_warned_of() {
    warnings();
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let ports = [free_port(), free_port()];
    let text = config(&judged_rollout(&ports, 300), blue.addr(), green.addr());
    let _same = replica(&text, ports[0], None, false).await;
    let other = text.replace("    match: ", "    split_key: agi_arg_1\n    match: ");
    assert_ne!(other, text);
    let _other = replica(&other, ports[1], None, false).await;
    let wanted = format!("127.0.0.1:{}: agi_arg_1", ports[1]);
    let t0 = Instant::now();
    loop {
        let log = warnings();
        if log.lines().any(|l| {
            l.contains("some peers split calls by another split_key") && l.contains(&wanted)
        }) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no warning:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The file is the GitOps way to run a rollout: a reload from it may take
/// an override away (before, a scheduled `promote` deleted from it stayed
/// scheduled), and one whose time is past when the file is read is applied
/// and warned of, naming since when calls move (before, nothing was said),
/// so that every replica runs the file and a late rollback still happens.
/// A replica that took a later time of the same action than the fleet's
/// comes back in line when the file has the fleet's (review: a refusal
/// there kept it out of every later change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_may_take_an_override_away_and_reaching_back_is_said() {
    warnings();
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let start = agiproxy_config::format_ms(now_ms() - 60_000);
    let rollout = |overrides: &str| {
        format!(
            "      from: blue\n      to: green\n      steps: [25, 50, 100]\n      step_duration: 10m\n      start: \"{start}\"\n      skew: 1s\n      overrides: [{overrides}]\n"
        )
    };
    let promote = format!(
        "{{ action: promote, at: \"{}\" }}",
        agiproxy_config::format_ms(now_ms() + 3_600_000)
    );
    let text =
        config(&rollout(&promote), blue.addr(), green.addr()).replace("name: ivr", "name: gitops");
    let (r, dir) = replica_of_a_file(&text).await;
    let file = dir.path().join("agiproxy.yaml");
    let reload = |body: String| {
        let r = &r;
        let file = &file;
        async move {
            std::fs::write(file, body).unwrap();
            r.client
                .call(&r.api, "POST", "/v1/reload", &[], None)
                .await
                .unwrap()
        }
    };
    assert_eq!(view_of(&r, "gitops").await.overrides.len(), 1);
    // The same rollout (the same start), the promote deleted.
    let without = text.replace(&promote, "");
    let resp = reload(without.clone()).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let v = view_of(&r, "gitops").await;
    assert!(v.overrides.is_empty(), "the deleted promote stayed: {v:?}");
    assert!(v.differs_from_file.is_none(), "{v:?}");
    // An API promote at T1, then the file with the fleet's earlier T0
    // (both past): applied, the replica in line, a later edit applied too.
    let t1 = agiproxy_config::format_ms(now_ms());
    let resp = act(&r, "gitops", "promote", &t1).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let t0 = agiproxy_config::format_ms(now_ms() - 30_000);
    let fleet = without.replace(
        "overrides: []",
        &format!("overrides: [{{ action: promote, at: \"{t0}\" }}]"),
    );
    assert_ne!(fleet, without);
    let resp = reload(fleet.clone()).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let v = view_of(&r, "gitops").await;
    assert_eq!(v.state, "promoted", "{v:?}");
    assert_eq!(v.overrides.len(), 1, "{v:?}");
    assert!(v.overrides[0].contains(&t0), "{v:?}");
    assert!(v.differs_from_file.is_none(), "{v:?}");
    let log = warnings();
    let line = log
        .lines()
        .find(|l| l.contains("rollout overrides changed in the past") && l.contains("routes[0]"))
        .unwrap_or_else(|| panic!("no WARN: {log}"));
    let effect = agiproxy_config::format_ms(agiproxy_config::parse_time(&t0).unwrap() + 1_000);
    assert!(
        line.contains(&format!("calls made since {effect}")),
        "{line}"
    );
    let resp = reload(fleet.replace("consecutive_failures: 100", "consecutive_failures: 99")).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(r.server.snapshot().config.pools[0].eject_after, 99);
}

/// `POST /v1/rollouts/{route}/{action}` with `{"at": at}` on `r`.
async fn act(
    r: &Replica,
    route: &str,
    action: &str,
    at: &str,
) -> agiproxy_control::client::Response {
    let path = format!("/v1/rollouts/{route}/{action}");
    let body = format!("{{\"at\": \"{at}\"}}").into_bytes();
    r.client
        .call(&r.api, "POST", &path, &[], Some(body))
        .await
        .unwrap()
}

/// The rollout of `route` on `r`.
async fn view_of(r: &Replica, route: &str) -> RolloutView {
    let path = format!("/v1/rollouts/{route}");
    let resp = r
        .client
        .call(&r.api, "GET", &path, &[], None)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    serde_json::from_slice(&resp.body).unwrap()
}

/// `ctl rollout ACTION ROUTE --identity ID` (the request's `identity`): an
/// action meant for a rollout that a reload replaced is refused with 409
/// and changes nothing (reload audit: a `promote` landed on the new rollout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_for_a_replaced_rollout_is_refused() {
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let rollout = format!(
        "      from: blue\n      to: green\n      steps: [25, 100]\n      step_duration: 10m\n      start: \"{}\"\n      skew: 1s\n",
        agiproxy_config::format_ms(now_ms() - 60_000)
    );
    let text = config(&rollout, blue.addr(), green.addr());
    let (r, _dir) = replica_of_a_file(&text).await;
    let identity = view(&r).await.identity.expect("an identity");
    let at = agiproxy_config::format_ms(now_ms() + 60_000);
    let post = |id: &str| {
        let body = format!("{{\"at\": \"{at}\", \"identity\": \"{id}\"}}").into_bytes();
        let r = &r;
        async move {
            r.client
                .call(&r.api, "POST", "/v1/rollouts/ivr/pause", &[], Some(body))
                .await
                .unwrap()
        }
    };
    let resp = post("0000000000000000").await;
    let answer = String::from_utf8_lossy(&resp.body).to_string();
    assert_eq!(resp.status, 409, "{answer}");
    assert!(
        answer.contains(&format!("runs rollout {identity}")),
        "{answer}"
    );
    assert!(view(&r).await.overrides.is_empty());
    let resp = post(&identity).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(view(&r).await.overrides.len(), 1);
}

/// A reload that declares another rollout on a route (here new steps)
/// re-colours calls in progress: said in a WARN naming the route and the
/// time since when calls move (rollout audit: nothing was said).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_replaces_a_running_rollout_says_what_it_moves() {
    warnings();
    let blue = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let green = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let start = agiproxy_config::format_ms(now_ms() - 60_000);
    let rollout = |steps: &str| {
        format!(
            "      from: blue\n      to: green\n      steps: {steps}\n      step_duration: 10m\n      start: \"{start}\"\n      skew: 1s\n"
        )
    };
    let text = config(&rollout("[25, 100]"), blue.addr(), green.addr())
        .replace("name: ivr", "name: replaced-ivr");
    let (r, dir) = replica_of_a_file(&text).await;
    std::fs::write(
        dir.path().join("agiproxy.yaml"),
        text.replace("[25, 100]", "[50, 100]"),
    )
    .unwrap();
    let resp = r
        .client
        .call(&r.api, "POST", "/v1/reload", &[], None)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let log = warnings();
    let line = log
        .lines()
        .find(|l| l.contains("another rollout on route replaced-ivr"))
        .unwrap_or_else(|| panic!("no WARN: {log}"));
    assert!(
        line.contains(&format!("calls made since {start}")),
        "{line}"
    );
}
