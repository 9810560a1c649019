//! REST resources and the router that puts them and the RPC services on one port.

pub mod access;
pub mod envs;
pub mod files;
pub mod init;
pub mod json;
pub mod metrics;
pub mod patches;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use http::{HeaderValue, StatusCode, header};

use crate::rpc::Rpc;
use crate::state::AppState;

/// The whole application: REST routes, with every `/package.Service/Method` path handed to
/// the RPC protocols. Every REST path passes the access-token gate ([`access`]); RPCs pass
/// the same gate inside the RPC stack.
pub fn router(state: AppState, rpc: Rpc) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/files",
            get(files::download::download).post(files::upload::upload),
        )
        .route("/files/metadata", patch(files::metadata::patch_metadata))
        .route("/init", post(init::init))
        .route("/envs", get(envs::envs))
        .route("/metrics", get(metrics::metrics))
        .route(
            "/patches",
            get(patches::get_patches).post(patches::post_patches),
        )
        .route("/metrics/envd", get(metrics::daemon_load))
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::gate,
        ))
        .with_state((state, rpc))
}

/// `GET /health`: 204, never cached.
async fn health() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn fallback(State((_, rpc)): State<(AppState, Rpc)>, request: Request<Body>) -> Response {
    if Rpc::is_rpc_path(request.uri().path()) {
        return rpc.serve(request).await;
    }
    let mut response = (StatusCode::NOT_FOUND, "404 page not found\n").into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl axum::extract::FromRef<(AppState, Rpc)> for AppState {
    fn from_ref(input: &(AppState, Rpc)) -> Self {
        input.0.clone()
    }
}
