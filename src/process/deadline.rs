//! Process deadlines: one sorted map of (due instant → process) and one reaper task that
//! sleeps until the earliest entry. Setting, changing or removing a deadline and the reaper
//! taking a due one all happen under one lock, so the deadline in force is always the last
//! one acknowledged, and the reaper never acts on a stale value. Work per tick is
//! O(log n) in the number of deadlines, never a scan.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use tokio::sync::Notify;

/// A deadline as clients see it and as the reaper uses it, computed once when set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// When the reaper acts (monotonic).
    pub due: Instant,
    /// The same moment on the wall clock, as reported.
    pub end_at: SystemTime,
}

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        Deadline {
            due: Instant::now() + timeout,
            end_at: SystemTime::now() + timeout,
        }
    }
}

/// Something with a deadline: the reaper calls [`Expire::expire`] once it is due.
pub trait Expire: Send + Sync + 'static {
    /// The deadline passed.
    fn expire(self: Arc<Self>);
}

struct State<T> {
    /// Due deadlines in order; the id breaks ties.
    queue: BTreeMap<(Instant, u64), Weak<T>>,
    /// The deadline in force per id.
    by_id: HashMap<u64, Deadline>,
}

/// A change refused because the target no longer accepts deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// Every deadline of the daemon.
pub struct Deadlines<T> {
    state: Mutex<State<T>>,
    wake: Notify,
}

impl<T: Expire> Deadlines<T> {
    /// An empty set with its reaper task running.
    pub fn start() -> Arc<Self> {
        let deadlines = Arc::new(Deadlines {
            state: Mutex::new(State {
                queue: BTreeMap::new(),
                by_id: HashMap::new(),
            }),
            wake: Notify::new(),
        });
        tokio::spawn(reap(deadlines.clone()));
        deadlines
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces `id`'s deadline (`None` removes it) if `still_valid` holds under the lock;
    /// returns what is in force afterwards.
    ///
    /// # Errors
    /// [`Refused`] when `still_valid` returned false (nothing changed).
    pub fn set(
        &self,
        id: u64,
        target: &Arc<T>,
        deadline: Option<Deadline>,
        still_valid: impl FnOnce() -> bool,
    ) -> Result<Option<Deadline>, Refused> {
        let mut state = self.lock();
        if !still_valid() {
            return Err(Refused);
        }
        if let Some(old) = state.by_id.remove(&id) {
            state.queue.remove(&(old.due, id));
        }
        if let Some(deadline) = deadline {
            state.by_id.insert(id, deadline);
            state
                .queue
                .insert((deadline.due, id), Arc::downgrade(target));
        }
        drop(state);
        self.wake.notify_one();
        Ok(deadline)
    }

    /// The deadline in force for `id`.
    pub fn get(&self, id: u64) -> Option<Deadline> {
        self.lock().by_id.get(&id).copied()
    }

    /// Forgets `id` (its process ended).
    pub fn clear(&self, id: u64) {
        let mut state = self.lock();
        if let Some(old) = state.by_id.remove(&id) {
            state.queue.remove(&(old.due, id));
        }
    }

    /// Takes the first due entry, if any, or says how long until the next one.
    fn take_due(&self, now: Instant) -> Result<Arc<T>, Option<Instant>> {
        let mut state = self.lock();
        loop {
            let Some((&(due, id), _)) = state.queue.first_key_value() else {
                return Err(None);
            };
            if due > now {
                return Err(Some(due));
            }
            let target = state
                .queue
                .remove(&(due, id))
                .and_then(|weak| weak.upgrade());
            state.by_id.remove(&id);
            if let Some(target) = target {
                return Ok(target);
            }
        }
    }
}

/// The reaper: lives as long as the daemon (it holds the set).
async fn reap<T: Expire>(set: Arc<Deadlines<T>>) {
    loop {
        let wake = set.wake.notified();
        tokio::pin!(wake);
        // Register for wake-ups before looking, so a change made meanwhile is not missed.
        wake.as_mut().enable();
        let next = match set.take_due(Instant::now()) {
            Ok(target) => {
                target.expire();
                continue;
            }
            Err(next) => next,
        };
        match next {
            Some(due) => {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = &mut wake => {}
                }
            }
            None => wake.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counter(AtomicUsize);

    impl Expire for Counter {
        fn expire(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fires_once_at_the_latest_deadline_set() {
        let deadlines = Deadlines::<Counter>::start();
        let target = Arc::new(Counter(AtomicUsize::new(0)));
        deadlines
            .set(
                1,
                &target,
                Some(Deadline::after(Duration::from_secs(5))),
                || true,
            )
            .expect("set");
        // Extend before it passes.
        tokio::time::sleep(Duration::from_secs(3)).await;
        deadlines
            .set(
                1,
                &target,
                Some(Deadline::after(Duration::from_secs(10))),
                || true,
            )
            .expect("extend");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            target.0.load(Ordering::SeqCst),
            0,
            "the old deadline is not acted on"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(target.0.load(Ordering::SeqCst), 1);
        assert_eq!(deadlines.get(1), None);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(target.0.load(Ordering::SeqCst), 1, "never twice");
    }

    #[tokio::test(start_paused = true)]
    async fn removed_and_refused_deadlines_never_fire() {
        let deadlines = Deadlines::<Counter>::start();
        let target = Arc::new(Counter(AtomicUsize::new(0)));
        deadlines
            .set(
                7,
                &target,
                Some(Deadline::after(Duration::from_secs(1))),
                || true,
            )
            .expect("set");
        deadlines.set(7, &target, None, || true).expect("remove");
        assert!(
            deadlines
                .set(
                    7,
                    &target,
                    Some(Deadline::after(Duration::from_secs(1))),
                    || false
                )
                .is_err()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(target.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn thousands_of_deadlines_fire_in_order() {
        let deadlines = Deadlines::<Counter>::start();
        let targets: Vec<_> = (0..5000)
            .map(|_| Arc::new(Counter(AtomicUsize::new(0))))
            .collect();
        for (i, target) in targets.iter().enumerate() {
            let after = Duration::from_millis(1000 + (i as u64 * 7919) % 5000);
            deadlines
                .set(i as u64, target, Some(Deadline::after(after)), || true)
                .expect("set");
        }
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let fired = targets
            .iter()
            .filter(|t| t.0.load(Ordering::SeqCst) == 1)
            .count();
        assert!(fired > 0 && fired < 5000, "{fired}");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(targets.iter().all(|t| t.0.load(Ordering::SeqCst) == 1));
    }
}
