//! One accepted connection: HTTP/1.1 or cleartext HTTP/2 with the configured limits, a
//! watchdog that closes it when it goes too long without a request in progress, request
//! bodies that fail when they stall, HTTP/1.1 bodies read to their end when a handler
//! answers early ([`crate::server::drain`]), and graceful shutdown.
//!
//! The watchdog is what makes slow clients harmless. A request is "in progress" from the
//! moment its headers are complete until its response body is finished or dropped; with
//! none in progress for `--request-header-timeout-secs`, the connection is closed, whatever
//! bytes trickle in. That covers a client that connects and sends nothing (hyper-util waits
//! for the HTTP/2 preface without a timeout of its own), one that sends its headers a byte
//! at a time (over either protocol), and keep-alive connections left idle. Streams and long
//! downloads are requests in progress, so they are never cut off by it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::limits::Limits;
use crate::rpc::Rpc;
use crate::server::body::IdleTimeoutBody;
use crate::server::drain::DrainOnDrop;
use crate::server::slots::Slot;

/// How long a connection closed by the watchdog may take to say goodbye (an HTTP/2 GOAWAY
/// waits for the peer's acknowledgement) before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// TCP keepalive: a peer that vanished without closing (its machine or network gone) is
/// found after about `KEEPALIVE_IDLE + KEEPALIVE_PROBES × KEEPALIVE_INTERVAL` (2 minutes),
/// and its streams end as if it had disconnected.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection is dropped.
pub const KEEPALIVE_PROBES: u32 = 6;

/// The service every connection serves (REST routes and RPCs behind their guards).
pub type App = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// What every connection is served with.
pub struct Settings {
    builder: auto::Builder<TokioExecutor>,
    request_header_timeout: Duration,
    body_idle_timeout: Duration,
}

impl Settings {
    /// The protocol builder with `limits` applied.
    pub fn new(limits: &Limits) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.request_header_timeout)
            // The whole head must fit in the read buffer: this is the header size limit.
            .max_buf_size(limits.max_header_bytes)
            .max_headers(limits.max_headers);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Settings {
            builder,
            request_header_timeout: limits.request_header_timeout,
            body_idle_timeout: limits.body_idle_timeout,
        }
    }
}

/// Serves one connection until it ends, the watchdog closes it, or the daemon shuts down.
/// `slot` is held until then.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    app: App,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
    slot: Slot,
) {
    configure_socket(&stream, peer);
    let activity = Activity::new();
    let service = Tracked {
        inner: app,
        activity: activity.clone(),
        body_idle_timeout: settings.body_idle_timeout,
    };
    let connection = settings
        .builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(connection);
    let quiet = activity.quiet_for(settings.request_header_timeout);
    tokio::pin!(quiet);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = &mut quiet => {
            tracing::debug!(%peer, timeout = ?settings.request_header_timeout, "closing a connection without a request in progress");
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await.unwrap_or(Ok(()))
        }
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%err, %peer, "connection ended with an error");
    }
    drop(slot);
}

/// TCP_NODELAY (RPC messages are small and latency-bound) and keepalive.
fn configure_socket(stream: &TcpStream, peer: SocketAddr) {
    use nix::sys::socket::{setsockopt, sockopt};
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, %peer, "setting TCP_NODELAY");
    }
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let keepalive = setsockopt(stream, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepIdle, &secs(KEEPALIVE_IDLE)))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepInterval, &secs(KEEPALIVE_INTERVAL)))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES));
    if let Err(err) = keepalive {
        tracing::debug!(%err, %peer, "setting TCP keepalive");
    }
}

/// The number of requests in progress on one connection.
#[derive(Clone)]
struct Activity {
    requests: Arc<watch::Sender<usize>>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            requests: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Counts a request until the returned guard is dropped.
    fn begin(&self) -> InFlight {
        self.requests.send_modify(|n| *n += 1);
        InFlight(self.clone())
    }

    /// Resolves once no request has been in progress for `limit`.
    async fn quiet_for(&self, limit: Duration) {
        let mut requests = self.requests.subscribe();
        loop {
            let idle = *requests.borrow_and_update() == 0;
            let changed = if idle {
                match tokio::time::timeout(limit, requests.changed()).await {
                    Ok(changed) => changed,
                    Err(_) => return,
                }
            } else {
                requests.changed().await
            };
            if changed.is_err() {
                // The sender lives as long as this connection's service: unreachable.
                return std::future::pending().await;
            }
        }
    }
}

/// One request in progress.
struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The connection's service: counts requests in progress and bounds body idle time.
#[derive(Clone)]
struct Tracked {
    inner: App,
    activity: Activity,
    body_idle_timeout: Duration,
}

impl tower::Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.begin();
        // A client stream may be quiet for as long as its user is (terminal input).
        let timeout =
            (!Rpc::request_is_stream(request.uri().path())).then_some(self.body_idle_timeout);
        // An HTTP/2 stream's unread body ends with its stream; an HTTP/1.1 one would take
        // the connection with it.
        let drain = request.version() < http::Version::HTTP_2 && !expects_continue(&request);
        let request = request.map(|body| {
            let body = IdleTimeoutBody::new(body, timeout);
            if drain {
                Body::new(DrainOnDrop::new(body))
            } else {
                Body::new(body)
            }
        });
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| {
                Body::new(Counted {
                    inner: body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// True when the client waits for `100 Continue` before it sends the body.
fn expects_continue<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(http::header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A response body that keeps its request counted as in progress until it is done.
struct Counted {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
