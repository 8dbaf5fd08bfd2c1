//! What one session did: the access-log line, and what tests and the demo
//! observe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::outcome::{Outcome, Reason};
use crate::pool::BackendLive;

/// What happened in one session: the access-log line, and what tests and
/// the demo observe.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    /// Generation of the config snapshot the session ran on.
    pub generation: u64,
    /// `agi_network_script` as Asterisk sent it.
    pub script: String,
    pub route: Option<Arc<str>>,
    pub pool: Option<Arc<str>>,
    pub backend: Option<SocketAddr>,
    pub attempts: u32,
    pub connect_time: Option<Duration>,
    pub first_command_time: Option<Duration>,
    pub duration: Duration,
    pub bytes_from_asterisk: u64,
    pub bytes_to_asterisk: u64,
    pub commands: u64,
    pub caller_hung_up: bool,
    pub outcome: Outcome,
    pub reason: Option<Reason>,
    pub header_error: Option<&'static str>,
    /// The committed backend, for its preformatted metric label.
    pub(crate) live_backend: Option<Arc<BackendLive>>,
    /// A rollout route's colour; counted for judgement when the session ends.
    pub(crate) rollout: Option<(Arc<super::rollout::RolloutLive>, super::rollout::Pick)>,
}

impl SessionRecord {
    pub(crate) fn new(peer: SocketAddr, listener: Arc<str>, generation: u64) -> SessionRecord {
        SessionRecord {
            peer,
            listener,
            generation,
            script: String::new(),
            route: None,
            pool: None,
            backend: None,
            attempts: 0,
            connect_time: None,
            first_command_time: None,
            duration: Duration::ZERO,
            bytes_from_asterisk: 0,
            bytes_to_asterisk: 0,
            commands: 0,
            caller_hung_up: false,
            outcome: Outcome::Completed,
            reason: None,
            header_error: None,
            live_backend: None,
            rollout: None,
        }
    }

    pub(crate) fn log(&self) {
        // A connect closed before any header byte is a port probe (a load
        // balancer's TCP check, a scanner): counted in metrics
        // (header_errors_total{reason="closed"}), not worth a log line each.
        if self.header_error == Some("closed") {
            return;
        }
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        tracing::info!(
            target: "agiproxy::access",
            peer = %self.peer,
            listener = %self.listener,
            generation = self.generation,
            script = %self.script,
            route = self.route.as_deref().unwrap_or("-"),
            pool = self.pool.as_deref().unwrap_or("-"),
            backend = %self.backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
            attempts = self.attempts,
            connect_ms = ms(self.connect_time),
            first_command_ms = ms(self.first_command_time),
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            bytes_in = self.bytes_from_asterisk,
            bytes_out = self.bytes_to_asterisk,
            commands = self.commands,
            hangup = self.caller_hung_up,
            outcome = self.outcome.as_str(),
            reason = self.reason.map_or(self.header_error.unwrap_or("-"), |r| r.as_str()),
            "session"
        );
    }
}
