//! How the control API serves its plane: the views that walk the whole
//! config are built off the runtime's threads.

use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use agiproxy_control::api::{
    Applied, BackendView, ConfigView, PoolView, RolloutTick, RolloutView, SplitWeight, Status,
};
use agiproxy_control::{ControlError, ControlPlane};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use tower::ServiceExt;

const MIB: usize = 1 << 20;

/// A plane that notes where its views are built.
#[derive(Default)]
struct Plane {
    /// The threads the views were built on.
    built_on: Mutex<Vec<ThreadId>>,
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
        _: String,
        _: bool,
        _: Option<u64>,
    ) -> Result<Applied, ControlError> {
        unimplemented!()
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
        _: Option<String>,
    ) -> Result<Applied, ControlError> {
        unimplemented!()
    }
    fn drain(&self) {}
    fn observe_request(&self, _: &str, _: u16) {}
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
