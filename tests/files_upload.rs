//! `POST /files` against the real binary: metadata on disk, replace and clear semantics,
//! validation that leaves the old file alone, atomicity under concurrency and disconnects,
//! bounded memory, disk full.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::{Daemon, getfattr, http, map, upload};
use futures_util::stream;

#[tokio::test]
async fn upload_with_metadata_is_visible_to_getfattr() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let path = dir.path().join("sub dir/report.txt");
    let response = upload(
        &daemon,
        &path,
        "hello",
        &[("Author", "mish"), ("job-ID", "42"), ("empty", "")],
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(
        body,
        serde_json::json!([{
            "metadata": {"author": "mish", "job-id": "42", "empty": ""},
            "name": "report.txt",
            "path": path.to_str().expect("utf-8"),
            "type": "file",
        }])
    );
    assert_eq!(std::fs::read(&path).expect("read"), b"hello");
    assert_eq!(
        getfattr(&path),
        map(&[("author", "mish"), ("job-id", "42"), ("empty", "")])
    );
}

#[tokio::test]
async fn uploads_replace_and_clear_the_set_and_keep_foreign_attributes() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let path = dir.path().join("f.bin");
    assert_eq!(
        upload(&daemon, &path, "v1", &[("a", "1"), ("b", "2")])
            .await
            .status(),
        200
    );
    xattr::set(&path, "user.other-tool", b"keep me").expect("foreign xattr");
    assert_eq!(
        upload(&daemon, &path, "v2", &[("c", "3")]).await.status(),
        200
    );
    assert_eq!(getfattr(&path), map(&[("c", "3")]));
    assert_eq!(
        xattr::get(&path, "user.other-tool").expect("get"),
        Some(b"keep me".to_vec())
    );

    let response = upload(&daemon, &path, "v3", &[]).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert!(
        body[0].get("metadata").is_none(),
        "no metadata key when cleared: {body}"
    );
    assert!(getfattr(&path).is_empty());
    assert_eq!(std::fs::read(&path).expect("read"), b"v3");
    assert_eq!(
        xattr::get(&path, "user.other-tool").expect("get"),
        Some(b"keep me".to_vec())
    );
}

#[tokio::test]
async fn every_validation_failure_is_400_and_leaves_the_old_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let path = dir.path().join("keep.txt");
    assert_eq!(
        upload(&daemon, &path, "original", &[("owner", "alice")])
            .await
            .status(),
        200
    );

    let long_key = "k".repeat(247);
    let big_value = "v".repeat(4096);
    let cases: Vec<(String, reqwest::header::HeaderValue)> = vec![
        (long_key, "x".parse().expect("value")),
        ("big".into(), big_value.parse().expect("value")),
        (
            "tab".into(),
            reqwest::header::HeaderValue::from_bytes(b"a\tb").expect("value"),
        ),
        (
            "utf8".into(),
            reqwest::header::HeaderValue::from_bytes("é".as_bytes()).expect("value"),
        ),
    ];
    for (key, value) in cases {
        let response = http()
            .post(daemon.url("/files"))
            .query(&[("path", path.to_str().expect("utf-8"))])
            .header("content-type", "application/octet-stream")
            .header(format!("x-metadata-{key}"), value)
            .body("replacement")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 400, "key {key}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["code"], 400);
        assert!(
            body["message"]
                .as_str()
                .expect("message")
                .starts_with("invalid metadata: "),
            "{body}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"original");
        assert_eq!(getfattr(&path), map(&[("owner", "alice")]));
    }
    assert_eq!(common::upload_temps(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn metadata_boundaries_are_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let path = dir.path().join("edge");
    let key246 = "k".repeat(246);
    assert_eq!(
        upload(&daemon, &path, "x", &[(&key246, "v")])
            .await
            .status(),
        200
    );
    // 9 + 1 + 4086 = 4096 passes validation. ext4 fits less than that in its one xattr
    // block (entry headers count there), so the filesystem may still refuse it: then it is
    // 507 and the previous file and metadata are untouched.
    let fits = "v".repeat(4086);
    let stored = match upload(&daemon, &path, "y", &[("a", &fits)])
        .await
        .status()
        .as_u16()
    {
        200 => map(&[("a", &fits)]),
        507 => {
            assert_eq!(std::fs::read(&path).expect("read"), b"x");
            map(&[(&key246, "v")])
        }
        other => panic!("a 4096-byte set is valid, got {other}"),
    };
    assert_eq!(getfattr(&path), stored);
    let over = "v".repeat(4087);
    assert_eq!(
        upload(&daemon, &path, "z", &[("a", &over)]).await.status(),
        400
    );
    assert_eq!(getfattr(&path), stored);
    assert_eq!(common::upload_temps(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn multipart_keeps_full_paths_and_gzip_bodies_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let boundary = "XyZbOuNdArY";
    let a = dir.path().join("nested/a.txt");
    let b = dir.path().join("b.bin");
    let mut body = Vec::new();
    for (path, content) in [(&a, "alpha"), (&b, "beta")] {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n{content}\r\n",
            path.display()
        )
        .expect("write");
    }
    write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nignored\r\n--{boundary}--\r\n").expect("write");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&body).expect("gzip");
    let response = http()
        .post(daemon.url("/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("content-encoding", "gzip")
        .header("x-metadata-batch", "7")
        .body(gz.finish().expect("gzip"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let entries: serde_json::Value = response.json().await.expect("json");
    let paths: Vec<&str> = entries
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["path"].as_str().expect("path"))
        .collect();
    assert_eq!(
        paths,
        [a.to_str().expect("utf-8"), b.to_str().expect("utf-8")]
    );
    assert_eq!(std::fs::read(&a).expect("a"), b"alpha");
    assert_eq!(std::fs::read(&b).expect("b"), b"beta");
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let target = dir.path().join("t");
    let target_str = target.to_str().expect("utf-8").to_owned();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            http()
                .post(daemon.url("/files"))
                .header("content-type", "application/octet-stream")
                .body("x"),
            400,
            "path query parameter is required",
        ),
        (
            http()
                .post(daemon.url("/files"))
                .query(&[("path", &target_str)])
                .header("content-type", "text/plain")
                .body("x"),
            400,
            "unsupported content type",
        ),
        (
            http()
                .post(daemon.url("/files"))
                .query(&[("path", &target_str)])
                .header("content-type", "application/octet-stream")
                .header("content-encoding", "br")
                .body("x"),
            400,
            "unsupported Content-Encoding",
        ),
        (
            http()
                .post(daemon.url("/files"))
                .query(&[
                    ("path", target_str.as_str()),
                    ("username", "no-such-user-here"),
                ])
                .header("content-type", "application/octet-stream")
                .body("x"),
            401,
            "error looking up user 'no-such-user-here'",
        ),
        (
            http()
                .post(daemon.url("/files"))
                .query(&[("path", dir.path().to_str().expect("utf-8"))])
                .header("content-type", "application/octet-stream")
                .body("x"),
            400,
            "is a directory",
        ),
    ];
    for (request, status, message) in cases {
        let response = request.send().await.expect("send");
        assert_eq!(response.status().as_u16(), status, "{message}");
        let body: serde_json::Value = response.json().await.expect("json error");
        assert_eq!(body["code"], status);
        assert!(
            body["message"].as_str().expect("message").contains(message),
            "{body}"
        );
    }
    assert!(!target.exists());
}

#[tokio::test]
async fn duplicate_multipart_targets_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let path = dir.path().join("dup.txt");
    let boundary = "b0undary";
    let mut body = String::new();
    for content in ["first", "second"] {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\n{content}\r\n",
            path.display()
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    let response = http()
        .post(daemon.url("/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    assert_eq!(std::fs::read(&path).expect("first stays"), b"first");
}

/// Each writer uploads its own content and metadata to one path while a reader checks,
/// through one open file, that content and metadata always come from the same upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_never_mix_content_and_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = std::sync::Arc::new(Daemon::start());
    let path = dir.path().join("contended.txt");
    assert_eq!(
        upload(&daemon, &path, "writer-init", &[("writer", "init")])
            .await
            .status(),
        200
    );
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut checked = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || checked == 0 {
                let mut file = std::fs::File::open(&path).expect("the target always exists");
                let mut content = String::new();
                file.read_to_string(&mut content).expect("read");
                let writer = xattr::FileExt::get_xattr(&file, "user.e2b.writer")
                    .expect("xattr")
                    .expect("metadata present");
                let writer = String::from_utf8(writer).expect("utf-8");
                assert_eq!(
                    content,
                    format!("writer-{writer}").repeat(if writer == "init" { 1 } else { 1000 })
                );
                checked += 1;
            }
            checked
        })
    };
    let mut tasks = Vec::new();
    for round in 0..5 {
        for writer in 0..8 {
            let daemon = daemon.clone();
            let path = path.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("{round}-{writer}");
                let content = format!("writer-{id}").repeat(1000);
                let response = upload(&daemon, &path, content, &[("writer", &id)]).await;
                assert_eq!(response.status(), 200);
            }));
        }
    }
    for task in tasks {
        task.await.expect("upload task");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().expect("reader") > 0);
    let final_writer = getfattr(&path).remove("writer").expect("writer key");
    let content = std::fs::read_to_string(&path).expect("read");
    assert_eq!(content, format!("writer-{final_writer}").repeat(1000));
    assert_eq!(common::upload_temps(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn a_client_vanishing_mid_upload_leaves_the_old_file_and_no_temp() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let path = dir.path().join("old.txt");
    assert_eq!(
        upload(&daemon, &path, "old content", &[("v", "old")])
            .await
            .status(),
        200
    );

    let mut socket = TcpStream::connect(daemon.addr).expect("connect");
    let head = format!(
        "POST /files?path={} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nX-Metadata-v: new\r\nContent-Length: 10485760\r\n\r\n",
        path.display()
    );
    socket.write_all(head.as_bytes()).expect("head");
    socket
        .write_all(&vec![b'n'; 1024 * 1024])
        .expect("part of the body");
    socket.flush().expect("flush");
    // Wait until the daemon has started writing the temp file, then vanish.
    wait_for_dir(
        dir.path(),
        || !common::upload_temps(dir.path()).is_empty(),
        "a temp file to appear",
    );
    drop(socket);
    wait_for_dir(
        dir.path(),
        || common::upload_temps(dir.path()).is_empty(),
        "the temp file to be removed",
    );
    assert_eq!(std::fs::read(&path).expect("read"), b"old content");
    assert_eq!(getfattr(&path), map(&[("v", "old")]));
    // The daemon is still serving.
    assert_eq!(
        http()
            .get(daemon.url("/health"))
            .send()
            .await
            .expect("health")
            .status(),
        204
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_upload_keeps_memory_bounded() {
    const CHUNK: usize = 1024 * 1024;
    const CHUNKS: usize = 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let path = dir.path().join("big.bin");
    let chunk = bytes::Bytes::from(vec![0xA5u8; CHUNK]);
    let body = stream::iter((0..CHUNKS).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let response = upload(
        &daemon,
        &path,
        reqwest::Body::wrap_stream(body),
        &[("size", "1GiB")],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        (CHUNK * CHUNKS) as u64
    );
    let peak_kib = daemon.status_kib("VmHWM");
    assert!(
        peak_kib < 64 * 1024,
        "peak RSS {peak_kib} KiB during a 1 GiB upload"
    );
}

/// The byte at `offset` of the test pattern: no run of it repeats at a chunk or batch size,
/// so a chunk written twice, dropped or out of order shows.
fn pattern_byte(offset: usize) -> u8 {
    (offset % 251) as u8 ^ (offset / 65_521) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_body_is_written_as_it_came_and_the_file_is_whole() {
    // More than a write batch before the pause, odd chunk sizes, and a tail after it.
    const BEFORE_PAUSE: usize = 3 * 1024 * 1024 + 5;
    const TOTAL: usize = BEFORE_PAUSE + 2 * 1024 * 1024 + 777;
    const CHUNK: usize = 100_003;
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let path = dir.path().join("paused.bin");
    let content: Vec<u8> = (0..TOTAL).map(pattern_byte).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let send = |tx: tokio::sync::mpsc::Sender<_>, range: std::ops::Range<usize>| {
        let chunks: Vec<bytes::Bytes> = content[range]
            .chunks(CHUNK)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        async move {
            for chunk in chunks {
                tx.send(Ok(chunk)).await.expect("the upload is reading");
            }
        }
    };
    // A new file is written unnamed until it is complete.
    let written = || {
        common::unnamed_uploads(daemon.pid(), dir.path())
            .first()
            .and_then(|fd| std::fs::metadata(fd).ok())
            .map_or(0, |meta| meta.len())
    };
    let client = async {
        send(tx.clone(), 0..BEFORE_PAUSE).await;
        // The client pauses: everything it sent reaches the temp file without more coming.
        common::wait_until(
            "the bytes before the pause to be written",
            Duration::from_secs(20),
            || written() == BEFORE_PAUSE as u64,
        )
        .await;
        send(tx, BEFORE_PAUSE..TOTAL).await;
    };
    let (response, ()) = tokio::join!(upload(&daemon, &path, body, &[]), client);
    assert_eq!(response.status(), 200);
    let stored = std::fs::read(&path).expect("read");
    assert_eq!(stored.len(), TOTAL);
    assert!(
        stored == content,
        "the stored bytes differ from the sent ones"
    );
    assert_eq!(common::upload_temps(dir.path()), Vec::<String>::new());
    assert!(common::unnamed_uploads(daemon.pid(), dir.path()).is_empty());
}

/// A stream of what `rx` receives, for a request body sent piece by piece.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

#[tokio::test]
async fn disk_full_is_507_and_the_old_file_survives() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipping: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "envd-test",
            mount.to_str().expect("utf-8"),
        ])
        .status()
        .expect("mount");
    if !mounted.success() {
        eprintln!("skipping: cannot mount tmpfs here");
        return;
    }
    let _unmount = Unmount(mount.clone());
    let daemon = Daemon::start();
    let path = mount.join("precious.txt");
    assert_eq!(upload(&daemon, &path, "precious", &[]).await.status(), 200);
    let response = upload(&daemon, &path, vec![7u8; 2 * 1024 * 1024], &[]).await;
    assert_eq!(response.status(), 507);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["code"], 507);
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("not enough disk space"),
        "{body}"
    );
    assert_eq!(std::fs::read(&path).expect("read"), b"precious");
    assert_eq!(common::upload_temps(&mount), Vec::<String>::new());
    // Space is back: the next upload works.
    assert_eq!(upload(&daemon, &path, "again", &[]).await.status(), 200);
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Waits, woken by inotify events on `dir`, until `condition` holds (hard deadline).
fn wait_for_dir(dir: &Path, condition: impl Fn() -> bool, what: &str) {
    common::wait_for_dir_change(dir, condition, Duration::from_secs(20), what);
}
