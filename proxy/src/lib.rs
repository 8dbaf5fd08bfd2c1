//! agiproxy: a FastAGI proxy and load balancer.
//!
//! Three layers, one folder each, dependencies pointing down only:
//! - the runtime (this folder): [`server`] (config changes), [`listener`]
//!   (binding and the accept loop), [`snapshot`] (the running config and the pools built from it),
//!   [`control`] (the proxy's side of the control API), [`watch`] (the config
//!   file), [`drain`] (shutdown order), [`metrics`], [`logging`] (with
//!   [`throttle`] for warnings a flood repeats);
//! - a session's path ([`session`]): [`session::header`] reads the `agi_*`
//!   header, [`session::router`] picks a route, [`session::connect`] attaches
//!   a backend within the budget, [`session::rewrite`] builds the header it
//!   receives, [`session::relay`] (with the [`session::turn`] observer)
//!   carries the conversation, and [`session::failure`] speaks FAILURE to
//!   Asterisk whenever the session cannot be served;
//! - pools and what keeps them current ([`pool`]): backend state, balancing
//!   policies, health checks and DNS discovery. It knows nothing above it.

pub mod control;
pub mod credentials;
pub mod drain;
pub mod fds;
pub mod listener;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod pool;
pub mod rollout;
pub mod server;
pub mod session;
pub mod snapshot;
#[cfg(test)]
mod test_log;
pub use agiproxy_control::throttle;
pub mod watch;

pub use server::{Server, ServerError};
pub use session::outcome::{Outcome, Reason};
pub use session::SessionRecord;
