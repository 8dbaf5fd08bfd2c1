mod common;

use chaos_tests::{AgiStatus, Behaviour, FakeBackend, Then};
use common::*;

#[tokio::test]
async fn a_call_passes_through() {
    let b = FakeBackend::start(Behaviour::Script {
        commands: vec![
            "VERBOSE \"hi\" 1".into(),
            "SET VARIABLE X y".into(),
            "NOOP".into(),
        ],
        then: Then::Close,
    })
    .await;
    let p = proxy(&one_pool("least_sessions", &[b.addr()], "")).await;
    let mut rx = p.server.subscribe();
    let out = caller("ivr/main", "1.1").run(p.addr).await;
    assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    assert_eq!(
        out.commands,
        vec!["VERBOSE \"hi\" 1", "SET VARIABLE X y", "NOOP"]
    );
    assert!(out.violations.is_empty(), "{:?}", out.violations);
    let rec = next_record(&mut rx).await;
    assert_eq!(rec.route.as_deref(), Some("all"));
    assert_eq!(rec.backend, Some(b.addr()));
    assert_eq!(rec.commands, 3);
}
