//! The daemon under test: started from its binary on a loopback port 0, read for its ready
//! line, measured through `/proc`, killed when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running daemon.
pub struct Daemon {
    child: Child,
    /// Kept open: the daemon's stdout is a pipe nobody else reads.
    _stdout: BufReader<ChildStdout>,
    /// The bound loopback address.
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its state directory and upload journal, removed when it is dropped.
    files: PathBuf,
}

impl Daemon {
    /// Execs `binary` on `127.0.0.1:0` and waits for its ready line. Its logs are discarded:
    /// the benchmark measures the daemon as deployed (default log level), not a terminal.
    ///
    /// # Errors
    /// When it cannot be started or its first line is not the ready line.
    pub fn start(binary: &Path) -> anyhow::Result<Daemon> {
        // Its own state directory and upload journal: daemons must not share them (one
        // run of the benchmark starts several, one after another).
        let state = std::env::temp_dir().join(format!(
            "envd-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let mut child = Command::new(binary)
            .args(["--addr", "127.0.0.1", "--port", "0"])
            .arg("--state-dir")
            .arg(state.join("state"))
            .arg("--upload-journal-dir")
            .arg(state.join("uploads"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        match ready_addr(&mut child) {
            Ok((addr, stdout)) => Ok(Daemon {
                child,
                _stdout: stdout,
                addr,
                base: format!("http://{addr}"),
                files: state,
            }),
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&state);
                Err(err)
            }
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A URL on the daemon.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
    ///
    /// # Errors
    /// When the status cannot be read or has no such field.
    pub fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        status_kib(self.pid(), field)
    }

    /// Resets the peak RSS (`VmHWM`) to the current RSS, so the next reading is the peak of
    /// what happens in between.
    ///
    /// # Errors
    /// When `/proc/<pid>/clear_refs` cannot be written.
    pub fn reset_peak(&self) -> anyhow::Result<()> {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), b"5")
            .context("resetting the peak RSS through clear_refs")
    }
}

/// Reads a started daemon's ready line: the address it bound, and its stdout to keep open.
fn ready_addr(child: &mut Child) -> anyhow::Result<(SocketAddr, BufReader<ChildStdout>)> {
    let stdout = child.stdout.take().context("daemon stdout")?;
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .context("reading the ready line")?;
    let ready: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("ready line {line:?} is not JSON"))?;
    let addr = ready["addr"]
        .as_str()
        .context("ready line without addr")?
        .parse()?;
    Ok((addr, stdout))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.files);
    }
}

/// A `/proc/<pid>/status` field in KiB.
///
/// # Errors
/// When the status cannot be read or has no such field.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// One cold start: from just before `exec` to the first `204` from `/health`, over a raw
/// socket so no client library's set-up is counted.
///
/// # Errors
/// When the daemon does not start or `/health` does not answer 204.
pub fn cold_start(binary: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let daemon = Daemon::start(binary)?;
    let mut socket = TcpStream::connect(daemon.addr)?;
    socket.set_nodelay(true)?;
    socket.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 512];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf)?;
        if n == 0 {
            bail!("/health closed before answering");
        }
        response.extend_from_slice(&buf[..n]);
    }
    let elapsed = start.elapsed();
    if !response.starts_with(b"HTTP/1.1 204") {
        bail!(
            "/health answered {:?}",
            String::from_utf8_lossy(&response[..response.len().min(40)])
        );
    }
    Ok(elapsed)
}
