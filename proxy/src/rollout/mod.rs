//! Rollouts at the runtime level: the judgement loop that reads the peer
//! replicas ([`eval`]) and what the control API shows and changes
//! ([`view`]). The routing decision, the schedule and the counters live on
//! the session path, in `crate::session::rollout`, re-exported here.

pub mod adopt;
pub mod eval;
pub mod file;
pub mod overrides;
pub mod replaced;
pub mod view;

pub use crate::session::rollout::{
    explain, judge, now_ms, position, schedule, sticky, CompiledRollout, Decision, Pick, Position,
    RolloutLive, Side, State,
};
