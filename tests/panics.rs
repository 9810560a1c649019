//! A panic in request handling, against the real binary: answered with 500 (REST) or
//! `internal` (every RPC protocol), logged once, and the daemon keeps serving.
//!
//! The panics are injected: the debug binary that `cargo test` builds honours
//! `x-envd-fault` when started with `ENVD_FAULT_INJECTION=1` (`src/panics/fault.rs`; a
//! release build has no such code). The injection panics inside the guards, in the same
//! future and body a handler runs in, so what is proven is the guard, not the injection.

mod common;

use common::{Daemon, Launch, envelope, envelopes, grpc_channel, http};
use envd::proto::filesystem::{StatRequest, filesystem_client::FilesystemClient};

const FAULT: &str = "x-envd-fault";

fn faulty_daemon(log: &std::path::Path) -> Daemon {
    Daemon::launch(
        &[],
        &[("ENVD_FAULT_INJECTION", "1"), ("ENVD_LOG", "error")],
        Launch {
            log_to: Some(log.to_path_buf()),
            ..Launch::default()
        },
    )
}

async fn healthy(daemon: &Daemon, client: &reqwest::Client) {
    let status = client
        .get(daemon.url("/health"))
        .send()
        .await
        .expect("health")
        .status();
    assert_eq!(status, 204);
}

#[tokio::test]
async fn panics_are_answered_logged_once_and_survived() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("envd.log");
    let daemon = faulty_daemon(&log);
    // One client, so the keep-alive connection that carried a panic is reused too.
    let client = http();
    let mut injected = 0;

    // REST: a handler panic is envd's JSON 500.
    for path in ["/health", "/envs", "/files?path=/etc/hostname"] {
        let response = client
            .get(daemon.url(path))
            .header(FAULT, "panic")
            .send()
            .await
            .expect("send");
        injected += 1;
        assert_eq!(response.status(), 500, "{path}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(
            body,
            serde_json::json!({"code": 500, "message": "internal error"})
        );
        healthy(&daemon, &client).await;
    }

    // REST: a panic once the response has begun cannot change its status: the response
    // is broken off, and the client sees an error rather than a complete answer.
    let outcome = match client
        .get(daemon.url("/envs"))
        .header(FAULT, "panic-body")
        .send()
        .await
    {
        Ok(response) => response.bytes().await.map(|_| ()),
        Err(err) => Err(err),
    };
    injected += 1;
    assert!(
        outcome.is_err(),
        "a broken-off response must not look complete"
    );
    healthy(&daemon, &client).await;

    // Connect unary: `internal`, HTTP 500.
    let response = client
        .post(daemon.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/json")
        .header(FAULT, "panic")
        .body(r#"{"path":"/"}"#)
        .send()
        .await
        .expect("send");
    injected += 1;
    assert_eq!(response.status(), 500);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(
        body,
        serde_json::json!({"code": "internal", "message": "internal error"})
    );

    // Connect stream: 200 and an end-of-stream error, whether the panic comes before the
    // first message or after the last.
    for fault in ["panic", "panic-body"] {
        let response = client
            .post(daemon.url("/filesystem.Filesystem/WatchDir"))
            .header("content-type", "application/connect+json")
            .header(FAULT, fault)
            .body(envelope(0, br#"{"path":"/tmp"}"#))
            .send()
            .await
            .expect("send");
        injected += 1;
        assert_eq!(response.status(), 200, "{fault}");
        let frames = envelopes(response.bytes().await.expect("body"));
        let (flags, payload) = frames.last().expect("an end-stream envelope");
        assert_eq!(*flags, 0x02, "{fault}");
        let end: serde_json::Value = serde_json::from_slice(payload).expect("json");
        assert_eq!(end["error"]["code"], "internal", "{fault}: {end}");
    }

    // gRPC: status 13, for a panic in the handler and one where the status would be sent.
    let mut grpc = FilesystemClient::new(grpc_channel(&daemon).await);
    for fault in ["panic", "panic-body"] {
        let mut request = tonic::Request::new(StatRequest { path: "/".into() });
        request
            .metadata_mut()
            .insert(FAULT, fault.parse().expect("ascii"));
        let status = grpc.stat(request).await.expect_err(fault);
        injected += 1;
        assert_eq!(status.code(), tonic::Code::Internal, "{fault}: {status:?}");
        assert_eq!(status.message(), "internal error");
    }
    // The same HTTP/2 connection still serves.
    let entry = grpc
        .stat(StatRequest { path: "/".into() })
        .await
        .expect("stat after the panics")
        .into_inner();
    assert_eq!(entry.entry.expect("entry").path, "/");

    // gRPC-Web: grpc-status 13.
    let response = client
        .post(daemon.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/grpc-web+proto")
        .header(FAULT, "panic")
        .body(envelope(
            0,
            &prost::Message::encode_to_vec(&StatRequest { path: "/".into() }),
        ))
        .send()
        .await
        .expect("send");
    injected += 1;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "13");

    // Still serving, on a fresh connection too.
    healthy(&daemon, &http()).await;

    // Logged once each: one line per panic, naming where it happened, and nothing else
    // at error level.
    let text = daemon.log();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(lines.len(), injected, "{text}");
    for line in &lines {
        assert!(line.contains("injected fault"), "{line}");
        assert!(line.contains("src/panics/fault.rs"), "the location: {line}");
    }
}

#[tokio::test]
async fn without_the_switch_the_fault_header_does_nothing() {
    let daemon = Daemon::start();
    let response = http()
        .get(daemon.url("/health"))
        .header(FAULT, "panic")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 204);
}
