//! Bad configs are refused with every mistake, each at its path and with a helpful message.

use agiproxy_config::{from_yaml_str, ConfigError};

/// Two pools most cases route to.
const POOLS: &str = r#"
pools:
  - name: ivr-blue
    backends: [{ address: "10.0.0.1:4573" }]
  - name: ivr-green
    backends: [{ address: "10.0.0.2:4573" }]
"#;

/// A config with `version: 1`, the given body and, unless the body has its own, [`POOLS`].
fn config(body: &str) -> String {
    let pools = if body.contains("\npools:") || body.starts_with("pools:") {
        ""
    } else {
        POOLS
    };
    format!("version: 1\n{body}\n{pools}")
}

fn errors(text: &str) -> Vec<ConfigError> {
    match from_yaml_str(text) {
        Ok(_) => panic!("expected errors, the config was accepted:\n{text}"),
        Err(e) => e.0,
    }
}

/// Asserts exactly these errors, in this order: path equal, message containing the text.
fn assert_errors(name: &str, text: &str, expected: &[(&str, &str)]) {
    let got = errors(text);
    let show = || {
        got.iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        got.len(),
        expected.len(),
        "case {name}: expected {} error(s), got:\n{}",
        expected.len(),
        show()
    );
    for (e, (path, message)) in got.iter().zip(expected) {
        assert_eq!(e.path, *path, "case {name}: wrong path; got:\n{}", show());
        assert!(
            e.message.contains(message),
            "case {name}: message of {path} should contain {message:?}; got:\n{}",
            show()
        );
        assert!(!e.message.contains('\n'), "case {name}: multi-line message");
    }
}

/// A case: its name, the config, and the errors expected as (path, part of the message).
type Case = (
    &'static str,
    String,
    &'static [(&'static str, &'static str)],
);

#[test]
fn bad_configs_are_refused_with_path_and_fix() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("unknown pool",
         config("routes: [{ name: a, pool: ivr-gren }]"),
         &[("routes[0].pool", "unknown pool \"ivr-gren\"; known pools: ivr-blue, ivr-green")]),
        ("unknown pool, no pools at all",
         config("routes: [{ name: a, pool: x }]\npools: []"),
         &[("routes[0].pool", "no pools are defined")]),
        ("not a duration",
         config("timeouts: { budget: 15OOms }"),
         &[("timeouts.budget", "\"15OOms\" is not a duration (write e.g. 250ms, 2s, 5m)")]),
        ("duration without unit",
         config("timeouts: { connect: 250 }"),
         &[("timeouts.connect", "250 has no unit; durations need one, e.g. 250ms")]),
        ("proxy_protocol: no list, an empty one, a bad network, an unknown key",
         config("listeners:\n  - { name: a, address: \"127.0.0.1:1\", proxy_protocol: {} }\n  - { name: b, address: \"127.0.0.1:2\", proxy_protocol: { from: [] } }\n  - { name: c, address: \"127.0.0.1:3\", proxy_protocol: { from: [\"10.0.0.0/8\", \"lb.example\"], trust: all } }"),
         &[("listeners[0].proxy_protocol.from", "missing; list the load balancers"),
           ("listeners[1].proxy_protocol.from", "empty; list the load balancers"),
           ("listeners[2].proxy_protocol", "unknown field `trust`"),
           ("listeners[2].proxy_protocol.from[1]", "\"lb.example\" is not an IP network")]),
        ("keepalive: not whole seconds, out of range, unknown key",
         config("tcp_keepalive: { idle: 1500ms, interval: 10h, probes: 0 }"),
         &[("tcp_keepalive.idle", "\"1500ms\" is not whole seconds from 1s to 32767s"),
           ("tcp_keepalive.interval", "\"10h\" is not whole seconds"),
           ("tcp_keepalive.probes", "0 is out of range; use 1 to 127")]),
        ("keepalive: unknown key, wrong type",
         config("tcp_keepalive: { idel: 60s, probes: many }"),
         &[("tcp_keepalive", "unknown field `idel`, expected one of `enabled`, `idle`"),
           ("tcp_keepalive.probes", "invalid type: string \"many\", expected u64")]),
        ("zero duration",
         config("timeouts: { header: 0s }"),
         &[("timeouts.header", "zero")]),
        ("connect longer than budget",
         config("timeouts: { budget: 200ms, connect: 300ms }"),
         &[("timeouts.connect", "connect (300ms) is longer than budget (200ms)")]),
        ("route budget below the global connect",
         config("routes: [{ name: a, pool: ivr-blue, timeouts: { budget: 100ms } }]"),
         &[("routes[0].timeouts.budget", "connect (250ms) is longer than budget (100ms)")]),
        ("version missing",
         "routes: []\n".to_string(),
         &[("version", "missing; add `version: 1` at the top")]),
        ("version 2",
         "version: 2\n".to_string(),
         &[("version", "unsupported version 2")]),
        ("backend without port",
         config("pools:\n  - name: p\n    backends: [{ address: \"10.0.0.2:4573\" }, { address: \"10.0.0.1\" }]"),
         &[("pools[0].backends[1].address", "\"10.0.0.1\" has no port; write host:port, e.g. 10.0.0.1:4573")]),
        ("DNS backend without port, bad name, duplicate",
         config("pools: [{ name: p, backends: [{ address: \"ivr.svc.cluster.local\" }, { address: \"ivr..svc:4573\" }, { address: \"a.svc:4573\" }, { address: \"A.svc.:4573\" }] }]"),
         &[("pools[0].backends[0].address", "\"ivr.svc.cluster.local\" has no port; write name:port, e.g. ivr.svc.cluster.local:4573"),
           ("pools[0].backends[1].address", "has an empty label"),
           ("pools[0].backends[3].address", "is listed twice in this pool (also pools[0].backends[2])")]),
        ("SRV with a port and SRV with a weight",
         config("pools: [{ name: p, backends: [{ srv: \"_agi._tcp.ivr:4573\" }, { srv: \"_agi._tcp.ivr\", weight: 2 }] }]"),
         &[("pools[0].backends[0].srv", "has a port; SRV records give each backend's port"),
           ("pools[0].backends[1].weight", "an SRV name takes each record's own weight")]),
        ("backend on 0.0.0.0",
         config("pools: [{ name: p, backends: [{ address: \"0.0.0.0:4573\" }] }]"),
         &[("pools[0].backends[0].address", "any address")]),
        ("duplicate backend",
         config("pools: [{ name: p, backends: [{ address: \"10.0.0.1:4573\" }, { address: \"10.0.0.1:4573\" }] }]"),
         &[("pools[0].backends[1].address", "10.0.0.1:4573 is listed twice in this pool (also pools[0].backends[0])")]),
        ("backend weight 0 and pool cap 0",
         config("pools: [{ name: p, max_sessions: 0, backends: [{ address: \"10.0.0.1:4573\", weight: 0 }] }]"),
         &[("pools[0].backends[0].weight", "0 is out of range; use 1 to 1000 (default 1)"),
           ("pools[0].max_sessions", "out of range")]),
        ("pool without backends",
         config("pools: [{ name: p }, { name: q, backends: [] }]"),
         &[("pools[0].backends", "at least one backend"),
           ("pools[1].backends", "at least one backend")]),
        ("duplicate pool name",
         config("pools: [{ name: p, backends: [{ address: \"10.0.0.1:1\" }] }, { name: p, backends: [{ address: \"10.0.0.2:1\" }] }]"),
         &[("pools[1].name", "\"p\" is also the name of pools[0]; pool names must be unique")]),
        ("bad hash key",
         config("pools: [{ name: p, balance: hash, hash_key: uniqueid, backends: [{ address: \"10.0.0.1:1\" }] }]"),
         &[("pools[0].hash_key", "start with agi_")]),
        ("backoff above its maximum",
         config("pools: [{ name: p, passive: { backoff: 1m, max_backoff: 10s }, backends: [{ address: \"10.0.0.1:1\" }] }]"),
         &[("pools[0].passive.max_backoff", "backoff (1m) is longer than max_backoff (10s)")]),
        ("health check rise 0 and a bad expect",
         config("pools: [{ name: p, health: { interval: 1s, timeout: 2s, rise: 0, expect: \"(\" }, backends: [{ address: \"10.0.0.1:1\" }] }]"),
         &[("pools[0].health.rise", "0 is out of range; use 1 to 100 (default 2)"),
           ("pools[0].health.expect", "not a valid regex")]),
        ("health check timeout over its interval",
         config("pools: [{ name: p, health: { interval: 1s, timeout: 2s }, backends: [{ address: \"10.0.0.1:1\" }] }]"),
         &[("pools[0].health.timeout", "timeout (2s) is longer than interval (1s)")]),
        ("tcp health check with a script",
         config("pools: [{ name: p, health: { type: tcp, script: healthz }, backends: [{ address: \"10.0.0.1:1\" }] }]"),
         &[("pools[0].health.script", "only used by type: agi")]),
        ("ejection percent, passive threshold, slow start",
         config("pools: [{ name: p, max_ejection_percent: 101, slow_start: 30, passive: { consecutive_failures: 0 }, backends: [{ address: \"10.0.0.1:1\" }] }]"),
         &[("pools[0].passive.consecutive_failures", "out of range; use 1 to 100"),
           ("pools[0].max_ejection_percent", "101 is out of range; use 0 to 100 (default 50)"),
           ("pools[0].slow_start", "has no unit")]),
        ("DNS settings",
         config("dns: { nameservers: [\"dns.local\"], min_ttl: 10m, max_ttl: 1m }\npools: [{ name: p, dns: { search: [\"a b\"] }, backends: [{ address: \"10.0.0.1:1\" }] }]"),
         &[("dns.nameservers[0]", "nameservers are given by IP"),
           ("dns.max_ttl", "min_ttl (10m) is longer than max_ttl (1m)"),
           ("pools[0].dns.search[0]", "contains ' '")]),
        ("control block without an address or a socket (no default port)",
         config("control: { token_env: T }"),
         &[("control", "no address and no socket: add address: \"127.0.0.1:PORT\"")]),
        ("control API with both token sources",
         config("control: { address: \"127.0.0.1:1\", token_file: /t, token_env: T }"),
         &[("control", "both token_file and token_env")]),
        ("control TLS without a key",
         config("control: { address: \"127.0.0.1:1\", tls: { cert: /c.pem } }"),
         &[("control.tls", "needs both cert and key")]),
        ("control TLS peers: a cert without its key, a server name that is no name",
         config("control: { address: \"127.0.0.1:1\", tls: { cert: /c.pem, key: /k.pem, peers: { cert: /p.pem, server_name: \"a b\" } } }"),
         &[("control.tls.peers", "cert and key go together"),
           ("control.tls.peers.server_name", "contains ' '; DNS names use letters")]),
        ("rollout judged on TLS peers with no CA to verify them",
         config("control: { address: \"127.0.0.1:1\", tls: { cert: /c.pem, key: /k.pem } }\nroutes: [{ name: a, rollout: { from: ivr-blue, to: ivr-green, steps: [50], step_duration: 1m, start: \"2026-01-01T00:00:00Z\", judge: { peers: [\"10.0.0.1:4574\"] } } }]"),
         &[("routes[0].rollout.judge.peers", "set control.tls.peers.ca (or control.tls.client_ca)")]),
        ("rollout naming TLS peers with no CA, its judge off (a start still asks them)",
         config("control: { address: \"127.0.0.1:1\", tls: { cert: /c.pem, key: /k.pem } }\nroutes: [{ name: a, rollout: { from: ivr-blue, to: ivr-green, steps: [50], step_duration: 1m, start: \"2026-01-01T00:00:00Z\", judge: { enabled: false, peers: [\"10.0.0.1:4574\"] } } }]"),
         &[("routes[0].rollout.judge.peers", "set control.tls.peers.ca (or control.tls.client_ca)")]),
        ("control socket relative, TLS with only a socket",
         config("control: { socket: run/c.sock, tls: { cert: /c.pem, key: /k.pem } }"),
         &[("control.socket", "\"run/c.sock\" is relative; write an absolute path"),
           ("control.tls", "applies to control.address, which is not set")]),
        ("control socket path too long for a Unix socket",
         config(&format!("control: {{ socket: /{} }}", "s".repeat(120))),
         &[("control.socket", "121 bytes long; a Unix socket path holds at most 107")]),
        ("both pool and split",
         config("routes: [{ name: a, pool: ivr-blue, split: [{ pool: ivr-green, weight: 1 }] }]"),
         &[("routes[0]", "has both pool: and split:; keep one")]),
        ("no target",
         config("routes: [{ name: a }]"),
         &[("routes[0]", "has no target; add pool: NAME")]),
        ("split weights add up to 0",
         config("routes: [{ name: a, split: [{ pool: ivr-blue, weight: 0 }, { pool: ivr-green, weight: 0 }] }]"),
         &[("routes[0].split", "weights add up to 0")]),
        ("split: weight too big, pool twice, unknown pool, weight missing",
         config("routes: [{ name: a, split: [{ pool: ivr-blue, weight: 20000 }, { pool: ivr-blue, weight: 1 }, { pool: ivr-gren, weight: 1 }, { pool: ivr-green }] }]"),
         &[("routes[0].split[0].weight", "20000 is out of range; use 0 to 10000"),
           ("routes[0].split[1].pool", "\"ivr-blue\" is listed twice (also routes[0].split[0])"),
           ("routes[0].split[2].pool", "unknown pool \"ivr-gren\""),
           ("routes[0].split[3].weight", "missing")]),
        ("empty split",
         config("routes: [{ name: a, split: [] }]"),
         &[("routes[0].split", "empty")]),
        ("route name missing, duplicate, malformed",
         config("routes: [{ pool: ivr-blue }, { name: a, pool: ivr-blue }, { name: a, pool: ivr-blue }, { name: \"ivr main\", pool: ivr-blue }]"),
         &[("routes[0].name", "missing; give each route a name"),
           ("routes[2].name", "\"a\" is also the name of routes[1]; route names must be unique"),
           ("routes[3].name", "names may contain only letters, digits, _, . and -")]),
        ("argument numbers out of range",
         config("routes: [{ name: a, pool: ivr-blue, match: { args: { \"0\": x, 128: y, first: z } } }]"),
         &[("routes[0].match.args.0", "run from 1 to 127"),
           ("routes[0].match.args.128", "run from 1 to 127"),
           ("routes[0].match.args.first", "\"first\" is not an argument number")]),
        ("argument listed twice",
         config("routes: [{ name: a, pool: ivr-blue, match: { args: { 1: x, \"01\": y } } }]"),
         &[("routes[0].match.args.01", "argument 1 is listed twice (also routes[0].match.args.1)")]),
        ("bad regex",
         config("routes: [{ name: a, pool: ivr-blue, match: { args: { 1: \"^[0-9+$\" } } }]"),
         &[("routes[0].match.args.1", "\"^[0-9+$\" is not a valid regex: unclosed character class")]),
        ("vars not header variables",
         config("routes: [{ name: a, pool: ivr-blue, match: { vars: { context: x, AGI_CONTEXT: y, agi_context: \"(\" } } }]"),
         &[("routes[0].match.vars.context", "start with agi_"),
           ("routes[0].match.vars.AGI_CONTEXT", "lowercase"),
           ("routes[0].match.vars.agi_context", "not a valid regex")]),
        ("script with two kinds",
         config("routes: [{ name: a, pool: ivr-blue, match: { script: { exact: a, prefix: b } } }]"),
         &[("routes[0].match.script", "has exact and prefix; a script match takes exactly one of them")]),
        ("script with none",
         config("routes: [{ name: a, pool: ivr-blue, match: { script: {} } }]"),
         &[("routes[0].match.script", "empty; write one of")]),
        ("script with a query",
         config("routes: [{ name: a, pool: ivr-blue, match: { script: { exact: \"ivr?lang=de\" } } }]"),
         &[("routes[0].match.script.exact", "match query parameters with match.query")]),
        ("bad regex script",
         config("routes: [{ name: a, pool: ivr-blue, match: { script: { regex: \"^/(ivr\" } } }]"),
         &[("routes[0].match.script.regex", "\"^/(ivr\" is not a valid regex: unclosed group")]),
        ("query key twice",
         config("routes: [{ name: a, pool: ivr-blue, match: { query: { lang: de, lang: en } } }]"),
         &[("routes[0].match.query.lang", "listed twice; keep one")]),
        ("bad source networks",
         config("routes: [{ name: a, pool: ivr-blue, match: { source: [\"10.0.0.0/8\", \"10.0.0.0/33\", \"lan\"] } }]"),
         &[("routes[0].match.source[1]", "\"10.0.0.0/33\" is not an IP network; write e.g. 10.0.0.0/8"),
           ("routes[0].match.source[2]", "not an IP network")]),
        ("empty source list",
         config("routes: [{ name: a, pool: ivr-blue, match: { source: [] } }]"),
         &[("routes[0].match.source", "remove the key to accept every address")]),
        ("set: bad placeholder, line break, Asterisk's variable, bad name, lone $",
         config("routes:\n  - name: a\n    pool: ivr-blue\n    set:\n      agi_x: \"${remote_host}\"\n      agi_y: \"a\\nb\"\n      agi_context: x\n      x_route: y\n      agi_z: \"cost $5\""),
         &[("routes[0].set.agi_x", "unknown placeholder ${remote_host}; known placeholders: ${remote_ip}"),
           ("routes[0].set.agi_y", "line break"),
           ("routes[0].set.agi_context", "agi_context is sent by Asterisk; set adds new variables only"),
           ("routes[0].set.x_route", "start with agi_"),
           ("routes[0].set.agi_z", "write $$ for a literal $")]),
        ("rewrite with both",
         config("routes: [{ name: a, pool: ivr-blue, rewrite: { strip_prefix: a, replace_prefix: { from: a, to: b } } }]"),
         &[("routes[0].rewrite", "has both strip_prefix and replace_prefix; keep one")]),
        ("rewrite replace without from and to",
         config("routes: [{ name: a, pool: ivr-blue, rewrite: { replace_prefix: {} } }]"),
         &[("routes[0].rewrite.replace_prefix.from", "missing"),
           ("routes[0].rewrite.replace_prefix.to", "missing")]),
        ("rewrite stripping nothing",
         config("routes: [{ name: a, pool: ivr-blue, rewrite: { strip_prefix: \"/\" } }]"),
         &[("routes[0].rewrite.strip_prefix", "strip nothing")]),
        ("bad split key",
         config("routes: [{ name: a, pool: ivr-blue, split_key: uniqueid }]"),
         &[("routes[0].split_key", "not a header variable name")]),
        ("listener problems",
         config("listeners:\n  - { name: a, address: \"0.0.0.0\" }\n  - { name: b, address: \":4573\" }\n  - { name: c, address: \"0.0.0.0:4573\" }\n  - { name: c, address: \"127.0.0.1:4573\" }\n  - { address: \"pbx.lan:4573\" }"),
         &[("listeners[0].address", "\"0.0.0.0\" has no port; write ip:port, e.g. 0.0.0.0:4573"),
           ("listeners[1].address", "has no IP; write 0.0.0.0:4573"),
           ("listeners[3].name", "\"c\" is also the name of listeners[2]"),
           ("listeners[3].address", "127.0.0.1:4573 clashes with listeners[2].address (0.0.0.0:4573)"),
           ("listeners[4].name", "missing"),
           ("listeners[4].address", "listeners bind IP addresses")]),
        ("a listener on an IPv4-mapped address",
         config("listeners:\n  - { name: a, address: \"[::ffff:10.0.0.1]:4573\" }\n  - { name: b, address: \"[::]:4574\" }"),
         &[("listeners[0].address", "[::ffff:10.0.0.1]:4573 is an IPv4-mapped IPv6 address, which a listener cannot bind (it listens IPv6 only); write 10.0.0.1:4573")]),
        ("control API on a listener's port",
         config("listeners:\n  - { name: a, address: \"0.0.0.0:4573\" }\ncontrol: { address: \"127.0.0.1:4573\" }"),
         &[("control.address", "127.0.0.1:4573 clashes with listeners[0].address (0.0.0.0:4573); the control API needs a port of its own, e.g. 127.0.0.1:9090")]),
        ("control API on an IPv4-mapped address of a listener, whose port 9090 is taken too",
         config("listeners:\n  - { name: a, address: \"127.0.0.1:9090\" }\n  - { name: b, address: \"127.0.0.1:4573\" }\ncontrol: { address: \"[::ffff:127.0.0.1]:4573\" }"),
         &[("control.address", "127.0.0.1:4573 clashes with listeners[1].address (127.0.0.1:4573); the control API needs a port of its own, e.g. 127.0.0.1:9091")]),
        ("control API on [::] and an IPv4 listener's port",
         config("listeners:\n  - { name: a, address: \"127.0.0.1:4573\" }\ncontrol: { address: \"[::]:4573\" }"),
         &[("control.address", "[::]:4573 clashes with listeners[0].address (127.0.0.1:4573)")]),
        ("no listeners",
         config("listeners: []"),
         &[("listeners", "empty; list at least one listener")]),
        ("limits out of range",
         config("limits: { max_sessions: 0, max_header_bytes: 100, max_header_lines: 5000, max_headers_per_peer: 0, max_header_memory: 1000 }"),
         &[("limits.max_sessions", "0 is out of range; use 1 to 1000000 (default 20000)"),
           ("limits.max_header_bytes", "100 is out of range; use 512 to 1048576 (default 16384)"),
           ("limits.max_header_lines", "5000 is out of range; use 8 to 4096 (default 512)"),
           ("limits.max_headers_per_peer", "0 is out of range; use 1 to 1000000 (default 1024)"),
           ("limits.max_header_memory", "1000 is out of range; use 1048576 to 68719476736 (default 67108864)")]),
        // Structural mistakes, found by serde: reported with the path and line/column it gives.
        ("unknown mode",
         config("routes: [{ name: a, pool: ivr-blue, mode: line }]"),
         &[("routes[0].mode", "unknown variant `line`, expected `lines` or `raw` (line 2, column")]),
        ("wrong type",
         config("routes: [{ name: a, pool: ivr-blue, forward_hangup: \"yes\" }]"),
         &[("routes[0].forward_hangup", "invalid type: string \"yes\", expected a boolean")]),
        ("negative number",
         config("limits: { max_sessions: -5 }"),
         &[("limits.max_sessions", "integer `-5`")]),
        ("decimal where text is compared",
         config("routes: [{ name: a, pool: ivr-blue, match: { query: { v: 1.50 } } }]"),
         &[("routes[0].match.query.v", "quote decimals")]),
        ("list where a mapping belongs",
         config("routes: { name: a }"),
         &[("routes", "invalid type: map, expected a sequence")]),
    ];
    assert!(cases.len() >= 20);
    for (name, text, expected) in cases {
        assert_errors(name, text, expected);
    }
}

#[test]
fn independent_mistakes_are_all_reported_at_once() {
    let text = config(
        "timeouts: { budget: 15OOms }\nroutes: [{ name: a, pool: ivr-gren }]\n\
         pools:\n  - name: ivr-blue\n    backends: [{ address: \"10.0.0.1\" }]",
    );
    let errs = errors(&text);
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "timeouts.budget",
            "routes[0].pool",
            "pools[0].backends[0].address"
        ]
    );
    // And they print one per line, each with its path.
    let printed = from_yaml_str(&text).unwrap_err().to_string();
    assert_eq!(printed.lines().count(), 3);
    assert!(printed
        .lines()
        .all(|l| !l.starts_with(':') && l.contains(": ")));
}

#[test]
fn unknown_fields_are_refused_by_name_with_the_known_ones() {
    let errs = errors("version: 1\nroutes:\n  - name: a\n    pols: x\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].path, "routes[0]");
    let m = &errs[0].message;
    assert!(
        m.starts_with("unknown field `pols`, expected one of"),
        "{m}"
    );
    assert!(m.contains("`pool`") && m.contains("`split`"), "{m}");
    assert!(m.ends_with("(line 4, column 5)"), "{m}");

    // Deeper down, and at the top level (where the line is found by name).
    let errs = errors(&config(
        "pools: [{ name: p, backends: [{ address: \"10.0.0.1:1\", wieght: 2 }] }]\nrotues: []",
    ));
    let printed: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 2, "{printed:?}");
    assert_eq!(errs[0].path, "pools[0].backends[0]");
    assert!(
        errs[0].message.contains("unknown field `wieght`"),
        "{printed:?}"
    );
    assert_eq!(errs[1].path, "");
    assert!(
        printed[1].starts_with("unknown field `rotues`, expected one of `version`, `listeners`"),
        "{printed:?}"
    );
    assert!(printed[1].ends_with("(line 3, column 1)"), "{printed:?}");
}

#[test]
fn structural_mistakes_in_separate_places_are_all_reported() {
    let text = "version: 1\n\
                listeners: [{ name: a, adress: \"0.0.0.0:4573\" }]\n\
                timeouts: { bugdet: 1s }\n\
                routes:\n\
                \x20 - { name: a, pool: p, mode: line }\n\
                \x20 - { name: b, pool: p }\n\
                \x20 - { name: c, pool: p, forward_hangup: 3 }\n\
                pools: [{ name: p, balance: fastest, backends: [{ address: \"10.0.0.1:1\" }] }]\n";
    let errs = errors(text);
    let got: Vec<(&str, &str)> = errs
        .iter()
        .map(|e| (e.path.as_str(), e.message.as_str()))
        .collect();
    let expected = [
        ("listeners[0]", "unknown field `adress`"),
        ("timeouts", "unknown field `bugdet`"),
        ("routes[0].mode", "unknown variant `line`"),
        ("routes[2].forward_hangup", "invalid type: integer `3`"),
        ("pools[0].balance", "unknown variant `fastest`"),
    ];
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    for ((path, message), (want_path, want_message)) in got.iter().zip(expected) {
        assert_eq!(*path, want_path, "{got:#?}");
        assert!(message.contains(want_message), "{got:#?}");
        assert!(message.contains("(line "), "no location: {got:#?}");
    }
}

#[test]
fn yaml_syntax_errors_give_line_and_column() {
    let errs = errors("version: 1\nroutes:\n  - name: a\n     pool: b\n");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].path, "");
    assert!(
        errs[0].message.contains("(line 4, column 10)"),
        "{}",
        errs[0]
    );

    let errs = errors("version: 1\nroutes: [{ name: \"a }]\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].message.contains("line 2"), "{}", errs[0]);
    // Where it failed is said once (line 3), where the quoted text began once (line 2).
    assert_eq!(errs[0].message.matches("line 3").count(), 1, "{}", errs[0]);

    let errs = errors("- just\n- a list\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].message.contains("invalid type: sequence"),
        "{}",
        errs[0]
    );
}

#[test]
fn every_mistake_of_a_file_is_reported_in_one_run_with_its_line_and_column() {
    // A misspelt field in a route, an unknown `balance`, a misspelt backend field, a string
    // weight, and value errors: once needed five runs of `check`.
    let text = "version: 1\n\
                timeouts: { budget: 15OOms }\n\
                routes:\n\
                \x20 - name: ivr\n\
                \x20   pool: ivr-gren\n\
                \x20   rewrte: { strip_prefix: \"ivr/\" }\n\
                pools:\n\
                \x20 - name: ivr-blue\n\
                \x20   balance: roundrobin\n\
                \x20   backends:\n\
                \x20     - { address: \"10.0.0.1:4573\", wieght: 2 }\n\
                \x20     - { address: \"10.0.0.2\", weight: \"ten\" }\n";
    let errs = errors(text);
    let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let expected = [
        "timeouts.budget: \"15OOms\" is not a duration",
        "routes[0].pool: unknown pool \"ivr-gren\"",
        "routes[0]: unknown field `rewrte`, expected one of",
        "pools[0].balance: unknown variant `roundrobin`",
        "pools[0].backends[0]: unknown field `wieght`",
        "pools[0].backends[1].weight: invalid type: string \"ten\"",
        "pools[0].backends[1].address: \"10.0.0.2\" has no port",
    ];
    let at = [
        (2, 21),
        (5, 11),
        (6, 5),
        (9, 14),
        (11, 37),
        (12, 40),
        (12, 20),
    ];
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    for ((line, want), (l, c)) in got.iter().zip(expected).zip(at) {
        assert!(line.starts_with(want), "{want:?} in {got:#?}");
        assert!(
            line.ends_with(&format!("(line {l}, column {c})")),
            "line {l} column {c}: {got:#?}"
        );
    }
}

/// A pool's list is bounded: every call orders a tier and every change
/// rebuilds the member set (6,000 backends took 30 s to start).
#[test]
fn a_pool_of_more_than_1000_backends_is_refused() {
    let list = |n: usize| -> String {
        (0..n)
            .map(|i| {
                format!(
                    "      - {{ address: \"10.{}.{}.1:4573\" }}\n",
                    i / 250,
                    i % 250
                )
            })
            .collect()
    };
    let text = |n: usize| {
        format!(
            "version: 1\npools:\n  - name: big\n    backends:\n{}",
            list(n)
        )
    };
    assert!(from_yaml_str(&text(1000)).is_ok());
    assert_errors(
        "1001 backends",
        &text(1001),
        &[(
            "pools[0].backends",
            "1001 entries; a pool takes at most 1000",
        )],
    );
}

/// A config with very many mistakes reports the first `MAX_ERRORS` (in
/// file order, located) and then how many more there were: 300,000 unknown
/// keys once gave 42 MB of errors to `check`, the API and one log line.
#[test]
fn very_many_errors_are_cut_to_the_first_hundred_and_a_count() {
    use agiproxy_config::MAX_ERRORS;
    assert_eq!(MAX_ERRORS, 100);
    let keys: String = (0..1_000).map(|i| format!("k{i}: 1\n")).collect();
    let errs = errors(&format!("version: 1\n{keys}"));
    assert_eq!(errs.len(), MAX_ERRORS + 1, "{errs:#?}");
    assert_eq!(
        errs.last().unwrap(),
        &ConfigError::new("", "… and 900 more errors")
    );
    // The ones kept are the first, in file order, with their lines.
    for (i, e) in errs[..MAX_ERRORS].iter().enumerate() {
        assert!(
            e.message.starts_with(&format!("unknown field `k{i}`"))
                && e.message.ends_with(&format!("(line {}, column 1)", i + 2)),
            "{i}: {e}"
        );
    }
    // Exactly at the cap: nothing cut, no count.
    let keys: String = (0..MAX_ERRORS).map(|i| format!("k{i}: 1\n")).collect();
    let errs = errors(&format!("version: 1\n{keys}"));
    assert_eq!(errs.len(), MAX_ERRORS, "{errs:#?}");
    // One more: the count is singular; large counts are grouped by thousands.
    let keys: String = (0..=MAX_ERRORS).map(|i| format!("k{i}: 1\n")).collect();
    let errs = errors(&format!("version: 1\n{keys}"));
    assert_eq!(errs.last().unwrap().message, "… and 1 more error");
    let keys: String = (0..11_100).map(|i| format!("k{i}: 1\n")).collect();
    let errs = errors(&format!("version: 1\n{keys}"));
    assert_eq!(errs.last().unwrap().message, "… and 11,000 more errors");
}

/// Keys YAML gives no name (null, a float, a list) are named as written, in
/// flow style, not as the parser's debug text (`Number(.nan)`, `Null`,
/// `Sequence [String("a"), …]`).
#[test]
fn keys_without_a_name_are_shown_as_written() {
    let text = config(
        "listeners: [{ name: a, address: \"127.0.0.1:4573\" }]\n.nan: 1\n~: 2\n[a, b]: 3\n\
         routes: [{ name: all, pool: ivr-blue }]",
    );
    let got: Vec<String> = errors(&text).iter().map(ToString::to_string).collect();
    assert_eq!(got.len(), 3, "{got:?}");
    for (e, key) in got.iter().zip(["`.nan`", "`~`", "`[\"a\", \"b\"]`"]) {
        assert!(
            e.starts_with(&format!("unknown field {key}, expected one of")),
            "{e}"
        );
    }
}

/// A custom tag was "invalid type: enum, expected any YAML value" (audit).
/// YAML's own tags (`!!str`) still read as what they say.
#[test]
fn a_custom_yaml_tag_is_named() {
    let text = config("routes: [{ name: all, pool: !blue ivr-blue }]");
    let got: Vec<String> = errors(&text).iter().map(ToString::to_string).collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("routes[0].pool: the YAML tag `!blue` means nothing to agiproxy"),
        "{got:?}"
    );
    assert!(from_yaml_str(&config("routes: [{ name: all, pool: !!str ivr-blue }]")).is_ok());
}

/// Inside a rollout (read whole by serde) a repeated key silently took the
/// last value: a rollback written before `overrides: []` was dropped
/// (audit). Refused as everywhere else, with its path.
#[test]
fn a_repeated_key_inside_a_rollout_is_refused() {
    let text = config(
        "routes:\n  - name: ivr\n    rollout:\n      from: ivr-blue\n      to: ivr-green\n      steps: [10, 100]\n      step_duration: 1h\n      start: \"2026-01-01T00:00:00Z\"\n      overrides: [{ action: rollback, at: \"2026-01-01T00:10:00Z\" }]\n      judge: { interval: 30s, interval: 5s }\n      overrides: []",
    );
    let got: Vec<(String, String)> = errors(&text)
        .iter()
        .map(|e| (e.path.clone(), e.message.clone()))
        .collect();
    // The refused rollout leaves the route without a target: not reported.
    assert_eq!(got.len(), 2, "{got:?}");
    for (path, key) in [
        ("routes[0].rollout.overrides", "overrides"),
        ("routes[0].rollout.judge.interval", "interval"),
    ] {
        assert!(
            got.iter()
                .any(|(p, m)| p == path && m.starts_with(&format!("duplicate field `{key}`"))),
            "{path}: {got:?}"
        );
    }
}

/// Channel keys carry whole seconds, and `ctl`'s override must reach every
/// replica within the skew: a skew of milliseconds made overrides fail at
/// random as already past (audit).
#[test]
fn a_skew_under_a_second_is_refused() {
    let text = config(
        "routes:\n  - name: ivr\n    rollout: { from: ivr-blue, to: ivr-green, steps: [10, 100], step_duration: 1h, start: \"2026-01-01T00:00:00Z\", skew: 1ms }",
    );
    let got: Vec<(String, String)> = errors(&text)
        .iter()
        .map(|e| (e.path.clone(), e.message.clone()))
        .collect();
    assert!(
        got.iter().any(|(p, m)| p == "routes[0].rollout.skew"
            && m.starts_with("1ms is too short; use at least 1s")),
        "{got:?}"
    );
    let ok = text.replace("skew: 1ms", "skew: 1s");
    assert!(from_yaml_str(&ok).is_ok());
}

/// A list at the top level (a cookbook's routes pasted alone) says what a
/// config is, not only "expected a mapping" (walkthrough).
#[test]
fn a_list_at_the_top_level_says_what_a_config_is() {
    let e = agiproxy_config::from_yaml_str("- { name: all, pool: p }\n").unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("expected a mapping") && text.contains("without `routes:` above them"),
        "{text}"
    );
}
