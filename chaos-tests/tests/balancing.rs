//! Retry before commit and balancing under concurrency.

mod common;

use std::time::Duration;

use chaos_tests::{refused_addr, AgiStatus, Behaviour, FakeBackend, Reply};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_before_commit_reaches_the_live_backend() {
    let live = FakeBackend::start(Behaviour::script(&["NOOP", "NOOP"])).await;
    let dead = refused_addr();
    // A tiny passive backoff keeps the dead backend in rotation, so many
    // sessions really try it first and must be retried.
    let body = format!(
        "routes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    balance: round_robin\n    passive: {{ backoff: 1ms, max_backoff: 1ms }}\n    backends:\n      - {{ address: \"{dead}\" }}\n      - {{ address: \"{}\" }}\n",
        live.addr()
    );
    let p = proxy(&body).await;
    let mut rx = p.server.subscribe();
    let mut retried = 0;
    for wave in 0..10 {
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let addr = p.addr;
                tokio::spawn(async move { caller("x", &format!("{wave}.{i}")).run(addr).await })
            })
            .collect();
        for c in calls {
            let out = c.await.unwrap();
            assert_eq!(out.status, AgiStatus::Success, "{out:?}");
            assert_eq!(out.commands, vec!["NOOP", "NOOP"]);
        }
        for _ in 0..20 {
            let rec = next_record(&mut rx).await;
            assert_eq!(rec.backend, Some(live.addr()));
            if rec.attempts == 2 {
                retried += 1;
            }
        }
    }
    assert!(
        live.stats()
            .wait_completed(200, Duration::from_secs(5))
            .await
    );
    assert_eq!(live.stats().accepted(), 200);
    assert!(
        retried >= 20,
        "only {retried} sessions were retried: the dead backend was never tried first"
    );
    let m = p.server.metrics().render();
    assert!(
        m.contains(&format!(
            "agiproxy_sessions_total{{backend=\"{}\",outcome=\"completed\",pool=\"p\",route=\"all\"}} 200",
            live.addr()
        )),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_sessions_spreads_concurrent_sessions_evenly() {
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(FakeBackend::start(Behaviour::script(&["EXEC Wait 1"])).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr()).collect();
    let p = proxy(&one_pool("least_sessions", &addrs, "")).await;
    // 1,000 calls at once, each holding its backend for 1.5 s.
    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let addr = p.addr;
            tokio::spawn(async move {
                caller("x", &format!("1.{i}"))
                    .reply_with(|_| Reply::ok().after(Duration::from_millis(1500)))
                    .run(addr)
                    .await
            })
        })
        .collect();
    for c in calls {
        let out = c.await.unwrap();
        assert_eq!(out.status, AgiStatus::Success, "{out:?}");
    }
    let counts: Vec<u64> = backends.iter().map(|b| b.stats().accepted()).collect();
    assert_eq!(counts.iter().sum::<u64>(), 1000);
    for c in &counts {
        assert!((238..=262).contains(c), "not within 5% of even: {counts:?}");
    }
}
