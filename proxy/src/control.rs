//! The proxy's side of the control API: `ControlPlane` over a `Server`.

use std::sync::Arc;

use agiproxy_control::api::{
    Applied, BackendView, CheckView, ConfigView, DiscoveryView, FieldError, ListenerView, PoolView,
    RolloutTick, RolloutView, SplitWeight, Status,
};
use agiproxy_control::{ControlError, ControlPlane};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts};

use crate::pool::{BackendStatus, PoolState};
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
        reason: None,
        dropped_overrides: a
            .dropped
            .iter()
            .map(|c| format!("route {}: {}", c.route, c.entry()))
            .collect(),
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
        ApplyError::Stale { current, expected } => ControlError::Stale {
            current,
            if_match: expected.is_some(),
        },
        ApplyError::Bind(e) => ControlError::Conflict(e.to_string()),
        ApplyError::Conflict(m) => ControlError::Conflict(m),
        ApplyError::NotFound(m) => ControlError::NotFound(m),
        e @ (ApplyError::NoFile(_)
        | ApplyError::File(_)
        | ApplyError::Uneditable(_)
        | ApplyError::Internal(_)) => ControlError::Unavailable(e.to_string()),
    }
}

fn backend_view(b: &BackendStatus) -> BackendView {
    BackendView {
        address: b.address.to_string(),
        source: b.source.clone(),
        state: b.state.as_str().to_string(),
        weight: b.weight,
        max_sessions: b.max_sessions,
        active_sessions: u64::from(b.active_sessions),
        total_sessions: b.total_sessions,
        consecutive_failures: u64::from(b.consecutive_failures),
        ejections: b.ejections,
        draining: b.draining,
        ejected_for_seconds: b.ejected_for.map(|d| d.as_secs_f64()),
        slow_start_share: b.slow_start_share,
        last_check: b.last_check.as_ref().map(|c| CheckView {
            ok: c.ok,
            latency_ms: c.latency.as_secs_f64() * 1000.0,
            detail: c.detail.clone(),
        }),
    }
}

fn pool_view(p: &PoolState) -> PoolView {
    let st = p.status();
    PoolView {
        name: st.name,
        balance: st.balance,
        active_sessions: u64::from(st.active_sessions),
        panic: st.panic,
        backends: st.backends.iter().map(backend_view).collect(),
        discovery: st
            .discovery
            .into_iter()
            .map(|d| DiscoveryView {
                target: d.target,
                addresses: d.addresses.iter().map(ToString::to_string).collect(),
                ttl_seconds: d.ttl.as_secs_f64(),
                lookups: d.lookups,
                failures: d.failures,
                failures_in_a_row: d.failing,
                last_error: d.last_error,
            })
            .collect(),
    }
}

/// Gauges and counters read from live state at scrape time: nothing on the
/// session path updates them.
fn live_families(snap: &Snapshot) -> Vec<MetricFamily> {
    let int = |name: &str, help: &str, labels: &[&str]| {
        IntGaugeVec::new(Opts::new(name, help).namespace("agiproxy"), labels).expect("valid metric")
    };
    // Running totals, typed as counters so that `rate()`/`increase()` on
    // them are what linters and dashboards expect (they were gauges; the
    // names stay, without `_total`, for the dashboards and alerts that use
    // them). Built afresh at each scrape, from 0 to the total.
    let total = |name: &str, help: &str, labels: &[&str]| {
        IntCounterVec::new(Opts::new(name, help).namespace("agiproxy"), labels)
            .expect("valid metric")
    };
    let pb = &["pool", "backend"][..];
    let active = int(
        "backend_active_sessions",
        "Sessions holding each backend",
        pb,
    );
    let state = int(
        "backend_state",
        "1 for each backend's current state: healthy, slow_start, ejected, unhealthy, draining",
        &["pool", "backend", "state"],
    );
    let failures = int(
        "backend_consecutive_failures",
        "Passive failures in a row",
        pb,
    );
    let ejections = total(
        "backend_ejections",
        "Passive ejections since the backend was first configured",
        pb,
    );
    let checks = total(
        "backend_checks",
        "Active health checks run against each backend",
        pb,
    );
    let checks_not_run = total(
        "backend_checks_not_run",
        "Active health checks that could not run for the proxy's own want of descriptors or memory (no verdict on the backend)",
        pb,
    );
    let check_up = int(
        "backend_check_up",
        "1 if the last active check passed, 0 if it failed",
        pb,
    );
    let check_latency = GaugeVec::new(
        Opts::new(
            "backend_check_latency_seconds",
            "Duration of the last active check",
        )
        .namespace("agiproxy"),
        pb,
    )
    .expect("valid metric");
    let pool_active = int("pool_active_sessions", "Sessions in each pool", &["pool"]);
    let panic = int(
        "pool_panic",
        "1 when more backends are ejected than max_ejection_percent allows (some kept in rotation)",
        &["pool"],
    );
    let dns_lookups = total(
        "dns_lookups",
        "DNS lookups of each name a pool follows",
        &["pool", "name"],
    );
    let dns_failures = total(
        "dns_lookup_failures",
        "Failed or empty DNS lookups (the last good set was kept)",
        &["pool", "name"],
    );
    let dns_addresses = int(
        "dns_addresses",
        "Addresses in the last good DNS answer",
        &["pool", "name"],
    );
    // Replicas that converged export the same hash.
    let config_info = int(
        "config_info",
        "Always 1; the running config's content hash in a label",
        &["hash"],
    );
    config_info
        .with_label_values(&[&snap.meta.hash_hex()])
        .set(1);
    for p in &snap.pools {
        let st = p.status();
        pool_active
            .with_label_values(&[&st.name])
            .set(i64::from(st.active_sessions));
        panic
            .with_label_values(&[&st.name])
            .set(i64::from(st.panic));
        for b in &st.backends {
            let addr = b.address.to_string();
            let l = [st.name.as_str(), addr.as_str()];
            active
                .with_label_values(&l)
                .set(i64::from(b.active_sessions));
            state
                .with_label_values(&[&st.name, &addr, b.state.as_str()])
                .set(1);
            failures
                .with_label_values(&l)
                .set(i64::from(b.consecutive_failures));
            ejections.with_label_values(&l).inc_by(b.ejections);
            if b.checks > 0 {
                checks.with_label_values(&l).inc_by(b.checks);
            }
            if b.checks_not_run > 0 {
                checks_not_run
                    .with_label_values(&l)
                    .inc_by(b.checks_not_run);
            }
            if let Some(c) = &b.last_check {
                check_up.with_label_values(&l).set(i64::from(c.ok));
                check_latency
                    .with_label_values(&l)
                    .set(c.latency.as_secs_f64());
            }
        }
        for d in &st.discovery {
            let l = [st.name.as_str(), d.target.as_str()];
            dns_lookups.with_label_values(&l).inc_by(d.lookups);
            dns_failures.with_label_values(&l).inc_by(d.failures);
            dns_addresses
                .with_label_values(&l)
                .set(d.addresses.len() as i64);
        }
    }
    use prometheus::core::Collector;
    let mut out: Vec<MetricFamily> = [
        active,
        state,
        failures,
        check_up,
        pool_active,
        panic,
        dns_addresses,
        config_info,
    ]
    .iter()
    .flat_map(|g| g.collect())
    .collect();
    for c in [ejections, checks, checks_not_run, dns_lookups, dns_failures] {
        out.extend(c.collect());
    }
    out.extend(check_latency.collect());
    let panics = prometheus::IntCounter::with_opts(
        Opts::new(
            "panics_total",
            "Panics (bugs) caught: each ended a call or failed a health check; the process went on",
        )
        .namespace("agiproxy"),
    )
    .expect("valid metric");
    panics.inc_by(crate::logging::panics());
    out.extend(panics.collect());
    out.extend(crate::rollout::view::metric_families(snap));
    out
}

/// Sets a route's `split:` in a config text (the route's `pool:` goes).
fn with_split(text: &str, route: &str, split: &[SplitWeight]) -> Result<String, ApplyError> {
    // A running text may start with a byte order mark, which serde_yaml refuses.
    let text = agiproxy_config::without_bom(text);
    let mut doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        ApplyError::Uneditable(format!("the running config text cannot be edited: {e}"))
    })?;
    let routes = doc
        .get_mut("routes")
        .and_then(|r| r.as_sequence_mut())
        .ok_or_else(|| {
            ApplyError::NotFound(format!("no route {route:?}: the config has no routes"))
        })?;
    let entry = routes
        .iter_mut()
        .filter_map(|r| r.as_mapping_mut())
        .find(|m| m.get("name").and_then(|n| n.as_str()) == Some(route))
        .ok_or_else(|| ApplyError::NotFound(format!("no route {route:?}")))?;
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
    serde_yaml::to_string(&doc).map_err(|e| ApplyError::Uneditable(e.to_string()))
}

impl ControlPlane for ControlHandle {
    fn status(&self) -> Status {
        let snap = self.server.snapshot();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.server.uptime().as_secs_f64(),
            generation: snap.meta.generation,
            hash: snap.meta.hash_hex(),
            source: snap.meta.source.to_string(),
            differs_from_file: self.server.differs_from_file(),
            // Draining, every listener is closed (and one a reload added then
            // was never opened): none is listed (audit).
            listeners: if self.server.is_draining() {
                Vec::new()
            } else {
                self.server
                    .bound_listeners()
                    .into_iter()
                    .map(|(name, a)| ListenerView {
                        name,
                        address: a.to_string(),
                    })
                    .collect()
            },
            active_sessions: self.server.active_sessions() as u64,
            draining: self.server.is_draining(),
            // The file as last read and parsed: a status call never reads it.
            rollouts_differ: crate::rollout::view::notes(
                &snap,
                self.server.file_rollouts().as_deref(),
            ),
        }
    }

    fn ready(&self) -> bool {
        !self.server.is_stopping()
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
        // The body moves in: no copy of it stays here (audit: three
        // were held of each while it waited its turn to be parsed; two now).
        self.server
            .apply_text(text.into(), crate::server::API_SOURCE, dry_run, if_match)
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

    fn pool(&self, name: &str) -> Option<PoolView> {
        self.server.snapshot().pool(name).map(pool_view)
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
        let not_found = || {
            ControlError::NotFound(format!(
                "no backend {backend:?} in pool {pool:?} (write it as ip:port, an IPv6 address in brackets: [fd00::5]:4573)"
            ))
        };
        let addr: std::net::SocketAddr = backend.parse().map_err(|_| not_found())?;
        // As the config holds it: an IPv4-mapped address is its IPv4 one.
        let addr = std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if !p.set_draining(addr, draining) {
            return Err(not_found());
        }
        tracing::info!(
            pool,
            backend,
            draining,
            "backend drain changed through the control API"
        );
        p.snapshot_state()
            .iter()
            .find(|b| b.address == addr)
            .map(backend_view)
            .ok_or_else(not_found)
    }

    async fn set_split(
        &self,
        route: &str,
        split: Vec<SplitWeight>,
        if_match: Option<u64>,
    ) -> Result<Applied, ControlError> {
        self.server
            .apply_edit(crate::server::API_SOURCE, if_match, {
                let route = route.to_string();
                move |text| with_split(text, &route, &split)
            })
            .await
            .map(applied)
            .map_err(control_error)
    }

    fn rollouts(&self) -> Vec<RolloutView> {
        crate::rollout::view::views(
            &self.server.snapshot(),
            self.server.file_rollouts().as_deref(),
        )
    }

    fn rollout(&self, route: &str) -> Option<RolloutView> {
        crate::rollout::view::view(
            &self.server.snapshot(),
            route,
            self.server.file_rollouts().as_deref(),
        )
    }

    fn rollout_routes(&self) -> Vec<String> {
        crate::rollout::view::routes(&self.server.snapshot())
    }

    fn config_bytes_limit(&self) -> Option<usize> {
        Some(self.server.snapshot().config.limits.max_config_bytes)
    }

    fn rollout_tick(&self, route: &str, tick: i64) -> Result<RolloutTick, ControlError> {
        crate::rollout::view::tick(&self.server.snapshot(), route, tick)
            .ok_or_else(|| ControlError::NotFound(format!("no rollout on route {route:?}")))
    }

    async fn rollout_override(
        &self,
        route: &str,
        action: &str,
        req: agiproxy_control::api::RolloutOverrideRequest,
    ) -> Result<Applied, ControlError> {
        let at = req.at;
        // The edit runs on a blocking thread (the parse is bounded but not
        // free): it owns what it needs.
        let (r_route, r_action, r_at) = (route.to_string(), action.to_string(), at.clone());
        let snap = self.server.snapshot();
        // The rollout acted on: the one named, which must be the one
        // running, or the one running now. A reload that brings another
        // before the swap refuses the action (audit: a `promote` meant for
        // the old rollout promoted the new one at once, before its start).
        let running = crate::rollout::view::identity_of(&snap, route);
        if let (Some(asked), Some(runs)) = (&req.identity, &running) {
            if asked != runs {
                return Err(ControlError::Conflict(format!(
                    "route {route} runs rollout {runs}, not {asked}: a reload replaced it; nothing \
                     was changed: see `ctl rollout status {route}`, and act on the rollout running"
                )));
            }
        }
        let fleet = crate::rollout::view::reads_peers(&snap, route);
        let skew = crate::rollout::view::skew(&snap, route);
        let at_ms = match at.as_deref() {
            Some(t) => agiproxy_config::parse_time(t).ok(),
            None => Some(crate::session::rollout::now_ms()),
        };
        if let (Some(a), Some(s), Some(at_ms)) =
            (agiproxy_config::OverrideAction::parse(action), skew, at_ms)
        {
            let effect = at_ms.saturating_add(s.as_millis() as i64);
            if let Some(reason) =
                crate::rollout::view::why_override_changes_nothing(&snap, route, a, effect)
            {
                tracing::info!(
                    route,
                    action,
                    reason,
                    "rollout override changes nothing: not written"
                );
                return Ok(Applied {
                    reason: Some(reason),
                    ..applied(crate::server::Applied {
                        generation: snap.meta.generation,
                        hash: snap.meta.hash,
                        dry_run: false,
                        changed: false,
                        dropped: Vec::new(),
                    })
                });
            }
        }
        drop(snap);
        let r = self
            .server
            .apply_edit_checked(
                crate::server::API_SOURCE,
                None,
                move |text| {
                    crate::rollout::view::with_override(
                        text,
                        &r_route,
                        &r_action,
                        r_at.as_deref(),
                        fleet,
                        skew,
                    )
                },
                crate::rollout::view::overrides_still_ahead(route, running),
            )
            .await;
        if r.is_ok() {
            tracing::warn!(route, action, at = ?at, "rollout override written into the running config through the control API (not into the file)");
        }
        r.map(applied).map_err(control_error)
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

    fn observe_refused_connection(&self, reason: &'static str) {
        self.server
            .metrics()
            .control_refused
            .with_label_values(&[reason])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

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
            Err(ApplyError::NotFound(_))
        ));
        // A running text that starts with a byte order mark (accepted by
        // the config crate) can be edited too.
        assert_eq!(
            with_split(&format!("\u{feff}{text}"), "b", &split).unwrap(),
            out
        );
    }

    /// Status names each listener with its own bound address, also while
    /// a change holds the listener table (audit: the names of one snapshot
    /// were zipped with addresses read later, and during a change a bound
    /// port read as the configured port 0), and two listeners asking for
    /// port 0 on one address each with its own port.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_pairs_each_listener_with_its_bound_address_during_a_change() {
        let text = "version: 1\nlisteners:\n  - { name: a, address: \"127.0.0.1:0\" }\n  - { name: b, address: \"127.0.0.1:0\" }\nroutes:\n  - name: r\n    pool: p\npools:\n  - name: p\n    backends: [{ address: \"127.0.0.1:1\" }]\n";
        let server = Server::start(agiproxy_config::from_yaml_str(text).unwrap())
            .await
            .unwrap();
        let handle = ControlHandle::new(server.clone());
        let listed = |h: &ControlHandle| -> Vec<(String, std::net::SocketAddr)> {
            h.status()
                .listeners
                .into_iter()
                .map(|l| (l.name, l.address.parse().unwrap()))
                .collect()
        };
        let before = listed(&handle);
        assert_eq!(before.len(), 2, "{before:?}");
        assert_eq!((before[0].0.as_str(), before[1].0.as_str()), ("a", "b"));
        assert_ne!(before[0].1.port(), 0, "{before:?}");
        assert_ne!(before[0].1, before[1].1, "{before:?}");
        for (_, a) in &before {
            tokio::net::TcpStream::connect(a).await.unwrap();
        }
        // A change held at its swap check: the listener table is held.
        let (entered, held) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (entered, released) = (Mutex::new(entered), Mutex::new(released));
        let changed = format!("{text}# changed\n");
        let change = tokio::spawn({
            let server = server.clone();
            async move {
                server
                    .apply_edit_checked(
                        "test",
                        None,
                        move |_| Ok(changed.clone()),
                        Arc::new(move |_, _| {
                            let _ = entered.lock().unwrap().send(());
                            let wait = Duration::from_secs(30);
                            let _ = released.lock().unwrap().recv_timeout(wait);
                            Err(ApplyError::NotFound("held by the test".into()))
                        }),
                    )
                    .await
            }
        });
        let wait = Duration::from_secs(30);
        tokio::task::spawn_blocking(move || held.recv_timeout(wait))
            .await
            .unwrap()
            .expect("the change reached its swap check");
        let during = listed(&handle);
        release.send(()).unwrap();
        assert!(matches!(
            change.await.unwrap(),
            Err(ApplyError::NotFound(_))
        ));
        assert_eq!(during, before);
        assert_eq!(listed(&handle), before);
    }
}
