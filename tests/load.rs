//! Load against the real binary: many concurrent connections (1,000 by default), each its
//! own, mixing uploads, downloads, Stat and ListDir (Connect over HTTP/1.1 and gRPC over
//! HTTP/2) and process streams (Connect and gRPC), all at once, for a while. Then: no
//! errors, bounded memory, and no leak: the daemon's descriptors and threads return to
//! where they were, and its tokio tasks to that plus one timer per retained process exit.
//!
//! `cargo test` runs a short round (a few seconds of load). The long run is the ignored
//! test, sized by environment variables:
//!
//! ```sh
//! ENVD_LOAD_SECS=600 ENVD_LOAD_CONNECTIONS=1000 \
//!   cargo test --release --test load -- --ignored --nocapture
//! ```
//!
//! Both need `ulimit -n` (hard) of at least twice the connections plus some: the test raises
//! its own soft limit to the hard one, and the daemon raises its own.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, TOKEN_HEADER, envelope, envelopes, wait_until};
use envd::proto::filesystem::{ListDirRequest, StatRequest, filesystem_client::FilesystemClient};
use envd::proto::process::{
    ProcessConfig, StartRequest, process_client::ProcessClient, process_event,
};
use tokio::sync::Barrier;

const TOKEN: &str = "load-token";
/// Peak resident memory the daemon may reach under the load (it is about 20 MiB idle).
const MAX_RSS_KIB: u64 = 512 * 1024;

#[derive(Default)]
struct Counts {
    ops: [AtomicU64; KINDS],
    errors: AtomicU64,
    first_errors: std::sync::Mutex<Vec<String>>,
}

const KINDS: usize = 8;
const KIND_NAMES: [&str; KINDS] = [
    "upload",
    "download",
    "Connect Stat",
    "Connect ListDir",
    "gRPC Stat",
    "gRPC ListDir",
    "Connect process stream",
    "gRPC process stream",
];

impl Counts {
    fn record(&self, kind: usize, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.ops[kind].fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_errors.lock().expect("lock");
                if first.len() < 10 {
                    first.push(format!("{}: {err}", KIND_NAMES[kind]));
                }
            }
        }
    }
}

/// Raises this process's soft descriptor limit to the hard one; the hard one.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The daemon's own load, from `GET /metrics/envd`.
async fn daemon_load(daemon: &Daemon) -> serde_json::Value {
    reqwest::Client::new()
        .get(daemon.url("/metrics/envd"))
        .header(TOKEN_HEADER, TOKEN)
        .send()
        .await
        .expect("/metrics/envd")
        .json()
        .await
        .expect("json")
}

/// Process exits the daemon retains (each with a timer task until it expires).
async fn retained_exits(daemon: &Daemon) -> u64 {
    let listed: serde_json::Value = reqwest::Client::new()
        .post(daemon.url("/envd_ext.Processes/List"))
        .header(TOKEN_HEADER, TOKEN)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    listed["processes"].as_array().map_or(0, |all| {
        all.iter()
            .filter(|p| p["state"] == "PROCESS_STATE_EXITED")
            .count()
    }) as u64
}

fn echo_request() -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/echo".into(),
            args: vec!["hi".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-access-token", TOKEN.parse().expect("ascii"));
    request
}

/// One operation of `kind` on this client's own connection.
async fn operate(
    kind: usize,
    i: usize,
    http: &reqwest::Client,
    grpc: Option<&tonic::transport::Channel>,
    daemon_base: &str,
    dir: &std::path::Path,
) -> Result<(), String> {
    let url = |path: &str| format!("{daemon_base}{path}");
    let fail = |what: &str, detail: String| Err(format!("{what}: {detail}"));
    match kind {
        0 => {
            let path = dir.join(format!("up-{i}.bin"));
            let response = http
                .post(url("/files"))
                .query(&[("path", path.to_str().unwrap_or_default())])
                .header(TOKEN_HEADER, TOKEN)
                .header("content-type", "application/octet-stream")
                .header("X-Metadata-Client", i.to_string())
                .body(vec![b'u'; 64 * 1024])
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if response.status() != 200 {
                return fail("status", response.status().to_string());
            }
            response.bytes().await.map_err(|e| e.to_string())?;
        }
        1 => {
            let response = http
                .get(url("/files"))
                .query(&[(
                    "path",
                    dir.join("download.bin").to_str().unwrap_or_default(),
                )])
                .header(TOKEN_HEADER, TOKEN)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let body = response.bytes().await.map_err(|e| e.to_string())?;
            if body.len() != 256 * 1024 {
                return fail("length", body.len().to_string());
            }
        }
        2 | 3 => {
            let (method, body) = if kind == 2 {
                (
                    "Stat",
                    serde_json::json!({ "path": dir.join("download.bin") }),
                )
            } else {
                ("ListDir", serde_json::json!({ "path": dir.join("listed") }))
            };
            let response = http
                .post(url(&format!("/filesystem.Filesystem/{method}")))
                .header(TOKEN_HEADER, TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if response.status() != 200 {
                let status = response.status();
                return fail("status", format!("{status} {:?}", response.text().await));
            }
            response.bytes().await.map_err(|e| e.to_string())?;
        }
        4 | 5 => {
            let mut client = FilesystemClient::new(grpc.ok_or("no channel")?.clone());
            if kind == 4 {
                let path = dir.join("download.bin").to_string_lossy().into_owned();
                client
                    .stat(with_token(StatRequest { path }))
                    .await
                    .map_err(|s| s.to_string())?;
            } else {
                let path = dir.join("listed").to_string_lossy().into_owned();
                let listed = client
                    .list_dir(with_token(ListDirRequest { path, depth: 1 }))
                    .await
                    .map_err(|s| s.to_string())?;
                if listed.into_inner().entries.len() != 50 {
                    return fail("entries", "not 50".into());
                }
            }
        }
        6 => {
            let request = serde_json::json!({ "process": { "cmd": "/bin/echo", "args": ["hi"] } });
            let response = http
                .post(url("/process.Process/Start"))
                .header(TOKEN_HEADER, TOKEN)
                .header("content-type", "application/connect+json")
                .body(envelope(0, request.to_string().as_bytes()))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let frames = envelopes(response.bytes().await.map_err(|e| e.to_string())?);
            let (flags, end) = frames.last().ok_or("no envelopes")?;
            let clean = serde_json::from_slice::<serde_json::Value>(end)
                .is_ok_and(|end| end.get("error").is_none());
            if *flags != 2 || !clean {
                return fail("end", String::from_utf8_lossy(end).into_owned());
            }
        }
        _ => {
            let mut client = ProcessClient::new(grpc.ok_or("no channel")?.clone());
            let mut stream = client
                .start(with_token(echo_request()))
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            let mut ended = false;
            while let Some(message) = stream.message().await.map_err(|s| s.to_string())? {
                let event = message.event.and_then(|e| e.event);
                if let Some(process_event::Event::End(end)) = event {
                    ended = end.exited && end.exit_code == 0;
                }
            }
            if !ended {
                return fail("end", "no clean exit".into());
            }
        }
    }
    Ok(())
}

async fn run(connections: usize, duration: Duration) {
    let hard = raise_nofile();
    let needed = 2 * connections as u64 + 512;
    if hard < needed {
        eprintln!("skipping: ulimit -n (hard) is {hard}, the load needs {needed}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("download.bin"), vec![b'd'; 256 * 1024]).expect("write");
    std::fs::create_dir(dir.path().join("listed")).expect("mkdir");
    for n in 0..50 {
        std::fs::write(dir.path().join(format!("listed/{n}")), b"x").expect("write");
    }
    let ca = tempfile::tempdir().expect("tempdir");
    let args = common::init_args(ca.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_with(&args, &[]);
    daemon
        .init_ok(serde_json::json!({ "accessToken": TOKEN }))
        .await;

    let idle = daemon_load(&daemon).await;
    let baseline_fds = daemon.fds().len();
    let baseline_threads = daemon.threads();
    let baseline_tasks = idle["tasks"].as_u64().expect("tasks");

    let counts = Arc::new(Counts::default());
    let barrier = Arc::new(Barrier::new(connections + 1));
    let dir_path = Arc::new(dir.path().to_path_buf());
    let mut clients = Vec::with_capacity(connections);
    for i in 0..connections {
        let kind = i % KINDS;
        let counts = counts.clone();
        let barrier = barrier.clone();
        let dir = dir_path.clone();
        let base = daemon.base.clone();
        clients.push(tokio::spawn(async move {
            // Each client its own connection: its own pool of one, or its own channel.
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .expect("client");
            let grpc = if matches!(kind, 4 | 5 | 7) {
                match tonic::transport::Endpoint::from_shared(base.clone())
                    .expect("endpoint")
                    .connect()
                    .await
                {
                    Ok(channel) => Some(channel),
                    Err(err) => {
                        counts.record(kind, Err(format!("connect: {err}")));
                        None
                    }
                }
            } else {
                None
            };
            // A first operation opens the connection; then all start together.
            let first = operate(kind, i, &http, grpc.as_ref(), &base, &dir).await;
            counts.record(kind, first);
            let deadline = barrier.wait().await;
            let _ = deadline;
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let result = operate(kind, i, &http, grpc.as_ref(), &base, &dir).await;
                counts.record(kind, result);
            }
        }));
    }
    barrier.wait().await;
    let during = daemon_load(&daemon).await;
    let concurrent = during["connections"].as_u64().expect("connections");
    for client in clients {
        client.await.expect("client task");
    }
    let peak_kib = daemon.status_kib("VmHWM");

    let errors = counts.errors.load(Ordering::Relaxed);
    let first_errors = counts.first_errors.lock().expect("lock").clone();
    let ops: Vec<u64> = counts
        .ops
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    eprintln!(
        "load: {connections} connections for {duration:?}: {} ops {:?}, {errors} errors, {concurrent} connections at once, peak RSS {} MiB",
        ops.iter().sum::<u64>(),
        KIND_NAMES.iter().zip(&ops).collect::<Vec<_>>(),
        peak_kib / 1024,
    );
    assert_eq!(errors, 0, "errors under load: {first_errors:?}");
    assert!(
        ops.iter().all(|n| *n > 0),
        "every kind of operation ran: {ops:?}"
    );
    assert!(
        concurrent > connections as u64,
        "{concurrent} connections at once, not all {connections}"
    );
    assert!(peak_kib < MAX_RSS_KIB, "peak RSS {peak_kib} KiB");

    // Nothing leaks: descriptors, then threads (idle blocking threads exit after 10 s),
    // then tasks (retained process exits hold a timer each until they expire).
    let limit = Duration::from_secs(30);
    wait_until("the daemon's descriptors to return to idle", limit, || {
        daemon.fds().len() <= baseline_fds
    })
    .await;
    wait_until("the daemon's threads to return to idle", limit, || {
        daemon.threads() <= baseline_threads
    })
    .await;
    let retained = retained_exits(&daemon).await;
    // The connections the checks make close on their own schedule: read the tasks once the
    // only connection left is the reading's own.
    let deadline = Instant::now() + limit;
    let mut ticks = tokio::time::interval(Duration::from_millis(20));
    let after = loop {
        let after = daemon_load(&daemon).await;
        if after["connections"] == 1 {
            break after;
        }
        assert!(Instant::now() < deadline, "connections left open: {after}");
        ticks.tick().await;
    };
    let tasks = after["tasks"].as_u64().expect("tasks");
    assert!(
        tasks <= baseline_tasks + retained,
        "tasks: {tasks} after, {baseline_tasks} before, {retained} retained exits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_mixing_everything_briefly() {
    let connections = env_or("ENVD_LOAD_CONNECTIONS", 1000) as usize;
    run(connections, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with --ignored (see the module docs)"]
async fn sustained_load() {
    let connections = env_or("ENVD_LOAD_CONNECTIONS", 1000) as usize;
    let secs = env_or("ENVD_LOAD_SECS", 300);
    run(connections, Duration::from_secs(secs)).await;
}
