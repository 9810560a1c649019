//! `GET /envs`: the environment the daemon gives new processes (internal variables and the
//! ones `/init` set), as a flat JSON object sorted by name.

use axum::extract::State;
use axum::response::Response;

use crate::http::json::json_no_store;
use crate::state::AppState;

/// Serves `GET /envs`.
pub async fn envs(State(state): State<AppState>) -> Response {
    json_no_store(&state.env.snapshot())
}
