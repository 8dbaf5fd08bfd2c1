//! Drain and shutdown, in a fixed order: stop accepting (so Asterisk's next
//! connect is refused at once and its dialplan fails over), let sessions in
//! flight finish up to a deadline, then cut the rest.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled when listeners must close.
    pub stop_accepting: CancellationToken,
    /// Cancelled when sessions still running must end now.
    pub force: CancellationToken,
    /// Every session task.
    pub sessions: TaskTracker,
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    pub fn is_draining(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Stops accepting; sessions in flight go on.
    pub fn start(&self) {
        self.stop_accepting.cancel();
        self.sessions.close();
    }

    /// Waits for sessions to finish, up to `deadline`; then cuts the rest and
    /// waits (briefly) for them to end. True when all finished in time.
    pub async fn finish(&self, deadline: Duration) -> bool {
        self.start();
        if tokio::time::timeout(deadline, self.sessions.wait())
            .await
            .is_ok()
        {
            return true;
        }
        self.force.cancel();
        // Cut sessions tell Asterisk FAILURE where it waits for a command,
        // which takes a round trip; bound it.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.sessions.wait()).await;
        false
    }
}
