//! The access token against the real binary: how `/init` sets it and refuses to change or
//! clear it, and the gate it puts in front of every REST route and every RPC protocol,
//! with envd's four exempt routes.

mod common;

use common::{
    Daemon, TOKEN_HEADER, basic_auth, connect_json_with, envelope, envelopes, grpc_channel,
    grpc_web, http,
};
use envd::proto::filesystem::{StatRequest, StatResponse, filesystem_client::FilesystemClient};
use serde_json::json;

const TOKEN: &str = "tok-1f2e3d";
const GATE_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// A daemon whose token has been set to [`TOKEN`].
async fn locked_daemon(ca_dir: &std::path::Path) -> Daemon {
    let daemon = Daemon::start_for_init(ca_dir);
    daemon.init_ok(json!({ "accessToken": TOKEN })).await;
    daemon
}

async fn get_envs(daemon: &Daemon, token: Option<&str>) -> reqwest::Response {
    let mut request = http().get(daemon.url("/envs"));
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    request.send().await.expect("/envs")
}

#[tokio::test]
async fn the_token_is_set_once_and_then_only_re_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(dir.path());

    // No token yet: everything is open.
    assert_eq!(get_envs(&daemon, None).await.status(), 200);

    // Set it.
    let response = daemon.init(json!({ "accessToken": TOKEN })).await;
    assert_eq!(response.status(), 204);
    assert_eq!(response.headers()["x-envd-version"], "0.6.13");
    assert_eq!(get_envs(&daemon, None).await.status(), 401);
    assert_eq!(get_envs(&daemon, Some(TOKEN)).await.status(), 200);

    // Re-sending the same token (no header needed: /init is exempt) is fine, repeatedly.
    for _ in 0..2 {
        assert_eq!(
            daemon.init(json!({ "accessToken": TOKEN })).await.status(),
            204
        );
    }

    // Changing it is refused, with or without the current token in the header.
    for header in [None, Some(TOKEN), Some("other")] {
        let mut request = http()
            .post(daemon.url("/init"))
            .header("content-type", "application/json")
            .body(json!({ "accessToken": "new-token" }).to_string());
        if let Some(header) = header {
            request = request.header(TOKEN_HEADER, header);
        }
        let response = request.send().await.expect("/init");
        assert_eq!(response.status(), 401, "header {header:?}");
        assert_eq!(response.headers()["x-envd-version"], "0.6.13");
        assert_eq!(
            response.text().await.expect("body").trim(),
            "access token validation failed"
        );
    }

    // Clearing it is refused: an /init without a token, an empty body, an explicit null.
    for body in [json!({}), json!({ "accessToken": null }), json!(null)] {
        let response = daemon.init(body.clone()).await;
        assert_eq!(response.status(), 401, "{body}");
        assert_eq!(
            response.text().await.expect("body").trim(),
            "access token reset not authorized"
        );
    }
    let response = daemon.init_raw("").await;
    assert_eq!(response.status(), 401, "empty body");

    // A refused /init applies nothing else either.
    let response = daemon
        .init(json!({ "accessToken": "new-token", "envVars": { "LEAK": "1" } }))
        .await;
    assert_eq!(response.status(), 401);

    // The original token is still the one in force.
    assert_eq!(get_envs(&daemon, Some("new-token")).await.status(), 401);
    let envs: serde_json::Value = get_envs(&daemon, Some(TOKEN))
        .await
        .json()
        .await
        .expect("json");
    assert!(envs.get("LEAK").is_none(), "{envs}");
}

#[tokio::test]
async fn the_gate_refuses_rest_routes_with_envds_json_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    for (method, path) in [
        ("GET", "/envs"),
        ("GET", "/metrics"),
        ("GET", "/files/"),
        ("HEAD", "/files"),
        ("HEAD", "/health"),
        ("POST", "/files/compose"),
        ("GET", "/init"),
        ("GET", "/no-such-route"),
    ] {
        for token in [None, Some("wrong"), Some("")] {
            let mut request = http().request(method.parse().expect("method"), daemon.url(path));
            if let Some(token) = token {
                request = request.header(TOKEN_HEADER, token);
            }
            let response = request.send().await.expect("send");
            assert_eq!(response.status(), 401, "{method} {path} {token:?}");
            if method == "HEAD" {
                continue;
            }
            assert_eq!(
                response.headers()["content-type"],
                "application/json; charset=utf-8"
            );
            assert_eq!(response.headers()["x-content-type-options"], "nosniff");
            let body = response.text().await.expect("body");
            assert_eq!(
                body,
                format!("{}\n", json!({ "code": 401, "message": GATE_MESSAGE })),
                "{method} {path}"
            );
        }
    }
    // With the token, the same routes answer as they would without a gate.
    let response = http()
        .get(daemon.url("/no-such-route"))
        .header(TOKEN_HEADER, TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn exempt_routes_pass_the_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let response = http()
        .get(daemon.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(response.status(), 204);

    // /files passes the gate and applies its own check: the refusal is its own, not the gate's.
    let file = dir.path().join("exempt.txt");
    std::fs::write(&file, "x").expect("write");
    let path = file.to_str().expect("utf-8");
    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path)])
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["message"], "missing signature query parameter");
    let response = http()
        .post(daemon.url("/files"))
        .query(&[("path", path)])
        .header("content-type", "application/octet-stream")
        .body("y")
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["message"], "missing signature query parameter");

    // With the token in the header, /files works.
    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path)])
        .header(TOKEN_HEADER, TOKEN)
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.expect("body"), "x");

    // /init is exempt (it checks token changes itself).
    daemon.init_ok(json!({ "accessToken": TOKEN })).await;
}

#[tokio::test]
async fn cors_preflight_is_not_blocked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    for path in ["/envs", "/filesystem.Filesystem/Stat"] {
        let response = http()
            .request(reqwest::Method::OPTIONS, daemon.url(path))
            .header("origin", "https://example.test")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "x-access-token")
            .send()
            .await
            .expect("preflight");
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
    }
}

#[tokio::test]
async fn connect_unary_refusals_are_unauthenticated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let stat = "/filesystem.Filesystem/Stat";
    for headers in [
        vec![],
        vec![(TOKEN_HEADER, "wrong")],
        vec![(TOKEN_HEADER, "")],
    ] {
        let (status, body) =
            connect_json_with(&daemon, stat, json!({ "path": "/" }), &headers).await;
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(body["code"], "unauthenticated", "{body}");
        assert_eq!(body["message"], GATE_MESSAGE);
    }
    let (status, body) = connect_json_with(
        &daemon,
        stat,
        json!({ "path": "/" }),
        &[(TOKEN_HEADER, TOKEN)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entry"]["type"], "FILE_TYPE_DIRECTORY");
    // A valid Basic user does not replace the token.
    let (status, _) = connect_json_with(
        &daemon,
        stat,
        json!({ "path": "/" }),
        &[("authorization", &basic_auth("root"))],
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn connect_stream_refusals_are_an_end_stream_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let response = http()
        .post(daemon.url("/filesystem.Filesystem/WatchDir"))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(envelope(0, br#"{"path":"/tmp"}"#))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let frames = envelopes(response.bytes().await.expect("body"));
    assert_eq!(frames.len(), 1, "only the end-stream envelope");
    let (flags, payload) = &frames[0];
    assert_eq!(*flags, 0x02);
    let end: serde_json::Value = serde_json::from_slice(payload).expect("json");
    assert_eq!(end["error"]["code"], "unauthenticated", "{end}");
}

#[tokio::test]
async fn grpc_and_grpc_web_refusals_are_status_16() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let mut client = FilesystemClient::new(grpc_channel(&daemon).await);
    let status = client
        .stat(StatRequest { path: "/".into() })
        .await
        .expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(status.message(), GATE_MESSAGE);

    let mut request = tonic::Request::new(StatRequest { path: "/".into() });
    request
        .metadata_mut()
        .insert("x-access-token", TOKEN.parse().expect("ascii"));
    let entry = client
        .stat(request)
        .await
        .expect("with the token")
        .into_inner()
        .entry
        .expect("entry");
    assert_eq!(entry.path, "/");

    // Reflection is an RPC like any other.
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let mut reflection = ServerReflectionClient::new(grpc_channel(&daemon).await);
    let status = reflection
        .server_reflection_info(futures_util::stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let (message, trailers) = grpc_web::<_, StatResponse>(
        &daemon,
        "/filesystem.Filesystem/Stat",
        &StatRequest { path: "/".into() },
    )
    .await;
    assert!(message.is_none());
    assert!(trailers.contains("grpc-status:16"), "{trailers}");
}

#[tokio::test]
async fn a_bad_basic_header_does_not_break_routes_without_a_user() {
    let daemon = Daemon::start();
    for value in ["Basic !!!".to_owned(), basic_auth("no-such-user-envd")] {
        let response = http()
            .get(daemon.url("/health"))
            .header("authorization", &value)
            .send()
            .await
            .expect("health");
        assert_eq!(response.status(), 204, "{value}");
        let response = http()
            .get(daemon.url("/envs"))
            .header("authorization", &value)
            .send()
            .await
            .expect("envs");
        assert_eq!(response.status(), 200, "{value}");
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: (status, head, body).
fn read_response(reader: &mut impl std::io::BufRead) -> (u16, String, Vec<u8>) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read a head line");
        assert!(n > 0, "the connection closed; head so far: {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status = head[9..12].parse().expect("status code");
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().expect("length"))
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    (status, head, body)
}

/// Opens a connection and sends only the head of `POST target`, announcing a body of
/// `length` bytes, as a client does that writes head and body in two writes to a quick
/// daemon. Reads the answer, which must be a 401; returns it (its head) with the
/// connection's two ends, for the body and what follows.
fn refused_before_the_body(
    daemon: &Daemon,
    target: &str,
    content_type: &str,
    length: usize,
) -> (
    String,
    std::net::TcpStream,
    std::io::BufReader<std::net::TcpStream>,
) {
    use std::io::Write;

    let socket = std::net::TcpStream::connect(daemon.addr).expect("connect");
    let mut writer = socket.try_clone().expect("clone");
    let mut reader = std::io::BufReader::new(socket);
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    );
    writer.write_all(head.as_bytes()).expect("head");
    let (status, head, _) = read_response(&mut reader);
    assert_eq!(status, 401, "{target}: {head}");
    (head, writer, reader)
}

#[tokio::test]
async fn a_refused_request_whose_body_comes_late_keeps_its_connection() {
    use std::io::Write;

    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let path = dir.path().join("guarded.txt");
    std::fs::write(&path, "guarded").expect("write");
    let upload = (
        format!("/files?path={}", path.display()),
        "application/octet-stream",
        "overwritten".to_owned(),
    );
    // A gated route: refused by the gate, not by the handler.
    let compose = (
        "/files/compose".to_owned(),
        "application/json",
        json!({ "source_paths": [path], "destination": path }).to_string(),
    );
    for (target, content_type, body) in [upload, compose] {
        let (head, mut writer, mut reader) =
            refused_before_the_body(&daemon, &target, content_type, body.len());
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{target}: {head}"
        );
        // The body, late, and then another request on the same connection.
        writer.write_all(body.as_bytes()).expect("the body");
        writer
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("the next request");
        let (status, head, _) = read_response(&mut reader);
        assert_eq!(status, 204, "{target}: {head}");
    }
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "guarded");
}

#[tokio::test]
async fn a_refused_upload_is_not_read_past_its_budget() {
    use std::io::Write;

    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path()).await;
    let path = dir.path().join("big.bin");
    let total: usize = 256 << 20;
    let target = format!("/files?path={}", path.display());
    let (_, mut writer, _reader) =
        refused_before_the_body(&daemon, &target, "application/octet-stream", total);
    // The daemon reads a bounded part of the rest and then closes: the client's writes
    // fail long before the 256 MiB are through.
    let chunk = vec![b'x'; 1 << 20];
    let mut written = 0;
    while written < total && writer.write_all(&chunk).is_ok() {
        written += chunk.len();
    }
    assert!(written < total / 2, "{written} bytes went through");
    assert!(!path.exists());
}
