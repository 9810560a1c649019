//! Output fan-out: the process's task (reading its keeper's link) hands each chunk of its
//! stdout/stderr (or PTY) to every subscriber.
//!
//! Policy (memory stays bounded whatever the process writes):
//! - no subscriber: the chunk is discarded (as envd does), so a process nobody watches
//!   never blocks on a full pipe;
//! - subscribers keep up: every one gets every chunk, in order;
//! - all subscribers are behind: delivery waits for the first to make room, which slows
//!   the readers and, through the pipe, the process (back-pressure, nothing lost);
//! - a subscriber [`SUBSCRIBER_QUEUE`] chunks behind one that is keeping up is dropped: its
//!   stream ends with a "too slow" error instead of stalling the others, and it can
//!   reconnect.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::process::exit::Exit;
use crate::process::registry::EndReason;

/// Chunks a subscriber may have queued (each at most 32 KiB, so at most 4 MiB).
pub const SUBSCRIBER_QUEUE: usize = 128;

/// Which output a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// The terminal (stdout and stderr merged).
    Pty,
}

/// Bytes a process wrote, as read.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Where they were written.
    pub stream: Stream,
    /// The bytes.
    pub data: Bytes,
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Chunk>,
    evicted: Arc<AtomicBool>,
}

#[derive(Default)]
struct Subscribers {
    list: Vec<Subscriber>,
    /// Set once the process has ended: nobody may subscribe any more.
    closed: bool,
}

/// The subscriber side of a process's output.
pub struct Hub {
    subscribers: Mutex<Subscribers>,
    next_id: AtomicU64,
    end: watch::Sender<Option<Ended>>,
}

/// What a subscriber receives next.
#[derive(Debug)]
pub enum Event {
    /// Output.
    Data(Chunk),
    /// The process ended; nothing follows.
    End(Ended),
    /// This subscriber fell too far behind and was dropped.
    Evicted,
}

/// One subscriber's view: output from the moment it subscribed, then the end.
pub struct Subscription {
    rx: mpsc::Receiver<Chunk>,
    end: watch::Receiver<Option<Ended>>,
    evicted: Arc<AtomicBool>,
}

impl Subscription {
    /// The next event. After `End` or `Evicted` it keeps returning the same.
    pub async fn next(&mut self) -> Event {
        if let Some(chunk) = self.rx.recv().await {
            return Event::Data(chunk);
        }
        if self.evicted.load(Ordering::Acquire) {
            return Event::Evicted;
        }
        match self.end.wait_for(Option::is_some).await {
            Ok(ended) => Event::End(ended.clone().unwrap_or_else(lost_end)),
            Err(_) => Event::End(lost_end()),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Its exit.
    pub exit: Exit,
    /// Why.
    pub reason: EndReason,
}

fn lost_end() -> Ended {
    Ended {
        exit: Exit::wait_failed(&std::io::Error::other(
            "process record dropped before its end",
        )),
        reason: EndReason::Signal,
    }
}

impl Hub {
    /// A hub with no subscribers.
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub {
            subscribers: Mutex::new(Subscribers::default()),
            next_id: AtomicU64::new(0),
            end: watch::Sender::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to output from now on. `Err` carries the end when the process has ended.
    ///
    /// # Errors
    /// How the process ended, when it has already ended.
    pub fn subscribe(&self) -> Result<Subscription, Ended> {
        let mut subscribers = self.lock();
        if subscribers.closed {
            return Err(self.end.borrow().clone().unwrap_or_else(lost_end));
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let evicted = Arc::new(AtomicBool::new(false));
        subscribers.list.push(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tx,
            evicted: evicted.clone(),
        });
        Ok(Subscription {
            rx,
            end: self.end.subscribe(),
            evicted,
        })
    }

    /// The end, once the process has ended.
    pub fn exit(&self) -> Option<Ended> {
        self.end.borrow().clone()
    }

    /// Hands `chunk` to every subscriber, as the policy above says: it waits only when
    /// every subscriber is behind.
    pub async fn deliver(&self, chunk: Chunk) {
        loop {
            let targets: Vec<(u64, mpsc::Sender<Chunk>)> = self
                .lock()
                .list
                .iter()
                .map(|s| (s.id, s.tx.clone()))
                .collect();
            if targets.is_empty() {
                return;
            }
            let mut delivered = false;
            let mut behind = Vec::new();
            for (id, tx) in targets {
                match tx.try_send(chunk.clone()) {
                    Ok(()) => delivered = true,
                    Err(mpsc::error::TrySendError::Full(_)) => behind.push((id, tx)),
                    Err(mpsc::error::TrySendError::Closed(_)) => self.remove(id, false),
                }
            }
            if behind.is_empty() {
                return;
            }
            if delivered {
                for (id, _) in behind {
                    self.remove(id, true);
                }
                return;
            }
            // Everyone is behind: wait for the first to make room.
            let waits = behind.iter().map(|(_, tx)| Box::pin(tx.reserve()));
            let (first, index, _) = futures_util::future::select_all(waits).await;
            match first {
                Ok(permit) => {
                    permit.send(chunk.clone());
                    for (i, (id, tx)) in behind.iter().enumerate() {
                        if i != index && tx.try_send(chunk.clone()).is_err() {
                            self.remove(*id, true);
                        }
                    }
                    return;
                }
                // That subscriber left; try again with the others.
                Err(_) => self.remove(behind[index].0, false),
            }
        }
    }

    fn remove(&self, id: u64, evict: bool) {
        let mut subscribers = self.lock();
        if let Some(position) = subscribers.list.iter().position(|s| s.id == id) {
            let subscriber = subscribers.list.swap_remove(position);
            if evict {
                tracing::warn!(
                    "dropping a process output subscriber that fell {SUBSCRIBER_QUEUE} chunks behind"
                );
                subscriber.evicted.store(true, Ordering::Release);
            }
        }
    }

    /// Resolves once the process has ended.
    pub async fn ended(&self) {
        let mut end = self.end.subscribe();
        let _ = end.wait_for(Option::is_some).await;
    }

    /// Records the end and releases every subscriber (each drains its queue, then sees it).
    pub fn finish(&self, exit: Exit, reason: EndReason) {
        let mut subscribers = self.lock();
        subscribers.closed = true;
        subscribers.list.clear();
        self.end.send_replace(Some(Ended { exit, reason }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8) -> Chunk {
        Chunk {
            stream: Stream::Stdout,
            data: Bytes::from(vec![n]),
        }
    }

    fn exit0() -> Exit {
        Exit::from_status(std::os::unix::process::ExitStatusExt::from_raw(0))
    }

    #[tokio::test]
    async fn every_subscriber_gets_everything_then_the_end() {
        let hub = Hub::new();
        let mut a = hub.subscribe().expect("open");
        let mut b = hub.subscribe().expect("open");
        for n in 0..10 {
            hub.deliver(chunk(n)).await;
        }
        hub.finish(exit0(), EndReason::Exit);
        for sub in [&mut a, &mut b] {
            for n in 0..10 {
                match sub.next().await {
                    Event::Data(c) => assert_eq!(c.data.as_ref(), [n]),
                    other => panic!("expected data, got {other:?}"),
                }
            }
            assert!(matches!(sub.next().await, Event::End(e) if e.exit.exit_code == 0));
        }
        assert!(hub.subscribe().is_err(), "no subscriptions after the end");
    }

    #[tokio::test]
    async fn a_stalled_subscriber_is_dropped_while_a_live_one_keeps_everything() {
        let hub = Hub::new();
        let mut stalled = hub.subscribe().expect("open");
        let mut live = hub.subscribe().expect("open");
        let total = SUBSCRIBER_QUEUE + 10;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < total {
                match live.next().await {
                    Event::Data(c) => got.push(c.data[0]),
                    other => panic!("live subscriber got {other:?}"),
                }
            }
            got
        });
        for n in 0..total {
            hub.deliver(chunk(u8::try_from(n % 256).expect("byte")))
                .await;
        }
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), total);
        // The stalled one got its queue's worth, then the eviction.
        let mut count = 0;
        loop {
            match stalled.next().await {
                Event::Data(_) => count += 1,
                Event::Evicted => break,
                Event::End(_) => panic!("should have been evicted"),
            }
        }
        assert_eq!(count, SUBSCRIBER_QUEUE);
    }

    #[tokio::test]
    async fn without_subscribers_output_is_discarded() {
        let hub = Hub::new();
        hub.deliver(chunk(1)).await;
        let mut late = hub.subscribe().expect("open");
        hub.deliver(chunk(2)).await;
        hub.finish(exit0(), EndReason::Exit);
        assert!(matches!(late.next().await, Event::Data(c) if c.data.as_ref() == [2]));
        assert!(matches!(late.next().await, Event::End(_)));
    }
}
