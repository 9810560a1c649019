//! No way in without the token, against the real binary: every RPC through every protocol
//! and every non-exempt route refuse an absent, wrong or differently-cased token; a signed
//! URL works only for what it was signed for; and the token shows up nowhere: not in the
//! logs at `trace`, not in `/envs` or a process's environment, not in any error.
//! (The constant-time comparison is checked by the code-path test in `src/auth/token.rs`.)

mod common;

use common::{Daemon, Launch, TOKEN_HEADER, envelope, envelopes, grpc_channel, http};
use serde_json::json;

const TOKEN: &str = "Tok-Sec-7f3a9";
const GATE_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// Every RPC the daemon serves, and whether its request is one message (Connect unary
/// or server stream) or a stream.
const RPCS: &[(&str, Kind)] = &[
    ("/filesystem.Filesystem/Stat", Kind::Unary),
    ("/filesystem.Filesystem/MakeDir", Kind::Unary),
    ("/filesystem.Filesystem/Move", Kind::Unary),
    ("/filesystem.Filesystem/ListDir", Kind::Unary),
    ("/filesystem.Filesystem/Remove", Kind::Unary),
    ("/filesystem.Filesystem/WatchDir", Kind::Stream),
    ("/filesystem.Filesystem/CreateWatcher", Kind::Unary),
    ("/filesystem.Filesystem/GetWatcherEvents", Kind::Unary),
    ("/filesystem.Filesystem/RemoveWatcher", Kind::Unary),
    ("/process.Process/List", Kind::Unary),
    ("/process.Process/Connect", Kind::Stream),
    ("/process.Process/Start", Kind::Stream),
    ("/process.Process/Update", Kind::Unary),
    ("/process.Process/StreamInput", Kind::Stream),
    ("/process.Process/SendInput", Kind::Unary),
    ("/process.Process/SendSignal", Kind::Unary),
    ("/process.Process/CloseStdin", Kind::Unary),
    ("/envd_ext.Processes/List", Kind::Unary),
    ("/envd_ext.Processes/SetTimeout", Kind::Unary),
    ("/envd_ext.Metadata/Patch", Kind::Unary),
];

/// Served over gRPC and gRPC-Web only (Connect has no reflection).
const REFLECTION: &[&str] = &[
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    Stream,
}

/// Everything that is not the token: none, wrong, another case, a prefix, an extension.
fn not_the_token() -> Vec<Option<String>> {
    vec![
        None,
        Some(String::new()),
        Some("wrong".into()),
        Some(TOKEN.to_lowercase()),
        Some(TOKEN.to_uppercase()),
        Some(TOKEN[..TOKEN.len() - 1].to_owned()),
        Some(format!("{TOKEN}0")),
    ]
}

async fn locked_daemon(dir: &std::path::Path, launch: Launch) -> Daemon {
    let args = common::init_args(dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::launch(&args, &[], launch);
    daemon.init_ok(json!({ "accessToken": TOKEN })).await;
    daemon
}

/// A Connect call of `path` with an empty message; the error code it ends with, if any.
async fn connect_code(
    daemon: &Daemon,
    path: &str,
    kind: Kind,
    token: Option<&str>,
) -> Option<String> {
    let mut request = http().post(daemon.url(path));
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    match kind {
        Kind::Unary => {
            let response = request
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .expect("send");
            if response.status() == 200 {
                return None;
            }
            let body: serde_json::Value = response.json().await.expect("json");
            if body["code"] == "unauthenticated" {
                assert_eq!(body["message"], GATE_MESSAGE, "{path}");
            }
            body["code"].as_str().map(str::to_owned)
        }
        Kind::Stream => {
            let response = request
                .header("content-type", "application/connect+json")
                .body(envelope(0, b"{}"))
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), 200, "{path}");
            let frames = envelopes(response.bytes().await.expect("body"));
            let (_, end) = frames.last().expect("an end-of-stream envelope");
            let end: serde_json::Value = serde_json::from_slice(end).expect("json");
            end["error"]["code"].as_str().map(str::to_owned)
        }
    }
}

/// A gRPC call of `path` with an empty message; its status code.
async fn grpc_code(
    channel: tonic::transport::Channel,
    path: &'static str,
    token: Option<&str>,
) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        if let Ok(value) = token.parse() {
            request.metadata_mut().insert("x-access-token", value);
        }
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match grpc
        .unary(request, http::uri::PathAndQuery::from_static(path), codec)
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => {
            if status.code() == tonic::Code::Unauthenticated {
                assert_eq!(status.message(), GATE_MESSAGE, "{path}");
            }
            status.code()
        }
    }
}

/// A gRPC-Web call of `path` with an empty message; its `grpc-status`.
async fn grpc_web_status(daemon: &Daemon, path: &str, token: Option<&str>) -> String {
    let mut request = http()
        .post(daemon.url(path))
        .header("content-type", "application/grpc-web+proto")
        .body(envelope(0, b""));
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    let response = request.send().await.expect("send");
    assert_eq!(response.status(), 200, "{path}");
    // Trailers-only (a refusal) carries the status in the headers, else a trailer frame.
    if let Some(status) = response.headers().get("grpc-status") {
        return status.to_str().expect("ascii").to_owned();
    }
    let frames = envelopes(response.bytes().await.expect("body"));
    let (_, trailers) = frames
        .iter()
        .find(|(flags, _)| flags & 0x80 != 0)
        .expect("trailers");
    let trailers = String::from_utf8_lossy(trailers).to_lowercase();
    trailers
        .lines()
        .find_map(|line| line.strip_prefix("grpc-status:"))
        .map(|status| status.trim().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn every_rpc_refuses_anything_but_the_token_on_every_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path(), Launch::default()).await;
    let channel = grpc_channel(&daemon).await;
    for token in not_the_token() {
        let token = token.as_deref();
        for (path, kind) in RPCS {
            let code = connect_code(&daemon, path, *kind, token).await;
            assert_eq!(
                code.as_deref(),
                Some("unauthenticated"),
                "Connect {path} {token:?}"
            );
        }
        for path in RPCS
            .iter()
            .map(|(path, _)| *path)
            .chain(REFLECTION.iter().copied())
        {
            let code = grpc_code(channel.clone(), path, token).await;
            assert_eq!(code, tonic::Code::Unauthenticated, "gRPC {path} {token:?}");
            let status = grpc_web_status(&daemon, path, token).await;
            assert_eq!(status, "16", "gRPC-Web {path} {token:?}");
        }
    }
    // The token itself passes the gate (whatever the empty request then leads to); header
    // names are case-insensitive in HTTP, so the name's case does not matter.
    for path in ["/filesystem.Filesystem/Stat", "/process.Process/List"] {
        assert_eq!(
            connect_code(&daemon, path, Kind::Unary, Some(TOKEN)).await,
            None,
            "{path}"
        );
        assert_eq!(
            grpc_code(channel.clone(), path, Some(TOKEN)).await,
            tonic::Code::Ok
        );
        assert_eq!(
            grpc_web_status(&daemon, path, Some(TOKEN)).await,
            "0",
            "{path}"
        );
        let response = http()
            .post(daemon.url(path))
            .header("X-ACCESS-TOKEN", TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn every_route_refuses_anything_but_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path(), Launch::default()).await;
    let file = dir.path().join("f.txt");
    std::fs::write(&file, "x").expect("write");
    let path = file.to_str().expect("utf-8");
    for token in not_the_token() {
        // The gate's routes.
        for (method, route) in [
            ("GET", "/envs"),
            ("GET", "/metrics"),
            ("GET", "/metrics/envd"),
            ("GET", "/no-such-route"),
            ("POST", "/health"),
            ("DELETE", "/files"),
        ] {
            let mut request = http().request(method.parse().expect("method"), daemon.url(route));
            if let Some(token) = &token {
                request = request.header(TOKEN_HEADER, token);
            }
            let response = request.send().await.expect("send");
            assert_eq!(response.status(), 401, "{method} {route} {token:?}");
        }
        // The routes that check the token themselves (or a signature, absent here).
        for (method, route) in [
            ("GET", "/files"),
            ("POST", "/files"),
            ("PATCH", "/files/metadata"),
        ] {
            let mut request = http()
                .request(method.parse().expect("method"), daemon.url(route))
                .query(&[("path", path)])
                .header("content-type", "application/octet-stream")
                .body(r#"{"metadata":{"k":"v"}}"#);
            if let Some(token) = &token {
                request = request.header(TOKEN_HEADER, token);
            }
            let response = request.send().await.expect("send");
            assert_eq!(response.status(), 401, "{method} {route} {token:?}");
        }
        // /init cannot change the token, in any case.
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            let response = daemon.init(json!({ "accessToken": token })).await;
            assert_eq!(response.status(), 401, "/init {token:?}");
        }
    }
    assert_eq!(
        std::fs::read(&file).expect("read"),
        b"x",
        "nothing was written"
    );
}

/// Query parameters of a `/files` request.
type Query<'a> = Vec<(&'a str, String)>;

#[tokio::test]
async fn a_signed_url_works_only_for_its_path_operation_and_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = locked_daemon(dir.path(), Launch::default()).await;
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.txt");
    std::fs::write(&a, "a").expect("write");
    std::fs::write(&b, "b").expect("write");
    let (a, b) = (a.to_str().expect("utf-8"), b.to_str().expect("utf-8"));
    let sign = |path: &str, op| envd::auth::signature::sign(path, op, "", TOKEN, None);
    use envd::auth::signature::Operation::{Read, Write};
    let read_a = sign(a, Read);
    let write_a = sign(a, Write);
    // A different spelling of the same file is a different path: signatures are over the
    // path as sent.
    let dotted = format!("{}/./a.txt", dir.path().display());

    let send = |method: &str, query: Vec<(&str, String)>| {
        http()
            .request(method.parse().expect("method"), daemon.url("/files"))
            .query(&query)
            .header("content-type", "application/octet-stream")
            .body("overwritten")
            .send()
    };
    let cases: Vec<(&str, Query, u16)> = vec![
        (
            "GET",
            vec![("path", a.into()), ("signature", read_a.clone())],
            200,
        ),
        (
            "GET",
            vec![("path", b.into()), ("signature", read_a.clone())],
            401,
        ),
        (
            "GET",
            vec![("path", dotted.clone()), ("signature", read_a.clone())],
            401,
        ),
        (
            "GET",
            vec![("path", a.into()), ("signature", write_a.clone())],
            401,
        ),
        (
            "GET",
            vec![
                ("path", a.into()),
                ("username", "root".into()),
                ("signature", read_a.clone()),
            ],
            401,
        ),
        (
            "POST",
            vec![("path", a.into()), ("signature", read_a.clone())],
            401,
        ),
        (
            "POST",
            vec![("path", b.into()), ("signature", write_a.clone())],
            401,
        ),
    ];
    for (method, query, want) in cases {
        let response = send(method, query.clone()).await.expect("send");
        assert_eq!(response.status(), want, "{method} {query:?}");
    }
    // PATCH /files/metadata takes write signatures for its own path only.
    for (signature, path, want) in [(&read_a, a, 401), (&write_a, b, 401)] {
        let response = http()
            .patch(daemon.url("/files/metadata"))
            .query(&[("path", path), ("signature", signature)])
            .header("content-type", "application/json")
            .body(r#"{"metadata":{"k":"v"}}"#)
            .send()
            .await
            .expect("patch");
        assert_eq!(response.status(), want, "{path}");
    }
    // Signatures open no other route and no RPC.
    for route in ["/envs", "/filesystem.Filesystem/Stat"] {
        let response = http()
            .post(daemon.url(route))
            .query(&[("path", a), ("signature", &read_a)])
            .header("content-type", "application/json")
            .body(json!({ "path": a }).to_string())
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 401, "{route}");
    }
    assert_eq!(std::fs::read(dir.path().join("a.txt")).expect("read"), b"a");
    assert_eq!(std::fs::read(dir.path().join("b.txt")).expect("read"), b"b");
}

#[tokio::test]
async fn the_token_appears_in_no_log_response_or_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("envd.log");
    let args = common::init_args(dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::launch(
        &args,
        &[("ENVD_LOG", "trace")],
        Launch {
            log_to: Some(log.clone()),
            ..Launch::default()
        },
    );
    let mut seen = String::new();
    let init = daemon.init(json!({ "accessToken": TOKEN })).await;
    seen.push_str(&init.text().await.expect("text"));
    // A refused change of token answers without echoing either token.
    let refused = daemon.init(json!({ "accessToken": "Other-Token-1" })).await;
    assert_eq!(refused.status(), 401);
    seen.push_str(&refused.text().await.expect("text"));

    let file = dir.path().join("f.txt");
    let path = file.to_str().expect("utf-8");
    for token in [Some(TOKEN), Some("wrong"), None] {
        let with = |request: reqwest::RequestBuilder| match token {
            Some(token) => request.header(TOKEN_HEADER, token),
            None => request,
        };
        for request in [
            with(http().get(daemon.url("/envs"))),
            with(http().get(daemon.url("/metrics/envd"))),
            with(http().post(daemon.url("/files")).query(&[("path", path)]))
                .header("content-type", "application/octet-stream")
                .body("content"),
            with(http().get(daemon.url("/files")).query(&[("path", path)])),
            with(http().post(daemon.url("/filesystem.Filesystem/Stat")))
                .header("content-type", "application/json")
                .body(json!({ "path": path }).to_string()),
            with(http().post(daemon.url("/filesystem.Filesystem/Stat")))
                .header("content-type", "application/grpc-web+proto")
                .body(envelope(0, b"")),
        ] {
            let response = request.send().await.expect("send");
            seen.push_str(&format!("{:?}", response.headers()));
            seen.push_str(&response.text().await.expect("text"));
        }
        let status = grpc_code(
            grpc_channel(&daemon).await,
            "/filesystem.Filesystem/Stat",
            token,
        )
        .await;
        seen.push_str(&format!("{status:?}"));
    }
    // A signed URL carries a signature, not the token.
    let signature = envd::auth::signature::sign(
        path,
        envd::auth::signature::Operation::Read,
        "",
        TOKEN,
        None,
    );
    let response = http()
        .get(daemon.url("/files"))
        .query(&[("path", path), ("signature", &signature)])
        .send()
        .await
        .expect("signed download");
    assert_eq!(response.status(), 200);
    // A process sees the daemon's environment for processes, which has no token.
    let response = http()
        .post(daemon.url("/process.Process/Start"))
        .header(TOKEN_HEADER, TOKEN)
        .header("content-type", "application/connect+json")
        .body(envelope(0, br#"{"process":{"cmd":"/usr/bin/env"}}"#))
        .send()
        .await
        .expect("start");
    let output = response.bytes().await.expect("body");
    seen.push_str(&String::from_utf8_lossy(&output));
    assert!(
        seen.contains("E2B_SANDBOX"),
        "the process's environment was captured"
    );

    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("TRACE"), "trace logging was on");
    for secret in [TOKEN, "Other-Token-1"] {
        assert!(!text.contains(secret), "{secret} in the log");
        assert!(!seen.contains(secret), "{secret} in a response: {seen}");
    }
}
