//! Drain and shutdown, in a fixed order: stop accepting (so Asterisk's next
//! connect is refused at once and its dialplan fails over), let sessions in
//! flight finish up to a deadline, then cut the rest.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled when listeners must close.
    pub stop_accepting: CancellationToken,
    /// Fired when sessions still running must end now.
    pub force: Cut,
    /// Every session task.
    pub sessions: TaskTracker,
    /// Every accept loop: when they stop, each serves what the kernel
    /// queued on its listener, so a drain waits for them before it waits
    /// for sessions (audit: with no session in flight, the process exited
    /// first and the queued calls were reset: SUCCESS to Asterisk).
    pub listeners: TaskTracker,
    /// Set when a stop is announced (`run --shutdown-delay`): not ready
    /// any more, still serving, so that load balancers stop sending before
    /// the listeners close.
    stopping: Arc<AtomicBool>,
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    pub fn is_draining(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Announces the stop: `/readyz` fails from now on; calls are still
    /// accepted until [`Drain::start`].
    pub fn announce_stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Stopping: announced, or draining.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed) || self.is_draining()
    }

    /// Stops accepting; sessions in flight go on.
    pub fn start(&self) {
        self.stop_accepting.cancel();
        self.listeners.close();
        self.sessions.close();
    }

    /// Waits for sessions to finish, up to `deadline`; then cuts the rest and
    /// waits (briefly) for them to end. True when all finished in time.
    pub async fn finish(&self, deadline: Duration) -> bool {
        self.start();
        let all = async {
            self.listeners.wait().await;
            self.sessions.wait().await;
        };
        let clean = tokio::time::timeout(deadline, all).await.is_ok();
        if !clean {
            self.force.fire();
            // Cut sessions tell Asterisk FAILURE where it waits for a
            // command, which takes a round trip; bound it.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.sessions.wait()).await;
        }
        // Backends abandoned last are still being closed politely (each for
        // at most 2 s); the exit would turn that into a reset.
        crate::pool::polite_close::finished().await;
        clean
    }
}

/// "End now", broadcast to every session, and cheap to watch: a session
/// polls its watch on every wake-up (twice a command), and once its waker is
/// registered a poll is one atomic load. (A `CancellationToken` takes its
/// mutex on every `is_cancelled` and every poll of `cancelled()`, twice per
/// wake-up: about 10,000 instructions per 10-command session, more than the
/// relay's own logic; see docs/benchmarks.md.)
#[derive(Clone, Default)]
pub struct Cut {
    inner: Arc<CutInner>,
}

#[derive(Default)]
struct CutInner {
    fired: AtomicBool,
    /// Holds the waiters and wakes them.
    token: CancellationToken,
}

impl Cut {
    pub fn fire(&self) {
        // Set before the wake-ups, so a woken watcher sees it.
        self.inner.fired.store(true, Ordering::Release);
        self.inner.token.cancel();
    }

    pub fn is_fired(&self) -> bool {
        self.inner.fired.load(Ordering::Acquire)
    }

    /// A future that resolves once `fire` is called.
    pub fn watch(&self) -> CutWatch<'_> {
        CutWatch {
            cut: self,
            wait: self.inner.token.cancelled(),
            registered: None,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct CutWatch<'a> {
        cut: &'a Cut,
        #[pin]
        wait: WaitForCancellationFuture<'a>,
        // The waker the token holds for us: while the task polls with the
        // same one, there is nothing to re-register.
        registered: Option<Waker>,
    }
}

impl Future for CutWatch<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(w) = this.registered {
            if w.will_wake(cx.waker()) {
                return if this.cut.is_fired() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                };
            }
        }
        match this.wait.poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                *this.registered = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn a_registered_watch_is_woken_and_resolves_when_fired() {
        let cut = Cut::default();
        let watch = cut.watch();
        let mut watch = std::pin::pin!(watch);
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(watch.as_mut().poll(&mut cx).is_pending());
        // Polled again with the same waker: the fast path, still pending.
        assert!(watch.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        cut.fire();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the watcher is woken");
        assert!(watch.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn a_new_waker_is_registered_and_the_old_one_is_not_woken() {
        let cut = Cut::default();
        let watch = cut.watch();
        let mut watch = std::pin::pin!(watch);
        let (first, w1) = counting_waker();
        let (second, w2) = counting_waker();
        assert!(watch
            .as_mut()
            .poll(&mut Context::from_waker(&w1))
            .is_pending());
        assert!(watch
            .as_mut()
            .poll(&mut Context::from_waker(&w2))
            .is_pending());
        cut.fire();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(watch
            .as_mut()
            .poll(&mut Context::from_waker(&w2))
            .is_ready());
    }

    #[test]
    fn a_watch_made_after_the_fire_is_ready_at_once() {
        let cut = Cut::default();
        cut.fire();
        let (_, w) = counting_waker();
        let watch = cut.watch();
        let mut watch = std::pin::pin!(watch);
        assert!(watch.as_mut().poll(&mut Context::from_waker(&w)).is_ready());
    }
}
