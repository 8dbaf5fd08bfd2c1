//! The control API against a real proxy: auth, limits, config changes with
//! optimistic concurrency, backend drain, blue-green split, replica drain,
//! Prometheus metrics that match the traffic, TLS with client certificates
//! made in the test, and (issue 17) no state change without a credential:
//! 403 with no token configured, the control socket for its owner only.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agiproxy::control::ControlHandle;
use agiproxy::server::Origin;
use agiproxy::Server;
use agiproxy_control::client::{Address, Client, Response, Target};
use agiproxy_control::server::{Endpoint, ServeOptions};
use agiproxy_control::tls::{connector, ClientTls, TlsFiles};
use agiproxy_control::ControlServer;
use chaos_tests::{AgiStatus, Behaviour, FakeBackend};
use common::*;
use serde_json::Value;

const TOKEN: &str = "s3cret-token-for-tests";

struct Api {
    server: Server,
    /// The control API over TCP (or the socket, when it has no address).
    target: Target,
    /// The proxy's FastAGI listener.
    addr: std::net::SocketAddr,
    endpoints: Vec<Endpoint>,
    /// Holds the config file; removed on drop.
    dir: tempfile::TempDir,
    /// Stops the control API (which removes its socket).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

impl Api {
    fn control_addr(&self) -> std::net::SocketAddr {
        match self.target.addr {
            Address::Tcp(a) => a,
            Address::Unix(_) => panic!("this API has no TCP address"),
        }
    }

    /// Stops the control API and waits until it has.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.served)
            .await
            .expect("the control API stops")
            .unwrap();
    }
}

fn config_text(blue: &str, green: &str) -> String {
    format!(
        "version: 1\nlisteners:\n  - name: asterisk\n    address: \"127.0.0.1:0\"\nroutes:\n  - name: ivr\n    match: {{ script: {{ prefix: ivr/ }} }}\n    pool: blue\n  - name: ro\n    match: {{ script: {{ prefix: rollout/ }} }}\n    rollout: {{ from: blue, to: green, steps: [10, 100], step_duration: 1h, start: \"2030-01-01T00:00:00Z\" }}\npools:\n  - name: blue\n    backends:\n      - {{ address: \"{blue}\" }}\n      - {{ address: \"{green}\" }}\n  - name: green\n    backends: [{{ address: \"{green}\" }}]\n"
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
    start_with(
        text,
        ServeOptions {
            address: Some("127.0.0.1:0".parse().unwrap()),
            socket: None,
            token: Some(TOKEN.into()),
            tls,
            max_body_bytes: max_body,
            request_timeout,
        },
    )
    .await
}

/// A fresh directory, removed with what it holds when dropped. Opened to
/// 0755 (a `TempDir` is 0700): the socket test connects as another user,
/// who must be kept out by the socket's own mode, not by its directory's.
fn temp_dir(what: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(&format!("agiproxy-{what}-"))
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

async fn start_with(text: &str, opts: ServeOptions) -> Api {
    let dir = temp_dir("api");
    let file = dir.path().join("agiproxy.yaml");
    std::fs::write(&file, text).unwrap();
    let origin = Origin {
        text: text.into(),
        source: format!("file:{}", file.display()),
        file: Some(file),
    };
    let server = Server::start_with(agiproxy_config::from_yaml_str(text).unwrap(), origin)
        .await
        .unwrap();
    let https = opts.tls.is_some();
    let socket = opts.socket.clone();
    let api = ControlServer::bind(ControlHandle::new(server.clone()), opts)
        .await
        .unwrap();
    let target = match (api.local_addr(), socket) {
        (Some(addr), _) => Target {
            addr: Address::Tcp(addr),
            https,
            host: "localhost".into(),
        },
        (None, Some(path)) => Target::socket(path),
        (None, None) => unreachable!("bind refuses options without address and socket"),
    };
    let endpoints = api.endpoints().to_vec();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(api.serve(async {
        let _ = stopped.await;
    }));
    let addr = server.local_addrs()[0];
    Api {
        server,
        target,
        addr,
        endpoints,
        dir,
        stop: Some(stop),
        served,
    }
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
        assert_eq!(call(&c, t, "GET", "/v1/status", &[], None).await.0, 200);
    }
    // Everything else: no token and a wrong token get 401.
    let (s, body) = call(&client(None), t, "GET", "/v1/config", &[], None).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (401, Some("missing bearer token"))
    );
    let (s, body) = call(
        &client(Some("s3cret-token-for-testX")),
        t,
        "POST",
        "/v1/drain",
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
        let (s, _) = call(&client(Some(&near)), t, "GET", "/v1/config", &[], None).await;
        assert_eq!(s, 401, "{near}");
    }
    assert!(!api.server.is_draining());
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
    // Not a generation number: 400 before anything is parsed or applied.
    let (s, body) = call(
        &good,
        t,
        "PUT",
        "/v1/config",
        &[("if-match", "W/\"1\"".into())],
        Some(&next),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not a generation number")),
        "{body}"
    );
    assert_eq!(api.server.snapshot().meta.generation, 1);
    // With the right one (quoted, as an ETag may be): applied.
    let (s, body) = call(
        &good,
        t,
        "PUT",
        "/v1/config",
        &[("if-match", "\"1\"".into())],
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
    // Every listener is closed: none is listed (they were, as if open).
    assert_eq!(status["listeners"], serde_json::json!([]), "{status}");
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
    let dir = temp_dir("tls");
    let write = |name: &str, pem: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    // A CA, a server certificate for localhost, a client certificate; and
    // one from another CA, which the API must refuse.
    let ca = TestCa::new();
    let (server_cert, server_key) = ca.issue(&["localhost"]);
    let (client_cert, client_key) = ca.issue(&["ops-client"]);
    let (rogue_cert, rogue_key) = TestCa::new().issue(&["rogue"]);
    let ca_pem = write("ca.pem", ca.pem());
    let files = TlsFiles {
        cert: write("server.pem", server_cert),
        key: write("server.key", server_key),
        client_ca: Some(ca_pem.clone()),
    };
    let (client_pem, client_key_pem) = (
        write("client.pem", client_cert),
        write("client.key", client_key),
    );
    let (rogue_pem, rogue_key_pem) = (
        write("rogue.pem", rogue_cert),
        write("rogue.key", rogue_key),
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
    // TCP probes (kubelet's `tcpSocket`, a balancer's check) that connect
    // and close: closed by their client, not refused.
    for _ in 0..5 {
        drop(
            tokio::net::TcpStream::connect(api.control_addr())
                .await
                .unwrap(),
        );
    }
    // Without a client certificate, or with one from another CA: refused in
    // the handshake, and the error says which and what to do ("connection
    // error" alone said nothing: walkthrough).
    let e = tls_client(None, None)
        .call(t, "GET", "/healthz", &[], None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("asks for a client certificate") && e.contains("--cert FILE --key FILE"),
        "{e}"
    );
    let e = tls_client(Some(&rogue_pem), Some(&rogue_key_pem))
        .call(t, "GET", "/healthz", &[], None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("refused the client certificate"), "{e}");
    // Plain HTTP to the TLS port: no answer.
    let plain = Target {
        https: false,
        ..t.clone()
    };
    assert!(client(Some(TOKEN))
        .call(&plain, "GET", "/healthz", &[], None)
        .await
        .is_err());
    // The three refused handshakes are counted, by reason, and the probes
    // are not (the server counts after it closed, so the count may trail
    // the client a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (text, refused) = loop {
        let m = ok.call(t, "GET", "/metrics", &[], None).await.unwrap();
        let text = String::from_utf8(m.body).unwrap();
        let refused = {
            let text = text.clone();
            move |reason: &str| {
                sample(
                    &text,
                    "agiproxy_control_connections_refused_total",
                    ("reason", reason),
                )
            }
        };
        if refused("tls_handshake") >= Some(3.0) || std::time::Instant::now() > deadline {
            break (text, refused);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused("tls_handshake"), Some(3.0), "{text}");
    assert_eq!(refused("tls_timeout"), Some(0.0), "{text}");
    assert_eq!(refused("connection_cap"), Some(0.0), "{text}");
}

/// A flood of failed handshakes (plain HTTP to the TLS port, a scanner) is
/// logged a few lines at a time, each counted (the wiring of the throttle,
/// whose own tests are in `throttle.rs`). A runtime on this thread, so
/// that this thread's subscriber sees the server's lines. The throttle is
/// the process's: another test's failures may take some of its lines.
#[tokio::test]
async fn failed_handshakes_are_logged_a_few_lines_at_a_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let log = LogSink::default();
    let _logged = log.install(tracing_subscriber::filter::LevelFilter::INFO);
    let dir = temp_dir("tls-flood");
    let ca = TestCa::new();
    let (cert, key) = ca.issue(&["localhost"]);
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let files = TlsFiles {
        cert: cert_file,
        key: key_file,
        client_ca: None,
    };
    let a = b.addr().to_string();
    let other = a.replace(&b.addr().port().to_string(), "1");
    let api = start(&config_text(&a, &other), Some(files), 1 << 20).await;
    const FLOOD: usize = 12;
    for _ in 0..FLOOD {
        let mut s = tokio::net::TcpStream::connect(api.control_addr())
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        // The server closes (with a TLS alert, or nothing): bounded.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    let lines = || {
        log.text()
            .matches("control API TLS handshake failed")
            .count()
    };
    // Every failure is counted; the lines are at most the throttle's 5.
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let client = Client {
        token: Some(TOKEN.into()),
        tls: Some(
            connector(&ClientTls {
                ca: Some(ca_file),
                cert: None,
                key: None,
            })
            .unwrap(),
        ),
        timeout: Duration::from_secs(5),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let counted = loop {
        let m = client
            .call(&api.target, "GET", "/metrics", &[], None)
            .await
            .unwrap();
        let text = String::from_utf8(m.body).unwrap();
        let n = sample(
            &text,
            "agiproxy_control_connections_refused_total",
            ("reason", "tls_handshake"),
        )
        .unwrap_or(0.0);
        if n >= FLOOD as f64 || std::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(counted >= FLOOD as f64, "{counted}");
    // At most the throttle's 5 (another test's failures in the window may
    // have taken some of them), and at least the ones nobody else can have
    // taken. The throttle (`HANDSHAKE_LINES`, 5 lines per 10 s) is the
    // process's, so other tests of this binary share it, but only one other
    // serves TLS: `tls_with_client_certificates`, whose refused handshakes
    // are exactly 3 (it asserts so; its TCP probes close first and are not
    // admitted). Whatever the order and overlap, at most those 3 can fall in
    // the window of this flood before its lines, which leaves this one at
    // least 2 (a window ending during the flood only gives it more). The
    // lines are written when each failure is counted, in the same task, on
    // this thread's runtime: all there once `counted` reached FLOOD. So a
    // flood that logged nothing (or only one line) fails here.
    const OTHER_TESTS_FAILED_HANDSHAKES: usize = 3;
    let n = lines();
    assert!(n <= 5, "{n} lines for {FLOOD} failed handshakes");
    assert!(
        n >= 5 - OTHER_TESTS_FAILED_HANDSHAKES,
        "{n} lines for {FLOOD} failed handshakes:\n{}",
        log.text()
    );
    api.stop().await;
}

/// A request whose body stops coming: 408 when `request_timeout` is over,
/// in the API's JSON error shape, naming the setting.
#[tokio::test]
async fn a_stalled_request_gets_408_in_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (api, _backends) = api_with_request_timeout(Duration::from_millis(300)).await;
    let mut s = tokio::net::TcpStream::connect(api.control_addr())
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

/// A change whose request ran out of `request_timeout` while it waited for
/// its turn (another change was parsing) is dropped unapplied, and counted
/// as `config_reloads_total{result="abandoned"}`: without it, the 408s of a
/// control API busy with large configs left no trace in the reload counts.
/// It also holds that an edit's parse is one of the parses (a PUT waits for
/// it): eight edits at once of a 3.5 MB config once peaked at 1.35 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_times_out_waiting_for_its_turn_is_counted_abandoned() {
    let (api, _backends) = api_with_request_timeout(Duration::from_millis(300)).await;
    let before = api.server.snapshot().meta.text.to_string();
    // An edit that holds the one parse for 1.5 s and changes nothing.
    let server = api.server.clone();
    let slow = tokio::spawn(async move {
        server
            .apply_edit("test: slow edit", None, |text: &str| {
                std::thread::sleep(Duration::from_millis(1500));
                Ok(text.to_string())
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let changed = before.replace("prefix: ivr/", "prefix: ivr");
    let (s, body) = call(
        &client(Some(TOKEN)),
        &api.target,
        "PUT",
        "/v1/config",
        &[],
        Some(&changed),
    )
    .await;
    assert_eq!(s, 408, "{body}");
    let applied = slow.await.unwrap().expect("the slow edit");
    assert!(!applied.changed);
    let reloads = |result: &str| {
        let text = api.server.metrics().render();
        sample(&text, "agiproxy_config_reloads_total", ("result", result))
    };
    assert_eq!(reloads("abandoned"), Some(1.0));
    assert_eq!(reloads("unchanged"), Some(1.0));
    assert_eq!(reloads("applied").unwrap_or(0.0), 0.0);
    // The dropped change never ran: the running text is the old one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.server.snapshot().meta.generation, 1);
    assert_eq!(*api.server.snapshot().meta.text, *before);
}

/// The requests that change state, as route templates: each must be
/// guarded (the tests below walk every guarded route, these included).
const STATE_CHANGES: &[(&str, &str)] = &[
    ("PUT", "/v1/config"),
    ("POST", "/v1/reload"),
    ("POST", "/v1/pools/{pool}/backends/{backend}/drain"),
    ("POST", "/v1/pools/{pool}/backends/{backend}/enable"),
    ("PUT", "/v1/routes/{route}/split"),
    ("POST", "/v1/drain"),
];

/// A request to `e` that would change something if it were served:
/// `backend` in the path, a valid new config or split as the body.
fn request_for(e: &Endpoint, backend: &str, new_config: &str) -> (String, Option<String>) {
    // Rollout endpoints act on the rollout route `ro` of `config_text`.
    let rollout = e.path.starts_with("/v1/rollouts");
    let mut path = e
        .path
        .replace("{pool}", "blue")
        .replace("{backend}", backend)
        .replace("{route}", if rollout { "ro" } else { "ivr" })
        .replace("{action}", "pause");
    if path.ends_with("/counts") {
        path.push_str("?tick=0");
    }
    let body = match e.path {
        "/v1/config" => Some(new_config.to_string()),
        "/v1/routes/{route}/split" => Some(
            r#"{"split": [{"pool": "blue", "weight": 0}, {"pool": "green", "weight": 100}]}"#
                .into(),
        ),
        _ => None,
    };
    (path, body)
}

/// Issue 17: with no token configured, every endpoint beyond the open,
/// read-only ones answers 403 with how to configure one, whatever the
/// address (loopback included) and whatever token is presented, and
/// nothing changes: same generation, backends as they were, the replica
/// not draining and still serving calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_17_without_a_token_no_state_changes_on_any_address() {
    let b1 = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b2 = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let text = config_text(&b1.addr().to_string(), &b2.addr().to_string());
    let changed = text.replace("prefix: ivr/", "prefix: ivr");
    // 127.0.0.2: loopback too, but not 127.0.0.1 (the address the old
    // code trusted).
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let api = start_with(
            &text,
            ServeOptions {
                address: Some(format!("{ip}:0").parse().unwrap()),
                socket: None,
                token: None,
                tls: None,
                max_body_bytes: 1 << 20,
                request_timeout: Duration::from_secs(5),
            },
        )
        .await;
        let t = &api.target;
        let handle = ControlHandle::new(api.server.clone());
        // The file differs from the running config: a served reload would
        // show as a new generation.
        std::fs::write(api.dir.path().join("agiproxy.yaml"), &changed).unwrap();
        // A backend drained by hand: a served `enable` would show.
        use agiproxy_control::ControlPlane;
        handle
            .set_backend_draining("green", &b2.addr().to_string(), true)
            .unwrap();

        let guarded: Vec<&Endpoint> = api.endpoints.iter().filter(|e| !e.open()).collect();
        for (m, p) in STATE_CHANGES {
            assert!(
                guarded.iter().any(|e| e.method == *m && e.path == *p),
                "{m} {p} is not guarded"
            );
        }
        for e in &guarded {
            for c in [client(None), client(Some(TOKEN))] {
                let (path, body) = request_for(e, &b2.addr().to_string(), &changed);
                let path = if e.path.ends_with("/enable") {
                    path.replace("/blue/", "/green/")
                } else {
                    path
                };
                let (s, answer) = call(&c, t, e.method.as_str(), &path, &[], body.as_deref()).await;
                assert_eq!(s, 403, "{ip}: {e}: {answer}");
                let msg = answer["error"].as_str().unwrap_or_default();
                assert!(
                    msg.contains("set control.token_file (or control.token_env)")
                        && msg.contains("ctl --socket PATH"),
                    "{ip}: {e}: {msg}"
                );
            }
        }
        // Nothing changed.
        assert_eq!(api.server.snapshot().meta.generation, 1, "{ip}");
        assert!(!api.server.is_draining(), "{ip}");
        let pools = handle.pools();
        let state = |pool: &str| {
            pools.iter().find(|p| p.name == pool).unwrap().backends[usize::from(pool == "blue")]
                .draining
        };
        assert!(!state("blue"), "{ip}: blue's second backend was drained");
        let green = pools.iter().find(|p| p.name == "green").unwrap();
        assert!(
            green.backends[0].draining,
            "{ip}: green's backend was enabled"
        );
        // Open endpoints still answer without a credential.
        for path in ["/healthz", "/readyz", "/metrics", "/v1/status"] {
            let (s, body) = call(&client(None), t, "GET", path, &[], None).await;
            assert_eq!(s, 200, "{ip}: {path}: {body}");
        }
        // And the replica serves calls, through the blue pool (no split).
        let mut rx = api.server.subscribe();
        let out = caller("ivr/main", &format!("17.{}", ip.len()))
            .run(api.addr)
            .await;
        assert_eq!(out.status, AgiStatus::Success, "{ip}");
        assert_eq!(next_record(&mut rx).await.pool.as_deref(), Some("blue"));
        api.stop().await;
    }
}

/// `(mode & 0o777, owner uid)` of `path`, which must be a socket.
fn socket_mode_and_owner(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(path).unwrap();
    assert!(m.file_type().is_socket(), "{}", path.display());
    (m.mode() & 0o777, m.uid())
}

/// What a request as another user got (see `post_drain_as`).
#[derive(Debug, PartialEq, Eq)]
enum AsOther {
    /// connect(2) failed with EACCES: the file's mode kept the user out.
    PermissionDenied,
    /// The API answered 403.
    Forbidden,
    /// Anything else, with the child's exit code.
    Other(i32),
}

/// `POST /v1/drain` on the Unix socket `path`, as uid/gid `id`, from a
/// forked child that calls only async-signal-safe functions (this process
/// has threads): everything it needs is prepared before the fork.
fn post_drain_as(id: u32, path: &std::path::Path) -> AsOther {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: a zeroed sockaddr_un is valid; the path fits (checked).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let request = b"POST /v1/drain HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let forbidden = b"HTTP/1.1 403";
    // SAFETY: fork; the child only calls async-signal-safe functions on
    // memory prepared above, and always ends in _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(id) != 0
                || libc::setuid(id) != 0
            {
                libc::_exit(90);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                libc::_exit(91);
            }
            if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                libc::_exit(if *libc::__errno_location() == libc::EACCES {
                    13
                } else {
                    92
                });
            }
            let mut sent = 0;
            while sent < request.len() {
                let n = libc::write(fd, request[sent..].as_ptr().cast(), request.len() - sent);
                if n <= 0 {
                    libc::_exit(93);
                }
                sent += n as usize;
            }
            let mut buf = [0u8; 64];
            let mut got = 0;
            while got < forbidden.len() {
                let n = libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got);
                if n <= 0 {
                    libc::_exit(94);
                }
                got += n as usize;
            }
            libc::_exit(if buf[..forbidden.len()] == forbidden[..] {
                43
            } else {
                95
            });
        }
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    assert!(libc::WIFEXITED(status), "child status {status}");
    match libc::WEXITSTATUS(status) {
        13 => AsOther::PermissionDenied,
        43 => AsOther::Forbidden,
        code => AsOther::Other(code),
    }
}

/// Issue 17: the control socket is created with mode 0600, owned by the
/// proxy's user, and takes state changes from that user without a token;
/// another user is kept out by the mode and, were the mode loosened, by
/// the peer credentials the kernel reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_17_the_control_socket_serves_its_owner_and_refuses_others() {
    let b1 = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b2 = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let text = config_text(&b1.addr().to_string(), &b2.addr().to_string());
    let dir = temp_dir("sock");
    let sock = dir.path().join("control.sock");
    let api = start_with(
        &text,
        ServeOptions {
            address: None,
            socket: Some(sock.clone()),
            token: None,
            tls: None,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(5),
        },
    )
    .await;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    assert_eq!(socket_mode_and_owner(&sock), (0o600, me));

    // The owner: every endpoint, no token.
    let t = &api.target;
    let owner = client(None);
    let changed = text.replace("prefix: ivr/", "prefix: ivr");
    let (s, body) = call(&owner, t, "PUT", "/v1/config", &[], Some(&changed)).await;
    assert_eq!((s, body["generation"].as_u64()), (200, Some(2)), "{body}");
    for e in api
        .endpoints
        .iter()
        .filter(|e| e.method != "PUT" && e.path != "/v1/drain")
    {
        let (path, body) = request_for(e, &b2.addr().to_string(), &changed);
        let (s, answer) = call(&owner, t, e.method.as_str(), &path, &[], body.as_deref()).await;
        assert_eq!(s, 200, "{e}: {answer}");
    }

    // Another user (nobody, 65534): needs root to become them.
    if me == 0 {
        let sock2 = sock.clone();
        let r = tokio::task::spawn_blocking(move || post_drain_as(65534, &sock2))
            .await
            .unwrap();
        assert_eq!(r, AsOther::PermissionDenied);
        // Loosened by hand: the kernel's peer credentials still keep them out.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let sock2 = sock.clone();
        let r = tokio::task::spawn_blocking(move || post_drain_as(65534, &sock2))
            .await
            .unwrap();
        assert_eq!(r, AsOther::Forbidden);
        assert!(!api.server.is_draining());
    } else {
        eprintln!("not root: the request as another user is skipped (mode and owner checked)");
    }

    // The owner drains the replica.
    let (s, _) = call(&owner, t, "POST", "/v1/drain", &[], None).await;
    assert_eq!(s, 202);
    assert!(api.server.is_draining());
    api.stop().await;
    assert!(!sock.exists(), "the socket is removed when the API stops");
}

/// Issue 17: binding the control socket replaces a stale socket file, and
/// nothing else: not a live socket (another replica), not a regular file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_17_the_control_socket_replaces_only_a_stale_socket() {
    let (b, g) = (
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
    );
    let text = config_text(&b.addr().to_string(), &g.addr().to_string());
    let dir = temp_dir("stale");
    let sock = dir.path().join("control.sock");
    let opts = ServeOptions {
        address: None,
        socket: Some(sock.clone()),
        token: None,
        tls: None,
        max_body_bytes: 1 << 20,
        request_timeout: Duration::from_secs(5),
    };
    let server = Server::start_with(
        agiproxy_config::from_yaml_str(&text).unwrap(),
        Origin {
            text: text.clone().into(),
            source: "test".into(),
            file: None,
        },
    )
    .await
    .unwrap();
    let bind = || ControlServer::bind(ControlHandle::new(server.clone()), opts.clone());

    // A regular file: refused, and left as it was.
    std::fs::write(&sock, "keep me").unwrap();
    let e = bind().await.err().expect("a regular file is not replaced");
    assert!(
        e.to_string()
            .contains("exists and is not a socket; refusing to replace it"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "keep me");
    std::fs::remove_file(&sock).unwrap();

    // A stale socket (its process gone): replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let live = bind().await.expect("a stale socket is replaced");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(live.serve(async {
        let _ = stopped.await;
    }));

    // A live one: refused, and still serving.
    let e = bind().await.err().expect("a live socket is not replaced");
    assert!(e.to_string().contains("another process is serving"), "{e}");
    let (s, _) = call(
        &client(None),
        &Target::socket(&sock),
        "GET",
        "/v1/status",
        &[],
        None,
    )
    .await;
    assert_eq!(s, 200);
    let _ = stop.send(());
    served.await.unwrap();
    assert!(!sock.exists());
}

/// `agiproxy_control_connections_refused_total{reason}` now.
/// The control API of a proxy with two NOOP backends (kept running with
/// it), with this `request_timeout` and a 4 KiB body limit.
async fn api_with_request_timeout(request_timeout: Duration) -> (Api, [FakeBackend; 2]) {
    let (b, g) = (
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
    );
    let text = config_text(&b.addr().to_string(), &g.addr().to_string());
    let api = start_timed(&text, None, 4096, request_timeout).await;
    (api, [b, g])
}

async fn refused_now(api: &Api, reason: &str) -> f64 {
    let text = metrics_text(api).await;
    sample(
        &text,
        "agiproxy_control_connections_refused_total",
        ("reason", reason),
    )
    .unwrap_or_else(|| panic!("no {reason} sample in {text}"))
}

/// The value of the sample of `name` with the label `k="v"` in an exposition.
fn sample(text: &str, name: &str, (key, value): (&str, &str)) -> Option<f64> {
    parse_prometheus(text)
        .into_iter()
        .find(|(n, l, _)| n == name && l.iter().any(|(k, v)| k == key && v == value))
        .map(|(_, _, v)| v)
}

/// `/metrics`, retried for a moment: the test may have every slot taken.
async fn metrics_text(api: &Api) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client(None)
            .call(&api.target, "GET", "/metrics", &[], None)
            .await
        {
            Ok(r) if r.status == 200 => return String::from_utf8(r.body).unwrap(),
            r => assert!(
                std::time::Instant::now() < deadline,
                "/metrics: {:?}",
                r.map(|r| r.status)
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP connection to `to` from `from` (a loopback address), with the
/// smallest receive buffer the kernel allows and an Ethernet-sized MSS
/// (loopback's 64 KiB one lets the server's send buffer grow to megabytes,
/// which a client that does not read makes it fill first).
/// The indexes of `streams` the server has closed: EOF (or a reset) within
/// `wait`, where a served connection waits for its request in silence.
async fn closed_by_the_server(streams: &mut [tokio::net::TcpStream], wait: Duration) -> Vec<usize> {
    use tokio::io::AsyncReadExt;
    let mut closed = Vec::new();
    for (i, s) in streams.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        if let Ok(r) = tokio::time::timeout(wait, s.read(&mut byte)).await {
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
            closed.push(i);
        }
    }
    closed
}

async fn connect_from(from: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_mss(1400).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let from: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&from.into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    sock.connect(to).await.unwrap()
}

/// Audit: clients that pipeline requests and never read the answers held
/// every slot of the control API for as long as they liked (hyper waited
/// on the write; `request_timeout` bounds only reading the headers and
/// making the answer), so `/healthz` was refused for minutes and every
/// replica failed its liveness probe. Now a connection whose client takes
/// no byte of its answer for `request_timeout` is closed (counted as
/// `write_timeout`), and the probe gets in within about that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_dropped_within_the_request_timeout() {
    let timeout = Duration::from_secs(1);
    let (api, _backends) = api_with_request_timeout(timeout).await;
    let control = api.control_addr();
    let pipelined = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    // 64 addresses, one connection each: with each one's share of the cap
    // they take every slot, and none holds enough for a newcomer to take
    // its slot (see `a_few_addresses_holding_every_connection_cannot_shut_out_a_probe`):
    // only the write deadline frees them.
    let started = std::time::Instant::now();
    let mut hogs = Vec::new();
    for i in 0..64 {
        hogs.push(connect_from(&format!("127.0.0.{}", 2 + i), control).await);
    }
    for s in &hogs {
        // Whatever the kernel takes at once: hundreds of requests, whose
        // answers are far more than the socket buffers hold.
        let mut sent = 0;
        while let Ok(n) = s.try_write(&pipelined.as_bytes()[sent..]) {
            sent += n;
            if n == 0 || sent == pipelined.len() {
                break;
            }
        }
        assert!(sent > 1000, "{sent}");
    }
    let filled = std::time::Instant::now();
    eprintln!("64 connections opened and fed in {:?}", filled - started);
    let mut probes = 0;
    let answered = loop {
        probes += 1;
        let probe = client(None)
            .call(&api.target, "GET", "/healthz", &[], None)
            .await;
        if probe.is_ok_and(|r| r.status == 200) {
            break filled.elapsed();
        }
        assert!(
            filled.elapsed() < Duration::from_secs(10),
            "/healthz still refused {:?} after 64 clients stopped reading ({probes} probes)",
            filled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("/healthz answered {answered:?} after the slots were taken ({probes} probes)");
    assert!(probes > 1, "the 64 clients did not take every slot");
    // Well before the connections' lifetime (10 × request_timeout) ends.
    assert!(answered < 5 * timeout, "{answered:?}");
    // Each one counted once, as it was closed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while refused_now(&api, "write_timeout").await < 64.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "write_timeout: {}",
            refused_now(&api, "write_timeout").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused_now(&api, "write_timeout").await, 64.0);
    drop(hogs);
    api.stop().await;
}

/// Audit: one client could take all 64 connections (idle ones for
/// `request_timeout`, and again when it reconnected), and the kubelet's
/// probes from another address were refused. Now one address holds at
/// most `MAX_CONNECTIONS_PER_PEER` (16); more are closed at once and
/// counted as `peer_cap`, and others still get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    use agiproxy_control::server::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER};
    use tokio::io::AsyncReadExt;
    // Idle connections are kept for request_timeout: long enough to probe.
    let (api, _backends) = api_with_request_timeout(Duration::from_secs(10)).await;
    let control = api.control_addr();
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(connect_from("127.0.0.2", control).await);
    }
    // Those past the share are closed at once.
    let closed = closed_by_the_server(&mut idle, Duration::from_millis(200)).await;
    assert_eq!(closed.len(), MAX_CONNECTIONS - MAX_CONNECTIONS_PER_PEER);
    assert_eq!(
        refused_now(&api, "peer_cap").await,
        (MAX_CONNECTIONS - MAX_CONNECTIONS_PER_PEER) as f64
    );
    // Another address (the kubelet's) gets in at once.
    let started = std::time::Instant::now();
    let (s, body) = call(&client(None), &api.target, "GET", "/healthz", &[], None).await;
    assert_eq!((s, body.as_str()), (200, Some("ok\n")));
    assert!(started.elapsed() < Duration::from_secs(1));
    // The address's own slots come back when its connections close.
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect_from("127.0.0.2", control).await;
        use tokio::io::AsyncWriteExt;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer)).await;
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "127.0.0.2 still refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused_now(&api, "connection_cap").await, 0.0);
    api.stop().await;
}

/// Four addresses at their share (16 each) held all 64 connections, idle
/// or trickling a request, and the kubelet's probe from a fifth was closed
/// unanswered (`connection_cap`): the pod would be restarted. Now a
/// newcomer holding two fewer than the greediest address takes that
/// address's oldest connection's slot (`evicted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_addresses_holding_every_connection_cannot_shut_out_a_probe() {
    use agiproxy_control::server::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER};
    use tokio::io::AsyncWriteExt;
    // Idle connections are kept for request_timeout: long enough to probe.
    let (api, _backends) = api_with_request_timeout(Duration::from_secs(10)).await;
    let control = api.control_addr();
    let hosts = MAX_CONNECTIONS / MAX_CONNECTIONS_PER_PEER;
    let mut hogs = Vec::new();
    for i in 0..MAX_CONNECTIONS {
        let from = format!("127.0.0.{}", 2 + i % hosts);
        let mut s = connect_from(&from, control).await;
        // Half of them trickle a request that never ends.
        if i % 2 == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
                .await
                .unwrap();
        }
        hogs.push(s);
    }
    // Every one of them is served (none closed).
    let early = closed_by_the_server(&mut hogs, Duration::from_millis(20)).await;
    assert!(early.is_empty(), "closed before the cap: {early:?}");
    let started = std::time::Instant::now();
    let (s, body) = call(&client(None), &api.target, "GET", "/healthz", &[], None).await;
    assert_eq!((s, body.as_str()), (200, Some("ok\n")));
    assert!(started.elapsed() < Duration::from_secs(1));
    // Exactly one hog paid for it: the oldest of an address holding 16.
    let closed = closed_by_the_server(&mut hogs, Duration::from_millis(20)).await;
    assert_eq!(closed.len(), 1, "closed: {closed:?}");
    assert!(closed[0] < hosts, "not the oldest: {closed:?}");
    // Counted (the /metrics request may have taken one more).
    assert!(refused_now(&api, "evicted").await >= 1.0);
    assert_eq!(refused_now(&api, "connection_cap").await, 0.0);
    drop(hogs);
    api.stop().await;
}

/// A connection is served for at most `LIFETIME_IN_REQUEST_TIMEOUTS`
/// request timeouts: a client that keeps one busy cannot hold its slot
/// for ever. It is closed after an answer, never in the middle of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_is_closed_after_its_lifetime_between_answers() {
    use agiproxy_control::server::LIFETIME_IN_REQUEST_TIMEOUTS;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = Duration::from_millis(200);
    let lifetime = timeout * LIFETIME_IN_REQUEST_TIMEOUTS;
    let (api, _backends) = api_with_request_timeout(timeout).await;
    let mut s = tokio::net::TcpStream::connect(api.control_addr())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (mut asked, mut answers, mut buf) = (0, 0, Vec::new());
    let ended = loop {
        assert!(
            started.elapsed() < lifetime + Duration::from_secs(5),
            "still open after {:?} ({answers} answers)",
            started.elapsed()
        );
        if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_ok()
        {
            asked += 1;
        }
        let mut chunk = [0u8; 1024];
        let n = match tokio::time::timeout(Duration::from_secs(2), s.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
            Err(_) => panic!("no answer within 2 s"),
        };
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        answers = text.matches("\r\n\r\nok\n").count();
        if n == 0 {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("closed after {ended:?}: {asked} requests sent, {answers} answered");
    assert!(ended >= lifetime, "{ended:?}");
    // Every answer begun was whole.
    let text = String::from_utf8_lossy(&buf);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), answers, "{text}");
    assert!(answers >= 10, "{answers}");
    api.stop().await;
}

/// Audit: `GET /v1/status` (open) and `/v1/rollouts` read and parsed the
/// config file on every call, on a runtime worker, outside the one-parse-
/// at-a-time gate and up to 64 MiB: 8 clients looping on status made
/// FastAGI answers 700 times slower, and a 27 MB file took 3.4 s and
/// 460 MB per call. Now they compare with the file as last read (at
/// start, by the watch or a reload), as `differs_from_file` did already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_rollouts_never_read_the_config_file() {
    let (b, g) = (
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
    );
    let text = config_text(&b.addr().to_string(), &g.addr().to_string());
    let api = start(&text, None, 1 << 20).await;
    let (t, good) = (&api.target, client(Some(TOKEN)));
    let file = api.dir.path().join("agiproxy.yaml");
    let notes = |status: &Value| {
        status["rollouts_differ"]
            .as_array()
            .map_or(0, std::vec::Vec::len)
    };
    let (_, status) = call(&good, t, "GET", "/v1/status", &[], None).await;
    assert_eq!(notes(&status), 0, "{status}");

    // The file changes behind the proxy's back (nothing watches it here):
    // no rollout on `ro` any more, and 20,000 more routes (1.4 MB).
    let rollout_line = text
        .lines()
        .find(|l| l.contains("rollout:"))
        .unwrap()
        .to_string();
    let mut changed = text.replace(&rollout_line, "    pool: blue");
    let extra: String = (0..20_000)
        .map(|i| {
            format!(
                "  - name: r{i}\n    match: {{ script: {{ prefix: x{i}/ }} }}\n    pool: blue\n"
            )
        })
        .collect();
    changed = changed.replace("routes:\n", &format!("routes:\n{extra}"));
    std::fs::write(&file, &changed).unwrap();
    for _ in 0..3 {
        for path in ["/v1/status", "/v1/rollouts"] {
            let started = std::time::Instant::now();
            let (s, body) = call(&good, t, "GET", path, &[], None).await;
            let took = started.elapsed();
            eprintln!("{path} with a changed 1.4 MB file: {took:?}");
            assert_eq!(s, 200, "{body}");
            let differs = if path == "/v1/status" {
                notes(&body)
            } else {
                body.as_array()
                    .unwrap()
                    .iter()
                    .filter(|v| !v["differs_from_file"].is_null())
                    .count()
            };
            assert!(took < Duration::from_millis(500), "{path} took {took:?}");
            assert_eq!(differs, 0, "{path} read the file: {body}");
        }
    }

    // A reload reads the file: what it read is then what status compares
    // with. The file's rollout now has an override; once applied, nothing
    // differs (compared with the start's file, the override would).
    let paused = text.replace(
        "start: \"2030-01-01T00:00:00Z\" }",
        "start: \"2030-01-01T00:00:00Z\", overrides: [{ action: pause, at: \"2030-01-01T00:30:00Z\" }] }",
    );
    assert_ne!(paused, text);
    std::fs::write(&file, &paused).unwrap();
    let (s, body) = call(&good, t, "POST", "/v1/reload", &[], None).await;
    assert_eq!((s, body["generation"].as_u64()), (200, Some(2)), "{body}");
    let (_, status) = call(&good, t, "GET", "/v1/status", &[], None).await;
    assert_eq!(notes(&status), 0, "{status}");
    // A change through the API: status says what the file lacks.
    let (s, body) = call(&good, t, "POST", "/v1/rollouts/ro/promote", &[], None).await;
    assert_eq!(s, 200, "{body}");
    let (_, status) = call(&good, t, "GET", "/v1/status", &[], None).await;
    assert_eq!(notes(&status), 1, "{status}");
    let note = status["rollouts_differ"][0].as_str().unwrap();
    assert!(
        note.contains("differs from the config file") && note.contains("action: pause"),
        "{note}"
    );
    api.stop().await;
}

/// One raw HTTP/1.1 request, no credential: the whole answer as text (the
/// client's `Response` has no headers, and `Allow` is one).
async fn raw_request(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A method an open path does not serve is 405 in JSON with `Allow`, with
/// or without a token configured and with no credential sent (it was 401 or
/// 403, as if it were a guarded route). Guarded routes stay guarded: a
/// method they serve, or one they do not, still needs the credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_on_an_open_path_is_405_without_a_credential() {
    let b1 = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let b2 = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let text = config_text(&b1.addr().to_string(), &b2.addr().to_string());
    for token in [Some(TOKEN), None] {
        let api = start_with(
            &text,
            ServeOptions {
                address: Some("127.0.0.1:0".parse().unwrap()),
                socket: None,
                token: token.map(Into::into),
                tls: None,
                max_body_bytes: 1 << 20,
                request_timeout: Duration::from_secs(5),
            },
        )
        .await;
        let addr = api.control_addr();
        for (method, path) in [
            ("POST", "/healthz"),
            ("POST", "/metrics"),
            ("DELETE", "/v1/status"),
            ("OPTIONS", "/readyz"),
            ("PUT", "/readyz"),
        ] {
            let answer = raw_request(addr, method, path).await;
            let lower = answer.to_ascii_lowercase();
            assert!(
                answer.starts_with("HTTP/1.1 405"),
                "{token:?}: {method} {path}: {answer}"
            );
            assert!(
                lower.contains("\r\nallow: get,head\r\n"),
                "{token:?}: {method} {path}: {answer}"
            );
            assert!(lower.contains("content-type: application/json"), "{answer}");
            assert!(
                answer.contains(r#"{"error":"method not allowed on this path"#),
                "{answer}"
            );
        }
        assert!(raw_request(addr, "HEAD", "/healthz")
            .await
            .starts_with("HTTP/1.1 200"));
        // Guarded paths: the credential first, whatever the method.
        let refused = if token.is_some() { 401 } else { 403 };
        let mut guarded: Vec<(String, String)> = api
            .endpoints
            .iter()
            .filter(|e| !e.open())
            .map(|e| (e.method.to_string(), request_for(e, "127.0.0.1:1", &text).0))
            .collect();
        guarded.push(("DELETE".into(), "/v1/config".into()));
        guarded.push(("OPTIONS".into(), "/v1/drain".into()));
        for (method, path) in &guarded {
            let (s, body) = call(&client(None), &api.target, method, path, &[], None).await;
            assert_eq!(s, refused, "{token:?}: {method} {path}: {body}");
        }
        assert!(!api.server.is_draining());
        assert_eq!(api.server.snapshot().meta.generation, 1);
        api.stop().await;
    }
}

/// docs/openapi.yaml describes exactly the endpoints the server routes,
/// and marks as open (`security: []`) exactly those served without a
/// credential: a route added, removed or opened without its description
/// fails here (audit: nothing compared them).
#[tokio::test]
async fn the_openapi_document_describes_every_endpoint_and_no_other() {
    let text = config_text("127.0.0.1:1", "127.0.0.1:2");
    let api = start(&text, None, 4096).await;
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(doc).unwrap()).unwrap();
    let mut described = Vec::new();
    for (path, ops) in doc["paths"].as_mapping().expect("paths") {
        let path = path.as_str().unwrap();
        for (method, op) in ops.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if method == "parameters" {
                continue;
            }
            let open = op["security"].as_sequence().is_some_and(Vec::is_empty);
            described.push((method.to_uppercase(), path.to_string(), open));
        }
    }
    let mut served: Vec<(String, String, bool)> = api
        .endpoints
        .iter()
        .map(|e| (e.method.to_string(), e.path.to_string(), e.open()))
        .collect();
    described.sort();
    served.sort();
    assert_eq!(described, served, "docs/openapi.yaml against the router");
    assert!(served.len() >= 17, "{served:?}");
    api.stop().await;
}
