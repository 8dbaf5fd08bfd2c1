//! Routing, table-driven: script exact/prefix/regex, query, arguments,
//! header variables, source address, no match. The backend must receive the
//! header byte for byte as Asterisk sent it, plus only the route's rewrite
//! and injected variables.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;

use chaos_tests::{AgiHeader, AgiStatus, Behaviour, FakeAsterisk, FakeBackend};
use common::*;

const ROUTES: &str = r#"
routes:
  - name: exact-main
    match: { script: { exact: "/ivr/main" } }
    pool: p-exact
  - name: ivr-de
    match: { script: { prefix: "ivr/" }, query: { lang: "de" } }
    pool: p-de
    rewrite: { strip_prefix: "/ivr/" }
    set: { agi_x_forwarded_for: "${remote_ip}", agi_x_route: "${route}" }
  - name: ivr
    match: { script: { prefix: "ivr" } }
    pool: p-ivr
  - name: sales
    match: { script: { regex: "^/sales/(eu|us)$" } }
    pool: p-regex
  - name: gold
    match: { query: { tier: "gold card" } }
    pool: p-query
  - name: dial-digits
    match: { script: { exact: "dial" }, args: { "1": "^[0-9]+$" } }
    pool: p-args
  - name: vip-arg
    match: { args: { "2": "^vip$" } }
    pool: p-arg2
  - name: trunk
    match: { vars: { agi_context: "^from-trunk" } }
    pool: p-vars
  - name: german-caller
    match: { vars: { agi_callerid: "^\\+49" } }
    pool: p-cid
  - name: from-7
    match: { source: ["127.0.0.7/32"] }
    pool: p-src
  - name: net
    match: { script: { prefix: "net/" }, source: ["127.0.1.0/24"] }
    pool: p-srcnet
  - name: old
    match: { script: { prefix: "old/" } }
    pool: p-replace
    rewrite: { replace_prefix: { from: "old/", to: "new/v2/" } }
"#;

const POOLS: &[&str] = &[
    "p-exact",
    "p-de",
    "p-ivr",
    "p-regex",
    "p-query",
    "p-args",
    "p-arg2",
    "p-vars",
    "p-cid",
    "p-src",
    "p-srcnet",
    "p-replace",
];

struct Case {
    script: &'static str,
    args: &'static [&'static str],
    vars: &'static [(&'static str, &'static str)],
    source: &'static str,
    route: Option<&'static str>,
}

const fn case(script: &'static str, route: Option<&'static str>) -> Case {
    Case {
        script,
        args: &[],
        vars: &[],
        source: "127.0.0.1",
        route,
    }
}

#[tokio::test]
async fn routing_table() {
    let mut backends = HashMap::new();
    let mut pools = String::from("pools:\n");
    for name in POOLS {
        let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
        pools.push_str(&format!(
            "  - name: {name}\n    backends:\n      - {{ address: \"{}\" }}\n",
            b.addr()
        ));
        backends.insert(*name, b);
    }
    let p = proxy(&format!("{ROUTES}{pools}")).await;
    let mut rx = p.server.subscribe();

    let cases = [
        case("ivr/main", Some("exact-main")),
        case("/ivr/main", Some("exact-main")),
        case("ivr/main?lang=de", Some("exact-main")), // exact compares the path, not the query
        case("ivr/menu?lang=de&x=1", Some("ivr-de")),
        case("ivr/menu?lang=%64e", Some("ivr-de")), // percent-decoded
        case("ivr/menu?lang=en", Some("ivr")),
        case("ivrx", Some("ivr")),
        case("sales/eu", Some("sales")),
        case("sales/asia", None),
        case("x?tier=gold%20card", Some("gold")),
        case("x?tier=gold", None),
        Case {
            args: &["12345"],
            ..case("dial", Some("dial-digits"))
        },
        Case {
            args: &["12a"],
            ..case("dial", None)
        },
        Case {
            args: &["a", "vip"],
            ..case("y", Some("vip-arg"))
        },
        Case {
            args: &["a", "vipx"],
            ..case("y", None)
        },
        Case {
            vars: &[("agi_context", "from-trunk-eu")],
            ..case("z", Some("trunk"))
        },
        Case {
            vars: &[("agi_callerid", "+4930123456")],
            ..case("z", Some("german-caller"))
        },
        Case {
            vars: &[("agi_callerid", "+3312345")],
            ..case("z", None)
        },
        Case {
            source: "127.0.0.7",
            ..case("z", Some("from-7"))
        },
        Case {
            source: "127.0.1.9",
            ..case("net/a", Some("net"))
        },
        case("net/a", None),
        case("old/menu?x=1", Some("old")),
        case("", None),
    ];
    assert!(cases.len() >= 15);

    for (i, c) in cases.iter().enumerate() {
        let mut header = AgiHeader::realistic(c.script, c.args, &format!("1700000000.{i}"));
        for (k, v) in c.vars {
            header.set(k, v);
        }
        let sent = header.to_bytes();
        let source: IpAddr = c.source.parse().unwrap();
        let out = FakeAsterisk::new()
            .header(header.clone())
            .source(source)
            .run(p.addr)
            .await;
        let rec = next_record(&mut rx).await;
        assert_eq!(
            rec.route.as_deref(),
            c.route,
            "case {i} ({}): {rec:?}",
            c.script
        );
        let Some(route) = c.route else {
            assert_eq!(out.status, AgiStatus::Failure, "case {i}");
            assert_eq!(
                out.variables.get("AGIPROXY_ERROR").map(String::as_str),
                Some("no_route")
            );
            continue;
        };
        assert_eq!(out.status, AgiStatus::Success, "case {i}: {out:?}");
        let pool = rec.pool.clone().unwrap();
        let got = backends[&*pool]
            .stats()
            .headers()
            .pop()
            .expect("backend saw the header");
        let expected = match route {
            "ivr-de" => {
                let mut h = header.clone();
                let script = h
                    .get("agi_network_script")
                    .unwrap()
                    .trim_start_matches("ivr/")
                    .to_string();
                let request = h.get("agi_request").unwrap().replace("/ivr/", "/");
                h.set("agi_network_script", &script)
                    .set("agi_request", &request);
                h.set("agi_x_forwarded_for", c.source)
                    .set("agi_x_route", "ivr-de");
                h.to_bytes()
            }
            "old" => {
                let mut h = header.clone();
                h.set("agi_network_script", "new/v2/menu?x=1");
                h.set(
                    "agi_request",
                    &h.get("agi_request").unwrap().replace("/old/", "/new/v2/"),
                );
                h.to_bytes()
            }
            _ => sent.clone(),
        };
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected),
            "case {i}: header at the backend"
        );
    }
}

#[tokio::test]
async fn hash_balancing_keeps_a_call_on_one_backend() {
    let bs = [
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
        FakeBackend::start(Behaviour::script(&["NOOP"])).await,
    ];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr()).collect();
    let p = proxy(&one_pool("hash", &addrs, "")).await;
    let mut rx = p.server.subscribe();
    let mut seen = HashMap::new();
    // Five AGI() calls of each of 30 channels: every AGI of one call lands
    // on the same backend, and the calls spread over all three.
    for round in 0..5 {
        for call in 0..30 {
            let uid = format!("1700000000.{call}");
            let out = caller("ivr/step", &uid).run(p.addr).await;
            assert_eq!(out.status, AgiStatus::Success);
            let backend = next_record(&mut rx).await.backend.unwrap();
            let first = *seen.entry(uid).or_insert(backend);
            assert_eq!(first, backend, "round {round}, call {call} moved");
        }
    }
    let used: std::collections::HashSet<_> = seen.values().collect();
    assert_eq!(used.len(), 3, "30 calls should use all 3 backends");
}
