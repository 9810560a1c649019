//! One listener for everything: HTTP/1.1 and cleartext HTTP/2 (prior knowledge) are told
//! apart per connection, REST and every RPC protocol share the router. Shutdown stops
//! accepting, ends streams cleanly through the shared cancellation token, and waits (up to
//! the configured grace) for in-flight requests.
//!
//! The limits are applied here: connection slots ([`slots`]), an accept loop that backs off
//! when descriptors run out ([`accept`]), and per connection the protocol limits, the idle
//! watchdog and stalled-body timeouts ([`connection`], [`body`]). A panic in a handler is
//! caught by the guard around the whole app ([`crate::panics`]).

pub mod accept;
pub mod body;
pub mod connection;
pub mod drain;
pub mod slots;

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer, ExposeHeaders};

use crate::http;
use crate::panics::guard::{CatchPanic, Rest};
use crate::rpc::Rpc;
use crate::server::connection::App;
use crate::state::AppState;

/// How long browsers may cache a CORS preflight answer (envd's value).
const CORS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7200);

/// Serves `listener` until `shutdown` resolves, then shuts down gracefully.
///
/// # Errors
/// None today (the services are built without failing); the result leaves room for one.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let rpc = Rpc::new(state.clone());
    let app = app(state.clone(), rpc);
    let settings = Arc::new(connection::Settings::new(&state.config.limits));
    let connections = TaskTracker::new();
    let mut acceptor = accept::Acceptor::new(listener);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = state.connections.acquire() => slot,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            () = &mut shutdown => break,
        };
        connections.spawn(connection::serve(
            stream,
            peer,
            app.clone(),
            settings.clone(),
            state.shutdown.clone(),
            slot,
        ));
    }
    tracing::info!("shutting down");
    crate::supervisor::stopping();
    drop(acceptor);
    state.shutdown.cancel();
    connections.close();
    if tokio::time::timeout(state.config.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?state.config.shutdown_grace, "requests still running after the grace period");
    }
    Ok(())
}

/// The service each connection serves: the REST routes and the RPC protocols, CORS, and
/// the panic guard around all of it (the RPC stack has its own inside, which answers in the
/// RPC's protocol).
pub fn app(state: AppState, rpc: Rpc) -> App {
    let router = http::router(state, rpc).layer(cors());
    #[cfg(debug_assertions)]
    if crate::panics::fault::enabled() {
        let rest_only = |path: &str| !Rpc::is_rpc_path(path);
        let faulty = crate::panics::fault::Faults::<_, Rest>::new(router, rest_only);
        return App::new(CatchPanic::<_, Rest>::new(faulty));
    }
    App::new(CatchPanic::<_, Rest>::new(router))
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
