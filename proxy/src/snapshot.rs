//! The running configuration: a validated `Config` compiled into a route
//! table and live pools. A session loads the current snapshot once and keeps
//! it for its whole life; a reload swaps in a new one atomically.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use agiproxy_config::{Config, ProxyProtocol};

use crate::metrics::retention::LiveLabels;
use crate::pool::{discovery, health, PoolState, PoolStatus};
use crate::session::router::Router;

#[derive(Debug)]
pub struct Snapshot {
    /// The config as validated, except its routes: they are moved into
    /// `router` (read them from [`Router::routes`]), so that a large table
    /// is not held twice.
    pub config: Arc<Config>,
    pub router: Router,
    /// Index-aligned with `config.pools`.
    pub pools: Vec<PoolState>,
    /// Listeners by configured address, names as shared text: a session's
    /// record names its listener without an allocation.
    listeners: Vec<Arc<ListenerView>>,
    pub meta: ConfigMeta,
}

/// A listener as sessions see it.
#[derive(Debug)]
pub(crate) struct ListenerView {
    address: SocketAddr,
    name: Arc<str>,
    proxy_protocol: Option<ProxyProtocol>,
}

impl ListenerView {
    /// The listener's name, and whether a connection from `peer` on it must
    /// begin with a PROXY header.
    pub(crate) fn settings(&self, peer: IpAddr) -> (Arc<str>, bool) {
        (
            self.name.clone(),
            self.proxy_protocol
                .as_ref()
                .is_some_and(|p| p.expected_from(peer)),
        )
    }
}

/// Where a running config came from, and which one it is.
#[derive(Debug, Clone)]
pub struct ConfigMeta {
    /// 1 for the config the process started with, +1 per applied change.
    pub generation: u64,
    /// Content hash of `text`: replicas that run the same text agree on it.
    pub hash: u64,
    /// `file:PATH`, `api`, `embedded`.
    pub source: Arc<str>,
    /// The config as applied (YAML or JSON).
    pub text: Arc<str>,
}

impl ConfigMeta {
    pub fn new(generation: u64, source: &str, text: Arc<str>) -> ConfigMeta {
        ConfigMeta {
            generation,
            hash: text_hash(&text),
            source: Arc::from(source),
            text,
        }
    }

    pub fn hash_hex(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

/// The content hash used for configs (stable across replicas and releases).
pub fn text_hash(text: &str) -> u64 {
    crate::pool::stable_hash(text.as_bytes(), 0xc0_4f16)
}

impl Snapshot {
    /// The config with its routes that have a rollout put back (`config`
    /// has none: they live in `router`), for the checks that compare a
    /// running rollout with a new one. (Given `config` itself, they saw no
    /// running rollout and refused nothing: walkthrough.)
    pub fn rollout_config(&self) -> Config {
        let mut c = (*self.config).clone();
        c.routes = self
            .router
            .routes()
            .iter()
            .filter(|r| r.route.rollout.is_some())
            .map(|r| r.route.clone())
            .collect();
        c
    }

    /// Compiles `config`. Live state (active sessions, passive ejections)
    /// of pools and backends that `previous` also has is carried over, by
    /// pool name and backend address.
    pub fn build(mut config: Config, meta: ConfigMeta, previous: Option<&Snapshot>) -> Snapshot {
        let routes = std::mem::take(&mut config.routes);
        let router = Router::new(routes, &config.pools, previous.map(|s| &s.router));
        let pools = config
            .pools
            .iter()
            .map(|p| PoolState::new(p, previous.and_then(|s| s.pool(&p.name))))
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                Arc::new(ListenerView {
                    address: l.address,
                    name: Arc::from(l.name.as_str()),
                    proxy_protocol: l.proxy_protocol.clone(),
                })
            })
            .collect();
        Snapshot {
            config: Arc::new(config),
            router,
            pools,
            listeners,
            meta,
        }
    }

    /// The route, pool and backend labels a session can end with now (see
    /// `metrics::retention`).
    pub fn live_labels(&self) -> LiveLabels {
        let mut live = LiveLabels::default();
        for r in self.router.routes() {
            live.routes.insert(r.name.to_string());
        }
        for p in &self.pools {
            live.pools.insert(p.name.to_string());
            for b in &p.members().backends {
                live.backends.insert(b.live.label.to_string());
            }
            // Those that left the pool while holding sessions (a DNS
            // change, a reload): their calls still end on them.
            p.in_use(|label| {
                live.backends.insert(label.to_string());
            });
        }
        live
    }

    /// Starts what keeps this snapshot's pools current (active health
    /// checks for pools that have them, one watcher for those that do not,
    /// DNS discovery). Called once, right after the snapshot is
    /// made the running one.
    /// The pool layer never starts its own work: this is the one place
    /// that does. Needs a Tokio runtime for the tasks; idempotent.
    pub fn activate(&self) {
        let rt = tokio::runtime::Handle::try_current();
        let mut unchecked = Vec::new();
        for pool in &self.pools {
            if !pool.activate() {
                continue;
            }
            let Ok(rt) = &rt else {
                tracing::warn!(pool = %pool.name, "no async runtime: health checks and DNS discovery not started");
                continue;
            };
            let shared = pool.shared();
            if pool.config().health.is_some() {
                rt.spawn(health::supervise(shared.clone()));
            } else {
                unchecked.push(shared.clone());
            }
            // Only for names without a lookup running: a reload that keeps
            // a name hands its lookup over (see `PoolState::activate`).
            discovery::start(shared, rt);
        }
        if let (false, Ok(rt)) = (unchecked.is_empty(), &rt) {
            rt.spawn(health::watch_unchecked(unchecked));
        }
    }

    /// Stops this snapshot's background work once a newer snapshot runs.
    /// Sessions still holding it go on; live state lives on in the new one.
    pub fn retire(&self) {
        for pool in &self.pools {
            pool.retire();
        }
    }

    /// Every pool's live state (backends, health, ejections, DNS names), in
    /// config order: for the control API and metrics.
    pub fn status(&self) -> Vec<PoolStatus> {
        self.pools.iter().map(PoolState::status).collect()
    }

    /// The listener configured at `address`, as sessions see it: a
    /// `proxy_protocol` change applies to the next connection, no rebind.
    /// `None` once a reload has removed it (its accept loop then goes on
    /// with what it saw last: see `listener::accept_loop`).
    pub(crate) fn listener(&self, address: SocketAddr) -> Option<&Arc<ListenerView>> {
        self.listeners.iter().find(|l| l.address == address)
    }

    pub fn pool(&self, name: &str) -> Option<&PoolState> {
        self.pools.iter().find(|p| &*p.name == name)
    }

    /// The rollout of the route named `route`, if it has one.
    pub fn rollout(&self, route: &str) -> Option<&crate::session::rollout::CompiledRollout> {
        self.router
            .routes()
            .iter()
            .find(|r| &*r.name == route)?
            .rollout
            .as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_labels_are_the_routes_pools_and_members_now() {
        let cfg = agiproxy_config::from_yaml_str(
            "version: 1\nlisteners: [{ name: a, address: \"127.0.0.1:0\" }]\n\
             routes:\n  - { name: ivr, match: { script: { exact: ivr } }, pool: ivr }\n  - { name: rest, pool: other }\n\
             pools:\n  - { name: ivr, backends: [{ address: \"127.0.0.1:4573\" }, { address: \"127.0.0.2:4573\" }] }\n  - { name: other, backends: [{ address: \"[::1]:4574\" }] }\n",
        )
        .unwrap();
        let snap = Snapshot::build(cfg, ConfigMeta::new(1, "test", Arc::from("")), None);
        let live = snap.live_labels();
        fn sorted(s: &std::collections::HashSet<String>) -> Vec<&str> {
            let mut v: Vec<&str> = s.iter().map(String::as_str).collect();
            v.sort();
            v
        }
        assert_eq!(sorted(&live.routes), ["ivr", "rest"]);
        assert_eq!(sorted(&live.pools), ["ivr", "other"]);
        // The same text as the `backend` label of `sessions_total`.
        assert_eq!(
            sorted(&live.backends),
            ["127.0.0.1:4573", "127.0.0.2:4573", "[::1]:4574"]
        );
    }
}
