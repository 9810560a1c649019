//! `GET /metrics`: CPU, memory and disk use of the sandbox, as envd reports them.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use crate::host::metrics;
use crate::http::json::json_no_store;
use crate::rpc::blocking;
use crate::state::AppState;

/// Serves `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let cpu = state.cpu.clone();
    match blocking(move || metrics::collect(&cpu)).await {
        Ok(reading) => json_no_store(&reading),
        Err(err) => err.into_response(),
    }
}
