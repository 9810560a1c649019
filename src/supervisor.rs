//! Talking to systemd (or any supervisor speaking its notify protocol): `READY=1` once the
//! daemon serves, `STOPPING=1` when it shuts down, and watchdog pets only while it really
//! serves — each pet follows a `GET /health` answered 204 through the daemon's own
//! listener, so a wedged accept loop or runtime stops the pets and the supervisor
//! restarts the daemon. Without `NOTIFY_SOCKET` all of this is a no-op.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Says the daemon is stopping (before it waits for in-flight requests).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// How long one health probe may take before this pet is skipped.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Says the daemon is ready and starts the watchdog (if the supervisor asked for one).
pub fn ready(addr: SocketAddr, shutdown: CancellationToken) {
    if let Err(err) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(%err, "telling the supervisor we are ready");
    }
    let probe = loopback(addr);
    let watchdog = sd_notify::watchdog_enabled();
    tokio::spawn(async move {
        let Some(period) = watchdog else { return };
        // Pet twice per period, as systemd recommends.
        let mut ticker = tokio::time::interval(period / 2);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                                () = shutdown.cancelled() => return,
            }
            match tokio::time::timeout(PROBE_TIMEOUT, healthy(probe)).await {
                Ok(true) => {
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
                _ => tracing::warn!("health probe failed: not petting the watchdog"),
            }
        }
    });
}

/// The address to probe the listener at: loopback when it listens on every interface.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// One `GET /health` through the listener.
async fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let request = b"GET /health HTTP/1.1\r\nHost: envd\r\nConnection: close\r\n\r\n";
    if stream.write_all(request).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.is_ok() && head.starts_with(b"HTTP/1.1 204")
}
