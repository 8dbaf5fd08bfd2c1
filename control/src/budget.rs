//! A budget on the bytes of request bodies held at once. Bodies are read
//! whole, and a config change then waits its turn for the one parse at a
//! time with its text held: 60 dry-run `PUT /v1/config` of 4 MiB drove a
//! replica to 937 MB, past a 512 MiB container limit (audit). A request
//! that may carry a body takes its share (its `Content-Length`, or the
//! body limit when it does not say) before the body is read, and gives it
//! back with its answer; the budget is [`BODIES_AT_ONCE`] times the running
//! `limits.max_config_bytes`. A request that finds it spent waits for it in
//! line, first come first served, for half of `control.request_timeout` at
//! most; then it is answered 503 with `Retry-After`, its body unread.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Largest config texts held at once, before and while waiting their turn
/// for the one parse at a time.
pub const BODIES_AT_ONCE: usize = 3;

/// The bytes of the bodies held now, the requests waiting for a share in
/// the order they came, and a wake-up for them.
#[derive(Debug, Default)]
pub(crate) struct BodyBudget {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct State {
    held: usize,
    /// Tickets of the requests waiting, first come first: a share goes to
    /// the first of them that fits, and no request passes a waiting one
    /// (a body needing most of the budget kept getting 503 under a steady
    /// stream of small ones).
    queue: VecDeque<u64>,
    next_ticket: u64,
}

impl State {
    fn fits(&self, bytes: usize, cap: usize) -> bool {
        bytes == 0 || self.held == 0 || self.held.saturating_add(bytes) <= cap
    }
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct BodyShare {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

/// A place in the queue, left when dropped (a request that gave up).
struct Waiting<'a> {
    budget: &'a BodyBudget,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.budget.lock();
        if let Some(i) = st.queue.iter().position(|t| *t == self.ticket) {
            st.queue.remove(i);
            drop(st);
            // The one behind may fit now.
            self.budget.freed.notify_waiters();
        }
    }
}

impl BodyBudget {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn share(self: &Arc<Self>, st: &mut State, bytes: usize) -> BodyShare {
        st.held += bytes;
        BodyShare {
            budget: self.clone(),
            bytes,
        }
    }

    /// `bytes` of a budget of `cap`, if that many are free and no request
    /// waits for a share; a request larger than the whole budget gets it
    /// only when nothing is held. A request with no body waits for nothing.
    pub(crate) fn try_take(self: &Arc<Self>, bytes: usize, cap: usize) -> Option<BodyShare> {
        let mut st = self.lock();
        if bytes != 0 && (!st.queue.is_empty() || !st.fits(bytes, cap)) {
            return None;
        }
        Some(self.share(&mut st, bytes))
    }

    /// [`BodyBudget::try_take`], waiting in line for shares given back.
    /// Dropped (a request that gave up), it leaves the line.
    pub(crate) async fn take(self: &Arc<Self>, bytes: usize, cap: usize) -> BodyShare {
        let ticket = {
            let mut st = self.lock();
            if bytes == 0 || (st.queue.is_empty() && st.fits(bytes, cap)) {
                return self.share(&mut st, bytes);
            }
            let t = st.next_ticket;
            st.next_ticket += 1;
            st.queue.push_back(t);
            t
        };
        let waiting = Waiting {
            budget: self,
            ticket,
        };
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a share given back between the
            // two is not missed.
            freed.as_mut().enable();
            {
                let mut st = self.lock();
                if st.queue.front() == Some(&ticket) && st.fits(bytes, cap) {
                    st.queue.pop_front();
                    let share = self.share(&mut st, bytes);
                    drop(st);
                    // Out of the line already: its drop finds nothing to do.
                    drop(waiting);
                    // The next in line may fit beside this one.
                    self.freed.notify_waiters();
                    return share;
                }
            }
            freed.await;
        }
    }

    /// The bytes held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.lock().held
    }
}

impl Drop for BodyShare {
    fn drop(&mut self) {
        let mut st = self.budget.lock();
        st.held -= self.bytes;
        drop(st);
        self.budget.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shares_wait_for_the_budget_and_one_larger_than_it_goes_alone() {
        let b = Arc::new(BodyBudget::default());
        let one = b.try_take(40, 100).unwrap();
        let two = b.try_take(60, 100).unwrap();
        assert!(b.try_take(1, 100).is_none());
        assert_eq!(b.held(), 100);
        // Waits until a share is given back.
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.take(50, 100).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(two);
        let three = waiting.await.unwrap();
        assert_eq!(b.held(), 90);
        // Larger than the budget: only alone.
        assert!(b.try_take(500, 100).is_none());
        drop((one, three));
        assert_eq!(b.held(), 0);
        let big = b.try_take(500, 100).unwrap();
        assert!(
            b.try_take(0, 100).is_some(),
            "a request with no body waits for nothing"
        );
        assert!(b.try_take(1, 100).is_none());
        drop(big);
        assert_eq!(b.held(), 0);
    }

    /// A request that needs most of the budget is served in its turn: those
    /// that come after it wait behind it, however small (they passed it,
    /// one after another, and it got 503), and one that gives up leaves the
    /// line.
    #[tokio::test]
    async fn shares_go_first_come_first_served() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let b = Arc::new(BodyBudget::default());
        let served = Arc::new(AtomicUsize::new(0));
        let wait = |bytes: usize| {
            let (b, served) = (b.clone(), served.clone());
            tokio::spawn(async move {
                let share = b.take(bytes, 100).await;
                (served.fetch_add(1, SeqCst), share)
            })
        };
        let small = b.try_take(30, 100).unwrap();
        let big = wait(90);
        tokio::task::yield_now().await;
        assert!(!big.is_finished());
        // Room for a small one, but the big one came first.
        assert!(b.try_take(10, 100).is_none());
        let after = wait(10);
        // One that gives up leaves the line.
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(20), b.take(5, 100));
        assert!(gave_up.await.is_err());
        tokio::task::yield_now().await;
        assert!(!after.is_finished(), "passed the big one");
        drop(small);
        let (first, big) = big.await.unwrap();
        let (second, after) = after.await.unwrap();
        assert_eq!((first, second), (0, 1));
        assert_eq!(b.held(), 100);
        assert!(b.try_take(0, 100).is_some(), "no body, no wait");
        drop((big, after));
        assert_eq!(b.held(), 0);
        assert!(b.try_take(100, 100).is_some());
    }
}
