//! Connection slots: at most `--max-connections` connections are served at once. The accept
//! loop takes a slot before it accepts, so beyond the limit new clients wait in the kernel's
//! listen queue rather than each costing the daemon a descriptor and a task.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slots, shared by the accept loop (which takes them) and `/metrics` (which counts them).
#[derive(Debug)]
pub struct ConnectionSlots {
    semaphore: Arc<Semaphore>,
    max: usize,
}

/// One connection's slot, given back when dropped.
pub type Slot = OwnedSemaphorePermit;

impl ConnectionSlots {
    /// `max` slots (capped at what a semaphore can count).
    pub fn new(max: usize) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        ConnectionSlots {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> Slot {
        match self.semaphore.clone().acquire_owned().await {
            Ok(slot) => slot,
            // The semaphore is never closed; were it, no connection could be served again.
            Err(_) => std::future::pending().await,
        }
    }

    /// Connections being served now.
    pub fn in_use(&self) -> usize {
        self.max - self.semaphore.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_counted_and_given_back() {
        let slots = ConnectionSlots::new(2);
        let a = slots.acquire().await;
        let _b = slots.acquire().await;
        assert_eq!(slots.in_use(), 2);
        let third = tokio::time::timeout(std::time::Duration::from_millis(20), slots.acquire());
        assert!(third.await.is_err(), "no third slot while two are taken");
        drop(a);
        let _c = slots.acquire().await;
        assert_eq!(slots.in_use(), 2);
    }
}
