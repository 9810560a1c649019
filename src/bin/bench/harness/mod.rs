//! The side-by-side benchmark: starts the daemon binary, measures each row of issue 6 next
//! to its floor (the same work done as directly as the machine allows) in the same run, and
//! returns a report. Shared by the `bench` binary and the smoke test in `tests/`, which
//! includes this module by path.

pub mod bare_server;
pub mod bare_start;
pub mod daemon;
pub mod footprint;
pub mod process;
pub mod report;
pub mod rpc;
pub mod scratch;
pub mod small;
pub mod stats;
pub mod transfer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use daemon::Daemon;
use report::Report;

/// The groups of rows, by the name `--rows` takes.
pub const GROUPS: &[&str] = &[
    "upload",
    "small",
    "download",
    "stat",
    "listdir",
    "process",
    "footprint",
];

const MIB: u64 = 1024 * 1024;

/// Sizes and counts of one run. [`Options::full`] has the sizes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    /// `quick` or `full`, for the report.
    pub mode: &'static str,
    /// The daemon binary to measure.
    pub daemon: PathBuf,
    /// Where the run's files go (a fresh subdirectory is made and removed).
    pub dir: PathBuf,
    /// Which groups of rows to run (see [`GROUPS`]).
    pub groups: Vec<String>,
    /// Row 1: bytes per upload, and uploads of each kind.
    pub upload_bytes: u64,
    /// Row 1: repetitions.
    pub upload_iterations: usize,
    /// Row 2: files, bytes per file, concurrent clients.
    pub small_files: usize,
    /// Row 2: bytes per file.
    pub small_bytes: usize,
    /// Row 2: concurrent clients.
    pub small_clients: usize,
    /// Row 3: bytes per download.
    pub download_bytes: u64,
    /// Row 3: repetitions.
    pub download_iterations: usize,
    /// Row 4: calls per protocol.
    pub stat_requests: usize,
    /// Row 4: concurrent callers.
    pub stat_callers: usize,
    /// Row 5: entries in the listed directory.
    pub list_entries: usize,
    /// Row 5: repetitions.
    pub list_iterations: usize,
    /// Row 6: starts per command.
    pub process_iterations: usize,
    /// Row 7: cold starts.
    pub cold_starts: usize,
    /// Row 7: idle time before the idle RSS is read.
    pub idle_settle: Duration,
}

impl Options {
    /// The sizes.
    pub fn full(daemon: PathBuf) -> Options {
        Options {
            mode: "full",
            daemon,
            dir: std::env::temp_dir(),
            groups: GROUPS.iter().map(|g| (*g).to_owned()).collect(),
            upload_bytes: 1024 * MIB,
            upload_iterations: 5,
            small_files: 10_000,
            small_bytes: 4096,
            small_clients: 16,
            download_bytes: 1024 * MIB,
            download_iterations: 5,
            stat_requests: 20_000,
            stat_callers: 64,
            list_entries: 10_000,
            list_iterations: 10,
            process_iterations: 200,
            cold_starts: 20,
            idle_settle: Duration::from_secs(1),
        }
    }

    /// Small sizes, same shape: every row in a few seconds, even against a debug build.
    pub fn quick(daemon: PathBuf) -> Options {
        Options {
            mode: "quick",
            upload_bytes: 4 * MIB,
            upload_iterations: 2,
            small_files: 200,
            download_bytes: 4 * MIB,
            download_iterations: 2,
            stat_requests: 256,
            list_entries: 200,
            list_iterations: 2,
            process_iterations: 3,
            cold_starts: 2,
            idle_settle: Duration::from_millis(50),
            ..Options::full(daemon)
        }
    }

    fn runs(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// What every row needs.
pub struct Ctx {
    /// The sizes.
    pub options: Options,
    /// The daemon under test.
    pub daemon: Daemon,
    /// One HTTP/1.1 client (pooled connections) for REST and Connect.
    pub http: reqwest::Client,
    /// This run's scratch directory.
    pub dir: PathBuf,
    /// Whether `dir` takes `user.*` xattrs.
    pub xattrs: bool,
}

/// Runs blocking work (floors, file set-up) off the runtime.
///
/// # Errors
/// The work's own error, or a panic in it.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await?
}

/// Removes the scratch directory however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the selected rows and returns the report.
///
/// # Errors
/// When the daemon cannot be started or a row fails.
pub async fn run(options: &Options) -> anyhow::Result<Report> {
    for group in &options.groups {
        anyhow::ensure!(
            GROUPS.contains(&group.as_str()),
            "unknown row group {group:?}; known: {}",
            GROUPS.join(", ")
        );
    }
    let dir = options
        .dir
        .join(format!("envd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = Scratch(dir.canonicalize()?);
    let load_before = loadavg();
    let daemon = Daemon::start(&options.daemon)?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let ctx = Ctx {
        options: options.clone(),
        daemon,
        http,
        xattrs: xattrs_supported(&scratch.0),
        dir: scratch.0.clone(),
    };
    let mut rows = Vec::new();
    // Idle first, before any traffic but one /health.
    let idle = if options.runs("footprint") {
        let row = footprint::idle_rss(&ctx.daemon, &options.daemon, &ctx.http, options.idle_settle)
            .await?;
        let kib = row.daemon_peak_rss_kib;
        Some((row, kib))
    } else {
        None
    };
    if options.runs("upload") {
        rows.extend(transfer::uploads(&ctx).await.context("row 1, uploads")?);
    }
    let mut small_peak = None;
    if options.runs("small") {
        let (row, peak) = small::small_uploads(&ctx)
            .await
            .context("row 2, small uploads")?;
        rows.push(row);
        small_peak = Some(peak);
    }
    if options.runs("download") {
        rows.extend(transfer::download(&ctx).await.context("row 3, download")?);
    }
    if options.runs("stat") {
        rows.extend(rpc::stat(&ctx).await.context("row 4, Stat")?);
    }
    if options.runs("listdir") {
        rows.extend(rpc::list_dir(&ctx).await.context("row 5, ListDir")?);
    }
    if options.runs("process") {
        rows.extend(process::start(&ctx).await.context("row 6, Start")?);
    }
    if let Some((row, idle_kib)) = idle {
        rows.push(row);
        if let Some(peak) = small_peak {
            rows.push(footprint::small_upload_peak(peak, idle_kib));
        }
        rows.push(
            footprint::cold_start(&options.daemon, options.cold_starts)
                .await
                .context("row 7, cold start")?,
        );
        rows.push(footprint::binary_size(&options.daemon, &scratch.0)?);
    }
    let xattrs = ctx.xattrs;
    drop(ctx);
    Ok(Report {
        version: 1,
        mode: options.mode,
        options: serde_json::to_value(options)?,
        machine: serde_json::json!({
            "cores": std::thread::available_parallelism().map_or(0, usize::from),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default().trim(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        }),
        daemon_binary: options.daemon.display().to_string(),
        xattrs,
        rows,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// True when `dir`'s filesystem takes `user.*` attributes.
fn xattrs_supported(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    if std::fs::write(&probe, b"").is_err() {
        return false;
    }
    let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}
