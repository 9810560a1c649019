//! Accepting connections without ever giving up the listener, and without spinning.
//!
//! When the daemon is out of descriptors (EMFILE, or ENFILE for the whole system) or the
//! kernel out of buffers (ENOBUFS, ENOMEM), `accept` fails while the connection it could not
//! take stays queued, so the listener is readable again at once: retrying immediately spins
//! a core at 100%. Those errors back off instead, 5 ms doubling to 1 s (as Go's net/http,
//! which envd uses, does), with one warning when it starts and one line when it ends. Errors
//! that concern one connection (it was reset before it was taken) are retried at once.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use nix::errno::Errno;
use tokio::net::{TcpListener, TcpStream};

/// First pause after a resource error.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause: a freed descriptor is used within this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The listener and the state of its backoff.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    /// The next pause, while accepting fails for lack of resources.
    backoff: Option<Duration>,
    /// Failed accepts in the current episode, reported when it ends.
    failures: u64,
}

impl Acceptor {
    /// Accepts from `listener`.
    pub fn new(listener: TcpListener) -> Self {
        Acceptor {
            listener,
            backoff: None,
            failures: 0,
        }
    }

    /// The next connection. Never fails: errors are logged and retried as described above.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    if self.failures > 0 {
                        tracing::info!(failed = self.failures, "accepting connections again");
                    }
                    self.backoff = None;
                    self.failures = 0;
                    return accepted;
                }
                Err(err) if is_resource_exhaustion(&err) => {
                    let pause = match self.backoff {
                        None => {
                            tracing::warn!(%err, "cannot accept connections; backing off until resources are freed");
                            FIRST_BACKOFF
                        }
                        Some(pause) => pause,
                    };
                    self.failures += 1;
                    self.backoff = Some((pause * 2).min(MAX_BACKOFF));
                    tokio::time::sleep(pause).await;
                }
                Err(err) => tracing::debug!(%err, "accepting a connection"),
            }
        }
    }
}

/// True for the errors that say the daemon or the system is out of a resource, as opposed
/// to something about the one connection.
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    let Some(code) = err.raw_os_error() else {
        return false;
    };
    [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
        .iter()
        .any(|errno| *errno as i32 == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_are_told_from_connection_errors() {
        for errno in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            let err = io::Error::from_raw_os_error(errno as i32);
            assert!(is_resource_exhaustion(&err), "{errno}");
        }
        for errno in [
            Errno::ECONNABORTED,
            Errno::EPROTO,
            Errno::EPERM,
            Errno::EINTR,
        ] {
            let err = io::Error::from_raw_os_error(errno as i32);
            assert!(!is_resource_exhaustion(&err), "{errno}");
        }
        assert!(!is_resource_exhaustion(&io::Error::other("no errno")));
    }
}
