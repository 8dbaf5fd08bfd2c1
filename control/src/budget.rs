//! A budget on the bytes of request bodies held at once. Bodies are read
//! whole, and a config change then waits its turn for the one parse at a
//! time with its text held: 60 dry-run `PUT /v1/config` of 4 MiB drove a
//! replica to 937 MB, past a 512 MiB container limit (audit). A request
//! that may carry a body takes its share (its `Content-Length`, or the
//! body limit when it does not say) before the body is read, and gives it
//! back with its answer; the budget is [`BODIES_AT_ONCE`] times the running
//! `limits.max_config_bytes`. A request that finds it spent waits for it,
//! for half of `control.request_timeout` at most; then it is answered 503
//! with `Retry-After`, its body unread.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Largest config texts held at once, before and while waiting their turn
/// for the one parse at a time.
pub const BODIES_AT_ONCE: usize = 3;

/// The bytes of the bodies held now, and a wake-up for those waiting.
#[derive(Debug, Default)]
pub(crate) struct BodyBudget {
    held: Mutex<usize>,
    freed: Notify,
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct BodyShare {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    /// `bytes` of a budget of `cap`, if that many are free; a request
    /// larger than the whole budget gets it only when nothing is held.
    pub(crate) fn try_take(self: &Arc<Self>, bytes: usize, cap: usize) -> Option<BodyShare> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if bytes != 0 && *held != 0 && held.saturating_add(bytes) > cap {
            return None;
        }
        *held += bytes;
        Some(BodyShare {
            budget: self.clone(),
            bytes,
        })
    }

    /// [`BodyBudget::try_take`], waiting for shares given back.
    pub(crate) async fn take(self: &Arc<Self>, bytes: usize, cap: usize) -> BodyShare {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a share given back between the
            // two is not missed.
            freed.as_mut().enable();
            if let Some(share) = self.try_take(bytes, cap) {
                return share;
            }
            freed.await;
        }
    }

    /// The bytes held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for BodyShare {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(|p| p.into_inner());
        *held -= self.bytes;
        drop(held);
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
}
