//! Filesystem RPC semantics over Connect JSON (what the SDKs speak): MakeDir, Move, Remove,
//! ListDir depth and symlinks, metadata following the inode.

mod common;

use common::{Daemon, connect_json, upload};
use serde_json::json;

#[tokio::test]
async fn make_move_remove() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let root = dir.path().to_str().expect("utf-8");
    let new_dir = format!("{root}/a/b/c");
    let (status, made) = connect_json(
        &daemon,
        "/filesystem.Filesystem/MakeDir",
        json!({"path": new_dir}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(made["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(made["entry"]["path"], new_dir.as_str());
    let (status, again) = connect_json(
        &daemon,
        "/filesystem.Filesystem/MakeDir",
        json!({"path": new_dir}),
    )
    .await;
    assert_eq!(
        (status, again["code"].as_str()),
        (409, Some("already_exists"))
    );

    let file = format!("{root}/a/f.txt");
    std::fs::write(&file, b"x").expect("write");
    let (status, err) = connect_json(
        &daemon,
        "/filesystem.Filesystem/MakeDir",
        json!({"path": file}),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_argument"))
    );

    let dest = format!("{root}/moved/deeper/g.txt");
    let (status, moved) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Move",
        json!({"source": file, "destination": dest}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(moved["entry"]["path"], dest.as_str());
    assert_eq!(moved["entry"]["name"], "g.txt");
    let (status, err) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Move",
        json!({"source": file, "destination": dest}),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));

    let (status, _) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Remove",
        json!({"path": format!("{root}/a")}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!dir.path().join("a").exists());
    let (status, _) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Remove",
        json!({"path": format!("{root}/a")}),
    )
    .await;
    assert_eq!(status, 200, "removing a missing path succeeds");
    let (status, err) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Remove",
        json!({"path": ""}),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_argument")),
        "an empty path never deletes home"
    );
    let (status, _) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Remove",
        json!({"path": "/"}),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn metadata_follows_moves_and_symlinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let file = dir.path().join("doc.txt");
    assert_eq!(
        upload(&daemon, &file, "x", &[("tag", "blue")])
            .await
            .status(),
        200
    );
    let moved = dir.path().join("renamed.txt");
    let (status, entry) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Move",
        json!({"source": file.to_str(), "destination": moved.to_str()}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(entry["entry"]["metadata"], json!({"tag": "blue"}));

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&moved, &link).expect("symlink");
    let (status, stat) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        json!({"path": link.to_str()}),
    )
    .await;
    assert_eq!(status, 200);
    let entry = &stat["entry"];
    assert_eq!(
        entry["type"], "FILE_TYPE_FILE",
        "a symlink reports its target's type"
    );
    assert_eq!(entry["isSymlink"], true);
    assert_eq!(entry["metadata"], json!({"tag": "blue"}));
    let canonical = std::fs::canonicalize(&moved).expect("canonical");
    assert_eq!(entry["symlinkTarget"], canonical.to_str().expect("utf-8"));
    assert!(
        entry["permissions"]
            .as_str()
            .expect("permissions")
            .starts_with('L')
    );
}

#[tokio::test]
async fn list_dir_depths_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    for d in ["a", "a/x", "b"] {
        std::fs::create_dir(dir.path().join(d)).expect("mkdir");
    }
    for f in ["a/y", "a/x/z", "c"] {
        std::fs::write(dir.path().join(f), b"").expect("write");
    }
    let root = dir.path().to_str().expect("utf-8");
    let names = |listing: &serde_json::Value| -> Vec<String> {
        listing["entries"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        e["path"]
                            .as_str()
                            .expect("path")
                            .trim_start_matches(root)
                            .to_owned()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (_, one) = connect_json(
        &daemon,
        "/filesystem.Filesystem/ListDir",
        json!({"path": root}),
    )
    .await;
    assert_eq!(names(&one), ["/a", "/b", "/c"]);
    let (_, two) = connect_json(
        &daemon,
        "/filesystem.Filesystem/ListDir",
        json!({"path": root, "depth": 2}),
    )
    .await;
    assert_eq!(names(&two), ["/a", "/a/x", "/a/y", "/b", "/c"]);
    let (_, three) = connect_json(
        &daemon,
        "/filesystem.Filesystem/ListDir",
        json!({"path": root, "depth": 3}),
    )
    .await;
    assert_eq!(names(&three), ["/a", "/a/x", "/a/x/z", "/a/y", "/b", "/c"]);
    let (status, err) = connect_json(
        &daemon,
        "/filesystem.Filesystem/ListDir",
        json!({"path": format!("{root}/c")}),
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (status, err) = connect_json(
        &daemon,
        "/filesystem.Filesystem/ListDir",
        json!({"path": format!("{root}/nope")}),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn unknown_basic_auth_user_is_unauthenticated() {
    let daemon = Daemon::start();
    let response = common::http()
        .post(daemon.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/json")
        .header("authorization", "Basic bm8tc3VjaC11c2VyOg==")
        .body(r#"{"path":"/"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 401);
    let json: serde_json::Value = response.json().await.expect("json");
    assert_eq!(json["code"], "unauthenticated");
    assert_eq!(json["message"], "invalid username: 'no-such-user'");
}
