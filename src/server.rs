//! One listener for everything: HTTP/1.1 and cleartext HTTP/2 (prior knowledge) are told
//! apart per connection, REST and every RPC protocol share the router. Shutdown stops
//! accepting, ends streams cleanly through the shared cancellation token, and waits (up to
//! the configured grace) for in-flight requests.

use std::future::Future;
use std::io;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer, ExposeHeaders};

use crate::http;
use crate::rpc::Rpc;
use crate::state::AppState;

/// How long browsers may cache a CORS preflight answer (envd's value).
const CORS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7200);

/// Serves `listener` until `shutdown` resolves, then shuts down gracefully.
///
/// # Errors
/// When the services cannot be built (a build defect).
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let rpc = Rpc::new(state.clone()).map_err(io::Error::other)?;
    let app = http::router(state.clone(), rpc).layer(cors());
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // EMFILE and friends: the connection is lost, the listener is not.
                    tracing::warn!(%err, "accepting a connection");
                    tokio::task::yield_now().await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, %peer, "setting TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, %peer, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down");
    crate::supervisor::stopping();
    drop(listener);
    state.shutdown.cancel();
    if tokio::time::timeout(state.config.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?state.config.shutdown_grace, "requests still running after the grace period");
    }
    Ok(())
}

/// Permissive CORS, as envd: any origin, the methods and headers clients use, the gRPC
/// status headers exposed.
fn cors() -> CorsLayer {
    use ::http::{HeaderName, Method};
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods(AllowMethods::list([
            Method::HEAD,
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ]))
        .allow_headers(AllowHeaders::any())
        .expose_headers(ExposeHeaders::list([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
            HeaderName::from_static("location"),
            HeaderName::from_static("cache-control"),
            HeaderName::from_static("x-content-type-options"),
        ]))
        .max_age(CORS_MAX_AGE)
}
