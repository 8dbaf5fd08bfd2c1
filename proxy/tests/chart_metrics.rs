//! Every metric the Helm chart's alert rules and Grafana dashboard query
//! exists in the `/metrics` of a running proxy: a renamed metric would leave
//! an alert that can never fire and an empty panel.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chaos_tests::{AgiStatus, Behaviour, FakeAsterisk, FakeBackend, FakeDns, SrvRecord};

mod common;
use common::{free_port, Running};

/// Metric names in a text (rule expressions, dashboard queries, their prose).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let re = regex::Regex::new(r"\b(?:agiproxy|process)_[a-z0-9_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

/// The sample names of a Prometheus text exposition.
fn exposed(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The control API as the test reads it: TLS, the fleet's CA, a token.
struct Api {
    client: agiproxy_control::client::Client,
}

impl Api {
    /// The body of a 200 answer to `GET path` at `addr`.
    async fn get(&self, addr: SocketAddr, path: &str) -> Option<String> {
        let target = agiproxy_control::client::Target {
            addr: agiproxy_control::client::Address::Tcp(addr),
            https: true,
            host: SERVER_NAME.into(),
        };
        let r = self
            .client
            .call(&target, "GET", path, &[], None)
            .await
            .ok()?;
        (r.status == 200).then(|| String::from_utf8_lossy(&r.body).into_owned())
    }
}

/// The name on the control API's certificate.
const SERVER_NAME: &str = "agiproxy-control";
const TOKEN: &str = "chart-metrics-token";

/// A CA, and a certificate for [`SERVER_NAME`] it signed, in `dir`:
/// `(ca, cert, key)` paths.
fn certificates(dir: &std::path::Path) -> [std::path::PathBuf; 3] {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let paths = ["ca.pem", "tls.crt", "tls.key"].map(|f| dir.join(f));
    for (p, text) in paths
        .iter()
        .zip([ca.pem(), cert.pem(), key.serialize_pem()])
    {
        std::fs::write(p, text).unwrap();
    }
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_chart_exists_in_a_running_proxy() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/agiproxy");
    let rules = std::fs::read_to_string(format!("{root}/templates/prometheusrule.yaml")).unwrap();
    let dashboard = std::fs::read_to_string(format!("{root}/files/dashboard.json")).unwrap();
    let wanted: Vec<(String, &str)> = metric_names(&rules)
        .into_iter()
        .map(|n| (n, "templates/prometheusrule.yaml"))
        .chain(
            metric_names(&dashboard)
                .into_iter()
                .map(|n| (n, "files/dashboard.json")),
        )
        .collect();
    assert!(wanted.len() > 10, "too few metric names found: {wanted:?}");

    // A pool found through SRV (the dns_* gauges) with health checks (the
    // backend gauges), and one call (sessions_total has no series before);
    // the control API on TLS with a token file (the credential metrics),
    // and a judged rollout reading its own replica as a peer (the rollout
    // gauges, the peer clock offset once a judgement has read it).
    let certs = tempfile::Builder::new()
        .prefix("agiproxy-chart-metrics-tls-")
        .tempdir()
        .unwrap();
    let [ca, cert, key] = certificates(certs.path());
    let token = certs.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let api = Api {
        client: agiproxy_control::client::Client {
            token: Some(TOKEN.into()),
            tls: Some(
                agiproxy_control::tls::connector(&agiproxy_control::tls::ClientTls {
                    ca: Some(ca.clone()),
                    cert: None,
                    key: None,
                })
                .unwrap(),
            ),
            timeout: Duration::from_secs(5),
        },
    };
    let start = agiproxy_config::format_ms(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            - 1000,
    );
    let backend = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let dns = FakeDns::start().await;
    dns.set_addrs("b.ivr.test", &[IpAddr::V4(Ipv4Addr::LOCALHOST)], 60);
    dns.set_srv(
        "_agi._tcp.ivr.test",
        &[SrvRecord::new(1, 1, backend.addr().port(), "b.ivr.test")],
        60,
    );
    // Ports picked free may be taken by the time the proxy binds them (other
    // tests run beside this one): a proxy that exits at start is retried
    // on new ports.
    let mut started = None;
    for attempt in 1..=3 {
        // Two replicas, each the other's peer: a replica does not measure
        // its own clock.
        let mut ports = std::collections::BTreeSet::new();
        while ports.len() < 4 {
            ports.insert(free_port());
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
        let (agi, control, control2) = (addr(ports[0]), addr(ports[1]), addr(ports[3]));
        let text = |agi: SocketAddr, control: SocketAddr| {
            format!(
                "version: 1\nlisteners:\n  - name: asterisk\n    address: \"{agi}\"\ncontrol:\n  address: \"{control}\"\n  token_file: {}\n  tls: {{ cert: {}, key: {}, peers: {{ ca: {}, server_name: {SERVER_NAME} }} }}\ndns: {{ nameservers: [\"{}\"], timeout: 2s }}\nroutes:\n  - name: ivr\n    match: {{ script: {{ prefix: ivr/ }} }}\n    rollout: {{ from: p, to: q, steps: [10, 100], step_duration: 1h, start: \"{start}\", judge: {{ interval: 500ms, peers: [\"{}\", \"{}\"] }} }}\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ srv: \"_agi._tcp.ivr.test\" }}\n    health: {{ type: tcp, interval: 500ms, timeout: 400ms, rise: 1, fall: 1 }}\n  - name: q\n    backends:\n      - {{ srv: \"_agi._tcp.ivr.test\" }}\n",
                token.display(),
                cert.display(),
                key.display(),
                ca.display(),
                dns.addr(),
                addr(ports[1]),
                addr(ports[3]),
            )
        };
        // Declared before the children: dropped (removed) after they are killed.
        let dir = tempfile::Builder::new()
            .prefix("agiproxy-chart-metrics-")
            .tempdir()
            .unwrap();
        let mut children = Vec::new();
        for (i, (agi, control)) in [(agi, control), (addr(ports[2]), control2)]
            .into_iter()
            .enumerate()
        {
            let path = dir.path().join(format!("agiproxy-{i}.yaml"));
            std::fs::write(&path, text(agi, control)).unwrap();
            children.push(Running::spawn(
                Command::new(env!("CARGO_BIN_EXE_agiproxy"))
                    .args(["run", "-c"])
                    .arg(&path)
                    .args(["--log-level", "warn"])
                    .stdout(Stdio::null()),
            ));
        }
        // Wait for the backend to be found and checked, and the peer read.
        let deadline = Instant::now() + Duration::from_secs(30);
        let exited = loop {
            let m = api.get(control, "/metrics").await.unwrap_or_default();
            if m.contains("agiproxy_backend_checks{")
                && m.contains("agiproxy_dns_addresses{")
                && m.contains("agiproxy_rollout_peer_clock_offset_seconds{")
            {
                break None;
            }
            if let Some(status) = children.iter_mut().find_map(|c| c.try_wait().unwrap()) {
                break Some(status);
            }
            assert!(
                Instant::now() < deadline,
                "no checked backend and read peer after 30 s:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match exited {
            None => {
                started = Some((children, agi, control, dir));
                break;
            }
            Some(status) => {
                drop(children);
                drop(dir);
                eprintln!("attempt {attempt}: a proxy exited: {status:?} (its log is above)")
            }
        }
    }
    let (child, agi, control, dir) = started.expect("the proxies started in 3 attempts");

    let out = FakeAsterisk::new()
        .call_timeout(Duration::from_secs(20))
        .run(agi)
        .await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");

    // The session is counted once both sides have closed, which may be just
    // after the caller saw its end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = api.get(control, "/metrics").await.expect("GET /metrics");
        if m.contains("agiproxy_sessions_total{") || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let names = exposed(&metrics);
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(n, _)| !names.contains(n))
        .map(|(n, file)| format!("{n} (in {file})"))
        .collect();
    drop(child);
    drop((dir, certs));
    assert!(
        missing.is_empty(),
        "metrics the chart queries but /metrics does not have: {missing:?}\n{metrics}"
    );
}
