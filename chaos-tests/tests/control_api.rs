//! The control API against a real proxy: auth, limits, config changes with
//! optimistic concurrency, backend drain, blue-green split, replica drain,
//! Prometheus metrics that match the traffic, and TLS with client
//! certificates made in the test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agiproxy::control::ControlHandle;
use agiproxy::server::Origin;
use agiproxy::Server;
use agiproxy_control::client::{Client, Response, Target};
use agiproxy_control::server::ServeOptions;
use agiproxy_control::tls::{connector, ClientTls, TlsFiles};
use agiproxy_control::ControlServer;
use chaos_tests::{AgiStatus, Behaviour, FakeBackend};
use common::*;
use serde_json::Value;

const TOKEN: &str = "s3cret-token-for-tests";

struct Api {
    server: Server,
    target: Target,
    addr: std::net::SocketAddr,
    _dir: std::path::PathBuf,
}

fn config_text(blue: &str, green: &str) -> String {
    format!(
        "version: 1\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: ivr\n    match: {{ script: {{ prefix: ivr/ }} }}\n    pool: blue\npools:\n  - name: blue\n    backends:\n      - {{ address: \"{blue}\" }}\n      - {{ address: \"{green}\" }}\n  - name: green\n    backends: [{{ address: \"{green}\" }}]\n"
    )
}

async fn start(text: &str, tls: Option<TlsFiles>, max_body: usize) -> Api {
    start_timed(text, tls, max_body, Duration::from_secs(5)).await
}

async fn start_timed(
    text: &str,
    tls: Option<TlsFiles>,
    max_body: usize,
    request_timeout: Duration,
) -> Api {
    let dir = std::env::temp_dir().join(format!(
        "agiproxy-api-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agiproxy.yaml");
    std::fs::write(&file, text).unwrap();
    let origin = Origin {
        text: text.into(),
        source: format!("file:{}", file.display()),
        file: Some(file),
    };
    let server = Server::start_with(agiproxy_config::from_yaml_str(text).unwrap(), origin)
        .await
        .unwrap();
    let https = tls.is_some();
    let opts = ServeOptions {
        address: "127.0.0.1:0".parse().unwrap(),
        token: Some(TOKEN.into()),
        tls,
        max_body_bytes: max_body,
        request_timeout,
    };
    let api = ControlServer::bind(ControlHandle::new(server.clone()), opts)
        .await
        .unwrap();
    let target = Target {
        addr: api.local_addr(),
        https,
        host: "localhost".into(),
    };
    tokio::spawn(api.serve(std::future::pending()));
    let addr = server.local_addrs()[0];
    Api {
        server,
        target,
        addr,
        _dir: dir,
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn client(token: Option<&str>) -> Client {
    Client {
        token: token.map(str::to_string),
        tls: None,
        timeout: Duration::from_secs(5),
    }
}

async fn call(
    c: &Client,
    t: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<&str>,
) -> (u16, Value) {
    let Response { status, body } = c
        .call(
            t,
            method,
            path,
            headers,
            body.map(|b| b.as_bytes().to_vec()),
        )
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into())),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_limits_and_config_changes() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let text = config_text(
        &b.addr().to_string(),
        &b.addr()
            .to_string()
            .replace(&b.addr().port().to_string(), "1"),
    );
    let api = start(&text, None, 4096).await;
    let t = &api.target;
    let good = client(Some(TOKEN));

    // Open endpoints: no token needed; a token (even a wrong one) is ignored.
    for c in [client(None), client(Some("wrong")), client(Some(TOKEN))] {
        assert_eq!(call(&c, t, "GET", "/healthz", &[], None).await.0, 200);
        assert_eq!(call(&c, t, "GET", "/readyz", &[], None).await.0, 200);
        assert_eq!(call(&c, t, "GET", "/metrics", &[], None).await.0, 200);
    }
    // Protected endpoints: no token and a wrong token get 401.
    let (s, body) = call(&client(None), t, "GET", "/v1/status", &[], None).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (401, Some("missing bearer token"))
    );
    let (s, body) = call(
        &client(Some("s3cret-token-for-testX")),
        t,
        "GET",
        "/v1/status",
        &[],
        None,
    )
    .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (401, Some("wrong bearer token"))
    );
    // The token's prefix, or the token with more after it: refused too
    // (digests are compared, not bytes up to the shorter length).
    let prefix = &TOKEN[..TOKEN.len() - 1];
    for near in [prefix.to_string(), format!("{TOKEN}x")] {
        let (s, _) = call(&client(Some(&near)), t, "GET", "/v1/status", &[], None).await;
        assert_eq!(s, 401, "{near}");
    }
    let (s, status) = call(&good, t, "GET", "/v1/status", &[], None).await;
    assert_eq!(s, 200);
    assert_eq!(status["generation"], 1);
    assert_eq!(status["differs_from_file"], false);
    assert_eq!(call(&good, t, "GET", "/v1/nope", &[], None).await.0, 404);

    // A body over the limit: 413, nothing changed, the setting named (in
    // the API's one error shape, like every refusal below).
    let big = format!("{text}#{}\n", "x".repeat(5000));
    let (s, body) = call(&good, t, "PUT", "/v1/config", &[], Some(&big)).await;
    assert_eq!(s, 413, "{body}");
    assert_eq!(
        body["error"].as_str(),
        Some("the request body is over control.max_body_bytes (4096 bytes)"),
        "{body}"
    );
    // A method the path does not have, a query that does not parse: JSON too.
    let (s, body) = call(&good, t, "DELETE", "/v1/status", &[], None).await;
    assert_eq!(s, 405, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("method not allowed"),
        "{body}"
    );
    let (s, body) = call(&good, t, "PUT", "/v1/config?dry_run=1", &[], Some(&text)).await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("dry_run"),
        "{body}"
    );

    // An invalid config: 400 with every error and its path; nothing changed.
    let bad = text
        .replace("pool: blue", "pool: bleu")
        .replace("version: 1", "version: 1\ntimeouts: { budget: soon }");
    let (s, body) = call(&good, t, "PUT", "/v1/config", &[], Some(&bad)).await;
    assert_eq!(s, 400, "{body}");
    let paths: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["timeouts.budget", "routes[0].pool"], "{body}");
    assert_eq!(api.server.snapshot().meta.generation, 1);

    // Dry run validates only.
    let next = text.replace("prefix: ivr/", "prefix: ivr");
    let (s, body) = call(&good, t, "PUT", "/v1/config?dry_run=true", &[], Some(&next)).await;
    assert_eq!(
        (s, body["dry_run"].as_bool(), body["generation"].as_u64()),
        (200, Some(true), Some(1))
    );
    // If-Match with a stale generation: 412 and the running one.
    let (s, body) = call(
        &good,
        t,
        "PUT",
        "/v1/config",
        &[("if-match", "7".into())],
        Some(&next),
    )
    .await;
    assert_eq!((s, body["generation"].as_u64()), (412, Some(1)));
    // With the right one: applied.
    let (s, body) = call(
        &good,
        t,
        "PUT",
        "/v1/config",
        &[("if-match", "1".into())],
        Some(&next),
    )
    .await;
    assert_eq!(
        (s, body["generation"].as_u64(), body["changed"].as_bool()),
        (200, Some(2), Some(true)),
        "{body}"
    );
    let (_, status) = call(&good, t, "GET", "/v1/status", &[], None).await;
    assert_eq!(
        status["differs_from_file"], true,
        "the API change is not in the file"
    );
    assert_eq!(status["source"], "api");
    // JSON works too (YAML is a superset).
    let (_, cfg) = call(&good, t, "GET", "/v1/config", &[], None).await;
    assert_eq!(cfg["generation"], 2);

    // Reload from the file brings the file's config back.
    let (s, body) = call(&good, t, "POST", "/v1/reload", &[], None).await;
    assert_eq!((s, body["generation"].as_u64()), (200, Some(3)), "{body}");
    let (_, status) = call(&good, t, "GET", "/v1/status", &[], None).await;
    assert_eq!(status["differs_from_file"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_drain_split_and_metrics() {
    let b1 = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b2 = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let text = config_text(&b1.addr().to_string(), &b2.addr().to_string());
    let api = start(&text, None, 1 << 20).await;
    let (t, good) = (&api.target, client(Some(TOKEN)));
    let mut rx = api.server.subscribe();

    // Drain b2 in pool blue: every new session goes to b1.
    let path = format!("/v1/pools/blue/backends/{}/drain", b2.addr());
    let (s, body) = call(&good, t, "POST", &path, &[], None).await;
    assert_eq!(
        (s, body["state"].as_str()),
        (200, Some("draining")),
        "{body}"
    );
    for i in 0..10 {
        let out = caller("ivr/main", &format!("1.{i}")).run(api.addr).await;
        assert_eq!(out.status, AgiStatus::Success);
        assert_eq!(next_record(&mut rx).await.backend, Some(b1.addr()));
    }
    let (_, pool) = call(&good, t, "GET", "/v1/pools/blue", &[], None).await;
    assert_eq!(pool["backends"][1]["draining"], true);
    assert_eq!(pool["backends"][0]["total_sessions"], 10);
    assert_eq!(
        call(
            &good,
            t,
            "POST",
            &path.replace("drain", "enable"),
            &[],
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(&good, t, "GET", "/v1/pools/nope", &[], None).await.0,
        404
    );
    assert_eq!(
        call(
            &good,
            t,
            "POST",
            "/v1/pools/blue/backends/10.9.9.9:1/drain",
            &[],
            None
        )
        .await
        .0,
        404
    );

    // Blue-green: send everything to green through the split endpoint.
    let split = r#"{"split": [{"pool": "blue", "weight": 0}, {"pool": "green", "weight": 100}]}"#;
    let (s, body) = call(&good, t, "PUT", "/v1/routes/ivr/split", &[], Some(split)).await;
    assert_eq!(s, 200, "{body}");
    for i in 0..10 {
        caller("ivr/main", &format!("2.{i}")).run(api.addr).await;
        let r = next_record(&mut rx).await;
        assert_eq!(
            (r.pool.as_deref(), r.backend),
            (Some("green"), Some(b2.addr()))
        );
    }
    let (s, _) = call(
        &good,
        t,
        "PUT",
        "/v1/routes/ivr/split",
        &[],
        Some("{\"split\": 3}"),
    )
    .await;
    assert_eq!(s, 400);
    let (s, body) = call(
        &good,
        t,
        "PUT",
        "/v1/routes/ivr/split",
        &[],
        Some(r#"{"split": [{"pool": "gren", "weight": 1}]}"#),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("unknown pool \"gren\""),
        "{body}"
    );

    // Three calls that match no route.
    for i in 0..3 {
        caller("billing", &format!("3.{i}")).run(api.addr).await;
        next_record(&mut rx).await;
    }

    // /metrics parses as Prometheus text and matches what was driven.
    let m = good.call(t, "GET", "/metrics", &[], None).await.unwrap();
    let text = String::from_utf8(m.body).unwrap();
    let samples = parse_prometheus(&text);
    let get = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    };
    let completed = [("outcome", "completed"), ("route", "ivr")];
    assert_eq!(get("agiproxy_sessions_total", &completed), 20.0, "{text}");
    assert_eq!(
        get(
            "agiproxy_sessions_total",
            &[("pool", "green"), ("outcome", "completed")]
        ),
        10.0
    );
    assert_eq!(
        get("agiproxy_failures_sent_total", &[("reason", "no_route")]),
        3.0
    );
    assert_eq!(
        get(
            "agiproxy_sessions_total",
            &[("outcome", "failed"), ("route", "-")]
        ),
        3.0
    );
    assert_eq!(get("agiproxy_config_generation", &[]), 2.0);
    assert_eq!(
        get("agiproxy_config_reloads_total", &[("result", "applied")]),
        1.0
    );
    assert_eq!(
        get("agiproxy_config_reloads_total", &[("result", "invalid")]),
        1.0
    );
    assert_eq!(get("agiproxy_session_seconds_count", &[]), 23.0);
    assert_eq!(
        get("agiproxy_backend_active_sessions", &[("pool", "blue")]),
        0.0
    );
    assert_eq!(
        get(
            "agiproxy_backend_state",
            &[("pool", "blue"), ("state", "healthy")]
        ),
        2.0
    );
    assert_eq!(get("agiproxy_build_info", &[]), 1.0);
    // The process's own, under the names every exporter uses: this test's
    // process holds at least the listeners and the sessions' sockets.
    assert!(get("process_open_fds", &[]) >= 3.0, "{text}");
    assert!(get("process_resident_memory_bytes", &[]) > 0.0, "{text}");
    assert!(get("process_start_time_seconds", &[]) > 0.0, "{text}");
    let (_, st) = call(&good, t, "GET", "/v1/status", &[], None).await;
    let hash = st["hash"].as_str().unwrap();
    // Regression: an empty live family (no health checks here) once cut the
    // exposition short; everything after it was missing.
    assert_eq!(
        get("agiproxy_config_info", &[("hash", hash)]),
        1.0,
        "one series, the running hash"
    );
    assert_eq!(
        samples
            .iter()
            .filter(|(n, _, _)| n == "agiproxy_config_info")
            .count(),
        1
    );
    assert!(
        get(
            "agiproxy_control_requests_total",
            &[("endpoint", "/v1/routes/{route}/split"), ("code", "400")]
        ) >= 2.0
    );
    assert_eq!(get("agiproxy_active_sessions", &[]), 0.0);

    // Draining the replica: not ready, new connects refused at once.
    let (s, _) = call(&good, t, "POST", "/v1/drain", &[], None).await;
    assert_eq!(s, 202);
    assert_eq!(call(&good, t, "GET", "/readyz", &[], None).await.0, 503);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(api.addr).await.is_err());
    let (_, status) = call(&good, t, "GET", "/v1/status", &[], None).await;
    assert_eq!(status["draining"], true);
}

/// Parses the Prometheus text format strictly enough to catch a malformed
/// exposition: every family has HELP and TYPE, every sample is
/// `name{label="value",...} number` of a declared family.
/// One sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn parse_prometheus(text: &str) -> Vec<Sample> {
    let sample = regex::Regex::new(r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$"#).unwrap();
    let label = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).unwrap();
    let mut typed = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            typed.insert(parts.next().unwrap().to_string());
            assert!(
                matches!(
                    parts.next(),
                    Some("counter" | "gauge" | "histogram" | "summary" | "untyped")
                ),
                "{line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let c = sample
            .captures(line)
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let name = c[1].to_string();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            typed.contains(&name) || typed.contains(family),
            "sample before its TYPE: {line}"
        );
        let labels = c.get(3).map_or(vec![], |l| {
            label
                .captures_iter(l.as_str())
                .map(|m| (m[1].to_string(), m[2].to_string()))
                .collect()
        });
        let value: f64 = c[4]
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.push((name, labels, value));
    }
    assert!(!out.is_empty());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("agiproxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    // A CA, a server certificate for localhost, a client certificate.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = CertificateParams::new(vec!["ops-client".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    // A certificate from another CA, which the API must refuse.
    let rogue_key = KeyPair::generate().unwrap();
    let rogue = CertificateParams::new(vec!["rogue".to_string()])
        .unwrap()
        .self_signed(&rogue_key)
        .unwrap();
    let ca_pem = write("ca.pem", ca.pem());
    let files = TlsFiles {
        cert: write("server.pem", server_cert.pem()),
        key: write("server.key", server_key.serialize_pem()),
        client_ca: Some(ca_pem.clone()),
    };
    let (client_pem, client_key_pem) = (
        write("client.pem", client_cert.pem()),
        write("client.key", client_key.serialize_pem()),
    );
    let (rogue_pem, rogue_key_pem) = (
        write("rogue.pem", rogue.pem()),
        write("rogue.key", rogue_key.serialize_pem()),
    );

    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let api = start(
        &config_text(
            &b.addr().to_string(),
            &b.addr()
                .to_string()
                .replace(&b.addr().port().to_string(), "1"),
        ),
        Some(files),
        1 << 20,
    )
    .await;
    let t = &api.target;

    let tls_client = |cert: Option<&std::path::Path>, key: Option<&std::path::Path>| Client {
        token: Some(TOKEN.into()),
        tls: Some(Arc::unwrap_or_clone(Arc::new(
            connector(&ClientTls {
                ca: Some(ca_pem.clone()),
                cert: cert.map(Into::into),
                key: key.map(Into::into),
            })
            .unwrap(),
        ))),
        timeout: Duration::from_secs(5),
    };
    // With a client certificate from the CA: served.
    let ok = tls_client(Some(&client_pem), Some(&client_key_pem));
    let (s, status) = call(&ok, t, "GET", "/v1/status", &[], None).await;
    assert_eq!((s, status["generation"].as_u64()), (200, Some(1)));
    // Without a client certificate, or with one from another CA: refused in the handshake.
    assert!(tls_client(None, None)
        .call(t, "GET", "/healthz", &[], None)
        .await
        .is_err());
    assert!(tls_client(Some(&rogue_pem), Some(&rogue_key_pem))
        .call(t, "GET", "/healthz", &[], None)
        .await
        .is_err());
    // Plain HTTP to the TLS port: no answer.
    let plain = Target {
        https: false,
        ..t.clone()
    };
    assert!(client(Some(TOKEN))
        .call(&plain, "GET", "/healthz", &[], None)
        .await
        .is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request whose body stops coming: 408 when `request_timeout` is over,
/// in the API's JSON error shape, naming the setting.
#[tokio::test]
async fn a_stalled_request_gets_408_in_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (b, g) = (
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
    );
    let text = config_text(&b.addr().to_string(), &g.addr().to_string());
    let api = start_timed(&text, None, 4096, Duration::from_millis(300)).await;
    let mut s = tokio::net::TcpStream::connect(api.target.addr)
        .await
        .unwrap();
    let head = format!(
        "PUT /v1/config HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\nversion: 1\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer within 5 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/json"), "{answer}");
    assert!(
        answer.contains(
            r#"{"error":"the request took longer than control.request_timeout (300ms)"}"#
        ),
        "{answer}"
    );
    assert_eq!(api.server.snapshot().meta.generation, 1, "nothing applied");
    // Counted like any other answer.
    let (_, metrics) = call(&client(None), &api.target, "GET", "/metrics", &[], None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains(r#"agiproxy_control_requests_total{code="408",endpoint="/v1/config"} 1"#),
        "{metrics}"
    );
}
