//! Faults against the real binary: descriptor exhaustion, a read-only filesystem, clients
//! vanishing in the middle of a download or a stream, and `kill -9` in the middle of
//! uploads. (A full disk is in `files_upload.rs`.) In each: clear errors, nothing lost or
//! half-written, nothing leaked, and the daemon recovers without a restart (or, after
//! `kill -9`, the next start cleans up).
//!
//! Mounting and descriptor limits need root; those tests say so and skip without it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Daemon, Launch, connect_json, envelope, getfattr, http, map, upload, wait_for_dir_change,
    wait_until,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_clear_does_not_spin_and_recovers() {
    if !is_root() {
        eprintln!("skipping: reading another process's /proc/<pid>/fd needs root here");
        return;
    }
    const NOFILE: u64 = 64;
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::launch(
        &[],
        &[],
        Launch {
            nofile: Some(NOFILE),
            ..Launch::default()
        },
    );
    // A connection made before the flood, kept alive in this client's pool.
    let pooled = http();
    let status = pooled
        .get(daemon.url("/health"))
        .send()
        .await
        .expect("health")
        .status();
    assert_eq!(status, 204);

    // Flood: more connections than the daemon has descriptors.
    let mut flood = Vec::new();
    for _ in 0..NOFILE + 16 {
        flood.push(TcpStream::connect(daemon.addr).await.expect("connect"));
    }
    wait_until("the daemon to run out of descriptors", LIMIT, || {
        daemon.fds().len() as u64 >= NOFILE
    })
    .await;

    // It does not spin on the listener: a bounded wait for half a second of CPU time, which
    // a daemon retrying accept() in a loop would burn within that second.
    let before = daemon.cpu_ticks();
    let spinning = tokio::time::timeout(
        Duration::from_secs(1),
        wait_until("CPU", LIMIT, || daemon.cpu_ticks() >= before + 50),
    )
    .await;
    assert!(
        spinning.is_err(),
        "the daemon burns CPU while out of descriptors"
    );

    // What needs a new descriptor fails clearly; what does not, works.
    let path = dir.path().join("f.txt");
    let response = pooled
        .post(daemon.url("/files"))
        .query(&[("path", path.to_str().expect("utf-8"))])
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 429);
    let body: serde_json::Value = response.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("Too many open files"),
        "{body}"
    );
    let response = pooled
        .post(daemon.url("/filesystem.Filesystem/ListDir"))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "path": dir.path() }).to_string())
        .send()
        .await
        .expect("list");
    assert_eq!(response.status(), 429);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["code"], "resource_exhausted", "{body}");
    let status = pooled
        .get(daemon.url("/health"))
        .send()
        .await
        .expect("health")
        .status();
    assert_eq!(status, 204, "an open connection keeps working");

    // Recovery, without a restart: once the flood is gone, new connections and uploads work.
    drop(flood);
    // A new connection waits in the listen queue until the daemon has a descriptor again.
    let response = tokio::time::timeout(LIMIT, http().get(daemon.url("/health")).send())
        .await
        .expect("a fresh connection is served within the limit")
        .expect("health");
    assert_eq!(response.status(), 204);
    assert_eq!(upload(&daemon, &path, "after", &[]).await.status(), 200);
    assert_eq!(std::fs::read(&path).expect("read"), b"after");
}

struct Mount(PathBuf);

impl Mount {
    /// A 1 MiB tmpfs at `dir`, or `None` when mounting is not possible here.
    fn tmpfs(dir: &Path) -> Option<Mount> {
        std::fs::create_dir_all(dir).expect("mkdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "envd-test"])
            .arg(dir)
            .status()
            .expect("mount");
        status.success().then(|| Mount(dir.to_path_buf()))
    }

    fn remount(&self, mode: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.0)
            .status()
            .expect("mount");
        assert!(status.success(), "remount {mode}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_read_only_filesystem_gives_clear_errors_and_keeps_the_files() {
    if !is_root() {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(mount) = Mount::tmpfs(&dir.path().join("ro")) else {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    };
    let daemon = Daemon::start();
    let path = mount.0.join("precious.txt");
    let response = upload(&daemon, &path, "precious", &[("v", "1")]).await;
    assert_eq!(response.status(), 200);
    mount.remount("ro");

    // Writes fail, naming the path and the reason.
    let response = upload(&daemon, &path, "new", &[("v", "2")]).await;
    assert_eq!(response.status(), 500);
    let body: serde_json::Value = response.json().await.expect("json");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("Read-only file system"), "{message}");
    assert!(message.contains("precious.txt"), "{message}");
    for (method, request) in [
        (
            "MakeDir",
            serde_json::json!({ "path": mount.0.join("sub") }),
        ),
        ("Remove", serde_json::json!({ "path": path })),
        (
            "Move",
            serde_json::json!({ "source": path, "destination": mount.0.join("moved") }),
        ),
    ] {
        let (status, body) = connect_json(
            &daemon,
            &format!("/filesystem.Filesystem/{method}"),
            request,
        )
        .await;
        assert_eq!(status, 500, "{method}: {body}");
        assert!(
            body["message"]
                .as_str()
                .expect("message")
                .contains("Read-only file system"),
            "{method}: {body}"
        );
    }
    let response = http()
        .patch(daemon.url("/files/metadata"))
        .query(&[("path", path.to_str().expect("utf-8"))])
        .header("content-type", "application/json")
        .body(r#"{"metadata":{"v":"3"}}"#)
        .send()
        .await
        .expect("patch");
    assert!(!response.status().is_success());
    assert!(
        response
            .text()
            .await
            .expect("text")
            .contains("Read-only file system")
    );

    // Reads work, and the file is exactly as it was.
    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path.to_str().expect("utf-8"))])
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "precious");
    let (status, body) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        serde_json::json!({ "path": path }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    if common::xattrs_supported(dir.path()) {
        assert_eq!(getfattr(&path), map(&[("v", "1")]));
    }
    assert!(common::upload_temps(&mount.0).is_empty());

    // Writable again: the daemon writes again, no restart needed.
    mount.remount("rw");
    assert_eq!(
        upload(&daemon, &path, "new", &[("v", "2")]).await.status(),
        200
    );
    assert_eq!(std::fs::read(&path).expect("read"), b"new");
}

#[tokio::test]
async fn clients_vanishing_mid_download_and_mid_stream_leak_nothing() {
    if !is_root() {
        eprintln!("skipping: reading another process's /proc/<pid>/fd needs root here");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let big = dir.path().join("big.bin");
    std::fs::File::create(&big)
        .expect("create")
        .set_len(256 * 1024 * 1024)
        .expect("size");
    let holds_big = |daemon: &Daemon| daemon.fds().iter().any(|fd| fd == &big);

    // Mid-download: read a little of 256 MiB, then vanish.
    let mut response = http()
        .get(daemon.url("/files"))
        .query(&[("path", big.to_str().expect("utf-8"))])
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    response.chunk().await.expect("a chunk").expect("data");
    assert!(holds_big(&daemon), "the file is open while it is sent");
    drop(response);
    wait_until("the download's file to be closed", LIMIT, || {
        !holds_big(&daemon)
    })
    .await;

    // Mid-stream: a watch stream and a process stream, over Connect.
    let baseline = daemon.fds();
    let watch = http()
        .post(daemon.url("/filesystem.Filesystem/WatchDir"))
        .header("content-type", "application/connect+json")
        .body(envelope(
            0,
            &serde_json::to_vec(&serde_json::json!({ "path": dir.path() })).expect("json"),
        ))
        .send()
        .await
        .expect("watch");
    let mut watch = watch;
    watch.chunk().await.expect("the start event").expect("data");
    let start = http()
        .post(daemon.url("/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .body(envelope(
            0,
            br#"{"process":{"cmd":"/bin/sh","args":["-c","echo started; exec sleep 1000"]},"tag":"vanish"}"#,
        ))
        .send()
        .await
        .expect("start");
    let mut start = start;
    start.chunk().await.expect("the start event").expect("data");
    drop(watch);
    drop(start);
    // The process outlives its stream, as documented; the watcher does not.
    let (status, listed) =
        connect_json(&daemon, "/process.Process/List", serde_json::json!({})).await;
    assert_eq!(status, 200);
    let pid = listed["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["tag"] == "vanish")
        .and_then(|p| p["pid"].as_u64())
        .expect("the process is still listed");
    let (status, _) = connect_json(
        &daemon,
        "/process.Process/SendSignal",
        serde_json::json!({ "process": { "pid": pid }, "signal": "SIGNAL_SIGKILL" }),
    )
    .await;
    assert_eq!(status, 200);
    let released = tokio::time::timeout(
        LIMIT,
        wait_until("the streams' descriptors to be released", LIMIT * 2, || {
            daemon.fds().len() <= baseline.len()
        }),
    )
    .await;
    assert!(
        released.is_ok(),
        "before: {baseline:?}\nafter: {:?}",
        daemon.fds()
    );
    let status = http()
        .get(daemon.url("/health"))
        .send()
        .await
        .expect("health")
        .status();
    assert_eq!(status, 204);
}

/// Sends the head and 1 MiB of a 10 MiB upload to `path`, and leaves it hanging.
async fn hanging_upload(daemon: &Daemon, path: &Path) -> TcpStream {
    let mut socket = TcpStream::connect(daemon.addr).await.expect("connect");
    let head = format!(
        "POST /files?path={} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nX-Metadata-v: new\r\nContent-Length: 10485760\r\n\r\n",
        path.display()
    );
    socket.write_all(head.as_bytes()).await.expect("head");
    socket
        .write_all(&vec![b'n'; 1024 * 1024])
        .await
        .expect("part of the body");
    socket
}

#[tokio::test]
async fn kill_9_mid_upload_leaves_the_old_file_and_the_next_start_removes_the_temp() {
    let journal = tempfile::tempdir().expect("journal");
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "--upload-journal-dir",
        journal.path().to_str().expect("utf-8"),
    ];
    let daemon = Daemon::start_with(&args, &[]);
    let path = dir.path().join("precious.txt");
    let xattrs = common::xattrs_supported(dir.path());
    let response = upload(&daemon, &path, "old content", &[("v", "old")]).await;
    assert_eq!(response.status(), 200);

    let _socket = hanging_upload(&daemon, &path).await;
    wait_for_dir_change(
        dir.path(),
        || !common::upload_temps(dir.path()).is_empty(),
        LIMIT,
        "the upload's temp file",
    );
    daemon.kill9();
    assert_eq!(std::fs::read(&path).expect("read"), b"old content");
    if xattrs {
        assert_eq!(getfattr(&path), map(&[("v", "old")]));
    }
    assert_eq!(
        common::upload_temps(dir.path()).len(),
        1,
        "the crash left its temp file"
    );

    // The next start removes it before it accepts anything (before its ready line).
    let daemon = Daemon::start_with(&args, &[]);
    assert_eq!(common::upload_temps(dir.path()), Vec::<String>::new());
    assert_eq!(std::fs::read(&path).expect("read"), b"old content");
    let response = upload(&daemon, &path, "new content", &[("v", "new")]).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_any_moment_leaves_old_or_new_never_a_mix() {
    const ROUNDS: usize = 6;
    let journal = tempfile::tempdir().expect("journal");
    let dir = tempfile::tempdir().expect("tempdir");
    let args = [
        "--upload-journal-dir",
        journal.path().to_str().expect("utf-8"),
    ];
    let path = dir.path().join("target.bin");
    let xattrs = common::xattrs_supported(dir.path());
    // Version i is 64 KiB of the byte i, with metadata v=i: content and metadata must
    // always name the same version.
    let version = |i: u8| vec![i; 64 * 1024];
    for round in 0..ROUNDS {
        let daemon = Daemon::start_with(&args, &[]);
        assert!(
            common::upload_temps(dir.path()).is_empty(),
            "round {round}: a temp survived a start"
        );
        let url = daemon.url("/files");
        let target = path.to_str().expect("utf-8").to_owned();
        let writer = tokio::spawn(async move {
            let client = http();
            for i in 1..=u8::MAX {
                let sent = client
                    .post(&url)
                    .query(&[("path", target.as_str())])
                    .header("content-type", "application/octet-stream")
                    .header("X-Metadata-v", i.to_string())
                    .body(version(i))
                    .send()
                    .await;
                if sent.is_err() {
                    return;
                }
            }
        });
        // Kill after a few uploads of this round have landed, a different number each round,
        // while the writer keeps going.
        let landed = |n: usize| {
            let path = path.clone();
            move || {
                std::fs::read(&path).is_ok_and(|c| c.len() == 64 * 1024 && usize::from(c[0]) >= n)
            }
        };
        wait_until("uploads to land", LIMIT, landed(round + 2)).await;
        daemon.kill9();
        writer.abort();
        let content = std::fs::read(&path).expect("read");
        assert_eq!(content.len(), 64 * 1024, "round {round}: a fragment");
        let v = content[0];
        assert!(
            content.iter().all(|b| *b == v),
            "round {round}: a mix of versions"
        );
        if xattrs {
            assert_eq!(
                getfattr(&path),
                map(&[("v", &v.to_string())]),
                "round {round}: metadata of another version"
            );
        }
    }
    let _daemon = Daemon::start_with(&args, &[]);
    assert!(common::upload_temps(dir.path()).is_empty());
}
