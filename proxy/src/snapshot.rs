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
    pub fn build(config: Config, generation: u64) -> Snapshot {
        let router = Router::new(&config.routes);
        let pools = config.pools.iter().map(PoolState::new).collect();
        Snapshot {
            config: Arc::new(config),
            router,
            pools,
            generation,
        }
    }
}
