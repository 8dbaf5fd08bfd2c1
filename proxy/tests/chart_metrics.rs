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

/// The body of a 200 answer to `GET path`.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let r = chaos_tests::http::get(addr, path).await?;
    (r.status == 200).then_some(r.body)
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
    // backend gauges), and one call (sessions_total has no series before).
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
        let agi: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut control: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        while control == agi {
            control = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        }
        let text = format!(
            "version: 1\nlisteners:\n  - name: asterisk\n    address: \"{agi}\"\ncontrol:\n  address: \"{control}\"\ndns: {{ nameservers: [\"{}\"], timeout: 2s }}\nroutes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    backends:\n      - {{ srv: \"_agi._tcp.ivr.test\" }}\n    health: {{ type: tcp, interval: 500ms, timeout: 400ms, rise: 1, fall: 1 }}\n",
            dns.addr()
        );
        // Declared before the child: dropped (removed) after it is killed.
        let dir = tempfile::Builder::new()
            .prefix("agiproxy-chart-metrics-")
            .tempdir()
            .unwrap();
        let path = dir
            .path()
            .join(format!("agiproxy-chart-metrics-{}.yaml", agi.port()));
        std::fs::write(&path, text).unwrap();
        let mut child = Running::spawn(
            Command::new(env!("CARGO_BIN_EXE_agiproxy"))
                .args(["run", "-c"])
                .arg(&path)
                .args(["--log-level", "warn"])
                .stdout(Stdio::null()),
        );
        // Wait for the backend to be found and checked.
        let deadline = Instant::now() + Duration::from_secs(30);
        let exited = loop {
            let m = get(control, "/metrics").await.unwrap_or_default();
            if m.contains("agiproxy_backend_checks{") && m.contains("agiproxy_dns_addresses{") {
                break None;
            }
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            assert!(
                Instant::now() < deadline,
                "no checked backend after 30 s:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match exited {
            None => {
                started = Some((child, agi, control, dir));
                break;
            }
            Some(status) => {
                drop(dir);
                eprintln!("attempt {attempt}: the proxy exited: {status:?} (its log is above)")
            }
        }
    }
    let (child, agi, control, dir) = started.expect("the proxy started in 3 attempts");

    let out = FakeAsterisk::new()
        .call_timeout(Duration::from_secs(20))
        .run(agi)
        .await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");

    // The session is counted once both sides have closed, which may be just
    // after the caller saw its end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = get(control, "/metrics").await.expect("GET /metrics");
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
    drop(dir);
    assert!(
        missing.is_empty(),
        "metrics the chart queries but /metrics does not have: {missing:?}\n{metrics}"
    );
}
