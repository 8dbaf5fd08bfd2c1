//! The proxy's side of the control API: `ControlPlane` over a `Server`.

use std::sync::Arc;

use agiproxy_control::api::{
    Applied, BackendView, ConfigView, FieldError, ListenerView, PoolView, SplitWeight, Status,
};
use agiproxy_control::{ControlError, ControlPlane};
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts};

use crate::balancer::{now_ms, Backend, PoolState};
use crate::server::{ApplyError, Server};
use crate::snapshot::Snapshot;

/// What the control API drives.
pub struct ControlHandle {
    server: Server,
}

impl ControlHandle {
    pub fn new(server: Server) -> Arc<ControlHandle> {
        Arc::new(ControlHandle { server })
    }
}

fn applied(a: crate::server::Applied) -> Applied {
    Applied {
        generation: a.generation,
        hash: format!("{:016x}", a.hash),
        dry_run: a.dry_run,
        changed: a.changed,
    }
}

fn control_error(e: ApplyError) -> ControlError {
    match e {
        ApplyError::Invalid(errors) => ControlError::Invalid(
            errors
                .0
                .into_iter()
                .map(|e| FieldError {
                    path: e.path,
                    message: e.message,
                })
                .collect(),
        ),
        ApplyError::Stale { current, .. } => ControlError::Stale { current },
        ApplyError::Bind(e) => ControlError::Conflict(e.to_string()),
        e @ (ApplyError::NoFile(_) | ApplyError::Read { .. }) => {
            ControlError::Unavailable(e.to_string())
        }
    }
}

/// A backend's state for humans and dashboards.
fn state_of(b: &Backend) -> &'static str {
    if b.live.is_draining() {
        "draining"
    } else if b.live.is_ejected(now_ms()) {
        "ejected"
    } else {
        "healthy"
    }
}

fn backend_view(b: &Backend) -> BackendView {
    use std::sync::atomic::Ordering::Relaxed;
    BackendView {
        address: b.addr.to_string(),
        state: state_of(b).to_string(),
        weight: b.weight,
        max_sessions: b.max_sessions,
        active_sessions: u64::from(b.live.active.load(Relaxed)),
        total_sessions: b.live.total.load(Relaxed),
        consecutive_failures: u64::from(b.live.consecutive_failures.load(Relaxed)),
        ejections: b.live.ejections.load(Relaxed),
        draining: b.live.is_draining(),
        last_check: None,
    }
}

fn pool_view(p: &PoolState) -> PoolView {
    PoolView {
        name: p.name.clone(),
        balance: p.balance.to_string(),
        active_sessions: u64::from(p.live.active.load(std::sync::atomic::Ordering::Relaxed)),
        backends: p.members().backends.iter().map(backend_view).collect(),
    }
}

/// Gauges read from live state at scrape time.
fn live_families(snap: &Snapshot) -> Vec<MetricFamily> {
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        IntGaugeVec::new(Opts::new(name, help).namespace("agiproxy"), labels).expect("valid metric")
    };
    let active = gauge(
        "backend_active_sessions",
        "Sessions holding each backend",
        &["pool", "backend"],
    );
    let state = gauge(
        "backend_state",
        "1 for each backend's current state (healthy, ejected, draining, ...)",
        &["pool", "backend", "state"],
    );
    let failures = gauge(
        "backend_consecutive_failures",
        "Consecutive failures of each backend",
        &["pool", "backend"],
    );
    let ejections = gauge(
        "backend_ejections",
        "Times each backend was ejected (since it was first configured)",
        &["pool", "backend"],
    );
    let pool_active = gauge("pool_active_sessions", "Sessions in each pool", &["pool"]);
    use std::sync::atomic::Ordering::Relaxed;
    for p in &snap.pools {
        pool_active
            .with_label_values(&[&p.name])
            .set(i64::from(p.live.active.load(Relaxed)));
        for b in &p.members().backends {
            let addr = b.addr.to_string();
            let labels = [p.name.as_str(), addr.as_str()];
            active
                .with_label_values(&labels)
                .set(i64::from(b.live.active.load(Relaxed)));
            state
                .with_label_values(&[&p.name, &addr, state_of(b)])
                .set(1);
            failures
                .with_label_values(&labels)
                .set(i64::from(b.live.consecutive_failures.load(Relaxed)));
            ejections
                .with_label_values(&labels)
                .set(b.live.ejections.load(Relaxed) as i64);
        }
    }
    use prometheus::core::Collector;
    [active, state, failures, ejections, pool_active]
        .iter()
        .flat_map(|g| g.collect())
        .collect()
}

/// Sets a route's `split:` in a config text (the route's `pool:` goes).
fn with_split(text: &str, route: &str, split: &[SplitWeight]) -> Result<String, ControlError> {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        ControlError::Unavailable(format!("the running config text cannot be edited: {e}"))
    })?;
    let routes = doc
        .get_mut("routes")
        .and_then(|r| r.as_sequence_mut())
        .ok_or_else(|| {
            ControlError::NotFound(format!("no route {route:?}: the config has no routes"))
        })?;
    let entry = routes
        .iter_mut()
        .filter_map(|r| r.as_mapping_mut())
        .find(|m| m.get("name").and_then(|n| n.as_str()) == Some(route))
        .ok_or_else(|| ControlError::NotFound(format!("no route {route:?}")))?;
    entry.remove("pool");
    let list = split
        .iter()
        .map(|w| {
            let mut m = serde_yaml::Mapping::new();
            m.insert("pool".into(), w.pool.clone().into());
            m.insert("weight".into(), u64::from(w.weight).into());
            serde_yaml::Value::Mapping(m)
        })
        .collect();
    entry.insert("split".into(), serde_yaml::Value::Sequence(list));
    serde_yaml::to_string(&doc).map_err(|e| ControlError::Unavailable(e.to_string()))
}

impl ControlPlane for ControlHandle {
    fn status(&self) -> Status {
        let snap = self.server.snapshot();
        let addrs = self.server.local_addrs();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.server.uptime().as_secs_f64(),
            generation: snap.meta.generation,
            hash: snap.meta.hash_hex(),
            source: snap.meta.source.to_string(),
            differs_from_file: self.server.differs_from_file(),
            listeners: snap
                .config
                .listeners
                .iter()
                .zip(addrs)
                .map(|(l, a)| ListenerView {
                    name: l.name.clone(),
                    address: a.to_string(),
                })
                .collect(),
            active_sessions: self.server.active_sessions() as u64,
            draining: self.server.is_draining(),
        }
    }

    fn ready(&self) -> bool {
        !self.server.is_draining()
    }

    fn metrics_text(&self) -> String {
        self.server
            .metrics()
            .render_with(live_families(&self.server.snapshot()))
    }

    fn config(&self) -> ConfigView {
        let snap = self.server.snapshot();
        ConfigView {
            generation: snap.meta.generation,
            hash: snap.meta.hash_hex(),
            source: snap.meta.source.to_string(),
            text: snap.meta.text.to_string(),
        }
    }

    async fn apply_config(
        &self,
        text: String,
        dry_run: bool,
        if_match: Option<u64>,
    ) -> Result<Applied, ControlError> {
        self.server
            .apply(&text, "api", dry_run, if_match)
            .await
            .map(applied)
            .map_err(control_error)
    }

    async fn reload_file(&self) -> Result<Applied, ControlError> {
        self.server
            .reload_file()
            .await
            .map(applied)
            .map_err(control_error)
    }

    fn pools(&self) -> Vec<PoolView> {
        self.server.snapshot().pools.iter().map(pool_view).collect()
    }

    fn set_backend_draining(
        &self,
        pool: &str,
        backend: &str,
        draining: bool,
    ) -> Result<BackendView, ControlError> {
        let snap = self.server.snapshot();
        let p = snap
            .pool(pool)
            .ok_or_else(|| ControlError::NotFound(format!("no pool {pool:?}")))?;
        let members = p.members();
        let b = members
            .backends
            .iter()
            .find(|b| b.addr.to_string() == backend)
            .ok_or_else(|| {
                ControlError::NotFound(format!(
                    "no backend {backend:?} in pool {pool:?} (write it as ip:port)"
                ))
            })?;
        b.live.set_draining(draining);
        tracing::info!(
            pool,
            backend,
            draining,
            "backend drain changed through the control API"
        );
        Ok(backend_view(b))
    }

    async fn set_split(
        &self,
        route: &str,
        split: Vec<SplitWeight>,
        if_match: Option<u64>,
    ) -> Result<Applied, ControlError> {
        let text = with_split(&self.server.snapshot().meta.text, route, &split)?;
        self.server
            .apply(&text, "api", false, if_match)
            .await
            .map(applied)
            .map_err(control_error)
    }

    fn drain(&self) {
        tracing::info!("drain requested through the control API");
        self.server.stop_accepting();
    }

    fn observe_request(&self, endpoint: &str, status: u16) {
        self.server
            .metrics()
            .control_requests
            .with_label_values(&[endpoint, &status.to_string()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_replaces_the_pool_of_one_route() {
        let text = "version: 1\nroutes:\n  - name: a\n    pool: blue\n  - name: b\n    pool: blue\npools:\n  - name: blue\n    backends: [{ address: \"127.0.0.1:1\" }]\n  - name: green\n    backends: [{ address: \"127.0.0.1:2\" }]\n";
        let split = [
            SplitWeight {
                pool: "blue".into(),
                weight: 90,
            },
            SplitWeight {
                pool: "green".into(),
                weight: 10,
            },
        ];
        let out = with_split(text, "b", &split).unwrap();
        let c = agiproxy_config::from_yaml_str(&out).unwrap();
        assert!(matches!(
            c.routes[0].target,
            agiproxy_config::RouteTarget::Pool(0)
        ));
        match &c.routes[1].target {
            agiproxy_config::RouteTarget::Split(t) => {
                assert_eq!(
                    (t[0].pool, t[0].weight, t[1].pool, t[1].weight),
                    (0, 90, 1, 10)
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            with_split(text, "c", &split),
            Err(ControlError::NotFound(_))
        ));
    }
}
