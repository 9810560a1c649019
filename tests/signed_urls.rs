//! Signed `/files` URLs against the real binary. Signatures are computed here from the
//! formula (`"v1_" + base64_std_unpadded(sha256("path:op:user:token[:exp]"))`), not with
//! the daemon's own code.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{Daemon, TOKEN_HEADER, http};
use serde_json::json;
use sha2::{Digest, Sha256};

const TOKEN: &str = "signing-token-9";

fn sign(path: &str, op: &str, user: &str, expiration: Option<i64>) -> String {
    let text = match expiration {
        Some(exp) => format!("{path}:{op}:{user}:{TOKEN}:{exp}"),
        None => format!("{path}:{op}:{user}:{TOKEN}"),
    };
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

fn now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    i64::try_from(secs).expect("fits")
}

async fn locked_daemon(dir: &std::path::Path) -> Daemon {
    let daemon = Daemon::start_for_init(dir);
    daemon.init_ok(json!({ "accessToken": TOKEN })).await;
    daemon
}

async fn download(daemon: &Daemon, query: &[(&str, &str)]) -> (u16, String) {
    let response = http()
        .get(daemon.url("/files"))
        .query(query)
        .send()
        .await
        .expect("download");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

async fn upload(daemon: &Daemon, query: &[(&str, &str)], body: &'static str) -> (u16, String) {
    let response = http()
        .post(daemon.url("/files"))
        .query(query)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("upload");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

fn message(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON error");
    assert_eq!(json["code"], 401, "{body}");
    json["message"].as_str().expect("message").to_owned()
}

#[tokio::test]
async fn signed_urls_write_and_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let file = dir.path().join("signed dir/a b ü.txt");
    let path = file.to_str().expect("utf-8");

    let write = sign(path, "write", "", None);
    let (status, body) = upload(&daemon, &[("path", path), ("signature", &write)], "hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "hello");

    let read = sign(path, "read", "", None);
    let (status, body) = download(&daemon, &[("path", path), ("signature", &read)]).await;
    assert_eq!((status, body.as_str()), (200, "hello"));

    // The read signature does not allow writing, nor the write one reading.
    let (status, body) = upload(&daemon, &[("path", path), ("signature", &read)], "x").await;
    assert_eq!(
        (status, message(&body).as_str()),
        (401, "invalid signature")
    );
    let (status, body) = download(&daemon, &[("path", path), ("signature", &write)]).await;
    assert_eq!(
        (status, message(&body).as_str()),
        (401, "invalid signature")
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "hello");

    // A username is part of what is signed.
    let as_root = sign(path, "read", "root", None);
    let (status, _) = download(
        &daemon,
        &[
            ("path", path),
            ("username", "root"),
            ("signature", &as_root),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = download(&daemon, &[("path", path), ("signature", &as_root)]).await;
    assert_eq!(
        (status, message(&body).as_str()),
        (401, "invalid signature")
    );
}

#[tokio::test]
async fn tampered_missing_and_expired_signatures_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let file = dir.path().join("f.txt");
    std::fs::write(&file, "content").expect("write");
    let other = dir.path().join("other.txt");
    std::fs::write(&other, "secret").expect("write");
    let path = file.to_str().expect("utf-8");
    let other_path = other.to_str().expect("utf-8");

    // Missing.
    let (status, body) = download(&daemon, &[("path", path)]).await;
    assert_eq!(
        (status, message(&body).as_str()),
        (401, "missing signature query parameter")
    );

    // Tampered: one character changed; a signature for one path used for another.
    let good = sign(path, "read", "", None);
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    for (query_path, signature) in [(path, tampered.as_str()), (other_path, good.as_str())] {
        let (status, body) =
            download(&daemon, &[("path", query_path), ("signature", signature)]).await;
        assert_eq!(
            (status, message(&body).as_str()),
            (401, "invalid signature")
        );
    }
    // Padded base64 is not the formula.
    let padded = format!("{good}=");
    let (status, _) = download(&daemon, &[("path", path), ("signature", &padded)]).await;
    assert_eq!(status, 401);

    // With an expiration: valid until then, and the expiration is signed.
    let later = now() + 600;
    let until_later = sign(path, "read", "", Some(later));
    let later_text = later.to_string();
    let (status, body) = download(
        &daemon,
        &[
            ("path", path),
            ("signature", &until_later),
            ("signature_expiration", &later_text),
        ],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "content"));
    let extended = (later + 1).to_string();
    let (status, body) = download(
        &daemon,
        &[
            ("path", path),
            ("signature", &until_later),
            ("signature_expiration", &extended),
        ],
    )
    .await;
    assert_eq!(
        (status, message(&body).as_str()),
        (401, "invalid signature")
    );
    let (status, body) = download(&daemon, &[("path", path), ("signature", &until_later)]).await;
    assert_eq!(
        (status, message(&body).as_str()),
        (401, "invalid signature")
    );

    // Expired.
    let earlier = now() - 60;
    let expired = sign(path, "read", "", Some(earlier));
    let earlier_text = earlier.to_string();
    let (status, body) = download(
        &daemon,
        &[
            ("path", path),
            ("signature", &expired),
            ("signature_expiration", &earlier_text),
        ],
    )
    .await;
    assert_eq!(
        (status, message(&body).as_str()),
        (401, "signature is already expired")
    );
    let expired_write = sign(path, "write", "", Some(earlier));
    let (status, body) = upload(
        &daemon,
        &[
            ("path", path),
            ("signature", &expired_write),
            ("signature_expiration", &earlier_text),
        ],
        "overwritten",
    )
    .await;
    assert_eq!(
        (status, message(&body).as_str()),
        (401, "signature is already expired")
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "content");

    // Not an integer: a query-binding error, 400 in plain text.
    let response = http()
        .get(daemon.url("/files"))
        .query(&[
            ("path", path),
            ("signature", &good),
            ("signature_expiration", "tomorrow"),
        ])
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    assert!(
        response
            .text()
            .await
            .expect("body")
            .starts_with("Invalid format for parameter signature_expiration")
    );
}

#[tokio::test]
async fn the_header_token_takes_precedence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let file = dir.path().join("h.txt");
    std::fs::write(&file, "h").expect("write");
    let path = file.to_str().expect("utf-8");
    let good = sign(path, "read", "", None);

    // A right header makes any signature irrelevant, even a bogus one.
    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path), ("signature", "v1_bogus")])
        .header(TOKEN_HEADER, TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);

    // A wrong header is refused even with a valid signature.
    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path), ("signature", &good)])
        .header(TOKEN_HEADER, "wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 401);
    assert_eq!(
        message(&response.text().await.expect("body")),
        "access token present in header but does not match"
    );

    // Uploads follow the same rule.
    let response = http()
        .post(daemon.url("/files"))
        .query(&[("path", path)])
        .header(TOKEN_HEADER, TOKEN)
        .header("content-type", "application/octet-stream")
        .body("new")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "new");
}

#[tokio::test]
async fn without_a_token_files_are_open_and_signatures_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(dir.path());
    let file = dir.path().join("open.txt");
    std::fs::write(&file, "open").expect("write");
    let path = file.to_str().expect("utf-8");
    let (status, body) = download(&daemon, &[("path", path), ("signature", "v1_whatever")]).await;
    assert_eq!((status, body.as_str()), (200, "open"));
}
