//! Users and paths against the real binary: which user a request acts as on each surface,
//! who owns what the daemon creates (with a real non-root user made by `useradd`), how
//! relative and `~` paths resolve, and what a daemon without root can and cannot do.
//! Tests that need root say so and skip without it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::{Daemon, basic_auth, connect_json, connect_json_with, grpc_channel, http, init_args};
use envd::proto::filesystem::{StatRequest, filesystem_client::FilesystemClient};
use serde_json::json;

/// `useradd`/`userdel` lock the user database: one at a time.
static USER_DB: Mutex<()> = Mutex::new(());

/// A real user with a home directory, removed (with its home) when dropped.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl TestUser {
    /// Creates a user, or `None` when not root (the caller skips).
    fn create(tag: &str) -> Option<TestUser> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: creating users needs root");
            return None;
        }
        let name = format!("envd-{tag}-{}", std::process::id());
        {
            let _db = USER_DB
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let status = Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/sh", &name])
                .status()
                .expect("run useradd");
            assert!(status.success(), "useradd {name}: {status}");
        }
        let user = nix::unistd::User::from_name(&name)
            .expect("passwd")
            .expect("created user");
        Some(TestUser {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        })
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _db = USER_DB
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = Command::new("userdel")
            .args(["--remove", &self.name])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn owner(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|err| panic!("stat {}: {err}", path.display()))
        .uid()
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

async fn upload_as(daemon: &Daemon, path: &str, username: Option<&str>) -> reqwest::Response {
    let mut query = vec![("path", path)];
    if let Some(username) = username {
        query.push(("username", username));
    }
    http()
        .post(daemon.url("/files"))
        .query(&query)
        .header("content-type", "application/octet-stream")
        .body("data")
        .send()
        .await
        .expect("upload")
}

#[tokio::test]
async fn created_files_and_directories_belong_to_the_requesting_user() {
    let Some(user) = TestUser::create("own") else {
        return;
    };
    let ca = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(ca.path());
    let dir = tempfile::tempdir().expect("tempdir");
    let root_uid = 0;

    // Upload as the user: the file and every directory created for it are theirs.
    let file = dir.path().join("up/deep/f.txt");
    let response = upload_as(&daemon, utf8(&file), Some(&user.name)).await;
    assert_eq!(response.status(), 200);
    for created in [&file, &dir.path().join("up/deep"), &dir.path().join("up")] {
        assert_eq!(owner(created), user.uid, "{}", created.display());
    }
    assert_eq!(
        owner(dir.path()),
        root_uid,
        "existing directories are untouched"
    );
    let meta = std::fs::metadata(&file).expect("stat");
    assert_eq!(meta.gid(), user.gid);

    // An existing root-owned file uploaded to by the user becomes theirs.
    let existing = dir.path().join("existing.txt");
    std::fs::write(&existing, "old").expect("write");
    assert_eq!(owner(&existing), root_uid);
    assert_eq!(
        upload_as(&daemon, utf8(&existing), Some(&user.name))
            .await
            .status(),
        200
    );
    assert_eq!(owner(&existing), user.uid);

    // MakeDir as the user (Basic auth): every new level is theirs.
    let made = dir.path().join("m1/m2");
    let (status, body) = connect_json_with(
        &daemon,
        "/filesystem.Filesystem/MakeDir",
        json!({ "path": utf8(&made) }),
        &[("authorization", &basic_auth(&user.name))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["owner"], user.name.as_str());
    assert_eq!(owner(&made), user.uid);
    assert_eq!(owner(&dir.path().join("m1")), user.uid);

    // Move as the user: new parents are theirs, the moved file keeps its owner.
    let source = dir.path().join("root-file.txt");
    std::fs::write(&source, "r").expect("write");
    let destination = dir.path().join("mv/sub/moved.txt");
    let (status, body) = connect_json_with(
        &daemon,
        "/filesystem.Filesystem/Move",
        json!({ "source": utf8(&source), "destination": utf8(&destination) }),
        &[("authorization", &basic_auth(&user.name))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(owner(&dir.path().join("mv/sub")), user.uid);
    assert_eq!(owner(&destination), root_uid);

    // Without a user in the request, the default user applies: root, then /init's.
    let as_root = dir.path().join("default/root.txt");
    assert_eq!(upload_as(&daemon, utf8(&as_root), None).await.status(), 200);
    assert_eq!(owner(&as_root), root_uid);
    daemon.init_ok(json!({ "defaultUser": user.name })).await;
    let as_default = dir.path().join("default/user.txt");
    assert_eq!(
        upload_as(&daemon, utf8(&as_default), None).await.status(),
        200
    );
    assert_eq!(owner(&as_default), user.uid);
    let made = dir.path().join("default-dir");
    let (status, _) = connect_json(
        &daemon,
        "/filesystem.Filesystem/MakeDir",
        json!({ "path": utf8(&made) }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(owner(&made), user.uid);
    // An explicit user still wins over the default.
    let explicit = dir.path().join("default/explicit-root.txt");
    assert_eq!(
        upload_as(&daemon, utf8(&explicit), Some("root"))
            .await
            .status(),
        200
    );
    assert_eq!(owner(&explicit), root_uid);
}

#[tokio::test]
async fn relative_and_home_paths_resolve_against_the_users_home() {
    let Some(user) = TestUser::create("path") else {
        return;
    };
    let ca = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(ca.path());
    let home = &user.home;

    // /files: relative, `~/`, `..` (cleaned), each for the named user.
    for (path, want) in [
        ("rel/a.txt", home.join("rel/a.txt")),
        ("~/tilde/b.txt", home.join("tilde/b.txt")),
        ("./x/../c.txt", home.join("c.txt")),
    ] {
        let response = upload_as(&daemon, path, Some(&user.name)).await;
        assert_eq!(response.status(), 200, "{path}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body[0]["path"], utf8(&want), "{path}");
        assert_eq!(std::fs::read_to_string(&want).expect("read"), "data");
        assert_eq!(owner(&want), user.uid);
        let response = http()
            .get(daemon.url("/files"))
            .query(&[("path", path), ("username", user.name.as_str())])
            .send()
            .await
            .expect("download");
        assert_eq!(response.status(), 200, "{path}");
    }

    // RPC: the same paths through Basic auth.
    let auth = basic_auth(&user.name);
    for (path, want) in [
        ("~", home.clone()),
        ("", home.clone()),
        ("rel", home.join("rel")),
        ("~/rel/a.txt", home.join("rel/a.txt")),
    ] {
        let (status, body) = connect_json_with(
            &daemon,
            "/filesystem.Filesystem/Stat",
            json!({ "path": path }),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["entry"]["path"], utf8(&want), "{path}");
    }

    // A default workdir replaces only the empty path; relative paths stay home-relative.
    let workdir = tempfile::tempdir().expect("tempdir");
    daemon
        .init_ok(json!({ "defaultWorkdir": utf8(workdir.path()) }))
        .await;
    for (path, want) in [
        ("", workdir.path().to_path_buf()),
        ("rel", home.join("rel")),
    ] {
        let (status, body) = connect_json_with(
            &daemon,
            "/filesystem.Filesystem/Stat",
            json!({ "path": path }),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["entry"]["path"], utf8(&want), "{path}");
    }

    // Another user's home cannot be named with `~name`.
    let (status, body) = connect_json_with(
        &daemon,
        "/filesystem.Filesystem/Stat",
        json!({ "path": "~root/x" }),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let response = upload_as(&daemon, "~root/x", Some(&user.name)).await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn unknown_users_are_refused_on_every_surface() {
    let ca = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(ca.path());
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("never.txt");
    let nobody = "no-such-user-envd";

    // REST: the username query parameter, including an empty one.
    for (username, want) in [
        (
            nobody,
            format!("error looking up user '{nobody}': user: unknown user {nobody}"),
        ),
        (
            "",
            "error looking up user '': user: unknown user ".to_owned(),
        ),
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let response = http()
                .request(method.clone(), daemon.url("/files"))
                .query(&[("path", utf8(&target)), ("username", username)])
                .header("content-type", "application/octet-stream")
                .body("x")
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), 401, "{method} {username:?}");
            let body: serde_json::Value = response.json().await.expect("json");
            assert_eq!(body["message"], want.as_str());
        }
    }
    assert!(!target.exists());

    // RPC: Basic auth on Connect, gRPC and gRPC-Web.
    let auth = basic_auth(nobody);
    let (status, body) = connect_json_with(
        &daemon,
        "/filesystem.Filesystem/Stat",
        json!({ "path": "/" }),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "unauthenticated");
    assert_eq!(body["message"], format!("invalid username: '{nobody}'"));
    let mut client = FilesystemClient::new(grpc_channel(&daemon).await);
    let mut request = tonic::Request::new(StatRequest { path: "/".into() });
    request
        .metadata_mut()
        .insert("authorization", auth.parse().expect("ascii"));
    let status = client.stat(request).await.expect_err("unknown user");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let response = http()
        .post(daemon.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/grpc-web+proto")
        .header("authorization", &auth)
        .body(common::envelope(0, b"\x0a\x01/"))
        .send()
        .await
        .expect("grpc-web");
    assert_eq!(response.headers()["grpc-status"], "16");

    // An unknown default user: requests that name no user fail the same way.
    let readable = dir.path().join("readable.txt");
    std::fs::write(&readable, "r").expect("write");
    daemon
        .init_ok(json!({ "defaultUser": "no-such-default" }))
        .await;
    let (status, body) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        json!({ "path": "/" }),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "invalid default user: 'no-such-default'");
    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", utf8(&readable))])
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 401);
    // Naming a real user still works.
    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", utf8(&readable)), ("username", "root")])
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_daemon_without_root_works_as_its_own_user() {
    let Some(user) = TestUser::create("noroot") else {
        return;
    };
    // The CA store stays root's: installing into it must fail clearly.
    let ca = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        ca.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let work = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::chown(work.path(), Some(user.uid), Some(user.gid)).expect("chown");
    let mut args = init_args(ca.path());
    // Allowed to try; the kernel refuses without CAP_SYS_TIME.
    args[1] = "true".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_as(user.uid, user.gid, &args);

    // Its default user is itself: uploads and MakeDir work and skip the chown.
    let file = work.path().join("mine/f.txt");
    let response = upload_as(&daemon, utf8(&file), None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(owner(&file), user.uid);
    let response = upload_as(
        &daemon,
        utf8(&work.path().join("named.txt")),
        Some(&user.name),
    )
    .await;
    assert_eq!(response.status(), 200);
    let (status, body) = connect_json(
        &daemon,
        "/filesystem.Filesystem/MakeDir",
        json!({ "path": utf8(&work.path().join("d1/d2")) }),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Acting as another user needs root: a clear refusal, nothing created.
    let refused = work.path().join("as-root/f.txt");
    let response = upload_as(&daemon, utf8(&refused), Some("root")).await;
    assert_eq!(response.status(), 403);
    let body: serde_json::Value = response.json().await.expect("json");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("without root"), "{message}");
    assert!(!work.path().join("as-root").exists());
    let (status, body) = connect_json_with(
        &daemon,
        "/filesystem.Filesystem/MakeDir",
        json!({ "path": utf8(&work.path().join("root-dir")) }),
        &[("authorization", &basic_auth("root"))],
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("permission_denied")),
        "{body}"
    );

    // The clock: an /init an hour behind succeeds; the clock is not moved.
    let before = std::time::SystemTime::now();
    let hour_ago =
        chrono::DateTime::<chrono::Utc>::from(before - std::time::Duration::from_secs(3600));
    daemon
        .init_ok(json!({ "timestamp": hour_ago.to_rfc3339() }))
        .await;
    let drift = std::time::SystemTime::now()
        .duration_since(before)
        .expect("the clock did not go back");
    assert!(drift.as_secs() < 60);

    // The CA store: refused, naming what is missing.
    let response = daemon
        .init(json!({ "caBundle": "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----" }))
        .await;
    assert_eq!(response.status(), 403);
    let text = response.text().await.expect("body");
    assert!(text.contains("needs root"), "{text}");

    // Everything else works.
    for path in ["/envs", "/metrics", "/health"] {
        let status = http()
            .get(daemon.url(path))
            .send()
            .await
            .expect("send")
            .status();
        assert!(status.is_success(), "{path}: {status}");
    }
}
