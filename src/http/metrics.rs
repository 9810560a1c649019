//! `GET /metrics`: CPU, memory and disk use of the sandbox, exactly as envd reports them;
//! and `GET /metrics/envd` (our extension) with the daemon's own load: connections, tokio
//! tasks, threads and open descriptors, so that a leak shows.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use crate::host::{descriptors, metrics};
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

/// What the daemon itself holds.
#[derive(Debug, serde::Serialize)]
struct DaemonLoad {
    /// Connections being served (this request's included).
    connections: usize,
    /// Tokio tasks alive: one per connection, and per stream, process and timer.
    tasks: usize,
    /// Threads of the daemon: runtime workers and blocking threads (idle ones exit after
    /// 10 s).
    threads: usize,
    /// Open descriptors.
    fds: usize,
}

/// Serves `GET /metrics/envd`.
pub async fn daemon_load(State(state): State<AppState>) -> Response {
    let connections = state.connections.in_use();
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let load = blocking(move || {
        Ok(DaemonLoad {
            connections,
            tasks,
            threads: thread_count(),
            fds: descriptors::open_count().unwrap_or(0),
        })
    });
    match load.await {
        Ok(load) => json_no_store(&load),
        Err(err) => err.into_response(),
    }
}

/// Threads of this process (entries of `/proc/self/task`), 0 when it cannot be read.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}
