//! The access-token gate on REST routes: a middleware in front of every REST path,
//! answering refusals with envd's JSON error (401). RPC paths pass through untouched: the
//! RPC stack applies the same gate itself ([`crate::rpc::access`]) so that a refused RPC
//! gets its own protocol's `unauthenticated` error.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::gate::{self, ACCESS_TOKEN_HEADER};
use crate::rpc::Rpc;
use crate::state::AppState;

/// Lets a REST request through the gate or answers 401.
pub async fn gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if Rpc::is_rpc_path(path) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(ACCESS_TOKEN_HEADER)
        .map(|value| value.as_bytes());
    match gate::check(&state.access, request.method(), path, presented) {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}
