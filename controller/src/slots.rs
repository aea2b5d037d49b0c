//! Concurrency limits that follow the settings file: `concurrency.reconciles` and
//! `concurrency.syncs` change the number of passes and syncs running at once without a restart.
//!
//! A limit is a semaphore whose size is changed in place: growing adds permits at once; shrinking
//! takes the free permits at once and the rest as running work finishes (nothing running is
//! interrupted), so the new limit holds as soon as the work above it is done.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One resizable limit.
#[derive(Debug)]
pub struct Slots {
    sem: Arc<Semaphore>,
    size: AtomicUsize,
}

impl Slots {
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Self { sem: Arc::new(Semaphore::new(size)), size: AtomicUsize::new(size) }
    }

    /// The limit in force.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// The semaphore itself, for code that takes a permit for a while.
    pub fn semaphore(&self) -> &Semaphore {
        &self.sem
    }

    /// A permit, held until dropped; None once closed.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().acquire_owned().await.ok()
    }

    /// Sets the limit to `size` (at least 1); true when it changed.
    pub fn resize(&self, size: usize) -> bool {
        let size = size.max(1);
        let old = self.size.swap(size, Ordering::Relaxed);
        if size > old {
            self.sem.add_permits(size - old);
        } else if size < old {
            let excess = old - size;
            let rest = excess - self.sem.forget_permits(excess);
            if rest > 0 {
                let sem = self.sem.clone();
                let n = u32::try_from(rest).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(n).await {
                        p.forget();
                    }
                });
            }
        }
        size != old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_at_once_and_shrinks_as_running_work_ends() {
        let s = Slots::new(3);
        let held: Vec<_> = futures::future::join_all((0..3).map(|_| s.acquire())).await;
        assert_eq!(s.semaphore().available_permits(), 0);
        assert!(s.resize(5));
        assert_eq!(s.semaphore().available_permits(), 2, "two more at once");
        let more = (s.acquire().await, s.acquire().await);
        // Down to 1 while all five run: nothing is interrupted; the limit holds once they end.
        assert!(s.resize(1));
        assert_eq!(s.size(), 1);
        drop(held);
        drop(more);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(s.semaphore().available_permits(), 1);
        let one = s.acquire().await;
        let second = tokio::time::timeout(std::time::Duration::from_millis(100), s.acquire()).await;
        assert!(second.is_err(), "a second permit waits");
        drop(one);
        assert!(!s.resize(1), "unchanged");
        assert!(s.resize(2));
        assert_eq!(s.semaphore().available_permits(), 2);
    }
}
