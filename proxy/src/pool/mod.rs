//! Pools and what keeps them current: the bottom layer of the proxy.
//!
//! - [`clock`], [`hash`]: the monotonic clock, locks, and the stable hash;
//! - [`backend`]: one backend's live state (active sessions, health verdict,
//!   passive ejection with backoff, slow start, draining);
//! - [`live`]: what a pool carries across reloads (cursor, registry, DNS
//!   answers);
//! - [`members`]: a pool's member set, in failover tiers;
//! - [`policy`]: the balancing policies that order a tier for one call;
//! - [`state`]: the pool: leases, passive ejection, candidates for a call;
//! - [`status`]: the readable state for the control API and metrics;
//! - [`health`] and [`discovery`]: active checks and DNS names, which *update*
//!   a pool through its methods. The pool never starts them: whoever
//!   activates a snapshot does ([`crate::snapshot::Snapshot::activate`]);
//! - [`polite_close`]: how every backend connection we abandon is ended,
//!   shared by health probes and the session's connector.
//!
//! Who changes what:
//! - sessions (`crate::session::connect`): active/total counts, passive
//!   failures and successes ([`PoolState::passive_failure`],
//!   [`PoolState::passive_success`]);
//! - active checks ([`health`]): the health verdict, through
//!   [`BackendLive::record_check`];
//! - DNS discovery ([`discovery`]): the member set, replaced whole;
//! - the control API: [`PoolState::set_draining`].
//!
//! Every state change is logged once, with its reason (see
//! [`BackendLive::note`]). Nothing here knows about sessions or headers.

pub mod backend;
pub mod clock;
pub mod discovery;
pub mod hash;
pub mod health;
pub mod live;
pub mod members;
pub mod policy;
pub mod polite_close;
pub mod state;
pub mod status;

pub use backend::{Backend, BackendLive, BackendState, CheckResult};
pub use hash::stable_hash;
pub use live::PoolLive;
pub use members::{Candidates, Members};
pub use state::{Lease, NoBackend, PoolState};
pub use status::{BackendStatus, DiscoveryStatus, PoolStatus};

#[cfg(test)]
mod tests;
