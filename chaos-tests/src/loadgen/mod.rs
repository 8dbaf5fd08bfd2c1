//! `agiproxy-bench`: a FastAGI load generator and benchmark backend, to
//! measure what a proxy between Asterisk and its backends costs.
//!
//! - [`client`]: Asterisk-like clients, load (sessions back to back) and
//!   idle (sessions held on a long command).
//! - [`backend`]: the FastAGI server they talk to.
//! - [`report`]: the JSON a run writes and the comparison table built from
//!   several runs.
//! - [`procstat`]: CPU time and RSS of the processes under test.

pub mod backend;
pub mod client;
pub mod lines;
pub mod procstat;
pub mod report;
pub mod stats;

#[cfg(test)]
mod tests;
