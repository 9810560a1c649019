//! Row 7: what the daemon costs by just being there: idle RSS, cold start, binary size,
//! and its peak RSS during the small uploads (row 2).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::daemon::{self, Daemon};
use super::report::{Row, Target};
use super::stats::{self, Summary};

/// Targets for this round.
const MAX_IDLE_RSS_MIB: f64 = 4.0;
const MAX_COLD_START_MS: f64 = 10.0;
const MAX_BINARY_MB: f64 = 8.0;

fn single(value: f64) -> Summary {
    stats::lower_better(&[value])
}

/// Idle RSS of a daemon that has started and answered one `/health`, after `settle`.
///
/// # Errors
/// When `/proc` cannot be read or the daemon does not answer.
pub async fn idle_rss(
    ctx_daemon: &Daemon,
    binary: &Path,
    http: &reqwest::Client,
    settle: Duration,
) -> anyhow::Result<Row> {
    let response = http.get(ctx_daemon.url("/health")).send().await?;
    if response.status() != 204 {
        bail!("/health answered {}", response.status());
    }
    tokio::time::sleep(settle).await;
    let rss_kib = ctx_daemon.status_kib("VmRSS")?;
    let split = rss_split(ctx_daemon.pid(), binary)?;
    let floor_kib = tokio::task::spawn_blocking(sleeping_process_rss).await??;
    let rss = rss_kib as f64 / 1024.0;
    let floor = floor_kib as f64 / 1024.0;
    Ok(Row {
        id: "idle_rss",
        title: "RSS after start and one /health, idle".into(),
        unit: "MiB",
        daemon: single(rss),
        floor: Some(single(floor)),
        floor_is: "RSS of `sleep` (a minimal C program)",
        rate: None,
        ratio: Some(rss / floor),
        ratio_is: "daemon/floor",
        target: Target::at_most("<= 4 MiB", Some(rss), MAX_IDLE_RSS_MIB),
        daemon_peak_rss_kib: Some(rss_kib),
        note: Some(format!(
            "daemon RSS: {:.2} MiB anonymous (heap, stacks, relocated data), {:.2} MiB pages of \
             the daemon binary, {:.2} MiB pages of shared libraries (libc, ld.so, libm, libgcc)",
            split.anon as f64 / 1024.0,
            split.binary as f64 / 1024.0,
            split.libraries as f64 / 1024.0
        )),
    })
}

/// A process's RSS in KiB by where the pages come from.
struct RssSplit {
    anon: u64,
    binary: u64,
    libraries: u64,
}

/// Splits `/proc/<pid>/smaps` into anonymous pages and file pages of `binary` and of
/// everything else mapped from files.
fn rss_split(pid: u32, binary: &Path) -> anyhow::Result<RssSplit> {
    let binary = binary.canonicalize()?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut split = RssSplit {
        anon: 0,
        binary: 0,
        libraries: 0,
    };
    let mut path = String::new();
    let mut rss = 0u64;
    let kib = |line: &str| -> u64 {
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            path = line.split_whitespace().nth(5).unwrap_or("").to_owned();
        } else if line.starts_with("Rss:") {
            rss = kib(line);
        } else if line.starts_with("Anonymous:") {
            let anon = kib(line);
            split.anon += anon;
            let file = rss.saturating_sub(anon);
            if Path::new(&path) == binary {
                split.binary += file;
            } else if path.starts_with('/') {
                split.libraries += file;
            } else {
                split.anon += file;
            }
        }
    }
    Ok(split)
}

fn sleeping_process_rss() -> anyhow::Result<u64> {
    let mut child = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    // `sleep` has reached its nanosleep once its command line is its own (after exec).
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rss = 0;
    while Instant::now() < deadline {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == "sleep") {
            std::thread::sleep(Duration::from_millis(20));
            rss = daemon::status_kib(pid, "VmRSS")?;
            break;
        }
        std::thread::yield_now();
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(rss)
}

/// Peak RSS during the small uploads, reported by row 2.
pub fn small_upload_peak(peak_kib: u64, idle_kib: Option<u64>) -> Row {
    let peak = peak_kib as f64 / 1024.0;
    Row {
        id: "peak_rss_small_uploads",
        title: "Peak RSS during the small uploads (row 2)".into(),
        unit: "MiB",
        daemon: single(peak),
        floor: idle_kib.map(|k| single(k as f64 / 1024.0)),
        floor_is: "the daemon's own idle RSS",
        rate: None,
        ratio: idle_kib.map(|k| peak_kib as f64 / k as f64),
        ratio_is: "peak/idle",
        target: None,
        daemon_peak_rss_kib: Some(peak_kib),
        note: None,
    }
}

/// Cold starts: exec to the first 204 from `/health`, against exec to exit of `true`.
///
/// # Errors
/// When a start fails.
pub async fn cold_start(binary: &Path, runs: usize) -> anyhow::Result<Row> {
    let binary = binary.to_path_buf();
    let (daemon, floor) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut daemon = Vec::new();
        let mut floor = Vec::new();
        daemon::cold_start(&binary)?; // page cache
        for _ in 0..runs {
            let start = Instant::now();
            let status = Command::new("/bin/true").status()?;
            floor.push(start.elapsed());
            if !status.success() {
                bail!("/bin/true failed");
            }
            daemon.push(daemon::cold_start(&binary)?);
        }
        Ok((daemon, floor))
    })
    .await??;
    let daemon = stats::lower_better(&stats::millis(&daemon));
    let floor = stats::lower_better(&stats::millis(&floor));
    Ok(Row {
        id: "cold_start",
        title: "exec to the first 204 from /health".into(),
        unit: "ms",
        daemon,
        floor: Some(floor),
        floor_is: "exec to exit of /bin/true",
        rate: None,
        ratio: Some(daemon.median / floor.median),
        ratio_is: "daemon/floor",
        target: Target::at_most("<= 10 ms", Some(daemon.median), MAX_COLD_START_MS),
        daemon_peak_rss_kib: None,
        note: None,
    })
}

/// Size of the daemon binary, stripped: a copy is stripped with `strip` where it is
/// installed (the release profile strips already, so the sizes agree); without `strip` the
/// file as it is.
///
/// # Errors
/// When the binary cannot be read or copied.
pub fn binary_size(binary: &Path, scratch: &Path) -> anyhow::Result<Row> {
    let as_built = std::fs::metadata(binary)?.len();
    let copy = scratch.join("envd-stripped");
    std::fs::copy(binary, &copy)?;
    let stripped = Command::new("strip")
        .arg("--strip-all")
        .arg(&copy)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let bytes = if stripped {
        std::fs::metadata(&copy)?.len()
    } else {
        as_built
    };
    let _ = std::fs::remove_file(&copy);
    let mb = bytes as f64 / 1e6;
    Ok(Row {
        id: "binary_size",
        title: format!(
            "{} {} (as built {:.2} MB; MB = 10^6 bytes)",
            binary.display(),
            if stripped {
                "stripped"
            } else {
                "as built (no `strip`)"
            },
            as_built as f64 / 1e6
        ),
        unit: "MB",
        daemon: single(mb),
        floor: None,
        floor_is: "none",
        rate: None,
        ratio: None,
        ratio_is: "",
        target: Target::at_most("<= 8 MB", Some(mb), MAX_BINARY_MB),
        daemon_peak_rss_kib: None,
        note: None,
    })
}
