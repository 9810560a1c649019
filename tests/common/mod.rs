//! Shared harness for the integration tests: starts the real `envd` binary on port 0 and
//! waits for its ready line; small clients for Connect, gRPC-Web and xattr checks. Its
//! `process` module reads the process service's event streams.

#![allow(dead_code)]

pub mod process;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A running daemon, killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// The bound address (loopback).
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The upload journal the harness gave it (each daemon its own, so that one test's
    /// daemon never cleans up another's uploads), removed with it.
    _journal: Option<tempfile::TempDir>,
    /// Where its stderr goes, when the test asked to read it.
    log: Option<PathBuf>,
    /// The daemon's own state directory, unless the test chose one.
    state: Option<tempfile::TempDir>,
}

/// How to launch a daemon, beyond its arguments and environment.
#[derive(Default)]
pub struct Launch {
    /// Send stderr to this file (read it with [`Daemon::log`]) instead of the test's.
    pub log_to: Option<PathBuf>,
    /// Start it with this `RLIMIT_NOFILE`, soft and hard, through `prlimit` (util-linux).
    pub nofile: Option<u64>,
}

impl Daemon {
    /// Starts the daemon on an ephemeral loopback port.
    pub fn start() -> Daemon {
        Daemon::start_with(&[], &[])
    }

    /// Starts the daemon with extra arguments and environment.
    pub fn start_with(args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        Daemon::launch(args, envs, Launch::default())
    }

    /// Starts the daemon with extra arguments, environment and launch options. Without an
    /// `--upload-journal-dir` among `args`, it gets a journal of its own.
    pub fn launch(args: &[&str], envs: &[(&str, &str)], launch: Launch) -> Daemon {
        let mut command = match launch.nofile {
            Some(limit) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={limit}:{limit}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_envd"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_envd")),
        };
        command
            .args(["--addr", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("ENVD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Daemons must not share a state directory: each gets its own unless the test
        // chose one.
        let state = (!args.contains(&"--state-dir")).then(|| {
            let dir = tempfile::tempdir().expect("state dir");
            command.arg("--state-dir").arg(dir.path());
            dir
        });
        let journal = if args.contains(&"--upload-journal-dir") {
            None
        } else {
            let dir = tempfile::tempdir().expect("journal dir");
            command.arg("--upload-journal-dir").arg(dir.path());
            Some(dir)
        };
        for (key, value) in envs {
            command.env(key, value);
        }
        if let Some(path) = &launch.log_to {
            command.stderr(std::fs::File::create(path).expect("log file"));
        }
        let mut daemon = Daemon::spawned(command);
        daemon._journal = journal;
        daemon.log = launch.log_to;
        daemon.state = state;
        daemon
    }

    /// What the daemon wrote to stderr so far (started with [`Launch::log_to`]).
    pub fn log(&self) -> String {
        let path = self.log.as_ref().expect("started with a log file");
        std::fs::read_to_string(path).expect("read the log")
    }

    /// Kills the daemon with SIGKILL, as a crash would, and reaps it.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// Sends a signal and waits for the exit.
    pub fn signal_and_wait(mut self, signal: nix::sys::signal::Signal) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal");
        child.wait().expect("wait")
    }

    /// A URL on the daemon.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Keepers outlive the daemon by design; a test's must not outlive the test. Their
        // processes die with them.
        if let Some(state) = &self.state {
            kill_keepers(state.path());
        }
    }
}

/// Kills the process keepers whose sockets live under `state_dir`.
pub fn kill_keepers(state_dir: &Path) {
    for pid in daemon_helpers(state_dir, "__keeper") {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The processes with `arg` and `state_dir` in their command line: the keepers of the
/// daemon on that state directory (`__keeper`), or its nursery (`__spares`).
pub fn daemon_helpers(state_dir: &Path, arg: &str) -> Vec<u32> {
    let needle = state_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains(arg) && cmdline.contains(&needle)).then_some(pid)
        })
        .collect()
}

/// The names of the upload temp files (`*.envd-upload`) in `dir`.
pub fn upload_temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(envd::fs::write::TEMP_SUFFIX))
        .collect()
}

/// The uploads of new files that daemon `pid` is writing in `dir`: unnamed files (they
/// have no name until complete), as their `/proc/<pid>/fd` links, which open and stat them.
pub fn unnamed_uploads(pid: u32, dir: &Path) -> Vec<std::path::PathBuf> {
    let prefix = format!("{}/#", dir.display());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's fds")
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                let target = target.to_string_lossy();
                target.starts_with(&prefix) && target.ends_with(" (deleted)")
            })
        })
        .map(|fd| fd.path())
        .collect()
}

/// A plain HTTP/1.1 client.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().build().expect("client")
}

/// True when `dir`'s filesystem takes `user.*` attributes.
pub fn xattrs_supported(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    std::fs::write(&probe, b"").expect("probe");
    let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Skips the calling test (returns from it) when `user.*` xattrs are unsupported.
#[macro_export]
macro_rules! require_xattrs {
    ($dir:expr) => {
        if !$crate::common::xattrs_supported($dir) {
            eprintln!("skipping: no user.* xattrs on {}", $dir.display());
            return;
        }
    };
}

/// What `getfattr -d -m '^user\.e2b\.'` shows for `path`, prefix stripped.
pub fn getfattr(path: &Path) -> BTreeMap<String, String> {
    let output = Command::new("getfattr")
        .args(["--absolute-names", "-d", "-m", r"^user\.e2b\."])
        .arg(path)
        .output()
        .expect("getfattr (Debian package `attr`) must be installed");
    assert!(output.status.success(), "getfattr failed: {output:?}");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    text.lines()
        .filter_map(|line| line.strip_prefix("user.e2b."))
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap_or((line, "\"\""));
            (key.to_owned(), value.trim_matches('"').to_owned())
        })
        .collect()
}

/// A `BTreeMap<String, String>` from pairs.
pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Uploads `content` to `path` as `application/octet-stream` with metadata headers.
pub async fn upload(
    daemon: &Daemon,
    path: &Path,
    content: impl Into<reqwest::Body>,
    metadata: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = http()
        .post(daemon.url("/files"))
        .query(&[("path", path.to_str().expect("utf-8 path"))])
        .header("content-type", "application/octet-stream")
        .body(content);
    for (key, value) in metadata {
        request = request.header(format!("X-Metadata-{key}"), *value);
    }
    request.send().await.expect("upload")
}

/// Connect unary call with a JSON body; returns (HTTP status, JSON body).
pub async fn connect_json(
    daemon: &Daemon,
    method: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    connect_json_with(daemon, method, body, &[]).await
}

/// Connect unary JSON call with extra headers; returns (HTTP status, JSON body).
pub async fn connect_json_with(
    daemon: &Daemon,
    method: &str,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut request = http()
        .post(daemon.url(method))
        .header("content-type", "application/json")
        .header("connect-protocol-version", "1");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .body(body.to_string())
        .send()
        .await
        .expect("connect call");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json =
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("{text:?} is not JSON: {err}"));
    (status, json)
}

/// Connect unary call with a binary protobuf body.
pub async fn connect_proto<Req: prost::Message, Resp: prost::Message + Default>(
    daemon: &Daemon,
    method: &str,
    request: &Req,
) -> Result<Resp, (u16, serde_json::Value)> {
    let response = http()
        .post(daemon.url(method))
        .header("content-type", "application/proto")
        .body(request.encode_to_vec())
        .send()
        .await
        .expect("connect call");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    if status == 200 {
        Ok(Resp::decode(body).expect("protobuf response"))
    } else {
        Err((status, serde_json::from_slice(&body).expect("JSON error")))
    }
}

/// Frames a message with the 5-byte envelope header.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(flags);
    out.put_u32(u32::try_from(payload.len()).expect("small"));
    out.put_slice(payload);
    out.freeze()
}

/// Splits a body into (flags, payload) envelopes.
pub fn envelopes(mut body: Bytes) -> Vec<(u8, Bytes)> {
    let mut out = Vec::new();
    while body.remaining() >= 5 {
        let flags = body.get_u8();
        let len = body.get_u32() as usize;
        out.push((flags, body.split_to(len)));
    }
    assert!(body.is_empty(), "trailing bytes in an envelope stream");
    out
}

/// gRPC-Web unary call (binary); returns the message and the trailer text.
pub async fn grpc_web<Req: prost::Message, Resp: prost::Message + Default>(
    daemon: &Daemon,
    method: &str,
    request: &Req,
) -> (Option<Resp>, String) {
    let response = http()
        .post(daemon.url(method))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(envelope(0, &request.encode_to_vec()))
        .send()
        .await
        .expect("grpc-web call");
    assert_eq!(response.status(), 200);
    let mut message = None;
    // A call that fails before any message answers "trailers-only": the status is in the
    // HTTP headers instead of a trailer frame.
    let mut trailers = response
        .headers()
        .get("grpc-status")
        .map(|status| format!("grpc-status:{}", status.to_str().expect("ascii")))
        .unwrap_or_default();
    for (flags, payload) in envelopes(response.bytes().await.expect("body")) {
        if flags & 0x80 != 0 {
            trailers.push_str(std::str::from_utf8(&payload).expect("trailers"));
        } else {
            message = Some(Resp::decode(payload).expect("message"));
        }
    }
    (message, trailers)
}

/// A tonic channel to the daemon (gRPC over cleartext HTTP/2).
pub async fn grpc_channel(daemon: &Daemon) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(daemon.base.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("gRPC connect")
}

/// Blocks until `condition` holds, re-checking whenever an entry of `dir` is created,
/// removed or renamed (inotify), so the wait is event-driven, with a hard `limit`.
pub fn wait_for_dir_change(
    dir: &Path,
    condition: impl Fn() -> bool,
    limit: std::time::Duration,
    what: &str,
) {
    use inotify::{Inotify, WatchMask};
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;

    let mut inotify = Inotify::init().expect("inotify");
    inotify
        .watches()
        .add(
            dir,
            WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::MOVED_TO,
        )
        .expect("watch");
    let deadline = std::time::Instant::now() + limit;
    let mut buffer = [0u8; 4096];
    while !condition() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(millis)).expect("poll");
        match inotify.read_events(&mut buffer) {
            Ok(events) => events.for_each(drop),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("reading inotify events: {err}"),
        }
    }
}

/// The header that carries the access token.
pub const TOKEN_HEADER: &str = "X-Access-Token";

impl Daemon {
    /// Starts a daemon for tests that call `/init`: it never sets the machine's clock and
    /// installs CA certificates under `ca_dir` instead of the system trust store.
    pub fn start_for_init(ca_dir: &Path) -> Daemon {
        let args = init_args(ca_dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_with(&args, &[])
    }

    /// Starts the daemon as `uid:gid` with no supplementary groups and no capabilities, via
    /// `setpriv` (util-linux), with `args`.
    pub fn start_as(uid: u32, gid: u32, args: &[&str]) -> Daemon {
        let state = tempfile::tempdir().expect("state dir");
        std::os::unix::fs::chown(state.path(), Some(uid), Some(gid)).expect("chown state dir");
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--inh-caps=-all")
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_envd"))
            .args(["--addr", "127.0.0.1", "--port", "0"])
            // Another user cannot write a journal in the test's directories.
            .args(["--upload-journal-dir", ""])
            .arg("--state-dir")
            .arg(state.path())
            .args(args)
            .env("ENVD_LOG", "warn")
            .env_remove("ENVD_DEFAULT_USER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut daemon = Daemon::spawned(command);
        daemon.state = Some(state);
        daemon
    }

    fn spawned(mut command: Command) -> Daemon {
        let mut child = command.spawn().expect("spawn envd");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the ready line");
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("ready line {line:?} is not JSON: {err}"));
        assert_eq!(ready["event"], "listening", "{line}");
        let addr: SocketAddr = ready["addr"]
            .as_str()
            .expect("addr")
            .parse()
            .expect("socket address");
        Daemon {
            child: Some(child),
            addr,
            base: format!("http://{addr}"),
            _journal: None,
            log: None,
            state: None,
        }
    }

    /// `POST /init` with a JSON body.
    pub async fn init(&self, body: serde_json::Value) -> reqwest::Response {
        self.init_raw(body.to_string()).await
    }

    /// `POST /init` with any body.
    pub async fn init_raw(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        http()
            .post(self.url("/init"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("/init")
    }

    /// `POST /init` that must succeed (204).
    pub async fn init_ok(&self, body: serde_json::Value) {
        let response = self.init(body).await;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 204, "/init answered {status}: {text}");
    }
}

/// Arguments that keep `/init` away from the machine's clock and trust store.
pub fn init_args(ca_dir: &Path) -> Vec<String> {
    let path = |name: &str| ca_dir.join(name).to_str().expect("utf-8").to_owned();
    vec![
        "--set-clock".into(),
        "false".into(),
        "--ca-bundle-file".into(),
        path("ca-certificates.crt"),
        "--ca-cert-file".into(),
        path("e2b-ca.crt"),
    ]
}

/// `Authorization: Basic` for `user` with an empty password, as the SDKs send it.
pub fn basic_auth(user: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

/// Polls `condition` every 5 ms until it holds, panicking after `limit`: for states that
/// raise no event to wait on (counts under `/proc`, a process's CPU time).
pub async fn wait_until(
    what: &str,
    limit: std::time::Duration,
    mut condition: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + limit;
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(5));
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        ticks.tick().await;
    }
}

impl Daemon {
    /// Where each of the daemon's open descriptors points (`/proc/<pid>/fd`).
    pub fn fds(&self) -> Vec<PathBuf> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read the daemon's fds")
            .filter_map(Result::ok)
            .filter_map(|entry| std::fs::read_link(entry.path()).ok())
            .collect()
    }

    /// The daemon's threads (`/proc/<pid>/task`).
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .expect("read the daemon's threads")
            .count()
    }

    /// CPU time the daemon has used, in clock ticks (user + system, `/proc/<pid>/stat`).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        // Fields after the command name (which may hold spaces) start at ") ".
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    }
}
