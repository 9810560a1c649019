//! Polling watchers (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`): watches that
//! live between requests, identified by an id, their events queued until polled.
//!
//! Bounds: each watcher's queue holds at most [`super::NOTICE_QUEUE`] undelivered
//! notices; past that the watch waits, the kernel queues, and a kernel overflow ends the
//! watcher with a `resource_exhausted` error that every later poll returns, so a client
//! can tell events were lost. A watcher never polled for the idle timeout is removed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fs::watch::{FsEvent, Notice, Watch, WatchLimits, WatchSpec, new_watcher_id};

struct Polled {
    watch: Watch,
    /// Why the watch ended, once it has: returned by every later poll.
    ended: Option<Error>,
    last_polled: Instant,
}

/// Every polling watcher of the daemon.
pub struct PollingWatchers {
    watchers: Mutex<HashMap<String, Arc<Mutex<Polled>>>>,
    limits: Arc<WatchLimits>,
    idle_timeout: Duration,
}

impl PollingWatchers {
    /// An empty set whose watchers count against `limits` and expire after `idle_timeout`
    /// without a poll.
    pub fn new(limits: Arc<WatchLimits>, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(PollingWatchers {
            watchers: Mutex::new(HashMap::new()),
            limits,
            idle_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mutex<Polled>>>> {
        self.watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a watcher and returns its id. Blocking (see [`Watch::open`]).
    ///
    /// # Errors
    /// As [`Watch::open`].
    pub fn create(&self, spec: WatchSpec) -> Result<String> {
        self.sweep();
        let watch = Watch::open(spec, &self.limits)?;
        let id = new_watcher_id();
        let polled = Polled {
            watch,
            ended: None,
            last_polled: Instant::now(),
        };
        self.lock().insert(id.clone(), Arc::new(Mutex::new(polled)));
        Ok(id)
    }

    fn get(&self, id: &str) -> Result<Arc<Mutex<Polled>>> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("watcher with id {id} not found")))
    }

    /// Takes every event queued since the last poll, oldest first. Once the watch has
    /// ended, returns the events queued before the end, then its error on every call.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown id; the watch's error once it has ended.
    pub fn events(&self, id: &str) -> Result<Vec<FsEvent>> {
        let polled = self.get(id)?;
        let mut polled = polled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        polled.last_polled = Instant::now();
        if let Some(err) = &polled.ended {
            return Err(replay(err));
        }
        let mut events = Vec::new();
        while let Some(notice) = polled.watch.try_next() {
            match notice {
                Notice::Event(event) => events.push(event),
                Notice::Ended(err) => {
                    let reported = replay(&err);
                    polled.ended = Some(err);
                    if events.is_empty() {
                        return Err(reported);
                    }
                    break;
                }
            }
        }
        Ok(events)
    }

    /// Stops and forgets a watcher.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown id.
    pub fn remove(&self, id: &str) -> Result<()> {
        self.lock()
            .remove(id)
            .map(drop)
            .ok_or_else(|| Error::NotFound(format!("watcher with id {id} not found")))
    }

    /// Removes watchers nobody polled for the idle timeout.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut watchers = self.lock();
        watchers.retain(|id, polled| {
            let last = polled.lock().map_or(now, |p| p.last_polled);
            let keep = now.duration_since(last) < self.idle_timeout;
            if !keep {
                tracing::info!(%id, "removing a watcher that was not polled for {:?}", self.idle_timeout);
            }
            keep
        });
    }

    /// Number of polling watchers.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The same error again, for every poll after a watch ended.
fn replay(err: &Error) -> Error {
    match err {
        Error::NotFound(m) => Error::NotFound(m.clone()),
        Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
        other => Error::Io {
            context: "the watcher ended".into(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}
