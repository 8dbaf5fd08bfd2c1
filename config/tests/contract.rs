//! The config from design.md ("The config file's shape (a contract)") must be accepted as
//! written. Until DNS discovery, health checks and the control API exist, the only errors it
//! may give are their "not supported yet" refusals; anything else means the shape drifted.

use agiproxy_config::{from_yaml_str, Balance, Mode, Rewrite, RouteTarget, ScriptMatch};

const CONTRACT: &str = include_str!("../examples/design-contract.yaml");

#[test]
fn the_contract_config_fails_only_on_what_is_not_supported_yet() {
    // DNS names, SRV names and health checks are supported: none of them is refused.
    let errs = match from_yaml_str(CONTRACT) {
        Ok(_) => agiproxy_config::ConfigErrors(Vec::new()),
        Err(errs) => errs,
    };
    let got: Vec<(&str, &str)> = errs
        .iter()
        .map(|e| (e.path.as_str(), e.message.as_str()))
        .collect();
    let expected: [(&str, &str); 0] = [];
    assert_eq!(got.len(), expected.len(), "{errs}");
    for ((path, message), (want_path, want_message)) in got.iter().zip(expected) {
        assert_eq!(*path, want_path, "{errs}");
        assert!(message.contains(want_message), "{errs}");
    }
}

#[test]
fn the_contract_config_without_unsupported_parts_compiles_as_written() {
    // Drop the DNS backend, the SRV backend, the health block and the control block.
    let mut text = String::new();
    let mut in_control = false;
    for line in CONTRACT.lines() {
        in_control = line.starts_with("control:") || (in_control && line.starts_with(' '));
        let unsupported = false;
        if !in_control && !unsupported {
            text.push_str(line);
            text.push('\n');
        }
    }
    assert_ne!(text.len(), CONTRACT.len());
    let c = match from_yaml_str(&text) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };

    assert_eq!(c.listeners[0].name, "asterisk");
    assert_eq!(c.limits.max_sessions, 20_000);
    let ivr = &c.routes[0];
    assert!(matches!(&ivr.matcher.script, Some(ScriptMatch::Prefix(p)) if p == "ivr/"));
    assert_eq!(ivr.matcher.query, [("lang".to_string(), "de".to_string())]);
    assert_eq!(ivr.matcher.args[0].0, 1);
    assert_eq!(ivr.matcher.vars[0].0, "agi_context");
    assert_eq!(ivr.matcher.source.len(), 2);
    assert!(matches!(ivr.target, RouteTarget::Pool(0)));
    assert!(matches!(&ivr.rewrite, Some(Rewrite::StripPrefix(p)) if p == "ivr/"));
    assert_eq!(ivr.set[0].0, "agi_x_route");
    assert_eq!(ivr.mode, Mode::Lines);
    // `hash_key` next to `balance: least_sessions` is accepted (and unused), as the contract writes it.
    assert_eq!(c.pools[0].balance, Balance::LeastSessions);
    assert_eq!(c.pools[0].backends[0].max_sessions, Some(500));
    // DNS discovery and health checks, as the contract writes them.
    use agiproxy_config::{BackendTarget, HealthKind};
    let targets: Vec<String> = c.pools[0]
        .backends
        .iter()
        .map(|b| b.target.to_string())
        .collect();
    assert_eq!(
        targets,
        [
            "10.1.0.5:4573",
            "ivr.backends.svc.cluster.local:4573",
            "srv _agi._tcp.ivr.backends.svc.cluster.local"
        ]
    );
    assert!(matches!(
        &c.pools[0].backends[1].target,
        BackendTarget::Host { name, port: 4573 } if name == "ivr.backends.svc.cluster.local"
    ));
    let h = c.pools[0].health.as_ref().expect("health block");
    assert!(matches!(&h.kind, HealthKind::Agi { script, expect: None } if script == "healthz"));
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(1),
            2,
            3
        )
    );
    assert!(matches!(c.routes[1].target, RouteTarget::Pool(1)));
    assert_eq!(
        ivr.describe(&c.pools),
        "ivr: script prefix \"ivr/\", query lang=de, args 1~^[0-9]+$, vars agi_context~^from-, \
         source 10.0.0.0/8 127.0.0.1/32 -> pool ivr (least_sessions, 1 backend, \
         dns ivr.backends.svc.cluster.local:4573, srv _agi._tcp.ivr.backends.svc.cluster.local, \
         health agi) \
         rewrite strip \"ivr/\" set agi_x_route=ivr mode lines"
    );
}
