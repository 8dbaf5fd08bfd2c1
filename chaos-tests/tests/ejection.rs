//! Issue 18: one backend hiccup must not fail a thousand calls. Passive
//! ejection never empties a pool on its own, so a transient failure costs
//! the calls it failed and no more; a pool that is really down still fails
//! fast (refused at once; black-holed within one connect, or at once with
//! health checks).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agiproxy::metrics::ConnectResult;
use chaos_tests::{blackholed_listener, refused_addr, AgiStatus, Behaviour, FakeBackend};
use common::*;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// A loopback front for one backend that the test can disturb: close the
/// next accepted connection at once (before the header is even read: a
/// close before the first command), or stop accepting for a while with its
/// accept queue full, so that SYNs are dropped and the proxy's connects
/// time out, as with an overloaded backend.
struct Gate {
    addr: SocketAddr,
    paused: Arc<AtomicBool>,
    close_next: Arc<AtomicUsize>,
    /// The test's own connections that fill the queue while paused.
    fillers: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn start(to: SocketAddr) -> Gate {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        sock.listen(16).unwrap();
        sock.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(std::net::TcpListener::from(sock)).unwrap();
        let addr = listener.local_addr().unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let close_next = Arc::new(AtomicUsize::new(0));
        let fillers = Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let (p, c, f) = (paused.clone(), close_next.clone(), fillers.clone());
        let task = tokio::spawn(async move {
            loop {
                if p.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                let Ok(Ok((mut front, peer))) =
                    tokio::time::timeout(Duration::from_millis(20), listener.accept()).await
                else {
                    continue;
                };
                let filler = f
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|s| s.local_addr().ok() == Some(peer));
                if filler {
                    continue;
                }
                let close = c
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if close {
                    drop(front);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut back) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut front, &mut back).await;
                    }
                });
            }
        });
        Gate {
            addr,
            paused,
            close_next,
            fillers,
            task,
        }
    }

    /// Stops accepting and fills the accept queue: from now on the
    /// backend's SYNs are dropped.
    fn stall(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let mut fillers = self.fillers.lock().unwrap();
        for _ in 0..64 {
            match std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(50)) {
                Ok(s) => fillers.push(s),
                Err(_) => return, // the queue is full
            }
        }
        panic!("the gate's accept queue never filled");
    }

    /// Accepts again (the fillers are dropped as they are accepted).
    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a batch of calls ended: AGISTATUS and AGIPROXY_ERROR, by count.
#[derive(Debug, Default)]
struct Tally {
    success: usize,
    /// The `AGIPROXY_ERROR` of each call told FAILURE (its status when it
    /// ended otherwise, short of hanging).
    failures: Vec<String>,
    /// Calls that got no answer within the caller's `call_timeout`: a real
    /// Asterisk would have waited for ever.
    hung: usize,
}

impl Tally {
    /// Every call ended (none hung); at most `max` failed, each with
    /// `reason`, and none because the pool was emptied (`no_backend`).
    fn assert_only_the_hiccup_failed(&self, total: usize, max: usize, reason: &str) {
        assert_eq!(self.hung, 0, "calls hung; failures: {:?}", self.failures);
        assert!(
            !self.failures.iter().any(|f| f == "no_backend"),
            "the pool was emptied by one hiccup: {:?}",
            self.failures
        );
        assert!(
            self.failures.iter().all(|f| f == reason),
            "a failure other than {reason}: {:?}",
            self.failures
        );
        assert!(
            self.failures.len() <= max,
            "{} failures: {:?}",
            self.failures.len(),
            self.failures
        );
        assert_eq!(self.success + self.failures.len(), total);
    }
}

/// `workers` concurrent callers place `total` calls; `disturb` runs once
/// `at` calls have finished.
async fn calls_with_one_hiccup(
    proxy: SocketAddr,
    workers: usize,
    total: usize,
    at: usize,
    disturb: impl std::future::Future<Output = ()> + Send + 'static,
) -> Tally {
    let done = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let done = done.clone();
        tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < at {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            disturb.await;
        })
    };
    let per = total / workers;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let done = done.clone();
            tokio::spawn(async move {
                let mut t = Tally::default();
                for i in 0..per {
                    let out = caller("ivr", &format!("1796505644.{}", w * per + i))
                        .run(proxy)
                        .await;
                    done.fetch_add(1, Ordering::Relaxed);
                    if out.status == AgiStatus::Success {
                        t.success += 1;
                    } else if out.status == AgiStatus::Hung {
                        t.hung += 1;
                    } else {
                        let why = out
                            .variables
                            .get("AGIPROXY_ERROR")
                            .cloned()
                            .unwrap_or_else(|| format!("{:?}", out.status));
                        t.failures.push(why);
                    }
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        all.success += t.success;
        all.failures.extend(t.failures);
        all.hung += t.hung;
    }
    watcher.await.unwrap();
    all
}

/// One early close of a fine backend, the only one of its pool, among 1,500
/// calls from 10 callers: the close fails its own call; nothing else. (The
/// old defaults ejected the backend for a second and failed every call of
/// that second with `no_backend`: 1,200 of 1,500 in the run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_early_close_fails_one_call_not_a_thousand() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let gate = Gate::start(b.addr()).await;
    let p = proxy(&one_pool("round_robin", &[gate.addr], "")).await;
    let close = gate.close_next.clone();
    let tally = calls_with_one_hiccup(p.addr, 10, 1500, 300, async move {
        close.store(1, Ordering::SeqCst);
    })
    .await;
    assert_eq!(
        gate.close_next.load(Ordering::SeqCst),
        0,
        "the close happened"
    );
    // The gate dropped the connection after the proxy had sent the header:
    // a close (or reset) before the first command.
    tally.assert_only_the_hiccup_failed(1500, 2, "backend_closed");
    // One failure in a row is not a pattern: the backend was never ejected
    // (with the old default of 1 it was, and each call that found it
    // ejected before another call's commit cleared it got `no_backend`).
    let state = &p.server.snapshot().pool("p").unwrap().snapshot_state()[0];
    assert_eq!(state.ejections, 0, "{state:?}");
}

/// The same with a connect that times out: the backend stops accepting for
/// a moment (its accept queue full, SYNs dropped), as an overloaded one
/// does, until a connect has timed out. Only the calls whose connect timed
/// out fail (one or two per caller while the queue was full), and none with
/// `no_backend` (the old defaults: 792 calls in one second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connect_timeout_fails_only_the_calls_it_held() {
    let b = FakeBackend::start(Behaviour::script(&["NOOP"])).await;
    let gate = Gate::start(b.addr()).await;
    let t = "timeouts:\n  connect: 150ms\n  budget: 1500ms\n";
    let p = proxy(&one_pool("round_robin", &[gate.addr], t)).await;
    let gate = Arc::new(gate);
    let g = gate.clone();
    let metrics = p.server.clone();
    let tally = calls_with_one_hiccup(p.addr, 10, 1500, 300, async move {
        tokio::task::block_in_place(|| g.stall());
        // Until a connect has timed out (150 ms), then accept again.
        let started = Instant::now();
        let timeouts = || {
            metrics
                .metrics()
                .connect_result(ConnectResult::Timeout)
                .get()
        };
        while timeouts() == 0 && started.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Checked before resuming, asserted after: a panic here must not
        // leave the gate stalled for the rest of the calls.
        let timed_out = timeouts();
        g.resume();
        assert!(
            timed_out > 0,
            "no connect timed out within 5 s of the stall"
        );
    })
    .await;
    assert!(
        !tally.failures.is_empty(),
        "the hiccup did not happen: no call failed"
    );
    // A connect timeout with the pool's only backend: `connect_failed`
    // (not `budget_exhausted`: 150 ms is far inside the budget).
    tally.assert_only_the_hiccup_failed(1500, 30, "connect_failed");
}

/// A pool that is really down still fails fast. Refused: each call at once.
#[tokio::test]
async fn a_refused_one_backend_pool_fails_each_call_at_once() {
    let p = proxy(&one_pool("round_robin", &[refused_addr()], "")).await;
    for i in 0..20 {
        let out = caller("x", &format!("1.{i}")).run(p.addr).await;
        assert_failure(&out, "connect_failed");
        assert!(
            out.elapsed < Duration::from_millis(100),
            "{:?}",
            out.elapsed
        );
    }
}

/// Black-holed without health checks: each call costs one `connect`, no
/// more (the budget would allow six).
#[tokio::test]
async fn a_blackholed_one_backend_pool_fails_within_one_connect() {
    let (_hole, addr) = blackholed_listener();
    let t = "timeouts:\n  connect: 200ms\n  budget: 1500ms\n";
    let p = proxy(&one_pool("round_robin", &[addr], t)).await;
    for i in 0..6 {
        let out = caller("x", &format!("1.{i}")).run(p.addr).await;
        assert_failure(&out, "connect_failed");
        assert!(
            out.elapsed >= Duration::from_millis(190) && out.elapsed < Duration::from_millis(600),
            "call {i}: {:?}",
            out.elapsed
        );
    }
}

/// Black-holed with active checks: once the checks condemn it, calls fail
/// at once, without a connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_one_backend_pool_with_checks_fails_at_once() {
    let (_hole, addr) = blackholed_listener();
    let body = format!(
        "routes:\n  - name: all\n    pool: p\npools:\n  - name: p\n    health: {{ type: agi, script: healthz, interval: 50ms, timeout: 50ms, jitter: 5ms, fall: 2 }}\n    backends:\n      - {{ address: \"{addr}\" }}\n"
    );
    let p = proxy(&body).await;
    let server = p.server.clone();
    wait_until("the checks mark it down", Duration::from_secs(5), || {
        server.snapshot().pool("p").unwrap().snapshot_state()[0].check_verdict == Some(false)
    })
    .await;
    for i in 0..20 {
        let out = caller("x", &format!("1.{i}")).run(p.addr).await;
        assert_failure(&out, "no_backend");
        assert!(
            out.elapsed < Duration::from_millis(100),
            "{:?}",
            out.elapsed
        );
    }
}
