//! The running configuration: a validated `Config` compiled into a route
//! table and live pools. A session loads the current snapshot once and keeps
//! it for its whole life; a reload swaps in a new one atomically.

use std::sync::Arc;

use agiproxy_config::Config;

use crate::balancer::PoolState;
use crate::router::Router;

#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    /// Index-aligned with `config.pools`.
    pub pools: Vec<PoolState>,
    pub generation: u64,
}

impl Snapshot {
    /// Compiles `config`. Live state (active sessions, passive ejections)
    /// of pools and backends that `previous` also has is carried over, by
    /// pool name and backend address.
    pub fn build(config: Config, generation: u64, previous: Option<&Snapshot>) -> Snapshot {
        let router = Router::new(&config.routes);
        let pools = config
            .pools
            .iter()
            .map(|p| PoolState::new(p, previous.and_then(|s| s.pool(&p.name))))
            .collect();
        Snapshot {
            config: Arc::new(config),
            router,
            pools,
            generation,
        }
    }

    /// Starts what keeps this snapshot's pools current (active health
    /// checks, DNS discovery). Called once, right after the snapshot is
    /// made the running one.
    pub fn activate(&self) {
        for pool in &self.pools {
            pool.activate();
        }
    }

    /// Stops this snapshot's background work once a newer snapshot runs.
    /// Sessions still holding it go on; live state lives on in the new one.
    pub fn retire(&self) {
        for pool in &self.pools {
            pool.retire();
        }
    }

    pub fn pool(&self, name: &str) -> Option<&PoolState> {
        self.pools.iter().find(|p| p.name == name)
    }
}
