//! Simulated FastAGI peers for agiproxy's tests, demo and load generation.
//!
//! - [`FakeAsterisk`] is one Asterisk channel running `AGI(agi://...)`: it
//!   connects, sends a header, answers commands and decides AGISTATUS the
//!   way a real Asterisk 23 does (`shared/fastagi-protocol.md`), and records
//!   every protocol violation of the server side (pipelining, partial lines,
//!   `\r\n`).
//! - [`FakeBackend`] is a scriptable FastAGI server on `127.0.0.1:0`, from
//!   well-behaved scripts to resets, stalls and garbage.
//! - [`refused_addr`] and [`blackholed_listener`] are the two ways a connect
//!   fails.
//! - [`FakeDns`] serves A/AAAA/SRV records that the test changes at run time.
//! - [`AgiHeader`] builds, parses and serialises headers; [`Fixture`] holds
//!   the real ones captured from Asterisk.
//! - [`http::get`] reads the control API as `curl` would.
//!
//! Everything listens and connects on loopback only.

pub mod asterisk;
pub mod backend;
pub mod delay;
pub mod dns;
mod framing;
pub mod header;
pub mod http;
pub mod loadgen;
mod net;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod ports;
pub mod soundfile;

pub use asterisk::{AgiStatus, CallOutcome, FakeAsterisk, Reply, ReplyFn};
pub use backend::{
    blackholed_listener, refused_addr, still_open, BackendStats, Behaviour, Blackhole, FakeBackend,
    SessionLog, Step, Then,
};
pub use dns::{FakeDns, RecordType, SrvRecord};
pub use header::{AgiHeader, Fixture};

#[cfg(test)]
mod tests;
