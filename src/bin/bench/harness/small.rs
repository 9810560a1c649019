//! Row 2: many small uploads with metadata at a fixed number of concurrent clients, against
//! the same files written with their xattrs by direct syscalls on as many threads.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use xattr::FileExt;

use super::bare_server::{BareServer, Publish};
use super::report::{Rate, Row, Target};
use super::stats;
use super::{Ctx, blocking};

/// The three metadata keys every file carries, as `X-Metadata-*` headers and as xattrs.
const KEYS: [&str; 3] = ["owner", "job-id", "kind"];

fn value(key: &str, index: usize) -> String {
    match key {
        "owner" => "bench".to_owned(),
        "job-id" => index.to_string(),
        _ => "small-upload".to_owned(),
    }
}

/// What the row measured: per-file latencies and each round's rate.
#[derive(Default)]
struct Batch {
    latencies: Vec<Duration>,
    wall: Duration,
    /// Files per second of each round added.
    rates: Vec<f64>,
}

impl Batch {
    fn add(&mut self, other: Batch) {
        self.rates
            .push(other.latencies.len() as f64 / other.wall.as_secs_f64());
        self.latencies.extend(other.latencies);
        self.wall += other.wall;
    }

    /// The median round's rate: one round stalled by the journal does not decide the row.
    fn rate(&self) -> f64 {
        stats::higher_better(&self.rates).median
    }
}

/// Row 2, and the daemon's peak RSS during it (for row 7).
///
/// # Errors
/// When a write fails.
pub async fn small_uploads(ctx: &Ctx) -> anyhow::Result<(Row, u64)> {
    let options = &ctx.options;
    let content = super::transfer::pattern(options.small_bytes);
    // A filesystem of its own when the machine allows (see `scratch`); else the run's
    // directory, and the row says so.
    let scratch = super::scratch::Scratch::mount(&ctx.dir);
    let root = match &scratch {
        Ok(scratch) => scratch.path().join("small"),
        Err(_) => ctx.dir.join("small"),
    };

    // Four rounds per side in the order floor, daemon, daemon, floor (twice), each into a
    // fresh directory after a writeback: neither side inherits the other's dirty pages or
    // journal work, and a change in the machine's load over the row hits both alike. No
    // file is removed until the row is over: ext4 allocates a new inode by scanning past
    // the ones freed in the last few seconds, and with 10,000 files removed between rounds
    // that scan was most of a round's time, on both sides alike, swinging the floor
    // between 2,200 and 13,000 files/s from run to run.
    //
    // Three more sides, the same way, are the row's ceilings: a bare HTTP server in the
    // harness doing only the floor's work per request with the daemon's client, writing
    // in place and publishing atomically two ways (see `bare_server`).
    let mut floor = Batch::default();
    let mut daemon = Batch::default();
    let publishing = [Publish::InPlace, Publish::Rename, Publish::Link];
    let mut bare: Vec<Batch> = publishing.iter().map(|_| Batch::default()).collect();
    let servers = publishing
        .iter()
        .map(|publish| BareServer::start(*publish))
        .collect::<anyhow::Result<Vec<_>>>()?;
    ctx.daemon.reset_peak()?;
    for round in 0..4 {
        let mut sides = vec![Side::Floor, Side::Daemon];
        sides.extend((0..publishing.len()).map(Side::Bare));
        if round % 2 == 1 {
            sides.reverse();
        }
        for side in sides {
            let dir = root.join(format!("{side:?}-{round}").to_lowercase());
            std::fs::create_dir_all(&dir)?;
            super::transfer::settle().await?;
            match side {
                Side::Floor => {
                    let content = content.clone();
                    let (files, clients, xattrs) =
                        (options.small_files, options.small_clients, ctx.xattrs);
                    floor.add(
                        blocking(move || floor_batch(&dir, &content, files, clients, xattrs))
                            .await?,
                    );
                }
                Side::Daemon => {
                    daemon.add(http_batch(ctx, &ctx.daemon.url("/files"), &dir, &content).await?);
                    check(&dir, options.small_files, ctx.xattrs)?;
                }
                Side::Bare(index) => {
                    let url = servers[index].url("/files");
                    bare[index].add(http_batch(ctx, &url, &dir, &content).await?);
                    check(&dir, options.small_files, ctx.xattrs)?;
                }
            }
        }
    }
    drop(servers);
    let peak = ctx.daemon.status_kib("VmHWM")?;
    let _ = std::fs::remove_dir_all(&root);
    let daemon_rate = daemon.rate();
    let floor_rate = floor.rate();
    let place = match scratch {
        Ok(_) => "both sides on a fresh ext4 made for the row (a loop-mounted image)".to_owned(),
        Err(why) => format!(
            "measured on the run's directory, not a fresh filesystem ({why}): the floor moves with what the filesystem freed in the last minutes"
        ),
    };
    let mut note = place;
    for (publish, batch) in publishing.iter().zip(&bare) {
        let rate = batch.rate();
        note.push_str(&format!(
            "\nceiling, a bare HTTP server doing only the floor's work with this client, {}: {rate:.0} files/s, {:.2} of the floor, p50 {:.3} ms",
            match publish {
                Publish::InPlace => "writing in place",
                Publish::Rename => "publishing by rename",
                Publish::Link => "publishing by O_TMPFILE + linkat",
            },
            rate / floor_rate,
            stats::lower_better(&stats::millis(&batch.latencies)).median,
        ));
    }
    let note = Some(note);
    let ratio = daemon_rate / floor_rate;
    let row = Row {
        id: "small_uploads",
        title: format!(
            "{} uploads of {} KiB with {} metadata keys, {} clients (four rounds each)",
            options.small_files,
            options.small_bytes / 1024,
            if ctx.xattrs { KEYS.len() } else { 0 },
            options.small_clients
        ),
        unit: "ms/file",
        daemon: stats::lower_better(&stats::millis(&daemon.latencies)),
        floor: Some(stats::lower_better(&stats::millis(&floor.latencies))),
        floor_is: "open, write, fsetxattr per key, close on as many threads",
        rate: Some(Rate {
            unit: "files/s",
            daemon: daemon_rate,
            floor: Some(floor_rate),
        }),
        ratio: Some(ratio),
        ratio_is: "daemon/floor",
        target: Target::at_least(">= 0.5 of floor", Some(ratio), 0.5),
        daemon_peak_rss_kib: Some(peak),
        note,
    };
    Ok((row, peak))
}

/// Who writes a round's files.
#[derive(Debug, Clone, Copy)]
enum Side {
    Floor,
    Daemon,
    /// The bare server publishing the `n`th way.
    Bare(usize),
}

/// One round of uploads to `url` (the daemon's `/files`, or the bare server's).
async fn http_batch(ctx: &Ctx, url: &str, dir: &Path, content: &Bytes) -> anyhow::Result<Batch> {
    let next = Arc::new(AtomicUsize::new(0));
    let files = ctx.options.small_files;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..ctx.options.small_clients {
        let (next, http, content) = (next.clone(), ctx.http.clone(), content.clone());
        let url = url.to_owned();
        let dir = dir.to_path_buf();
        let xattrs = ctx.xattrs;
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= files {
                    return anyhow::Ok(latencies);
                }
                let path = file_path(&dir, index);
                let mut request = http
                    .post(&url)
                    .query(&[("path", path.to_str().context("utf-8 path")?)])
                    .header("content-type", "application/octet-stream")
                    .body(content.clone());
                if xattrs {
                    for key in KEYS {
                        request = request.header(format!("X-Metadata-{key}"), value(key, index));
                    }
                }
                let began = Instant::now();
                let response = request.send().await?;
                let status = response.status();
                let text = response.text().await?;
                latencies.push(began.elapsed());
                if status != 200 {
                    bail!("small upload answered {status}: {text}");
                }
            }
        });
    }
    let mut latencies = Vec::with_capacity(files);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    Ok(Batch {
        latencies,
        wall: start.elapsed(),
        rates: Vec::new(),
    })
}

fn floor_batch(
    dir: &Path,
    content: &Bytes,
    files: usize,
    clients: usize,
    xattrs: bool,
) -> anyhow::Result<Batch> {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let per_thread: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut latencies = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= files {
                            return Ok(latencies);
                        }
                        let began = Instant::now();
                        let mut file = File::create(file_path(dir, index))?;
                        file.write_all(content)?;
                        if xattrs {
                            for key in KEYS {
                                file.set_xattr(
                                    format!("user.e2b.{key}"),
                                    value(key, index).as_bytes(),
                                )?;
                            }
                        }
                        drop(file);
                        latencies.push(began.elapsed());
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("floor writer panicked"))?
            })
            .collect()
    });
    let wall = start.elapsed();
    let mut latencies = Vec::with_capacity(files);
    for thread in per_thread {
        latencies.extend(thread?);
    }
    Ok(Batch {
        latencies,
        wall,
        rates: Vec::new(),
    })
}

fn file_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("f{index:05}.bin"))
}

/// Spot-checks that the daemon stored what it was sent.
fn check(dir: &Path, files: usize, xattrs: bool) -> anyhow::Result<()> {
    for index in [0, files / 2, files.saturating_sub(1)] {
        let path = file_path(dir, index);
        let len = std::fs::metadata(&path)
            .with_context(|| format!("{} missing", path.display()))?
            .len();
        if xattrs {
            let stored = xattr::get(&path, "user.e2b.job-id")?;
            if stored.as_deref() != Some(index.to_string().as_bytes()) {
                bail!("{} has job-id {stored:?}", path.display());
            }
        }
        if len == 0 {
            bail!("{} is empty", path.display());
        }
    }
    Ok(())
}
