//! The generator against the benchmark backend (and against FakeBackend's
//! faults), in process on loopback. Small counts: these run in CI.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::backend::{Backend, BackendConfig, BackendStats};
use super::client::{self, ClientConfig, HeaderTemplate, IdleConfig, RunLength, Window};
use super::stats::Recorder;
use crate::header::AgiHeader;
use crate::{refused_addr, Behaviour, FakeBackend};

/// A hang is a failure, not a stuck CI job.
async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("test exceeded its 10 s bound")
}

async fn backend(commands: usize, think: Duration) -> Backend {
    let cfg = BackendConfig {
        commands,
        think,
        ..BackendConfig::default()
    };
    Backend::start(&["127.0.0.1:0".parse().unwrap()], cfg)
        .await
        .expect("listen on loopback")
}

/// The backend counts a session when the client has closed it, a moment
/// after the client is done: wait for it.
async fn completed(stats: &BackendStats, n: u64) {
    while stats.snapshot().completed < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn sessions(cfg: ClientConfig, clients: usize, n: u64) -> Recorder {
    client::run_load(cfg, clients, RunLength::Sessions(n), &mut ())
        .await
        .rec
}

#[test]
fn the_header_is_realistic_and_only_its_uniqueid_changes() {
    let mut t = HeaderTemplate::new("bench/load", &["arg1", "arg2"]);
    assert_eq!(t.lines(), 24);
    let before = t.bytes().to_vec();
    t.set_uniqueid(4_200_000_017);
    assert_eq!(t.bytes().len(), before.len());
    let h = AgiHeader::parse(t.bytes()).expect("still a header");
    assert_eq!(h.get("agi_uniqueid"), Some("1700000000.00004200000017"));
    assert_eq!(h.get("agi_network_script"), Some("bench/load"));
    let differing = before.iter().zip(t.bytes()).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 4, "only the patched digits change");
}

#[tokio::test]
async fn counts_add_up_between_generator_and_backend() {
    bounded(async {
        let b = backend(5, Duration::ZERO).await;
        let mut cfg = ClientConfig::new(b.addrs().to_vec(), "bench/load");
        cfg.expect_commands = 5;
        let rec = sessions(cfg, 4, 40).await;
        assert_eq!(rec.errors.total(), 0, "{:?}", rec.errors);
        assert_eq!(rec.sessions, 40);
        assert_eq!(rec.commands, 200);
        // The first command of each session is its setup, the rest RTTs.
        assert_eq!(rec.setup.count(), 40);
        assert_eq!(rec.rtt.count(), 40 * 4);
        assert_eq!(rec.session.count(), 40);
        completed(b.stats(), 40).await;
        let s = b.stats().snapshot();
        assert_eq!(s.accepted, 40);
        assert_eq!((s.commands, s.replies), (200, 200));
        assert_eq!(s.hangups, 40, "one end-of-session HANGUP per session");
        assert_eq!(s.idle + s.short + s.io_errors + s.header_eof, 0, "{s:?}");
    })
    .await;
}

#[tokio::test]
async fn paced_clients_start_sessions_on_their_schedule() {
    bounded(async {
        let b = backend(2, Duration::ZERO).await;
        let mut cfg = ClientConfig::new(b.addrs().to_vec(), "bench/load");
        // 40 sessions/s over 2 clients: each starts one every 50 ms, the
        // second 25 ms after the first, so the 10th session starts 225 ms
        // in. Back to back these 10 take a few ms.
        cfg.session_interval = Some(Duration::from_millis(50));
        let t0 = std::time::Instant::now();
        let rec = sessions(cfg, 2, 10).await;
        let took = t0.elapsed();
        assert_eq!(rec.errors.total(), 0, "{:?}", rec.errors);
        assert_eq!(rec.sessions, 10);
        assert!(
            took >= Duration::from_millis(225),
            "10 paced sessions took {took:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_known_delay_lands_in_the_rtt_percentiles() {
    bounded(async {
        // The backend waits 30 ms before each command: every RTT (reply
        // written -> next command) and every setup includes it.
        let b = backend(3, Duration::from_millis(30)).await;
        let rec = sessions(ClientConfig::new(b.addrs().to_vec(), "bench/load"), 2, 4).await;
        assert_eq!(rec.errors.total(), 0, "{:?}", rec.errors);
        let rtt = rec.rtt.summary();
        assert_eq!(rtt.count, 8);
        assert!(rtt.p50 >= 30_000.0, "{rtt:?}");
        assert!(rtt.max < 30_000.0 + 500_000.0, "{rtt:?}");
        assert!(rec.setup.summary().p50 >= 30_000.0);

        // Without the delay the same percentile is far below it: the RTT
        // measures the round trip, not a fixed cost of the generator.
        let fast = backend(3, Duration::ZERO).await;
        let rec = sessions(ClientConfig::new(fast.addrs().to_vec(), "bench/load"), 2, 4).await;
        assert!(rec.rtt.summary().p50 < 30_000.0, "{:?}", rec.rtt.summary());
    })
    .await;
}

/// Reads the backend's finished-session count when the hold ends.
struct CompletedAtHoldEnd {
    stats: Arc<BackendStats>,
    seen: Option<u64>,
}

impl Window for CompletedAtHoldEnd {
    fn end(&mut self) {
        self.seen = Some(self.stats.snapshot().completed);
    }
}

#[tokio::test]
async fn idle_mode_holds_every_session_then_releases_them_cleanly() {
    bounded(async {
        let b = backend(10, Duration::ZERO).await;
        let cfg = ClientConfig::new(b.addrs().to_vec(), "bench/idle");
        let idle = IdleConfig {
            sessions: 60,
            hold: Duration::from_millis(200),
            connect_concurrency: 16,
        };
        let mut window = CompletedAtHoldEnd {
            stats: Arc::clone(b.stats()),
            seen: None,
        };
        let mut at_established = None;
        let out = client::run_idle(cfg, idle, &mut window, |p| at_established = Some(*p)).await;

        let p = at_established.expect("reported when established");
        assert_eq!((p.established, p.failed), (60, 0));
        assert_eq!(out.established, 60);
        // All 60 were open at once: none had finished when the hold ended.
        assert_eq!(window.seen, Some(0));
        assert_eq!(out.rec.errors.total(), 0, "{:?}", out.rec.errors);
        assert_eq!(out.rec.sessions, 60);
        assert_eq!(out.rec.commands, 60, "one long command each");
        assert!(
            out.rec.session.summary().p50 >= 200_000.0,
            "held for the hold"
        );
        completed(b.stats(), 60).await;
        let s = b.stats().snapshot();
        assert_eq!((s.idle, s.replies, s.hangups), (60, 60, 60));
    })
    .await;
}

#[tokio::test]
async fn errors_are_classified_by_kind() {
    bounded(async {
        let refused = ClientConfig::new(vec![refused_addr()], "bench/load");
        let rec = sessions(refused, 1, 3).await;
        assert_eq!(rec.errors.connect_refused, 3, "{:?}", rec.errors);
        assert_eq!((rec.errors.total(), rec.sessions), (3, 0));

        async fn against(behaviour: Behaviour, expect: usize, timeout: Duration) -> Recorder {
            let fake = FakeBackend::start(behaviour).await;
            let mut cfg = ClientConfig::new(vec![fake.addr()], "bench/load");
            cfg.expect_commands = expect;
            cfg.session_timeout = timeout;
            sessions(cfg, 1, 2).await
        }
        let long = Duration::from_secs(5);
        let failure = against(Behaviour::Garbage(b"failure\n".to_vec()), 0, long).await;
        assert_eq!(failure.errors.failure, 2, "{:?}", failure.errors);
        let short = against(Behaviour::CloseAfterHeader, 3, long).await;
        assert_eq!(short.errors.short_session, 2, "{:?}", short.errors);
        let reset = against(Behaviour::ResetAfterHeader, 0, long).await;
        assert_eq!(reset.errors.reset, 2, "{:?}", reset.errors);
        let piped = against(
            Behaviour::Pipelined(vec!["NOOP".into(), "NOOP".into()]),
            0,
            long,
        )
        .await;
        assert_eq!(piped.errors.protocol, 2, "{:?}", piped.errors);
        let stalled = against(Behaviour::StallAfterHeader, 0, Duration::from_millis(150)).await;
        assert_eq!(stalled.errors.timeout, 2, "{:?}", stalled.errors);
        for r in [&failure, &short, &reset, &piped, &stalled] {
            assert_eq!(
                r.errors.total(),
                2,
                "one kind per failed session: {:?}",
                r.errors
            );
            assert_eq!(r.sessions, 0);
        }
    })
    .await;
}

#[tokio::test]
async fn wait_ready_gives_up_on_a_dead_target_and_passes_a_live_one() {
    bounded(async {
        let dead = ClientConfig::new(vec![refused_addr()], "bench/load");
        let r = client::wait_ready(dead, Duration::from_millis(120)).await;
        assert_eq!(r, Err(super::stats::ErrorKind::ConnectRefused));
        let b = backend(2, Duration::ZERO).await;
        let live = ClientConfig::new(b.addrs().to_vec(), "bench/load");
        assert_eq!(
            client::wait_ready(live, Duration::from_secs(2)).await,
            Ok(())
        );
    })
    .await;
}
