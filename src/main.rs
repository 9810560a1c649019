//! The `envd` binary: parse the command line, set up logging, bind, print the bound address
//! on stdout, serve until SIGTERM or SIGINT.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use envd::config::{Cli, Config};
use envd::state::AppState;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("ENVD_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    envd::panics::log_panics();
    let config = match Config::from_cli(cli) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("envd: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(config.limits.max_blocking_threads)
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("envd: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "envd failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    match envd::host::descriptors::raise_limit() {
        Ok((soft, _)) => tracing::debug!(limit = soft, "descriptor limit"),
        Err(err) => tracing::warn!(%err, "cannot raise the descriptor limit"),
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|err| anyhow::anyhow!("binding {}: {err}", config.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal()?;
    // Before the ready line: building the state cleans up after a crashed previous run.
    let state = AppState::new(config);
    // The one machine-readable line on stdout: supervisors and tests wait for it.
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{{\"event\":\"listening\",\"addr\":\"{addr}\"}}")?;
        stdout.flush()?;
    }
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "listening");
    envd::server::run(listener, state, shutdown).await?;
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
