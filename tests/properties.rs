//! Property tests of the request paths as a whole, in process and without a socket: the
//! Connect translation (envelopes, end-stream, compression, timeouts) in front of a stub
//! gRPC service, and uploads (multipart and metadata headers) through the real app into a
//! temporary directory. Whatever the input: no panic, no 500, a well-formed answer in the
//! request's protocol, and no temp file left behind.
//!
//! The parsers on their own (envelope decoder, JSON and proto transcoding, paths, signed
//! URLs, `/init` bodies, `Content-Disposition`, metadata headers) have their properties
//! next to them, in the modules' tests. (cargo-fuzz needs a nightly toolchain, which this
//! project's machines do not have; proptest runs on stable, in `cargo test`.)

mod common;

use std::convert::Infallible;

use axum::body::Body;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use envd::rpc::GrpcService;
use envd::rpc::connect::{self, MessageLimits, Shape};
use envd::rpc::envelope::{self, Decoder};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;

/// A gRPC service that answers each request message with the same bytes, then OK: enough
/// to drive every path of the translation in both directions.
fn echo() -> GrpcService {
    GrpcService::new(tower::service_fn(
        |request: Request<tonic::body::Body>| async move {
            let body = request.into_body().collect().await;
            let mut out = BytesMut::new();
            if let Ok(collected) = body {
                let mut decoder = Decoder::new(1 << 20);
                decoder.push(&collected.to_bytes());
                while let Ok(Some((_, message))) = decoder.next_frame() {
                    out.extend_from_slice(&envelope::encode(0, &message));
                }
            }
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let frames = futures_util::stream::iter([
                Ok::<_, Infallible>(http_body::Frame::data(out.freeze())),
                Ok(http_body::Frame::trailers(trailers)),
            ]);
            let body = tonic::body::Body::new(http_body_util::StreamBody::new(frames));
            Ok::<_, Infallible>(http::Response::new(body))
        },
    ))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A request body: raw bytes, or envelopes with any flags and payloads, cut anywhere.
fn connect_body() -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        Just(br#"{"path":"/tmp"}"#.to_vec()),
        Just(br#"{"process":{"cmd":"/bin/true"}}"#.to_vec()),
        Just(b"{}".to_vec()),
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..128),
        prop::collection::vec((any::<u8>(), payload), 0..5).prop_map(|frames| {
            frames
                .into_iter()
                .flat_map(|(flags, payload)| envelope::encode(flags, &payload).to_vec())
                .collect()
        }),
    ]
}

/// Splits a Connect stream response into its envelopes; `None` when it is not made of
/// whole envelopes.
fn split_envelopes(mut body: Bytes) -> Option<Vec<(u8, Bytes)>> {
    let mut out = Vec::new();
    while body.remaining() >= 5 {
        let flags = body.get_u8();
        let len = body.get_u32() as usize;
        if body.len() < len {
            return None;
        }
        out.push((flags, body.split_to(len)));
    }
    body.is_empty().then_some(out)
}

const CONNECT_CODES: &[&str] = &[
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any Connect request, unary or streaming, JSON or binary, with any envelopes (the
    /// client's end-stream flag, compression flags, garbage included), encodings and
    /// timeouts: the answer is a well-formed Connect answer. A unary error is a JSON
    /// `{code, message}` with a Connect code; a stream is whole envelopes ending with
    /// exactly one end-of-stream envelope, whose JSON says how it ended.
    #[test]
    fn connect_answers_are_always_well_formed(
        path in prop::sample::select(vec![
            "/filesystem.Filesystem/Stat",
            "/filesystem.Filesystem/ListDir",
            "/filesystem.Filesystem/WatchDir",
            "/process.Process/Start",
            "/process.Process/StreamInput",
            "/no.Such/Method",
        ]),
        shape in prop::sample::select(vec![
            Shape::Unary(connect::Codec::Json),
            Shape::Unary(connect::Codec::Proto),
            Shape::Stream(connect::Codec::Json),
            Shape::Stream(connect::Codec::Proto),
        ]),
        body in connect_body(),
        content_encoding in prop::option::of(prop::sample::select(vec!["gzip", "identity", "br", ""])),
        timeout in prop::option::of(prop_oneof!["[0-9]{1,12}", ".{0,4}"]),
    ) {
        let mut request = Request::post(path);
        if let Some(encoding) = content_encoding {
            request = request
                .header("content-encoding", encoding)
                .header("connect-content-encoding", encoding);
        }
        if let Some(timeout) = timeout.filter(|t| http::HeaderValue::from_str(t).is_ok()) {
            request = request.header("connect-timeout-ms", timeout);
        }
        let request = request.body(Body::from(body)).expect("request");
        let limits = MessageLimits { max_bytes: 1024, max_json_nesting: 8 };
        let response = runtime().block_on(async {
            let response = connect::serve(echo(), request, shape, limits).await;
            let (head, body) = response.into_parts();
            (head, body.collect().await.expect("the body completes").to_bytes())
        });
        let (head, body) = response;
        prop_assert_ne!(head.status, StatusCode::INTERNAL_SERVER_ERROR, "{:?}", body);
        let content_type = head.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        if content_type.starts_with("application/connect+") {
            prop_assert_eq!(head.status, StatusCode::OK);
            let envelopes = split_envelopes(body.clone());
            prop_assert!(envelopes.is_some(), "not whole envelopes: {:?}", body);
            let envelopes = envelopes.unwrap_or_default();
            let ends: Vec<usize> = envelopes.iter().enumerate().filter(|(_, (f, _))| f & 0x02 != 0).map(|(i, _)| i).collect();
            prop_assert_eq!(ends, vec![envelopes.len() - 1], "one end-of-stream, last");
            let (_, end) = envelopes.last().expect("an end");
            let end: serde_json::Value = serde_json::from_slice(end).expect("end-of-stream JSON");
            if let Some(code) = end.get("error").map(|e| e["code"].as_str().unwrap_or("")) {
                prop_assert!(CONNECT_CODES.contains(&code), "{}", end);
            }
        } else if head.status != StatusCode::OK && content_type == "application/json" {
            let error: serde_json::Value = serde_json::from_slice(&body).expect("error JSON");
            prop_assert!(CONNECT_CODES.contains(&error["code"].as_str().unwrap_or("")), "{}", error);
        } else if head.status != StatusCode::OK {
            // Protocol-level refusals (wrong method or shape) are plain text 4xx.
            prop_assert!(head.status.is_client_error(), "{:?}", head.status);
        }
    }
}

/// The real app over a state whose requests act as root, in a runtime the cases share.
struct App {
    runtime: tokio::runtime::Runtime,
    app: envd::server::connection::App,
}

impl App {
    fn new() -> App {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let app = runtime.block_on(async {
            let state = envd::state::AppState::new(envd::config::Config::ephemeral(), None);
            let rpc = envd::rpc::Rpc::new(state.clone());
            envd::server::app(state, rpc)
        });
        App { runtime, app }
    }

    fn call(&self, request: Request<Body>) -> (StatusCode, Bytes) {
        self.runtime.block_on(async {
            let response = self.app.clone().oneshot(request).await.expect("infallible");
            let status = response.status();
            (
                status,
                response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes(),
            )
        })
    }
}

/// A multipart body: well-formed parts mixed with garbage, any boundary.
fn multipart() -> impl Strategy<Value = (String, Vec<u8>)> {
    let part = prop_oneof![
        (".{0,12}", prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(name, data)| {
            let mut part = format!(
                "Content-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\r\n"
            )
            .into_bytes();
            part.extend(data);
            part
        }),
        prop::collection::vec(any::<u8>(), 0..64),
        Just(b"Content-Disposition: form-data; name=\"other\"\r\n\r\nvalue".to_vec()),
    ];
    (
        "[a-zA-Z0-9'()+_,./:=?-]{1,20}",
        prop::collection::vec(part, 0..4),
        any::<bool>(),
    )
        .prop_map(|(boundary, parts, closed)| {
            let mut body = Vec::new();
            for part in parts {
                body.put_slice(format!("--{boundary}\r\n").as_bytes());
                body.extend(part);
                body.put_slice(b"\r\n");
            }
            if closed {
                body.put_slice(format!("--{boundary}--\r\n").as_bytes());
            }
            (boundary, body)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any multipart body to a fixed path: 200 or a 4xx, never a 500, never a temp file
    /// left, and on 200 the file holds one of the parts.
    #[test]
    fn multipart_uploads_succeed_or_are_refused_cleanly((boundary, body) in multipart(), quote in any::<bool>()) {
        thread_local!(static APP: App = App::new());
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target.bin");
        let boundary_param = if quote { format!("\"{boundary}\"") } else { boundary };
        let request = Request::post(format!("/files?path={}", target.display()))
            .header("content-type", format!("multipart/form-data; boundary={boundary_param}"))
            .body(Body::from(body))
            .expect("request");
        let (status, answer) = APP.with(|app| app.call(request));
        prop_assert!(status == StatusCode::OK || status.is_client_error(), "{status}: {answer:?}");
        prop_assert!(common::upload_temps(dir.path()).is_empty());
        if status == StatusCode::OK {
            let listed: serde_json::Value = serde_json::from_slice(&answer).expect("JSON");
            if !listed.as_array().expect("a list").is_empty() {
                prop_assert!(target.is_file());
            }
        }
    }

    /// Any `X-Metadata-*` headers on an upload: 200 with exactly the valid set, or 400
    /// and nothing written.
    #[test]
    fn metadata_headers_are_stored_or_refused_cleanly(
        headers in prop::collection::vec(("[a-zA-Z0-9-]{0,10}", prop::collection::vec(0x20u8..0xff, 0..40)), 0..8),
    ) {
        thread_local!(static APP: App = App::new());
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target.txt");
        let mut request = Request::post(format!("/files?path={}", target.display()))
            .header("content-type", "application/octet-stream");
        for (key, value) in &headers {
            if let Ok(value) = http::HeaderValue::from_bytes(value) {
                request = request.header(format!("x-metadata-{key}"), value);
            }
        }
        let (status, answer) = APP.with(|app| app.call(request.body(Body::from("content")).expect("request")));
        prop_assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST, "{status}: {answer:?}");
        prop_assert_eq!(target.exists(), status == StatusCode::OK);
        prop_assert!(common::upload_temps(dir.path()).is_empty());
    }
}
