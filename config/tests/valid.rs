//! Valid configs compile to the expected values: defaults, merges, normalisation, templates.

use std::time::Duration;

use agiproxy_config::{
    example_config, from_yaml_str, load_file, script_path, Balance, Config, Keepalive, Limits,
    Mode, Rewrite, RouteTarget, ScriptMatch, Template, TemplatePart, Timeouts, DEFAULT_PORT,
};

const FULL: &str = r#"
version: 1
listeners:
  - name: asterisk
    address: "0.0.0.0:4573"
  - name: local6
    address: "[::1]:4574"
timeouts:
  budget: 1s
  connect: 200ms
limits:
  max_header_lines: 64
routes:
  - name: ivr
    match:
      script: { prefix: "/ivr/" }
      query: { lang: de, page: 2 }
      args: { "1": "^[0-9]+$", 3: "x" }
      vars: { agi_context: "^from-" }
      source: ["10.0.0.0/8", "127.0.0.1", "::1"]
    pool: ivr
    rewrite: { strip_prefix: "/ivr/" }
    set:
      agi_x_route: "${route}"
      agi_x_from: "${remote_ip}:${remote_port} $$5"
    mode: lines
    timeouts: { connect: 100ms, next_command: 2m }
  - name: canary
    match:
      script: { regex: "^/menu/(main|alt)$" }
    split: [{ pool: ivr-blue, weight: 90 }, { pool: ivr-green, weight: 10 }]
    split_key: agi_callerid
    rewrite: { replace_prefix: { from: "/menu/", to: "/ivr/" } }
    mode: raw
    forward_hangup: false
  - name: hello
    match: { script: { exact: "/hello" } }
    pool: general
  - name: everything-else
    pool: general
pools:
  - name: ivr
    backends:
      - { address: "10.1.0.5:4573", weight: 2, max_sessions: 500 }
      - { address: "[fd00::5]:4573" }
  - name: ivr-blue
    balance: hash
    backends: [{ address: "10.2.0.1:4573" }]
    max_sessions: 1000
    passive: { backoff: 500ms, max_backoff: 1m }
  - name: ivr-green
    balance: hash
    hash_key: agi_callerid
    backends: [{ address: "10.3.0.1:4573" }]
  - name: general
    balance: round_robin
    backends: [{ address: "127.0.0.1:5001" }]
  - name: unused
    balance: weighted
    backends: [{ address: "127.0.0.1:5002" }]
"#;

fn compile(text: &str) -> Config {
    match from_yaml_str(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn full_config_compiles_to_the_expected_values() {
    let c = compile(FULL);
    assert_eq!(c.version, 1);

    let l: Vec<(&str, String)> = c
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.address.to_string()))
        .collect();
    assert_eq!(
        l,
        [
            ("asterisk", "0.0.0.0:4573".to_string()),
            ("local6", "[::1]:4574".to_string())
        ]
    );

    // Global: two keys given, the rest defaults.
    let global = Timeouts {
        budget: ms(1000),
        connect: ms(200),
        ..Timeouts::default()
    };
    assert_eq!(c.timeouts, global);
    assert_eq!(
        c.limits,
        Limits {
            max_header_lines: 64,
            ..Limits::default()
        }
    );

    let names: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["ivr", "canary", "hello", "everything-else"]);

    // Route 0: every matcher, prefix slash dropped, override merged over the global block.
    let ivr = &c.routes[0];
    let m = &ivr.matcher;
    assert!(matches!(&m.script, Some(ScriptMatch::Prefix(p)) if p == "ivr/"));
    assert_eq!(
        m.query,
        [
            ("lang".to_string(), "de".to_string()),
            ("page".to_string(), "2".to_string())
        ]
    );
    let args: Vec<(usize, &str)> = m.args.iter().map(|(n, r)| (*n, r.as_str())).collect();
    assert_eq!(args, [(1, "^[0-9]+$"), (3, "x")]);
    let vars: Vec<(&str, &str)> = m
        .vars
        .iter()
        .map(|(k, r)| (k.as_str(), r.as_str()))
        .collect();
    assert_eq!(vars, [("agi_context", "^from-")]);
    let source: Vec<String> = m.source.iter().map(|n| n.to_string()).collect();
    assert_eq!(source, ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
    assert!(matches!(ivr.target, RouteTarget::Pool(0)));
    assert!(matches!(&ivr.rewrite, Some(Rewrite::StripPrefix(p)) if p == "ivr/"));
    assert_eq!(ivr.set.len(), 2);
    assert_eq!(ivr.set[0].0, "agi_x_route");
    assert_eq!(ivr.set[0].1, Template(vec![TemplatePart::Route]));
    assert_eq!(ivr.set[1].0, "agi_x_from");
    assert_eq!(
        ivr.set[1].1,
        Template(vec![
            TemplatePart::RemoteIp,
            TemplatePart::Literal(":".into()),
            TemplatePart::RemotePort,
            TemplatePart::Literal(" $5".into()),
        ])
    );
    assert_eq!(ivr.mode, Mode::Lines);
    assert!(ivr.forward_hangup);
    assert_eq!(ivr.split_key, "agi_uniqueid");
    assert_eq!(
        ivr.timeouts,
        Timeouts {
            connect: ms(100),
            next_command: Duration::from_secs(120),
            ..global
        }
    );

    // Route 1: split, regex "^/" made optional, replace rewrite normalised, raw, no HANGUP.
    let canary = &c.routes[1];
    let Some(ScriptMatch::Regex(re)) = &canary.matcher.script else {
        panic!("expected a regex script match");
    };
    assert_eq!(re.as_str(), "^/?menu/(main|alt)$");
    assert!(re.is_match("menu/main") && re.is_match("/menu/alt") && !re.is_match("xmenu/main"));
    let RouteTarget::Split(sides) = &canary.target else {
        panic!("expected a split");
    };
    let sides: Vec<(usize, u32)> = sides.iter().map(|s| (s.pool, s.weight)).collect();
    assert_eq!(sides, [(1, 90), (2, 10)]);
    assert_eq!(canary.split_key, "agi_callerid");
    assert!(matches!(&canary.rewrite,
        Some(Rewrite::ReplacePrefix { from, to }) if from == "menu/" && to == "ivr/"));
    assert_eq!(canary.mode, Mode::Raw);
    assert!(!canary.forward_hangup);
    assert_eq!(canary.timeouts, global);

    assert!(matches!(&c.routes[2].matcher.script, Some(ScriptMatch::Exact(s)) if s == "hello"));
    assert!(c.routes[3].matcher.is_catch_all());
    assert!(matches!(c.routes[3].target, RouteTarget::Pool(3)));

    // Pools: defaults, balances, caps, backoff.
    let p = &c.pools;
    assert_eq!(p.len(), 5);
    assert_eq!(p[0].balance, Balance::LeastSessions);
    let b: Vec<(String, u32, Option<u32>)> = p[0]
        .backends
        .iter()
        .map(|b| (b.target.to_string(), b.weight, b.max_sessions))
        .collect();
    assert_eq!(
        b,
        [
            ("10.1.0.5:4573".to_string(), 2, Some(500)),
            ("[fd00::5]:4573".to_string(), 1, None)
        ]
    );
    assert_eq!(p[0].max_sessions, None);
    assert_eq!(
        (p[0].backoff.base, p[0].backoff.max),
        (ms(1000), ms(30_000))
    );
    assert_eq!(
        p[1].balance,
        Balance::Hash {
            key: "agi_uniqueid".into()
        }
    );
    assert_eq!(p[1].max_sessions, Some(1000));
    assert_eq!((p[1].backoff.base, p[1].backoff.max), (ms(500), ms(60_000)));
    assert_eq!(
        p[2].balance,
        Balance::Hash {
            key: "agi_callerid".into()
        }
    );
    assert_eq!(p[3].balance, Balance::RoundRobin);
    assert_eq!(p[4].balance, Balance::Weighted);
    assert_eq!(c.pool_index("general"), Some(3));
    assert_eq!(c.pool_index("nope"), None);
}

#[test]
fn a_bare_config_gets_every_default() {
    let c = compile("version: 1\n");
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].name, "asterisk");
    assert_eq!(c.listeners[0].address.to_string(), "0.0.0.0:4573");
    assert_eq!(c.listeners[0].address.port(), DEFAULT_PORT);
    assert_eq!(
        c.timeouts,
        Timeouts {
            header: ms(5000),
            budget: ms(1500),
            connect: ms(250),
            first_command: ms(3000),
            next_command: ms(60_000),
            drain: ms(300_000),
        }
    );
    assert_eq!(
        (
            c.limits.max_sessions,
            c.limits.max_header_bytes,
            c.limits.max_header_lines
        ),
        (20_000, 16_384, 512)
    );
    assert!(c.routes.is_empty() && c.pools.is_empty());
    assert_eq!(c.tcp_keepalive, Some(Keepalive::default()));
    assert_eq!(
        c.tcp_keepalive
            .map(|k| (k.idle, k.interval, k.probes, k.detection())),
        Some((ms(60_000), ms(10_000), 6, ms(120_000)))
    );
    // Empty sections are as good as absent ones.
    let c = compile("version: 1\nroutes:\npools:\ntimeouts:\n");
    assert!(c.routes.is_empty());
    assert_eq!(c.timeouts, Timeouts::default());
}

/// Issue 17: no `control:` block, no control API (no port opened unasked);
/// with a block, no token is needed anywhere, since without one the API
/// refuses every state change instead of serving it.
#[test]
fn control_is_off_without_a_block_and_needs_no_token_on_any_address() {
    let c = compile("version: 1\n");
    assert!(!c.control.enabled);
    assert_eq!((c.control.address, c.control.socket.as_ref()), (None, None));
    let c = compile("version: 1\ncontrol: { address: \"0.0.0.0:4574\" }\n");
    assert!(c.control.enabled && c.control.token.is_none());
    assert_eq!(c.control.address, Some("0.0.0.0:4574".parse().unwrap()));
    let c = compile("version: 1\ncontrol: { socket: /run/agiproxy/control.sock }\n");
    assert_eq!(
        (c.control.enabled, c.control.address, c.control.socket),
        (true, None, Some("/run/agiproxy/control.sock".into()))
    );
    let c = compile("version: 1\ncontrol: { enabled: false }\n");
    assert!(!c.control.enabled);
}

/// Rollout judgement reads peers as this replica serves: with `control.tls`,
/// over TLS; the fleet CA and this replica's own certificate are the
/// defaults, each overridable under `control.tls.peers`.
#[test]
fn peers_are_read_with_the_fleet_ca_and_this_replicas_certificate_by_default() {
    let base = "version: 1\ncontrol:\n  address: \"127.0.0.1:4574\"\n  tls: ";
    let c = compile(&format!(
        "{base}{{ cert: /c.pem, key: /k.pem, client_ca: /ca.pem }}\n"
    ));
    let p = &c.control.tls.as_ref().unwrap().peers;
    assert_eq!(p.ca, Some("/ca.pem".into()));
    assert_eq!(p.client_cert, Some(("/c.pem".into(), "/k.pem".into())));
    assert_eq!(p.server_name, None);
    // No client certificates asked for: none presented, and no CA known.
    let c = compile(&format!("{base}{{ cert: /c.pem, key: /k.pem }}\n"));
    let p = &c.control.tls.as_ref().unwrap().peers;
    assert_eq!((p.ca.as_ref(), p.client_cert.as_ref()), (None, None));
    let c = compile(&format!(
        "{base}{{ cert: /c.pem, key: /k.pem, client_ca: /ca.pem, peers: {{ ca: /peer-ca.pem, cert: /p.pem, key: /p.key, server_name: agiproxy-control.ivr.svc. }} }}\n"
    ));
    let p = &c.control.tls.as_ref().unwrap().peers;
    assert_eq!(p.ca, Some("/peer-ca.pem".into()));
    assert_eq!(p.client_cert, Some(("/p.pem".into(), "/p.key".into())));
    assert_eq!(p.server_name.as_deref(), Some("agiproxy-control.ivr.svc"));
    let c = compile(&format!(
        "{base}{{ cert: /c.pem, key: /k.pem, peers: {{ ca: /ca.pem, server_name: \"10.0.0.7\" }} }}\n"
    ));
    let p = &c.control.tls.as_ref().unwrap().peers;
    assert_eq!(p.server_name.as_deref(), Some("10.0.0.7"));
}

#[test]
fn edge_values_are_accepted() {
    let c = compile(
        r#"
version: 1
listeners:
  - { name: a, address: "127.0.0.1:0" }
  - { name: b, address: "127.0.0.1:0" }    # port 0 twice: the OS picks two ports
  - { name: c, address: "[::]:4573" }
  - { name: d, address: "0.0.0.0:4573" }   # another family than [::]
timeouts: { budget: 2500ms, connect: 2500ms }   # connect may equal budget; budget may pass 2s
limits: { max_header_bytes: 512, max_header_lines: 4096, max_sessions: 1 }
routes:
  - name: r
    match: { script: { prefix: "" }, args: { 127: "" } }
    split: [{ pool: p, weight: 0 }, { pool: q, weight: 10000 }]
    rewrite: { replace_prefix: { from: "", to: "v2/" } }
    set: { agi_x_empty: "" }
pools:
  - { name: p, backends: [{ address: "10.0.0.1:1", weight: 1000 }] }
  - { name: q, backends: [{ address: "10.0.0.1:1" }] }   # same address, other pool: fine
"#,
    );
    assert_eq!(c.listeners.len(), 4);
    assert_eq!(c.timeouts.connect, c.timeouts.budget);
    assert_eq!(c.routes[0].set[0].1, Template(vec![]));
    assert_eq!(c.pools[0].backends[0].weight, 1000);
}

#[test]
fn routes_describe_themselves_on_one_line() {
    let c = compile(FULL);
    let d: Vec<String> = c.routes.iter().map(|r| r.describe(&c.pools)).collect();
    assert_eq!(
        d[0],
        "ivr: script prefix \"ivr/\", query lang=de&page=2, args 1~^[0-9]+$ 3~x, \
         vars agi_context~^from-, source 10.0.0.0/8 127.0.0.1/32 ::1/128 \
         -> pool ivr (least_sessions, 2 backends) rewrite strip \"ivr/\" \
         set agi_x_route=${route} agi_x_from=${remote_ip}:${remote_port} $$5 mode lines"
    );
    assert_eq!(
        d[1],
        "canary: script regex ^/?menu/(main|alt)$ -> split ivr-blue:90 ivr-green:10 by agi_callerid \
         rewrite replace \"menu/\" with \"ivr/\" mode raw hangup withheld"
    );
    assert_eq!(
        d[3],
        "everything-else: any call -> pool general (round_robin, 1 backend) mode lines"
    );
    for line in &d {
        assert!(!line.contains('\n'));
    }
}

#[test]
fn script_matching_and_rewrites_follow_asterisk_spelling() {
    assert_eq!(script_path("ivr/main?lang=de"), "ivr/main");
    assert_eq!(script_path("/ivr/main"), "ivr/main");
    assert_eq!(script_path(""), "");

    let c = compile(FULL);
    let prefix = c.routes[0].matcher.script.as_ref().unwrap();
    assert!(prefix.matches(script_path("ivr/main?x=1")));
    assert!(!prefix.matches(script_path("menu/ivr/")));
    let exact = c.routes[2].matcher.script.as_ref().unwrap();
    assert!(exact.matches(script_path("/hello?x")) && !exact.matches("hello2"));

    let strip = c.routes[0].rewrite.as_ref().unwrap();
    assert_eq!(&*strip.apply(b"ivr/main?lang=de"), b"main?lang=de");
    assert_eq!(&*strip.apply(b"/ivr/main"), b"/main");
    assert_eq!(&*strip.apply(b"other/ivr/x"), b"other/ivr/x");
    assert_eq!(&*strip.apply(b"ivr/x?n=M\xfcller"), b"x?n=M\xfcller");
    let replace = c.routes[1].rewrite.as_ref().unwrap();
    assert_eq!(&*replace.apply(b"menu/main?a=menu/"), b"ivr/main?a=menu/");
}

#[test]
fn the_example_config_is_valid_and_commented() {
    let text = example_config();
    assert!(text.contains('#'));
    let c = compile(text);
    assert!(!c.routes.is_empty() && !c.pools.is_empty());
}

#[test]
fn load_file_reads_and_names_an_unreadable_file() {
    let dir = tempfile::Builder::new()
        .prefix("agiproxy-config-test-")
        .tempdir()
        .unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, example_config()).unwrap();
    assert!(load_file(&good).is_ok());

    let missing = dir.path().join("missing.yaml");
    let errs = load_file(&missing).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs.0[0].path, "");
    assert!(errs.0[0].message.contains("missing.yaml"), "{errs}");
    assert!(!errs.to_string().starts_with(':'));
    dir.close().unwrap();
}

#[test]
fn health_checks_dns_and_ejection_settings_compile_with_defaults_and_overrides() {
    use agiproxy_config::{BackendTarget, HealthKind};
    let c = compile(
        r#"
version: 1
dns: { nameservers: ["127.0.0.1:5353", "10.96.0.10"], search: [svc.cluster.local], min_ttl: 2s }
pools:
  - name: a
    backends:
      - { address: "ivr.test:4573", max_sessions: 10 }
      - { srv: "_agi._tcp.ivr.test." }
    health: { type: agi, script: "/healthz?x=1", expect: "^(NOOP|VERBOSE)", interval: 500ms, timeout: 200ms, rise: 1, fall: 2 }
    slow_start: 30s
    max_ejection_percent: 0
    passive: { consecutive_failures: 3 }
    dns: { max_ttl: 60s }
  - name: b
    backends: [{ address: "10.0.0.1:4573" }]
    health: { type: tcp }
"#,
    );
    let a = &c.pools[0];
    assert!(a.has_dns());
    assert!(
        matches!(&a.backends[0].target, BackendTarget::Host { name, port: 4573 } if name == "ivr.test")
    );
    assert_eq!(a.backends[0].max_sessions, Some(10));
    assert!(
        matches!(&a.backends[1].target, BackendTarget::Srv { name } if name == "_agi._tcp.ivr.test.")
    );
    let h = a.health.as_ref().unwrap();
    match &h.kind {
        HealthKind::Agi { script, expect } => {
            // A leading "/" is dropped: Asterisk never sends one.
            assert_eq!(script, "healthz?x=1");
            assert!(expect.as_ref().unwrap().is_match("VERBOSE \"ok\" 1"));
        }
        HealthKind::Tcp => panic!("agi expected"),
    }
    assert_eq!(
        (h.interval, h.timeout, h.jitter),
        (ms(500), ms(200), ms(50))
    );
    assert_eq!((h.rise, h.fall), (1, 2));
    assert_eq!(a.slow_start, Some(Duration::from_secs(30)));
    assert_eq!((a.max_ejection_percent, a.eject_after), (0, 3));
    assert_eq!(a.dns.nameservers.len(), 2);
    assert_eq!(a.dns.nameservers[1].port(), 53);
    assert_eq!(a.dns.search, ["svc.cluster.local"]);
    // The pool's dns: overrides field by field over the top-level one.
    assert_eq!(
        (a.dns.min_ttl, a.dns.max_ttl),
        (Duration::from_secs(2), Duration::from_secs(60))
    );

    let b = &c.pools[1];
    assert!(!b.has_dns());
    let h = b.health.as_ref().unwrap();
    assert!(matches!(h.kind, HealthKind::Tcp));
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (Duration::from_secs(2), Duration::from_secs(1), 2, 3)
    );
    assert_eq!(
        (b.max_ejection_percent, b.eject_after, b.slow_start),
        (50, 5, None)
    );
    assert_eq!(b.dns.max_ttl, Duration::from_secs(300));
}

/// A large route table is loaded without building anything per route that it does not need
/// (issue 19: 100,000 routes in under a second). Counted, not timed: no regex of a route is
/// compiled at load (the proxy matches script regexes as sets; the rest compile on first use),
/// a duplicate name among 20,000 is still found and named, and the file is over the default
/// `limits.max_config_bytes`, which the file itself raises.
#[test]
fn a_large_route_table_loads_without_compiling_its_regexes() {
    let n = 20_000;
    let mut text = String::from("version: 1\nlimits: { max_config_bytes: 67108864 }\nroutes:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  - {{ name: r{i}, match: {{ script: {{ regex: \"^/other/{i}$\" }}, \
             vars: {{ agi_context: \"^ctx{i}$\" }}, args: {{ 1: \"^{i}\" }} }}, pool: p }}\n"
        ));
    }
    text.push_str("pools:\n  - name: p\n    backends: [{ address: \"127.0.0.1:1\" }]\n");
    // Padding (a comment) takes the text past the default limit of 4 MiB.
    text.push_str(&format!(
        "# {}\n",
        "x".repeat(Limits::DEFAULT_MAX_CONFIG_BYTES)
    ));
    let c = from_yaml_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.routes.len(), n);
    for r in &c.routes {
        let Some(ScriptMatch::Regex(re)) = &r.matcher.script else {
            panic!("expected a regex script match");
        };
        assert!(!re.is_compiled(), "{} compiled at load", r.name);
        assert!(!r.matcher.vars[0].1.is_compiled() && !r.matcher.args[0].1.is_compiled());
    }
    // Built on first use, with the `^/` → `^/?` rewrite.
    let Some(ScriptMatch::Regex(re)) = &c.routes[7].matcher.script else {
        unreachable!()
    };
    assert!(re.is_match("other/7") && re.is_match("/other/7") && !re.is_match("other/70"));

    let dup = text.replacen("name: r19999,", "name: r3,", 1);
    let errs = from_yaml_str(&dup).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs}");
    assert_eq!(errs.0[0].path, "routes[19999].name");
    assert!(
        errs.0[0].message.starts_with(
            "\"r3\" is also the name of routes[3]; route names must be unique (line 20003,"
        ),
        "{}",
        errs.0[0].message
    );
}

/// Only the listed balancers, canonical networks; an IPv4 balancer seen on
/// an IPv6 socket (`::ffff:a.b.c.d`) is the same balancer.
#[test]
fn proxy_protocol_lists_the_balancers_a_listener_trusts() {
    let c = compile(
        "version: 1\nlisteners:\n  - name: a\n    address: \"0.0.0.0:4573\"\n    proxy_protocol: { from: [\"10.0.16.7/20\", \"192.0.2.7\", \"2001:db8::/32\"] }\n  - name: b\n    address: \"[::]:4573\"\n",
    );
    let pp = c.listeners[0].proxy_protocol.as_ref().unwrap();
    let nets: Vec<String> = pp.from.iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, ["10.0.16.0/20", "192.0.2.7/32", "2001:db8::/32"]);
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert!(pp.expected_from(ip("10.0.31.255")));
    assert!(pp.expected_from(ip("::ffff:192.0.2.7")));
    assert!(pp.expected_from(ip("2001:db8:1::9")));
    assert!(!pp.expected_from(ip("10.0.32.0")));
    assert!(!pp.expected_from(ip("192.0.2.8")));
    assert_eq!(c.listeners[1].proxy_protocol, None);
}

#[test]
fn tcp_keepalive_is_on_by_default_and_can_be_tuned_or_turned_off() {
    let c = compile("version: 1\ntcp_keepalive: { idle: 30s, interval: 5s, probes: 3 }\n");
    assert_eq!(
        c.tcp_keepalive,
        Some(Keepalive {
            idle: ms(30_000),
            interval: ms(5_000),
            probes: 3
        })
    );
    // Unset fields keep their defaults.
    let c = compile("version: 1\ntcp_keepalive: { idle: 2m }\n");
    assert_eq!(
        c.tcp_keepalive.map(|k| (k.idle, k.probes)),
        Some((ms(120_000), 6))
    );
    let c = compile("version: 1\ntcp_keepalive: { enabled: false }\n");
    assert_eq!(c.tcp_keepalive, None);
    let c = compile("version: 1\ntcp_keepalive:\n");
    assert_eq!(c.tcp_keepalive, Some(Keepalive::default()));
}

/// A file that starts with a UTF-8 byte order mark (as some Windows editors
/// write it) compiles as it does without one; it was refused as "more than
/// one document". Its errors keep their lines and columns.
#[test]
fn a_leading_byte_order_mark_is_ignored() {
    let with_bom = format!("\u{feff}{FULL}");
    assert_eq!(
        format!("{:?}", compile(&with_bom)),
        format!("{:?}", compile(FULL))
    );
    let bare = "\u{feff}version: 1\n";
    assert_eq!(
        format!("{:?}", compile(bare)),
        format!("{:?}", compile(&bare[3..]))
    );
    let bad = "\u{feff}version: 1\ntimeouts: { budget: soon }\n";
    let errs = from_yaml_str(bad).unwrap_err();
    assert_eq!(errs, from_yaml_str(&bad[3..]).unwrap_err());
    assert!(errs.0[0].message.ends_with("(line 2, column 21)"), "{errs}");
}
