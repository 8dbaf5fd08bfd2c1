//! agiproxy: a FastAGI proxy and load balancer.
//!
//! A session's path through the modules: [`server`] accepts, [`header`]
//! reads the `agi_*` header, [`router`] picks a route, [`balancer`] orders a
//! pool's backends, [`connect`] attaches one within the budget, [`rewrite`]
//! builds the header it receives, [`relay`] (with the [`turn`] observer)
//! carries the conversation, and [`failure`] speaks FAILURE to Asterisk
//! whenever the session cannot be served. [`drain`] orders shutdown.

pub mod balancer;
pub mod connect;
pub mod control;
pub mod discovery;
pub mod drain;
pub mod failure;
pub mod header;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod outcome;
pub mod relay;
pub mod rewrite;
pub mod router;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod turn;
pub mod watch;

pub use outcome::{Outcome, Reason};
pub use server::{Server, ServerError};
pub use session::SessionRecord;
