//! Directory watching against the real binary: WatchDir streams (tonic and Connect) and
//! polling watchers; every event type, recursive watches, entries with metadata,
//! cleanup on disconnect, overflow, limits, errors.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, connect_json, envelope, grpc_channel, http, upload};
use envd::proto::filesystem::{
    self as pb, EventType, filesystem_client::FilesystemClient,
    watch_dir_response::Event as WatchEvent,
};
use serde_json::json;
use tonic::transport::Channel;

async fn client(daemon: &Daemon) -> FilesystemClient<Channel> {
    FilesystemClient::new(grpc_channel(daemon).await)
}

/// Opens a WatchDir stream and waits for its `start`.
async fn watch(
    client: &mut FilesystemClient<Channel>,
    path: &Path,
    recursive: bool,
    include_entry: bool,
) -> tonic::Streaming<pb::WatchDirResponse> {
    let mut stream = client
        .watch_dir(pb::WatchDirRequest {
            path: path.to_str().expect("utf-8").into(),
            recursive,
            include_entry,
            allow_network_mounts: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("first").expect("open");
    assert!(
        matches!(first.event, Some(WatchEvent::Start(_))),
        "start comes first"
    );
    stream
}

/// Reads filesystem events until `done` says the list is complete (hard deadline).
async fn events_until(
    stream: &mut tonic::Streaming<pb::WatchDirResponse>,
    done: impl Fn(&[(EventType, String)]) -> bool,
) -> Vec<pb::FilesystemEvent> {
    let mut seen = Vec::new();
    let mut summary = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&summary) {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| panic!("timed out; events so far: {summary:?}"))
            .expect("stream healthy")
            .expect("stream open");
        if let Some(WatchEvent::Filesystem(event)) = message.event {
            summary.push((event.r#type(), event.name.clone()));
            seen.push(event);
        }
    }
    seen
}

fn has(events: &[(EventType, String)], kind: EventType, name: &str) -> bool {
    events.iter().any(|(k, n)| *k == kind && n == name)
}

#[tokio::test]
async fn every_event_type_with_relative_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut stream = watch(&mut client, dir.path(), false, false).await;
    let file = dir.path().join("f.txt");
    std::fs::write(&file, b"one").expect("create");
    std::fs::write(&file, b"two").expect("write");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    std::fs::rename(&file, dir.path().join("g.txt")).expect("rename");
    std::fs::remove_file(dir.path().join("g.txt")).expect("remove");
    events_until(&mut stream, |seen| {
        has(seen, EventType::Create, "f.txt")
            && has(seen, EventType::Write, "f.txt")
            && has(seen, EventType::Chmod, "f.txt")
            && has(seen, EventType::Rename, "f.txt")
            && has(seen, EventType::Create, "g.txt")
            && has(seen, EventType::Remove, "g.txt")
    })
    .await;
}

#[tokio::test]
async fn recursive_watches_catch_files_in_brand_new_subdirectories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut stream = watch(&mut client, dir.path(), true, false).await;
    let deep = dir.path().join("a/b/c");
    std::fs::create_dir_all(&deep).expect("mkdir -p");
    std::fs::write(deep.join("quick.txt"), b"x").expect("write right away");
    let events = events_until(&mut stream, |seen| {
        has(seen, EventType::Create, "a")
            && has(seen, EventType::Create, "a/b")
            && has(seen, EventType::Create, "a/b/c")
            && has(seen, EventType::Create, "a/b/c/quick.txt")
    })
    .await;
    let creates = events
        .iter()
        .filter(|e| e.name == "a/b/c/quick.txt" && e.r#type() == EventType::Create)
        .count();
    assert_eq!(creates, 1, "reported once");
    // The new subdirectory is watched from now on, also after a move within the tree.
    std::fs::rename(dir.path().join("a"), dir.path().join("moved")).expect("move");
    std::fs::write(dir.path().join("moved/b/c/later.txt"), b"y").expect("write");
    events_until(&mut stream, |seen| {
        has(seen, EventType::Create, "moved/b/c/later.txt")
    })
    .await;
}

#[tokio::test]
async fn entries_carry_upload_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut stream = watch(&mut client, dir.path(), false, true).await;
    let path = dir.path().join("tagged.txt");
    assert_eq!(
        upload(&daemon, &path, "content", &[("owner", "alice")])
            .await
            .status(),
        200
    );
    let events = events_until(&mut stream, |seen| {
        has(seen, EventType::Create, "tagged.txt") && has(seen, EventType::Write, "tagged.txt")
    })
    .await;
    for event in &events {
        assert!(
            !event.name.contains("envd-upload") && !event.name.starts_with('#'),
            "temp and unnamed files are not reported: {}",
            event.name
        );
        let entry = event
            .entry
            .as_ref()
            .expect("include_entry attaches the entry");
        assert_eq!(entry.path, path.to_str().expect("utf-8"));
        assert_eq!(
            entry.metadata.get("owner").map(String::as_str),
            Some("alice")
        );
    }
    std::fs::remove_file(&path).expect("remove");
    let events = events_until(&mut stream, |seen| {
        has(seen, EventType::Remove, "tagged.txt")
    })
    .await;
    assert!(
        events.last().expect("remove").entry.is_none(),
        "REMOVE never carries an entry"
    );
}

/// inotify instances the daemon holds.
fn inotify_instances(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().contains("inotify"))
        })
        .count()
}

async fn wait_for_instances(daemon: &Daemon, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while inotify_instances(daemon.pid()) != want {
        assert!(
            Instant::now() < deadline,
            "daemon holds {} inotify instances, want {want}",
            inotify_instances(daemon.pid())
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_disconnected_stream_releases_its_watches() {
    let dir = tempfile::tempdir().expect("tempdir");
    for sub in ["x", "y", "z"] {
        std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
    }
    let daemon = Daemon::start();
    let baseline = inotify_instances(daemon.pid());
    let mut client = client(&daemon).await;
    let stream = watch(&mut client, dir.path(), true, false).await;
    assert_eq!(inotify_instances(daemon.pid()), baseline + 1);
    drop(stream);
    // The stream's task notices the client is gone when it next has something to send, or
    // at once when the connection's stream closes.
    std::fs::write(dir.path().join("x/poke"), b"").expect("poke");
    wait_for_instances(&daemon, baseline).await;
}

#[tokio::test]
async fn polling_watchers_deliver_remove_and_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_with(&["--watcher-idle-timeout-secs", "1"], &[]);
    let baseline = inotify_instances(daemon.pid());
    let (status, created) = connect_json(
        &daemon,
        "/filesystem.Filesystem/CreateWatcher",
        json!({"path": dir.path().to_str(), "recursive": true, "includeEntry": true}),
    )
    .await;
    assert_eq!(status, 200);
    let id = created["watcherId"].as_str().expect("id").to_owned();
    assert!(id.starts_with('w') && id.len() == 21, "{id}");
    std::fs::write(dir.path().join("p.txt"), b"x").expect("write");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut names = Vec::new();
    while !names.iter().any(|n: &String| n == "p.txt") {
        assert!(Instant::now() < deadline, "no event for p.txt: {names:?}");
        let (status, events) = connect_json(
            &daemon,
            "/filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        )
        .await;
        assert_eq!(status, 200);
        for event in events["events"].as_array().into_iter().flatten() {
            names.push(event["name"].as_str().expect("name").to_owned());
            assert_eq!(event["entry"]["name"], "p.txt");
        }
    }
    let (status, _) = connect_json(
        &daemon,
        "/filesystem.Filesystem/RemoveWatcher",
        json!({"watcherId": id}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, err) = connect_json(
        &daemon,
        "/filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": id}),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    wait_for_instances(&daemon, baseline).await;

    // A watcher nobody polls goes away after the idle timeout.
    let (_, created) = connect_json(
        &daemon,
        "/filesystem.Filesystem/CreateWatcher",
        json!({"path": dir.path().to_str()}),
    )
    .await;
    let idle = created["watcherId"].as_str().expect("id").to_owned();
    assert_eq!(inotify_instances(daemon.pid()), baseline + 1);
    wait_for_instances(&daemon, baseline).await;
    let (status, _) = connect_json(
        &daemon,
        "/filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": idle}),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_overflowing_watcher_says_events_were_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let (_, created) = connect_json(
        &daemon,
        "/filesystem.Filesystem/CreateWatcher",
        json!({"path": dir.path().to_str()}),
    )
    .await;
    let id = created["watcherId"].as_str().expect("id").to_owned();
    // More events than the daemon queues plus the kernel's default queue (16384) holds.
    let max_queued: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(16384);
    for i in 0..(max_queued + 4096) / 2 + 1 {
        std::fs::write(dir.path().join(format!("f{i}")), b"x").expect("write");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let error = loop {
        assert!(Instant::now() < deadline, "the overflow was never reported");
        let (status, body) = connect_json(
            &daemon,
            "/filesystem.Filesystem/GetWatcherEvents",
            json!({"watcherId": id}),
        )
        .await;
        if status != 200 {
            break body;
        }
    };
    assert_eq!(error["code"], "resource_exhausted", "{error}");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("events were lost"),
        "{error}"
    );
    let (status, again) = connect_json(
        &daemon,
        "/filesystem.Filesystem/GetWatcherEvents",
        json!({"watcherId": id}),
    )
    .await;
    assert_eq!(
        (status, again["code"].as_str()),
        (429, Some("resource_exhausted")),
        "every later poll says so"
    );
}

#[tokio::test]
async fn limits_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"").expect("write");
    let daemon = Daemon::start_with(&["--max-watchers", "2"], &[]);
    let cases = [
        (dir.path().join("missing"), 404, "not_found", "not found"),
        (file.clone(), 400, "invalid_argument", "is not a directory"),
    ];
    for (path, status, code, message) in cases {
        let (got, err) = connect_json(
            &daemon,
            "/filesystem.Filesystem/CreateWatcher",
            json!({"path": path.to_str()}),
        )
        .await;
        assert_eq!(
            (got, err["code"].as_str()),
            (status, Some(code)),
            "{path:?}"
        );
        let text = err["message"].as_str().expect("message");
        assert!(text.contains(message) && !text.contains("%!"), "{text}");
    }
    for _ in 0..2 {
        let (status, _) = connect_json(
            &daemon,
            "/filesystem.Filesystem/CreateWatcher",
            json!({"path": dir.path().to_str()}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, err) = connect_json(
        &daemon,
        "/filesystem.Filesystem/CreateWatcher",
        json!({"path": dir.path().to_str()}),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (429, Some("resource_exhausted"))
    );
    // The stream shape reports the limit as a Connect end-stream error with HTTP 200.
    let response = http()
        .post(daemon.url("/filesystem.Filesystem/WatchDir"))
        .header("content-type", "application/connect+json")
        .body(envelope(
            0,
            json!({"path": dir.path().to_str()}).to_string().as_bytes(),
        ))
        .send()
        .await
        .expect("watch");
    assert_eq!(response.status(), 200);
    let frames = common::envelopes(response.bytes().await.expect("body"));
    let end: serde_json::Value =
        serde_json::from_slice(&frames.last().expect("end").1).expect("json");
    assert_eq!(end["error"]["code"], "resource_exhausted");
}

#[tokio::test]
async fn the_stream_ends_with_an_error_when_the_directory_goes_away() {
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("doomed");
    std::fs::create_dir(&dir).expect("mkdir");
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut stream = watch(&mut client, &dir, false, false).await;
    std::fs::remove_dir(&dir).expect("rmdir");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        assert!(Instant::now() < deadline, "the stream never ended");
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}
