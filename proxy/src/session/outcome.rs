//! How a session ended, and why it failed: closed sets used by the access
//! log, metrics labels and the `AGIPROXY_ERROR` channel variable.

/// The end of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed to the end; the backend or Asterisk closed in order.
    Completed,
    /// Asterisk was told FAILURE (see `Reason`).
    Failed,
    /// The header was refused; no backend was touched.
    BadHeader,
    /// Asterisk went away: before a backend was attached, or after commit
    /// (a reset, a write error, or keepalive found it gone; `mode: lines`).
    ClientGone,
    /// Cut by the drain deadline or a forced shutdown.
    Aborted,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Completed,
        Outcome::Failed,
        Outcome::BadHeader,
        Outcome::ClientGone,
        Outcome::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::BadHeader => "bad_header",
            Outcome::ClientGone => "client_gone",
            Outcome::Aborted => "aborted",
        }
    }
}

/// Why Asterisk got FAILURE. The string is what the dialplan reads in
/// `${AGIPROXY_ERROR}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No route matched the call.
    NoRoute,
    /// The pool had no eligible backend (all in backoff); failed at once.
    NoBackend,
    /// Every eligible backend, or the pool, is at its session limit.
    PoolFull,
    /// Every attempt failed to connect (refused, reset, timed out).
    ConnectFailed,
    /// The budget for finding a backend ran out.
    BudgetExhausted,
    /// A backend closed or reset before sending its first command.
    BackendClosed,
    /// A backend did not send its first command within `first_command`.
    FirstCommandTimeout,
    /// A backend did not send its next command within `next_command`.
    NextCommandTimeout,
    /// A backend reset the connection while Asterisk waited for a command.
    BackendReset,
    /// A backend sent a line Asterisk could not take (over-long line).
    BackendProtocol,
    /// The Asterisk side sent a line no Asterisk sends (over-long): ended.
    AsteriskProtocol,
    /// The proxy ran out of a local resource (file descriptors, socket
    /// buffers, memory) while connecting: not the backend's fault.
    LocalResources,
    /// The proxy is at `limits.max_sessions`.
    Overloaded,
    /// The header was over a limit.
    HeaderTooLarge,
    /// A header line after the first was not `agi_name: value` (a value
    /// with a newline in it).
    HeaderMalformed,
    /// The proxy is shutting down.
    ShuttingDown,
    /// A load balancer listed in `proxy_protocol.from` sent no valid PROXY
    /// protocol header before Asterisk's.
    ProxyProtocol,
    /// A bug in agiproxy (a panic) ended the session: logged as `panic:`
    /// and counted in `agiproxy_panics_total`.
    Internal,
}

impl Reason {
    pub const ALL: [Reason; 18] = [
        Reason::NoRoute,
        Reason::NoBackend,
        Reason::PoolFull,
        Reason::ConnectFailed,
        Reason::BudgetExhausted,
        Reason::BackendClosed,
        Reason::FirstCommandTimeout,
        Reason::NextCommandTimeout,
        Reason::BackendReset,
        Reason::BackendProtocol,
        Reason::AsteriskProtocol,
        Reason::LocalResources,
        Reason::Overloaded,
        Reason::HeaderTooLarge,
        Reason::HeaderMalformed,
        Reason::ShuttingDown,
        Reason::ProxyProtocol,
        Reason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRoute => "no_route",
            Reason::NoBackend => "no_backend",
            Reason::PoolFull => "pool_full",
            Reason::ConnectFailed => "connect_failed",
            Reason::BudgetExhausted => "budget_exhausted",
            Reason::BackendClosed => "backend_closed",
            Reason::FirstCommandTimeout => "first_command_timeout",
            Reason::NextCommandTimeout => "next_command_timeout",
            Reason::BackendReset => "backend_reset",
            Reason::BackendProtocol => "backend_protocol",
            Reason::AsteriskProtocol => "asterisk_protocol",
            Reason::LocalResources => "local_resources",
            Reason::Overloaded => "overloaded",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::HeaderMalformed => "header_malformed",
            Reason::ShuttingDown => "shutting_down",
            Reason::ProxyProtocol => "proxy_protocol",
            Reason::Internal => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_index_all() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
