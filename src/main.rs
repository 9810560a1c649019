//! The `envd` binary: parse the command line, set up logging, open the state directory,
//! restore what a previous run left (the `/init` state, the processes its keepers still
//! hold), bind, print the bound address on stdout, tell systemd it is ready, serve until
//! SIGTERM or SIGINT. Started as `envd __keeper <socket>`, it is a process keeper instead,
//! and as `envd __spares <dir> <room>`, the nursery that forks spare keepers.
//!
//! The entry point is C's `main`, not std's `fn main`: std's start-up asks glibc for the
//! main thread's stack bounds (`pthread_getattr_np`, which parses `/proc/self/maps` with
//! stdio and scanf), only to report a stack overflow by name. That parse kept about 0.1 MiB
//! more of libc's text resident in the idle daemon, and it ran in every keeper's start.
//! What else std's start-up does is done here ([`envd::sys::start_like_std`]); a panic
//! that escapes ends the process with 101, as std's does.

#![no_main]

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;

use clap::Parser;
use envd::config::{Cli, Config};
use envd::persist::StateDir;
use envd::persist::init_state::{self, InitState};
use envd::process::keeper::nursery::NURSERY_ARG;
use envd::process::keeper::{self, KEEPER_ARG};
use envd::state::AppState;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// The process's entry point, called by the C runtime.
#[allow(unsafe_code)] // `no_mangle`: the C runtime calls it by this name.
#[unsafe(no_mangle)]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    envd::sys::start_like_std();
    let code = std::panic::catch_unwind(run).unwrap_or(PANICKED);
    // std::process::exit flushes stdout, as returning from std's `fn main` does.
    std::process::exit(i32::from(code))
}

/// The exit code of a panic that reached `main` (std's).
const PANICKED: u8 = 101;

fn run() -> u8 {
    // A keeper first: it is started for every process, single-threaded, and needs none of
    // the daemon's set-up (the arena count below reads cgroup files).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|arg| arg == KEEPER_ARG) {
        return match args.get(2) {
            Some(socket) => keeper::server::main(Path::new(socket)),
            None => 2,
        };
    }
    if args.get(1).is_some_and(|arg| arg == NURSERY_ARG) {
        return keeper::nursery::main(args.first().map_or(OsStr::new("envd"), |a| a.as_os_str()));
    }
    envd::sys::tune_malloc(
        std::thread::available_parallelism().map_or(2, |n| i32::try_from(n.get()).unwrap_or(2)),
    );
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
            return 2;
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
            return 1;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => 0,
        Err(err) => {
            tracing::error!(%err, "envd failed");
            1
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    match envd::host::descriptors::raise_limit() {
        Ok((soft, _)) => tracing::debug!(limit = soft, "descriptor limit"),
        Err(err) => tracing::warn!(%err, "cannot raise the descriptor limit"),
    }
    let state_dir = match &config.state_dir {
        Some(path) => Some(
            StateDir::open(path)
                .map_err(|err| anyhow::anyhow!("state directory {}: {err}", path.display()))?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|err| anyhow::anyhow!("binding {}: {err}", config.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal()?;
    // Building the state also cleans up after a crashed previous run (the upload journal).
    let state = AppState::new(config, state_dir);
    // Restore before accepting anything: the token is enforced from the first request,
    // and surviving processes are listed, signalled and re-attached as before.
    if let Some(dir) = &state.state_dir {
        if let Some(saved) = dir.load::<InitState>(init_state::FILE) {
            saved.restore(&state);
            tracing::info!("restored the /init state of a previous run");
        }
    }
    let adopted = state.processes.rehydrate().await;
    if adopted > 0 {
        tracing::info!(adopted, "re-adopted processes of a previous run");
    }
    // The one machine-readable line on stdout: supervisors and tests wait for it.
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{{\"event\":\"listening\",\"addr\":\"{addr}\"}}")?;
        stdout.flush()?;
    }
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "listening");
    // Start-up is over: the relocation table the dynamic linker read is never read again.
    match envd::sys::relocations::release_relocation_table() {
        Ok(bytes) => tracing::debug!(bytes, "released the relocation table's pages"),
        Err(err) => tracing::debug!(%err, "could not release the relocation table's pages"),
    }
    envd::supervisor::ready(addr, state.shutdown.clone());
    envd::server::run(listener, state.clone(), shutdown).await?;
    // Changes the saver was still gathering (`SAVE_GATHER` in the process registry).
    state.processes.save().await;
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
