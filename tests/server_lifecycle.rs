//! The server itself: the ready line, routing of unknown paths, graceful shutdown with a
//! request in flight.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use common::{Daemon, http};
use nix::sys::signal::Signal;

#[tokio::test]
async fn health_and_unknown_paths() {
    let daemon = Daemon::start();
    let response = http()
        .get(daemon.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(response.status(), 204);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let response = http().get(daemon.url("/nope")).send().await.expect("get");
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_upload_finish_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let path = dir.path().join("inflight.txt");
    let mut socket = TcpStream::connect(daemon.addr).expect("connect");
    let head = format!(
        "POST /files?path={} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 10\r\nConnection: close\r\n\r\n01234",
        path.display()
    );
    socket.write_all(head.as_bytes()).expect("head");
    // The new file is being written (unnamed until complete).
    common::wait_until(
        "the upload to start",
        std::time::Duration::from_secs(20),
        || !common::unnamed_uploads(daemon.pid(), dir.path()).is_empty(),
    )
    .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    socket.write_all(b"56789").expect("rest of the body");
    let mut status_line = String::new();
    BufReader::new(&socket)
        .read_line(&mut status_line)
        .expect("response");
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    assert_eq!(std::fs::read(&path).expect("read"), b"0123456789");
    let status = daemon.signal_and_wait(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn sigint_on_an_idle_daemon_exits_zero() {
    let daemon = Daemon::start();
    let status = daemon.signal_and_wait(Signal::SIGINT);
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn shutdown_ends_open_streams_cleanly() {
    use futures_util::StreamExt;
    let daemon = Daemon::start();
    let body = common::envelope(0, br#"{"process":{"cmd":"/bin/sleep","args":["1000"]}}"#);
    let response = http()
        .post(daemon.url("/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .body(body)
        .send()
        .await
        .expect("start");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("start event").expect("bytes");
    let start: serde_json::Value = serde_json::from_slice(&first[5..]).expect("json");
    let child = start["event"]["start"]["pid"].as_u64().expect("pid");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.pid()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("the stream ends cleanly, not with a reset"));
    }
    let frames = common::envelopes(rest.into());
    let (flags, payload) = frames.last().expect("end-stream envelope");
    assert_eq!(*flags, 0x02);
    let end: serde_json::Value = serde_json::from_slice(payload).expect("json");
    assert_eq!(end["error"]["code"], "unavailable", "{end}");
    let status = daemon.signal_and_wait(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child).expect("pid")),
        Signal::SIGKILL,
    );
}

/// Started with descriptors 0, 1 and 2 closed (a careless supervisor), the daemon puts
/// `/dev/null` in their place before it opens anything: its ready line goes nowhere rather
/// than into the first file it opened (the state directory's lock), and it serves.
#[tokio::test]
async fn closed_standard_descriptors_are_replaced_before_anything_is_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"exec "$0" --addr 127.0.0.1 --port "$1" --state-dir "$2" --upload-journal-dir "$3" <&- >&- 2>&-"#)
        .arg(env!("CARGO_BIN_EXE_envd"))
        .arg(port.to_string())
        .arg(&state)
        .arg(dir.path().join("uploads"))
        .spawn()
        .expect("spawn");
    common::wait_until(
        "the daemon to listen",
        std::time::Duration::from_secs(10),
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    )
    .await;
    let response = http()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .expect("/health");
    assert_eq!(response.status(), 204);
    let pid = child.id();
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("fd");
        assert_eq!(target, std::path::Path::new("/dev/null"), "fd {fd}");
    }
    assert_eq!(
        std::fs::read(state.join("lock")).expect("the lock file"),
        b"",
        "nothing was written into the lock file"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}
