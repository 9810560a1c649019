//! Every limit against the real binary: what a client that exceeds it sees, and that the
//! daemon keeps serving. Slow clients (silent, trickling headers, stalled bodies) are
//! dropped after their timeout, without pinning the daemon's threads or connections.
//!
//! Timeouts are set to 1 s here; each wait is on what the client observes (the connection
//! closes, an answer arrives) with a hard deadline.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, envelope, grpc_channel, http, upload, wait_for_dir_change};
use envd::proto::filesystem::{StatRequest, filesystem_client::FilesystemClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the daemon closes the connection and returns everything read.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut all = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await
        .unwrap_or_else(|_| panic!("the daemon kept the connection open for {limit:?}"));
    all
}

/// Sends `request` on a new connection and returns the whole answer (to close).
async fn raw(daemon: &Daemon, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    // The daemon may answer and close before all of an oversized request is written.
    let _ = stream.write_all(request).await;
    String::from_utf8_lossy(&read_until_closed(&mut stream, Duration::from_secs(10)).await)
        .into_owned()
}

async fn health(daemon: &Daemon) {
    let status = http()
        .get(daemon.url("/health"))
        .send()
        .await
        .expect("health")
        .status();
    assert_eq!(status, 204, "the daemon still serves");
}

#[tokio::test]
async fn oversized_headers_are_431_over_http1_and_refused_over_http2() {
    let daemon = Daemon::start();
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(envd::limits::DEFAULT_MAX_HEADER_BYTES + 1)
    );
    let answer = raw(&daemon, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    let mut many = String::from("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..=envd::limits::DEFAULT_MAX_HEADERS {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw(&daemon, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    let mut client = FilesystemClient::new(grpc_channel(&daemon).await);
    let mut request = tonic::Request::new(StatRequest { path: "/".into() });
    let value = "a".repeat(envd::limits::DEFAULT_MAX_HEADER_BYTES + 1);
    request
        .metadata_mut()
        .insert("x-big", value.parse().expect("ascii"));
    let refused = client.stat(request).await;
    assert!(
        refused.is_err(),
        "an oversized HTTP/2 header list is refused"
    );
    let mut client = FilesystemClient::new(grpc_channel(&daemon).await);
    client
        .stat(StatRequest { path: "/".into() })
        .await
        .expect("a normal call still works");
    health(&daemon).await;
}

#[tokio::test]
async fn metadata_headers_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with(&["--max-metadata-headers", "3"], &[]);
    let path = dir.path().join("f.txt");
    let three = [("a", "1"), ("b", "2"), ("c", "3")];
    assert_eq!(upload(&daemon, &path, "ok", &three).await.status(), 200);
    // Repeats count too: the limit is on headers, not keys.
    let four = [("a", "1"), ("b", "2"), ("c", "3"), ("a", "again")];
    let response = upload(&daemon, &path, "refused", &four).await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("more than 3 X-Metadata-* headers"),
        "{body}"
    );
    assert_eq!(std::fs::read(&path).expect("read"), b"ok");
}

#[tokio::test]
async fn json_bodies_and_rpc_messages_are_bounded_in_size_and_depth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = common::init_args(dir.path());
    args.extend(
        [
            "--max-json-body-bytes",
            "1024",
            "--max-message-bytes",
            "2048",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_with(&args, &[]);
    let padding = "x".repeat(2000);

    // /init: too large, too deep.
    let response = daemon
        .init(serde_json::json!({ "envVars": { "PAD": padding } }))
        .await;
    assert_eq!(response.status(), 400);
    let deep = format!("{{\"x\":{}{}}}", "[".repeat(8), "]".repeat(8));
    let response = daemon.init_raw(deep.clone()).await;
    assert_eq!(response.status(), 400);
    assert!(
        response
            .text()
            .await
            .expect("text")
            .contains("nested deeper than 8")
    );

    // PATCH /files/metadata: too large, too deep.
    let file = dir.path().join("f.txt");
    std::fs::write(&file, "x").expect("write");
    for body in [
        format!("{{\"metadata\":{{\"k\":\"{padding}\"}}}}"),
        deep.clone(),
    ] {
        let response = http()
            .patch(daemon.url("/files/metadata"))
            .query(&[("path", file.to_str().expect("utf-8"))])
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("patch");
        assert_eq!(response.status(), 400);
    }

    // Connect JSON: too deep is invalid_argument; too large is resource_exhausted.
    let (status, body) = common::connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        serde_json::json!({ "path": "/", "x": [[[[[[[[[]]]]]]]]] }),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("nested deeper")
    );
    let (status, body) = common::connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        serde_json::json!({ "path": "x".repeat(3000) }),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "resource_exhausted");

    // gRPC and gRPC-Web: tonic applies the same size limit.
    let mut client = FilesystemClient::new(grpc_channel(&daemon).await);
    let status = client
        .stat(StatRequest {
            path: "x".repeat(3000),
        })
        .await
        .expect_err("too large");
    assert_ne!(status.code(), tonic::Code::Ok);
    assert!(status.message().contains("too large"), "{status:?}");
    let response = http()
        .post(daemon.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/grpc-web+proto")
        .body(envelope(
            0,
            &prost::Message::encode_to_vec(&StatRequest {
                path: "x".repeat(3000),
            }),
        ))
        .send()
        .await
        .expect("send");
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().expect("ascii").to_owned());
    assert!(status.is_some_and(|s| s != "0"), "refused over gRPC-Web");
    health(&daemon).await;
}

#[tokio::test]
async fn silent_trickling_and_idle_connections_are_closed_after_the_header_timeout() {
    let daemon = Daemon::start_with(&["--request-header-timeout-secs", "1"], &[]);
    let limit = Duration::from_secs(10);

    // Connects and says nothing.
    let started = Instant::now();
    let mut silent = TcpStream::connect(daemon.addr).await.expect("connect");
    assert!(read_until_closed(&mut silent, limit).await.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(1));

    // Trickles a header a byte at a time, so that bytes keep arriving: over HTTP/1.1
    // (endlessly), and as the HTTP/2 preface (24 bytes, 2.4 s, then nothing).
    let http1: Vec<u8> = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
        .iter()
        .copied()
        .chain(std::iter::repeat_n(b'a', 1000))
        .collect();
    let http2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    for bytes in [http1, http2] {
        let started = Instant::now();
        let stream = TcpStream::connect(daemon.addr).await.expect("connect");
        let (mut reader, mut writer) = stream.into_split();
        // The slow client itself: one byte every 100 ms.
        let trickle = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(100));
            for byte in bytes {
                ticks.tick().await;
                if writer.write_all(&[byte]).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(limit, reader.read(&mut buf)).await;
        let elapsed = started.elapsed();
        let read = read.unwrap_or_else(|_| panic!("a trickling client was kept for {limit:?}"));
        let shown = read
            .as_ref()
            .map(|n| String::from_utf8_lossy(&buf[..*n]).into_owned());
        assert!(elapsed >= Duration::from_secs(1), "{elapsed:?} {shown:?}");
        trickle.abort();
    }

    // A keep-alive connection left idle after a request.
    let mut idle = TcpStream::connect(daemon.addr).await.expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let answer = read_until_closed(&mut idle, limit).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 204"));
    health(&daemon).await;
}

#[tokio::test]
async fn a_stalled_upload_is_408_and_leaves_the_old_file_and_no_temp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with(&["--body-idle-timeout-secs", "1"], &[]);
    let path = dir.path().join("old.txt");
    assert_eq!(upload(&daemon, &path, "old", &[]).await.status(), 200);

    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    let head = format!(
        "POST /files?path={} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\nten bytes.",
        path.display()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("sent nothing for 1 s"), "{answer}");
    wait_for_dir_change(
        dir.path(),
        || common::upload_temps(dir.path()).is_empty(),
        Duration::from_secs(10),
        "the temp file to be removed",
    );
    assert_eq!(std::fs::read(&path).expect("read"), b"old");

    // A stalled Connect call is deadline_exceeded.
    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    stream
        .write_all(b"POST /filesystem.Filesystem/Stat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"path\":")
        .await
        .expect("head");
    let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("deadline_exceeded"), "{answer}");

    // Slow is not stalled: chunks 700 ms apart (2.1 s in all) with a 1 s idle limit.
    let chunks = futures_util::stream::unfold(0, |i| async move {
        if i == 3 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"slow ")),
            i + 1,
        ))
    });
    let response = upload(&daemon, &path, reqwest::Body::wrap_stream(chunks), &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(std::fs::read(&path).expect("read"), b"slow slow slow ");
}

#[tokio::test]
async fn stalled_uploads_do_not_pin_the_blocking_threads() {
    const STALLED: usize = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    // Far fewer blocking threads than stalled uploads.
    let daemon = Daemon::start_with(&["--max-blocking-threads", "2"], &[]);
    let mut sockets = Vec::new();
    for i in 0..STALLED {
        let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
        let head = format!(
            "POST /files?path={}/stalled-{i} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\n",
            dir.path().display()
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        // A first piece of the body, then nothing: stalled mid-file.
        stream
            .write_all(&[b'x'; 10])
            .await
            .expect("part of the body");
        sockets.push(stream);
    }
    // Every upload has begun (each made its unnamed file on a blocking thread) ...
    common::wait_until(
        "every stalled upload to begin",
        Duration::from_secs(10),
        || common::unnamed_uploads(daemon.pid(), dir.path()).len() == STALLED,
    )
    .await;
    // ... and the blocking threads are free for everyone else.
    let stat = common::connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        serde_json::json!({ "path": dir.path() }),
    );
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), stat)
        .await
        .expect("Stat answers while uploads stall");
    assert_eq!(status, 200);
    let done = dir.path().join("done.txt");
    assert_eq!(upload(&daemon, &done, "done", &[]).await.status(), 200);
    drop(sockets);
    common::wait_until(
        "the abandoned uploads to be let go",
        Duration::from_secs(10),
        || common::unnamed_uploads(daemon.pid(), dir.path()).is_empty(),
    )
    .await;
    assert!(common::upload_temps(dir.path()).is_empty());
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["done.txt"], "abandoned uploads leave nothing");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let daemon = Daemon::start_with(&["--max-connections", "2"], &[]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).await.expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 204"));
        held.push(stream);
    }
    // The kernel completes the third handshake; the daemon does not take it yet.
    let mut third = TcpStream::connect(daemon.addr).await.expect("connect");
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut buf = [0u8; 256];
    // Bounded wait for something that must not happen while both slots are taken.
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection was served with two slots"
    );
    drop(held.pop());
    let answer = read_until_closed(&mut third, Duration::from_secs(10)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 204"),
        "served once a slot is free"
    );
}

#[tokio::test]
async fn http2_peers_are_told_the_stream_limit() {
    let daemon = Daemon::start_with(&["--max-concurrent-streams", "7"], &[]);
    let stream = TcpStream::connect(daemon.addr).await.expect("connect");
    let (_send, mut connection) = h2::client::handshake(stream).await.expect("handshake");
    let advertised = futures_util::future::poll_fn(|cx| {
        // Driving the connection reads the daemon's SETTINGS.
        if let std::task::Poll::Ready(result) = connection.poll_unpin_connection(cx) {
            panic!("connection ended: {result:?}");
        }
        match connection.max_concurrent_send_streams() {
            7 => std::task::Poll::Ready(7),
            _ => std::task::Poll::Pending,
        }
    });
    let advertised = tokio::time::timeout(Duration::from_secs(10), advertised)
        .await
        .expect("SETTINGS with the limit");
    assert_eq!(advertised, 7);
}

/// Polls an h2 client connection in place.
trait PollConnection {
    fn poll_unpin_connection(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), h2::Error>>;
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> PollConnection
    for h2::client::Connection<T, bytes::Bytes>
{
    fn poll_unpin_connection(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), h2::Error>> {
        use std::future::Future;
        std::pin::Pin::new(self).poll(cx)
    }
}
