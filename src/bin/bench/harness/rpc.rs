//! Rows 4 and 5: `Stat` under concurrent callers (Connect JSON and gRPC) and `ListDir` of a
//! large directory whose entries carry metadata, each against the same syscalls made
//! directly by the harness.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use envd::proto::filesystem::filesystem_client::FilesystemClient;
use envd::proto::filesystem::{ListDirRequest, StatRequest};
use xattr::FileExt;

use super::report::{Rate, Row, Target};
use super::stats;
use super::{Ctx, blocking};

/// Metadata keys on the entries `Stat` and `ListDir` read.
const KEYS: [&str; 3] = ["owner", "job-id", "kind"];
/// Largest message the gRPC client accepts (a listing of 10,000 entries is ~2 MiB).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Creates `path` with the three metadata keys (when the filesystem takes them).
fn tagged_file(path: &Path, index: usize, xattrs: bool) -> anyhow::Result<()> {
    let file = File::create(path)?;
    if xattrs {
        for key in KEYS {
            let value = if key == "job-id" {
                index.to_string()
            } else {
                format!("{key}-value")
            };
            file.set_xattr(format!("user.e2b.{key}"), value.as_bytes())?;
        }
    }
    Ok(())
}

/// An entry as the floor reads it: its `lstat` and its `user.e2b.*` pairs.
type Described = (std::fs::Metadata, Vec<(String, Vec<u8>)>);

/// What `Stat` and each `ListDir` entry cost in syscalls, done directly: `lstat`, then the
/// `user.e2b.*` names and each value.
fn describe(path: &Path) -> anyhow::Result<Described> {
    let meta = std::fs::symlink_metadata(path)?;
    let mut metadata = Vec::new();
    for name in xattr::list(path)? {
        let Some(key) = name.to_str().and_then(|n| n.strip_prefix("user.e2b.")) else {
            continue;
        };
        if let Some(value) = xattr::get(path, &name)? {
            metadata.push((key.to_owned(), value));
        }
    }
    Ok((meta, metadata))
}

async fn grpc_client(ctx: &Ctx) -> anyhow::Result<FilesystemClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(ctx.daemon.base.clone())?
        .connect()
        .await?;
    Ok(FilesystemClient::new(channel).max_decoding_message_size(MAX_MESSAGE))
}

/// Row 4: `Stat` over Connect JSON and over gRPC at the configured number of callers.
///
/// # Errors
/// When a call fails.
pub async fn stat(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let dir = ctx.dir.join("stat");
    std::fs::create_dir_all(&dir)?;
    let target = dir.join("target.txt");
    tagged_file(&target, 42, ctx.xattrs)?;
    let path = target.to_str().context("utf-8 path")?.to_owned();
    let (requests, callers) = (ctx.options.stat_requests, ctx.options.stat_callers);

    let floor = {
        let target = target.clone();
        blocking(move || threads(requests, callers, move || describe(&target).map(drop))).await?
    };
    ctx.daemon.reset_peak()?;
    let json = {
        let http = ctx.http.clone();
        let url = ctx.daemon.url("/filesystem.Filesystem/Stat");
        let body = serde_json::json!({ "path": path }).to_string();
        tasks(requests, callers, move || {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            async move {
                let response = http
                    .post(url)
                    .header("content-type", "application/json")
                    .header("connect-protocol-version", "1")
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                let text = response.text().await?;
                if status != 200 || !text.contains("\"entry\"") {
                    bail!("Stat answered {status}: {text}");
                }
                Ok(())
            }
        })
        .await?
    };
    let json_peak = ctx.daemon.status_kib("VmHWM")?;
    ctx.daemon.reset_peak()?;
    let grpc = {
        let client = grpc_client(ctx).await?;
        tasks(requests, callers, move || {
            let mut client = client.clone();
            let path = path.clone();
            async move {
                let response = client.stat(StatRequest { path }).await?.into_inner();
                if response.entry.is_none() {
                    bail!("Stat answered without an entry");
                }
                Ok(())
            }
        })
        .await?
    };
    let grpc_peak = ctx.daemon.status_kib("VmHWM")?;
    let _ = std::fs::remove_dir_all(&dir);
    let floor_rate = requests as f64 / floor.wall.as_secs_f64();
    Ok([
        ("stat_connect_json", "Connect JSON", json, json_peak),
        ("stat_grpc", "gRPC", grpc, grpc_peak),
    ]
    .into_iter()
    .map(|(id, protocol, batch, peak)| {
        let rate = requests as f64 / batch.wall.as_secs_f64();
        Row {
            id,
            title: format!("Stat over {protocol}, {callers} concurrent callers"),
            unit: "ms/call",
            daemon: stats::lower_better(&stats::millis(&batch.latencies)),
            floor: Some(stats::lower_better(&stats::millis(&floor.latencies))),
            floor_is: "lstat + listxattr + getxattr per key on as many threads",
            rate: Some(Rate {
                unit: "req/s",
                daemon: rate,
                floor: Some(floor_rate),
            }),
            ratio: Some(rate / floor_rate),
            ratio_is: "daemon/floor",
            target: None,
            daemon_peak_rss_kib: Some(peak),
            note: None,
        }
    })
    .collect())
}

/// Row 5: `ListDir` of a directory of tagged files, over gRPC and Connect JSON.
///
/// # Errors
/// When a call fails or a listing misses entries.
pub async fn list_dir(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let entries = ctx.options.list_entries;
    let dir = ctx.dir.join("listdir");
    std::fs::create_dir_all(&dir)?;
    {
        let (dir, xattrs) = (dir.clone(), ctx.xattrs);
        blocking(move || {
            for index in 0..entries {
                tagged_file(&dir.join(format!("entry-{index:05}.txt")), index, xattrs)?;
            }
            Ok(())
        })
        .await?;
    }
    let path = dir.to_str().context("utf-8 path")?.to_owned();
    let mut client = grpc_client(ctx).await?;
    let request = || ListDirRequest {
        path: path.clone(),
        depth: 1,
    };
    let json_body = serde_json::json!({ "path": path, "depth": 1 }).to_string();
    let json_call = || async {
        let response = ctx
            .http
            .post(ctx.daemon.url("/filesystem.Filesystem/ListDir"))
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .body(json_body.clone())
            .send()
            .await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if status != 200 {
            bail!("ListDir answered {status}");
        }
        anyhow::Ok(bytes)
    };

    // Warm-up, and a check that every entry is listed with its metadata.
    let listed = client.list_dir(request()).await?.into_inner().entries;
    if listed.len() != entries || (ctx.xattrs && listed.iter().any(|e| e.metadata.len() != 3)) {
        bail!(
            "ListDir listed {} entries, not {entries} with metadata",
            listed.len()
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&json_call().await?)?;
    let json_len = json["entries"].as_array().map_or(0, Vec::len);
    if json_len != entries {
        bail!("ListDir (JSON) listed {json_len} entries, not {entries}");
    }

    let mut floor = Vec::new();
    let mut grpc = Vec::new();
    let mut connect = Vec::new();
    let mut peak = 0u64;
    for _ in 0..ctx.options.list_iterations {
        let dir2 = dir.clone();
        floor.push(blocking(move || floor_list(&dir2, entries)).await?);
        ctx.daemon.reset_peak()?;
        let start = Instant::now();
        let listed = client.list_dir(request()).await?.into_inner().entries.len();
        grpc.push(start.elapsed());
        let start = Instant::now();
        json_call().await?;
        connect.push(start.elapsed());
        peak = peak.max(ctx.daemon.status_kib("VmHWM")?);
        if listed != entries {
            bail!("ListDir listed {listed} entries, not {entries}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let floor_summary = stats::lower_better(&stats::millis(&floor));
    Ok([
        ("listdir_grpc", "gRPC (decoded by tonic)", grpc),
        (
            "listdir_connect_json",
            "Connect JSON (bytes received)",
            connect,
        ),
    ]
    .into_iter()
    .map(|(id, protocol, samples)| {
        let daemon = stats::lower_better(&stats::millis(&samples));
        let ratio = daemon.median / floor_summary.median;
        Row {
            id,
            title: format!(
                "ListDir of {entries} entries with {} metadata keys over {protocol}",
                if ctx.xattrs { KEYS.len() } else { 0 }
            ),
            unit: "ms/listing",
            daemon,
            floor: Some(floor_summary),
            floor_is: "readdir + lstat + listxattr + getxattr per key, one thread",
            rate: None,
            ratio: Some(ratio),
            ratio_is: "daemon/floor",
            target: Target::at_most("<= 1.5x floor", Some(ratio), 1.5),
            daemon_peak_rss_kib: Some(peak),
            note: None,
        }
    })
    .collect())
}

/// The floor of a listing: the same syscalls, results kept as a caller would keep them.
fn floor_list(dir: &Path, entries: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut listed = Vec::with_capacity(entries);
    for entry in std::fs::read_dir(dir)? {
        let path: PathBuf = entry?.path();
        let described = describe(&path)?;
        listed.push((path, described));
    }
    let elapsed = start.elapsed();
    if listed.len() != entries {
        bail!("floor listed {} entries, not {entries}", listed.len());
    }
    Ok(elapsed)
}

/// Per-call latencies and the batch's wall time.
pub struct Batch {
    /// One per call.
    pub latencies: Vec<Duration>,
    /// The whole batch.
    pub wall: Duration,
}

/// Runs `total` calls of `work` on `workers` threads.
fn threads(
    total: usize,
    workers: usize,
    work: impl Fn() -> anyhow::Result<()> + Sync,
) -> anyhow::Result<Batch> {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut latencies = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < total {
                        let began = Instant::now();
                        work()?;
                        latencies.push(began.elapsed());
                    }
                    Ok(latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
            .collect()
    });
    let wall = start.elapsed();
    let mut latencies = Vec::with_capacity(total);
    for result in results {
        latencies.extend(result?);
    }
    Ok(Batch { latencies, wall })
}

/// Runs `total` calls of `call` on `callers` concurrent tasks.
async fn tasks<F, Fut>(total: usize, callers: usize, call: F) -> anyhow::Result<Batch>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let call = Arc::new(call);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (next, call) = (next.clone(), call.clone());
        set.spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let began = Instant::now();
                call().await?;
                latencies.push(began.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(done) = set.join_next().await {
        latencies.extend(done??);
    }
    Ok(Batch {
        latencies,
        wall: start.elapsed(),
    })
}
