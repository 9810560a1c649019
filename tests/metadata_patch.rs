//! `PATCH /files/metadata` and `envd_ext.Metadata/Patch` against the real binary: merge
//! rules, every protocol, auth, and concurrency (no lost updates, never half-applied).

mod common;

use std::path::Path;

use base64::Engine;
use common::{Daemon, getfattr, grpc_channel, grpc_web, http, map, upload};
use envd::proto::envd_ext::{self as ext, metadata_client::MetadataClient};
use serde_json::json;
use sha2::{Digest, Sha256};

async fn patch(daemon: &Daemon, path: &Path, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = http()
        .patch(daemon.url("/files/metadata"))
        .query(&[("path", path.to_str().expect("utf-8"))])
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("patch");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

#[tokio::test]
async fn merge_semantics_over_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let path = dir.path().join("doc.txt");
    assert_eq!(
        upload(
            &daemon,
            &path,
            "x",
            &[("a", "1"), ("b", "2"), ("keep", "k")]
        )
        .await
        .status(),
        200
    );
    xattr::set(&path, "user.other-tool", b"untouched").expect("foreign");

    let (status, entry) = patch(
        &daemon,
        &path,
        json!({"metadata": {"a": "", "b": null, "c": "3"}}),
    )
    .await;
    assert_eq!(status, 200, "{entry}");
    assert_eq!(entry["metadata"], json!({"c": "3", "keep": "k"}));
    assert_eq!(entry["path"], path.to_str().expect("utf-8"));
    assert_eq!(entry["type"], "FILE_TYPE_FILE");
    assert_eq!(getfattr(&path), map(&[("c", "3"), ("keep", "k")]));

    // Invalid input and invalid results change nothing.
    for body in [
        json!({"metadata": {"x": 1}}),
        json!({"metadata": {"x": {"nested": "y"}}}),
        json!({"metadata": {"x": ["y"]}}),
        json!({"metadata": {"x": true}}),
        json!({"other": {}}),
        json!({"metadata": {"big": "v".repeat(5000)}}),
        json!({"metadata": {"tab": "a\tb"}}),
    ] {
        let (status, err) = patch(&daemon, &path, body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(getfattr(&path), map(&[("c", "3"), ("keep", "k")]), "{body}");
    }

    let (status, entry) = patch(&daemon, &path, json!({"metadata": null})).await;
    assert_eq!(status, 200);
    assert!(entry.get("metadata").is_none(), "cleared: {entry}");
    assert!(getfattr(&path).is_empty());
    assert_eq!(
        xattr::get(&path, "user.other-tool").expect("get"),
        Some(b"untouched".to_vec())
    );

    // Directories, and symlinks (their target), work too.
    let (status, entry) = patch(&daemon, dir.path(), json!({"metadata": {"kind": "dir"}})).await;
    assert_eq!((status, &entry["metadata"]), (200, &json!({"kind": "dir"})));
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    let (status, _) = patch(&daemon, &link, json!({"metadata": {"via": "link"}})).await;
    assert_eq!(status, 200);
    assert_eq!(getfattr(&path), map(&[("via", "link")]));

    let (status, err) = patch(
        &daemon,
        &dir.path().join("missing"),
        json!({"metadata": {}}),
    )
    .await;
    assert_eq!((status, err["code"].as_u64()), (404, Some(404)));
}

#[tokio::test]
async fn the_rpc_can_set_remove_and_clear_on_every_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let path = dir.path().join("f");
    assert_eq!(
        upload(&daemon, &path, "x", &[("a", "1"), ("b", "2")])
            .await
            .status(),
        200
    );
    let path_str = path.to_str().expect("utf-8").to_owned();

    // gRPC: set one key, remove another, leave the rest.
    let mut client = MetadataClient::new(grpc_channel(&daemon).await);
    let response = client
        .patch(ext::PatchMetadataRequest {
            path: path_str.clone(),
            set: [("c".to_owned(), "3".to_owned())].into(),
            remove: vec!["a".into()],
            clear: false,
        })
        .await
        .expect("patch")
        .into_inner();
    let entry = response.entry.expect("entry");
    assert_eq!(
        entry
            .metadata
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        map(&[("b", "2"), ("c", "3")])
    );
    let status = client
        .patch(ext::PatchMetadataRequest {
            path: path_str.clone(),
            set: [("c".to_owned(), "9".to_owned())].into(),
            remove: vec!["c".into()],
            clear: false,
        })
        .await
        .expect_err("ambiguous");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Connect JSON.
    let (status, body) = common::connect_json(
        &daemon,
        "/envd_ext.Metadata/Patch",
        json!({"path": path_str, "set": {"d": "4"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["entry"]["metadata"],
        json!({"b": "2", "c": "3", "d": "4"})
    );

    // Connect proto.
    let response: ext::PatchMetadataResponse = common::connect_proto(
        &daemon,
        "/envd_ext.Metadata/Patch",
        &ext::PatchMetadataRequest {
            path: path_str.clone(),
            remove: vec!["b".into()],
            ..Default::default()
        },
    )
    .await
    .expect("connect proto");
    assert_eq!(response.entry.expect("entry").metadata.len(), 2);

    // gRPC-Web: clear everything.
    let (response, trailers) = grpc_web::<_, ext::PatchMetadataResponse>(
        &daemon,
        "/envd_ext.Metadata/Patch",
        &ext::PatchMetadataRequest {
            path: path_str.clone(),
            clear: true,
            ..Default::default()
        },
    )
    .await;
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    assert!(
        response
            .expect("message")
            .entry
            .expect("entry")
            .metadata
            .is_empty()
    );
    assert!(getfattr(&path).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_writers_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = std::sync::Arc::new(Daemon::start());
    let path = dir.path().join("shared.txt");
    assert_eq!(upload(&daemon, &path, "x", &[]).await.status(), 200);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let daemon = daemon.clone();
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let (status, body) = patch(
                &daemon,
                &path,
                json!({"metadata": {format!("k{i}"): format!("{i}")}}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    let stored = getfattr(&path);
    assert_eq!(stored.len(), 100, "lost updates: {stored:?}");
    for i in 0..100 {
        assert_eq!(
            stored.get(&format!("k{i}")).map(String::as_str),
            Some(i.to_string().as_str())
        );
    }
}

/// Patches set two keys to the same value at once while uploads replace the file and
/// Stat watches: no response ever shows one key without the other, and the end state is
/// one some serial order gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patches_racing_uploads_and_readers_are_never_half_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = std::sync::Arc::new(Daemon::start());
    let path = dir.path().join("raced.txt");
    assert_eq!(
        upload(&daemon, &path, "upload-0", &[("writer", "0")])
            .await
            .status(),
        200
    );
    let mut tasks = Vec::new();
    for i in 1..=30 {
        let (d, p) = (daemon.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let (daemon, path) = (d, p);
            let (status, body) = patch(
                &daemon,
                &path,
                json!({"metadata": {"x": format!("{i}"), "y": format!("{i}")}}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let metadata = &body["metadata"];
            assert_eq!(
                metadata["x"], metadata["y"],
                "a patch response is whole: {body}"
            );
        }));
        let (d, p) = (daemon.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let (daemon, path) = (d, p);
            let response = upload(
                &daemon,
                &path,
                format!("upload-{i}"),
                &[("writer", &i.to_string())],
            )
            .await;
            assert_eq!(response.status(), 200);
        }));
        let (d, p) = (daemon.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let (daemon, path) = (d, p);
            let (status, body) = common::connect_json(
                &daemon,
                "/filesystem.Filesystem/Stat",
                json!({"path": path.to_str()}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let metadata = &body["entry"]["metadata"];
            assert_eq!(
                metadata["x"], metadata["y"],
                "Stat never sees half a patch: {body}"
            );
            assert!(
                metadata["writer"].is_string(),
                "an upload's metadata is always there: {body}"
            );
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let stored = getfattr(&path);
    let writer = stored.get("writer").expect("writer").clone();
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        format!("upload-{writer}")
    );
    assert_eq!(stored.get("x"), stored.get("y"));
}

#[tokio::test]
async fn auth_is_as_for_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let ca = tempfile::tempdir().expect("ca dir");
    let args = common::init_args(ca.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_with(&args, &[]);
    let path = dir.path().join("guarded");
    std::fs::write(&path, b"x").expect("write");
    let token = "patch-token-1";
    daemon.init_ok(json!({"accessToken": token})).await;
    let raw = path.to_str().expect("utf-8");
    let send = |request: reqwest::RequestBuilder| async move {
        request
            .header("content-type", "application/json")
            .body(json!({"metadata": {"a": "1"}}).to_string())
            .send()
            .await
            .expect("send")
            .status()
            .as_u16()
    };
    assert_eq!(
        send(
            http()
                .patch(daemon.url("/files/metadata"))
                .query(&[("path", raw)])
        )
        .await,
        401
    );
    assert_eq!(
        send(
            http()
                .patch(daemon.url("/files/metadata"))
                .query(&[("path", raw)])
                .header("x-access-token", "wrong")
        )
        .await,
        401
    );
    assert_eq!(
        send(
            http()
                .patch(daemon.url("/files/metadata"))
                .query(&[("path", raw)])
                .header("x-access-token", token)
        )
        .await,
        200
    );
    let digest = Sha256::digest(format!("{raw}:write::{token}").as_bytes());
    let signature = format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    );
    assert_eq!(
        send(
            http()
                .patch(daemon.url("/files/metadata"))
                .query(&[("path", raw), ("signature", signature.as_str())])
        )
        .await,
        200
    );
    let read_digest = Sha256::digest(format!("{raw}:read::{token}").as_bytes());
    let read_signature = format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(read_digest)
    );
    assert_eq!(
        send(
            http()
                .patch(daemon.url("/files/metadata"))
                .query(&[("path", raw), ("signature", read_signature.as_str())])
        )
        .await,
        401,
        "a read signature does not allow a write"
    );
}
