//! `GET /files` against the real binary: identity and gzip downloads, negotiation errors,
//! ranges, Content-Disposition, missing files and directories.

mod common;

use std::io::Read;

use common::{Daemon, http};

#[tokio::test]
async fn downloads_identity_gzip_and_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let path = dir.path().join("my notes.txt");
    let content: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    std::fs::write(&path, &content).expect("write");
    let path_str = path.to_str().expect("utf-8");

    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path_str)])
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-disposition"],
        "inline; filename=\"my notes.txt\""
    );
    assert_eq!(response.headers()["vary"], "Accept-Encoding");
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        content.as_slice()
    );

    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path_str)])
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/plain")
    );
    let compressed = response.bytes().await.expect("body");
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(compressed.as_ref())
        .read_to_end(&mut plain)
        .expect("gunzip");
    assert_eq!(plain, content);

    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path_str)])
        .header("range", "bytes=10-19")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 206, "ranges force identity");
    assert!(response.headers().get("content-encoding").is_none());
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        &content[10..20]
    );
}

#[tokio::test]
async fn download_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").expect("write");
    let cases = [
        (
            dir.path()
                .join("missing")
                .to_str()
                .expect("utf-8")
                .to_owned(),
            None,
            404u16,
            "does not exist",
        ),
        (
            dir.path().to_str().expect("utf-8").to_owned(),
            None,
            400,
            "is a directory",
        ),
        (
            file.to_str().expect("utf-8").to_owned(),
            Some("*;q=0"),
            406,
            "no acceptable encoding",
        ),
        (
            "~other/x".to_owned(),
            None,
            400,
            "cannot expand user-specific home dir",
        ),
    ];
    for (path, accept, status, message) in cases {
        let mut request = http().get(daemon.url("/files")).query(&[("path", &path)]);
        if let Some(accept) = accept {
            request = request.header("accept-encoding", accept);
        }
        let response = request.send().await.expect("get");
        assert_eq!(response.status().as_u16(), status, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json; charset=utf-8"
        );
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["code"], status);
        assert!(
            body["message"].as_str().expect("message").contains(message),
            "{body}"
        );
    }
    let response = http()
        .get(daemon.url("/files?path=a&path=b"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 400, "repeated parameters");
}
