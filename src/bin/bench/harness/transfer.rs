//! Rows 1 and 3: large uploads (octet-stream and multipart) and downloads, each against the
//! same bytes moved over a raw loopback socket by a minimal peer in the harness.
//!
//! Memory: every transfer also runs once at 1/16 of the size first; the daemon's peak RSS
//! during the small and the full transfer, side by side, shows whether memory grows with
//! the file.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::stream;

use super::report::{Row, Target};
use super::stats::{self, Summary};
use super::{Ctx, blocking};

/// Size of the buffer the harness sends from (and that the content repeats).
const CHUNK: usize = 1024 * 1024;
/// Read buffer of the floor's receivers: large enough that syscalls are not the limit.
const RECV_BUF: usize = 256 * 1024;
/// The multipart boundary (never appears in the pseudo-random content).
const BOUNDARY: &str = "envd-bench-7c1f0b9e2d";
/// Growth of peak RSS from a 1/16-size transfer to the full one still called "bounded":
/// allocator noise, not buffering of the body.
const RSS_SLACK_KIB: u64 = 4 * 1024;

/// Writes back every dirty page before a measured write, so no transfer pays for the
/// writeback of the one before it (each starts with the same clean page cache).
///
/// # Errors
/// Never in practice; a panicked blocking task.
pub async fn settle() -> anyhow::Result<()> {
    blocking(|| {
        nix::unistd::sync();
        Ok(())
    })
    .await
}

/// Pseudo-random content (xorshift), so nothing along the way compresses or special-cases it.
pub fn pattern(len: usize) -> Bytes {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// The chunks of a `size`-byte body cut from `data`.
fn chunks(data: &Bytes, size: u64) -> impl Iterator<Item = Bytes> + use<> {
    let data = data.clone();
    let mut left = size;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = usize::try_from(left.min(data.len() as u64)).unwrap_or(data.len());
        left -= n as u64;
        Some(data.slice(..n))
    })
}

/// Which way the daemon is asked to move the bytes.
#[derive(Debug, Clone, Copy)]
enum Upload {
    Octet,
    Multipart,
}

/// Row 1: both upload rows.
///
/// # Errors
/// When a transfer fails.
pub async fn uploads(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let size = ctx.options.upload_bytes;
    let data = pattern(CHUNK);
    let dir = ctx.dir.join("uploads");
    std::fs::create_dir_all(&dir)?;
    let mut floor = Vec::new();
    let mut octet = Vec::new();
    let mut multipart = Vec::new();
    let mut peaks = [[0u64; 2]; 2];
    for (kind, slot) in [(Upload::Octet, 0), (Upload::Multipart, 1)] {
        // Warm-up at 1/16 of the size: the small side of the memory comparison.
        ctx.daemon.reset_peak()?;
        upload(ctx, kind, &dir, &data, (size / 16).max(1)).await?;
        peaks[slot][0] = ctx.daemon.status_kib("VmHWM")?;
    }
    for _ in 0..ctx.options.upload_iterations {
        let (dir2, data2) = (dir.clone(), data.clone());
        settle().await?;
        floor.push(blocking(move || floor_upload(&dir2, &data2, size)).await?);
        for (kind, slot, out) in [
            (Upload::Octet, 0, &mut octet),
            (Upload::Multipart, 1, &mut multipart),
        ] {
            settle().await?;
            ctx.daemon.reset_peak()?;
            out.push(upload(ctx, kind, &dir, &data, size).await?);
            peaks[slot][1] = peaks[slot][1].max(ctx.daemon.status_kib("VmHWM")?);
        }
    }
    let floor_summary = stats::higher_better(&stats::mib_per_sec(size, &floor));
    let mut rows = Vec::new();
    for (id, what, samples, peak) in [
        ("upload_octet", "octet-stream", &octet, peaks[0]),
        ("upload_multipart", "multipart", &multipart, peaks[1]),
    ] {
        let daemon = stats::higher_better(&stats::mib_per_sec(size, samples));
        rows.push(throughput_row(
            id,
            format!("POST /files {what}, {}", size_text(size)),
            daemon,
            floor_summary,
            "raw loopback socket -> file (read/write, 256 KiB buffer)",
            peak,
        ));
    }
    Ok(rows)
}

/// Row 3: download.
///
/// # Errors
/// When a transfer fails.
pub async fn download(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let size = ctx.options.download_bytes;
    let dir = ctx.dir.join("downloads");
    std::fs::create_dir_all(&dir)?;
    let big = dir.join("big.bin");
    let small = dir.join("small.bin");
    {
        let data = pattern(CHUNK);
        let (big, small) = (big.clone(), small.clone());
        blocking(move || {
            write_file(&big, &data, size)?;
            write_file(&small, &data, (size / 16).max(1))
        })
        .await?;
    }
    let mut peak = [0u64; 2];
    ctx.daemon.reset_peak()?;
    get(ctx, &small, (size / 16).max(1)).await?;
    peak[0] = ctx.daemon.status_kib("VmHWM")?;
    let mut floor = Vec::new();
    let mut daemon = Vec::new();
    for _ in 0..ctx.options.download_iterations {
        let big2 = big.clone();
        floor.push(blocking(move || floor_download(&big2, size)).await?);
        ctx.daemon.reset_peak()?;
        daemon.push(get(ctx, &big, size).await?);
        peak[1] = peak[1].max(ctx.daemon.status_kib("VmHWM")?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(vec![throughput_row(
        "download",
        format!("GET /files, {}", size_text(size)),
        stats::higher_better(&stats::mib_per_sec(size, &daemon)),
        stats::higher_better(&stats::mib_per_sec(size, &floor)),
        "file -> raw loopback socket (sendfile), read with a 256 KiB buffer",
        peak,
    )])
}

fn throughput_row(
    id: &'static str,
    title: String,
    daemon: Summary,
    floor: Summary,
    floor_is: &'static str,
    peak: [u64; 2],
) -> Row {
    let ratio = daemon.median / floor.median;
    let bounded = peak[1] <= peak[0] + RSS_SLACK_KIB;
    let mut target = Target::at_least(">= 0.90 of floor, flat RSS", Some(ratio), 0.90);
    if let Some(target) = target.as_mut() {
        target.met &= bounded;
    }
    Row {
        id,
        title,
        unit: "MiB/s",
        daemon,
        floor: Some(floor),
        floor_is,
        rate: None,
        ratio: Some(ratio),
        ratio_is: "daemon/floor",
        target,
        daemon_peak_rss_kib: Some(peak[1]),
        note: Some(format!(
            "daemon peak RSS: {:.1} MiB at 1/16 of the size, {:.1} MiB at full size ({})",
            peak[0] as f64 / 1024.0,
            peak[1] as f64 / 1024.0,
            if bounded {
                "flat"
            } else {
                "GROWS with the size"
            }
        )),
    }
}

fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

/// One upload through the daemon; the time from the first byte sent to the response.
async fn upload(
    ctx: &Ctx,
    kind: Upload,
    dir: &Path,
    data: &Bytes,
    size: u64,
) -> anyhow::Result<Duration> {
    let target = dir.join(match kind {
        Upload::Octet => "octet.bin",
        Upload::Multipart => "multipart.bin",
    });
    let path = target.to_str().context("utf-8 path")?.to_owned();
    let request = match kind {
        Upload::Octet => {
            let body = reqwest::Body::wrap_stream(stream::iter(
                chunks(data, size).map(Ok::<_, std::io::Error>),
            ));
            ctx.http
                .post(ctx.daemon.url("/files"))
                .query(&[("path", path.as_str())])
                .header("content-type", "application/octet-stream")
                .header("content-length", size)
                .body(body)
        }
        Upload::Multipart => {
            let head = Bytes::from(format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ));
            let tail = Bytes::from(format!("\r\n--{BOUNDARY}--\r\n"));
            let length = head.len() as u64 + size + tail.len() as u64;
            let parts = std::iter::once(head)
                .chain(chunks(data, size))
                .chain(std::iter::once(tail));
            let body = reqwest::Body::wrap_stream(stream::iter(parts.map(Ok::<_, std::io::Error>)));
            ctx.http
                .post(ctx.daemon.url("/files"))
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                )
                .header("content-length", length)
                .body(body)
        }
    };
    let start = Instant::now();
    let response = request.send().await?;
    let status = response.status();
    let text = response.text().await?;
    let elapsed = start.elapsed();
    if status != 200 {
        bail!("upload answered {status}: {text}");
    }
    let written = std::fs::metadata(&target)?.len();
    if written != size {
        bail!("upload wrote {written} bytes, not {size}");
    }
    std::fs::remove_file(&target)?;
    Ok(elapsed)
}

/// One download through the daemon; the time from the request to the last byte.
async fn get(ctx: &Ctx, path: &Path, size: u64) -> anyhow::Result<Duration> {
    let path = path.to_str().context("utf-8 path")?;
    let start = Instant::now();
    let mut response = ctx
        .http
        .get(ctx.daemon.url("/files"))
        .query(&[("path", path)])
        .send()
        .await?;
    if response.status() != 200 {
        bail!("download answered {}", response.status());
    }
    let mut received = 0u64;
    while let Some(chunk) = response.chunk().await? {
        received += chunk.len() as u64;
    }
    let elapsed = start.elapsed();
    if received != size {
        bail!("download returned {received} bytes, not {size}");
    }
    Ok(elapsed)
}

fn write_file(path: &Path, data: &Bytes, size: u64) -> anyhow::Result<()> {
    let mut file = File::create(path)?;
    for chunk in chunks(data, size) {
        file.write_all(&chunk)?;
    }
    Ok(())
}

/// The floor of an upload: the same bytes over a raw loopback socket, written to a file by
/// a receiver that reads into one buffer and writes it out; timed from connect to the
/// receiver's acknowledgement that the file is closed.
fn floor_upload(dir: &Path, data: &Bytes, size: u64) -> anyhow::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let path: PathBuf = dir.join("floor.bin");
    let receiver_path = path.clone();
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut socket, _) = listener.accept()?;
        let mut file = File::create(&receiver_path)?;
        let mut buf = vec![0u8; RECV_BUF];
        let mut total = 0u64;
        loop {
            let n = socket.read(&mut buf)?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n])?;
            total += n as u64;
        }
        drop(file);
        socket.write_all(b"k")?;
        Ok(total)
    });
    let start = Instant::now();
    let mut socket = TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    for chunk in chunks(data, size) {
        socket.write_all(&chunk)?;
    }
    socket.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 1];
    socket.read_exact(&mut ack)?;
    let elapsed = start.elapsed();
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("floor receiver panicked"))??;
    if received != size {
        bail!("floor receiver got {received} bytes, not {size}");
    }
    std::fs::remove_file(&path)?;
    Ok(elapsed)
}

/// The floor of a download: a server that sends the file with `sendfile` (what
/// `std::io::copy` does from a file to a socket) after a one-line request; timed from
/// connect to the client's end of file.
fn floor_download(path: &Path, size: u64) -> anyhow::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let path = path.to_path_buf();
    let server = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut socket, _) = listener.accept()?;
        let mut request = [0u8; 4];
        socket.read_exact(&mut request)?;
        let mut file = File::open(&path)?;
        std::io::copy(&mut file, &mut socket)
    });
    let start = Instant::now();
    let mut socket = TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    socket.write_all(b"GET\n")?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut received = 0u64;
    loop {
        let n = socket.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let elapsed = start.elapsed();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("floor server panicked"))??;
    if received != size {
        bail!("floor download got {received} bytes, not {size}");
    }
    Ok(elapsed)
}
