//! How the control API serves its plane: the views that walk the whole
//! config are built off the runtime's threads, and the request bodies held
//! at once stay within a budget (audit: 60 dry-run `PUT /v1/config` of
//! 4 MiB drove a replica to 937 MB).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use agiproxy_control::api::{
    Applied, BackendView, ConfigView, PoolView, RolloutTick, RolloutView, SplitWeight, Status,
};
use agiproxy_control::{ControlError, ControlPlane};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use tower::ServiceExt;

const MIB: usize = 1 << 20;

/// A plane that notes where its views are built and how many bytes of
/// config texts it holds at once.
#[derive(Default)]
struct Plane {
    /// The threads the views were built on.
    built_on: Mutex<Vec<ThreadId>>,
    /// Bytes of texts inside `apply_config` now, and at most.
    held: AtomicUsize,
    most: AtomicUsize,
    /// `apply_config` keeps its text until this many bytes are held,
    /// `hold` has passed or `go` is set, whichever comes first.
    until: usize,
    hold: Duration,
    go: AtomicBool,
    /// Status calls being built now, at most, and how long each takes.
    building: AtomicUsize,
    most_building: AtomicUsize,
    status_takes: Duration,
}

impl Plane {
    fn built_here(&self) {
        self.built_on
            .lock()
            .unwrap()
            .push(std::thread::current().id());
    }
}

impl ControlPlane for Plane {
    fn status(&self) -> Status {
        self.built_here();
        let now = self.building.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_building.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(self.status_takes);
        self.building.fetch_sub(1, Ordering::SeqCst);
        Status {
            version: "test".into(),
            uptime_seconds: 1.0,
            generation: 1,
            hash: "0".into(),
            source: "api".into(),
            differs_from_file: false,
            listeners: vec![],
            active_sessions: 0,
            draining: false,
            rollouts_differ: Vec::new(),
        }
    }
    fn ready(&self) -> bool {
        true
    }
    fn metrics_text(&self) -> String {
        String::new()
    }
    fn config(&self) -> ConfigView {
        unimplemented!()
    }
    async fn apply_config(
        &self,
        text: String,
        dry_run: bool,
        _: Option<u64>,
    ) -> Result<Applied, ControlError> {
        let now = self.held.fetch_add(text.len(), Ordering::SeqCst) + text.len();
        self.most.fetch_max(now, Ordering::SeqCst);
        let deadline = Instant::now() + self.hold;
        while self.held.load(Ordering::SeqCst) < self.until
            && !self.go.load(Ordering::SeqCst)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.held.fetch_sub(text.len(), Ordering::SeqCst);
        Ok(Applied {
            generation: 1,
            hash: "0".into(),
            dry_run,
            changed: false,
            reason: None,
            dropped_overrides: Vec::new(),
        })
    }
    async fn reload_file(&self) -> Result<Applied, ControlError> {
        unimplemented!()
    }
    fn pools(&self) -> Vec<PoolView> {
        Vec::new()
    }
    fn set_backend_draining(&self, _: &str, _: &str, _: bool) -> Result<BackendView, ControlError> {
        unimplemented!()
    }
    async fn set_split(
        &self,
        _: &str,
        _: Vec<SplitWeight>,
        _: Option<u64>,
    ) -> Result<Applied, ControlError> {
        unimplemented!()
    }
    fn rollouts(&self) -> Vec<RolloutView> {
        self.built_here();
        Vec::new()
    }
    fn rollout(&self, _: &str) -> Option<RolloutView> {
        self.built_here();
        None
    }
    fn rollout_routes(&self) -> Vec<String> {
        Vec::new()
    }
    fn rollout_tick(&self, _: &str, _: i64) -> Result<RolloutTick, ControlError> {
        unimplemented!()
    }
    async fn rollout_override(
        &self,
        _: &str,
        _: &str,
        _: agiproxy_control::api::RolloutOverrideRequest,
    ) -> Result<Applied, ControlError> {
        unimplemented!()
    }
    fn drain(&self) {}
    fn observe_request(&self, _: &str, _: u16) {}
    fn config_bytes_limit(&self) -> Option<usize> {
        Some(MIB)
    }
}

fn put_config(body: Vec<u8>) -> Request<Body> {
    Request::builder()
        .method(Method::PUT)
        .uri("/v1/config?dry_run=true")
        .header(header::AUTHORIZATION, "Bearer secret")
        .body(Body::from(body))
        .unwrap()
}

/// Status and the rollout views are built on a blocking thread, not on the
/// runtime's (audit: with 500 rollouts, status in a loop took a
/// `--workers 1` proxy's calls from 0.9 ms to 74 ms).
#[tokio::test(flavor = "current_thread")]
async fn status_and_rollout_views_are_built_off_the_runtime_threads() {
    let plane = Arc::new(Plane::default());
    let app = agiproxy_control::server::router(
        plane.clone(),
        Some("secret".into()),
        MIB,
        Duration::from_secs(30),
    );
    for path in ["/v1/status", "/v1/rollouts", "/v1/rollouts/ivr"] {
        let req = Request::get(path)
            .header(header::AUTHORIZATION, "Bearer secret")
            .body(Body::empty())
            .unwrap();
        let status = app.clone().oneshot(req).await.unwrap().status();
        assert!(status == StatusCode::OK || status == StatusCode::NOT_FOUND);
    }
    let built = plane.built_on.lock().unwrap().clone();
    assert_eq!(built.len(), 3, "status, the rollouts, one rollout");
    let here = std::thread::current().id();
    assert!(
        built.iter().all(|t| *t != here),
        "a view was built on the runtime's thread"
    );
}

/// Views built on blocking threads are at most two at a time: a flood of
/// the open `/v1/status` (whose cut requests leave their work running)
/// cannot pile up CPU-bound threads against the runtime's (review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_are_built_two_at_a_time() {
    let plane = Arc::new(Plane {
        status_takes: Duration::from_millis(100),
        ..Plane::default()
    });
    let app = agiproxy_control::server::router(plane.clone(), None, MIB, Duration::from_secs(30));
    let asks: Vec<_> = (0..8)
        .map(|_| {
            let req = Request::get("/v1/status").body(Body::empty()).unwrap();
            tokio::spawn(app.clone().oneshot(req))
        })
        .collect();
    for a in asks {
        assert_eq!(a.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(plane.built_on.lock().unwrap().len(), 8);
    let most = plane.most_building.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "{most} views built at once");
}

/// Concurrent config bodies wait for their share of the budget (three
/// times `limits.max_config_bytes`) before they are read: no more than
/// that is ever held, and every request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_config_bodies_are_held_within_the_budget() {
    let plane = Arc::new(Plane {
        // Each keeps its text until a fourth is held (never, within the
        // budget), or for 300 ms.
        until: 3 * MIB + 1,
        hold: Duration::from_millis(300),
        ..Plane::default()
    });
    let app = agiproxy_control::server::router(
        plane.clone(),
        Some("secret".into()),
        MIB,
        Duration::from_secs(60),
    );
    let puts: Vec<_> = (0..8)
        .map(|_| tokio::spawn(app.clone().oneshot(put_config(vec![b'#'; MIB]))))
        .collect();
    for p in puts {
        assert_eq!(p.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let most = plane.most.load(Ordering::SeqCst);
    assert!(most <= 3 * MIB, "{most} bytes of bodies held at once");
    assert_eq!(plane.held.load(Ordering::SeqCst), 0);
}

/// A body that finds the budget spent for half the request timeout is
/// answered 503 with `Retry-After`, unread; the others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_budget_is_answered_503_with_retry_after() {
    let plane = Arc::new(Plane {
        // Kept until a fourth comes in, or for 20 s: the test lets them go
        // once the fourth has its answer.
        until: 4 * MIB,
        hold: Duration::from_secs(20),
        ..Plane::default()
    });
    let app = agiproxy_control::server::router(
        plane.clone(),
        Some("secret".into()),
        MIB,
        Duration::from_secs(4),
    );
    let first: Vec<_> = (0..3)
        .map(|_| tokio::spawn(app.clone().oneshot(put_config(vec![b'#'; MIB]))))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while plane.held.load(Ordering::SeqCst) < 3 * MIB {
        assert!(Instant::now() < deadline, "the first three were not taken");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fourth = app
        .clone()
        .oneshot(put_config(vec![b'#'; MIB]))
        .await
        .unwrap();
    let status = fourth.status();
    let retry = fourth.headers().get(header::RETRY_AFTER).cloned();
    // Let the first three go (a fourth held would have done it already).
    plane.go.store(true, Ordering::SeqCst);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry.unwrap(), "1");
    assert!(plane.most.load(Ordering::SeqCst) <= 3 * MIB);
    for p in first {
        assert_eq!(p.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}
