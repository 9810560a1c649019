//! The filesystem RPCs over every protocol on the one port: gRPC (tonic client, h2c),
//! Connect JSON and proto (unary and streaming), gRPC-Web; reflection; Connect error rules.

mod common;

use std::collections::BTreeMap;

use common::{
    Daemon, connect_json, connect_proto, envelope, envelopes, grpc_channel, grpc_web, http, map,
    upload,
};
use envd::proto::filesystem::{
    self as pb, ListDirRequest, ListDirResponse, StatRequest, StatResponse,
    filesystem_client::FilesystemClient,
};

fn metadata_of(entry: &pb::EntryInfo) -> BTreeMap<String, String> {
    entry
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[tokio::test]
async fn stat_and_list_agree_across_protocols() {
    let dir = tempfile::tempdir().expect("tempdir");
    require_xattrs!(dir.path());
    let daemon = Daemon::start();
    let path = dir.path().join("tagged.txt");
    let want = map(&[("owner", "alice"), ("job", "42")]);
    assert_eq!(
        upload(&daemon, &path, "data", &[("owner", "alice"), ("job", "42")])
            .await
            .status(),
        200
    );
    let path_str = path.to_str().expect("utf-8").to_owned();
    let dir_str = dir.path().to_str().expect("utf-8").to_owned();

    // gRPC over cleartext HTTP/2.
    let mut grpc = FilesystemClient::new(grpc_channel(&daemon).await);
    let stat = grpc
        .stat(StatRequest {
            path: path_str.clone(),
        })
        .await
        .expect("gRPC stat")
        .into_inner();
    let grpc_entry = stat.entry.expect("entry");
    assert_eq!(metadata_of(&grpc_entry), want);
    assert_eq!(grpc_entry.r#type, pb::FileType::File as i32);
    assert_eq!(grpc_entry.size, 4);
    let listing = grpc
        .list_dir(ListDirRequest {
            path: dir_str.clone(),
            depth: 1,
        })
        .await
        .expect("gRPC list")
        .into_inner();
    let listed: Vec<_> = listing
        .entries
        .iter()
        .filter(|e| e.path == path_str)
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(metadata_of(listed[0]), want);

    // Connect JSON.
    let (status, json) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        serde_json::json!({"path": path_str}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        json["entry"]["metadata"],
        serde_json::json!({"owner": "alice", "job": "42"})
    );
    assert_eq!(json["entry"]["type"], "FILE_TYPE_FILE");
    assert_eq!(json["entry"]["size"], "4");
    assert!(
        json["entry"]["modifiedTime"]
            .as_str()
            .expect("time")
            .ends_with('Z'),
        "{json}"
    );
    let (status, json) = connect_json(
        &daemon,
        "/filesystem.Filesystem/ListDir",
        serde_json::json!({"path": dir_str, "depth": 1}),
    )
    .await;
    assert_eq!(status, 200);
    let entry = json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["path"] == path_str.as_str())
        .expect("listed");
    assert_eq!(
        entry["metadata"],
        serde_json::json!({"owner": "alice", "job": "42"})
    );

    // Connect proto.
    let stat: StatResponse = connect_proto(
        &daemon,
        "/filesystem.Filesystem/Stat",
        &StatRequest {
            path: path_str.clone(),
        },
    )
    .await
    .expect("connect proto stat");
    assert_eq!(stat.entry.expect("entry"), grpc_entry);
    let listing: ListDirResponse = connect_proto(
        &daemon,
        "/filesystem.Filesystem/ListDir",
        &ListDirRequest {
            path: dir_str.clone(),
            depth: 1,
        },
    )
    .await
    .expect("connect proto list");
    assert!(
        listing
            .entries
            .iter()
            .any(|e| e.path == path_str && metadata_of(e) == want)
    );

    // gRPC-Web.
    let (stat, trailers) = grpc_web::<_, StatResponse>(
        &daemon,
        "/filesystem.Filesystem/Stat",
        &StatRequest {
            path: path_str.clone(),
        },
    )
    .await;
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    assert_eq!(stat.expect("message").entry.expect("entry"), grpc_entry);
}

#[tokio::test]
async fn errors_carry_the_right_code_on_every_protocol() {
    let daemon = Daemon::start();
    let missing = "/definitely/not/here";
    let mut grpc = FilesystemClient::new(grpc_channel(&daemon).await);
    let status = grpc
        .stat(StatRequest {
            path: missing.into(),
        })
        .await
        .expect_err("missing");
    assert_eq!(status.code(), tonic::Code::NotFound);

    let (status, json) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        serde_json::json!({"path": missing}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(json["code"], "not_found");
    assert!(json["message"].as_str().expect("message").contains(missing));

    let err = connect_proto::<_, StatResponse>(
        &daemon,
        "/filesystem.Filesystem/Stat",
        &StatRequest {
            path: missing.into(),
        },
    )
    .await
    .expect_err("missing");
    assert_eq!(err.0, 404);
    assert_eq!(err.1["code"], "not_found");

    let (message, trailers) = grpc_web::<_, StatResponse>(
        &daemon,
        "/filesystem.Filesystem/Stat",
        &StatRequest {
            path: missing.into(),
        },
    )
    .await;
    assert!(message.is_none());
    assert!(trailers.contains("grpc-status:5"), "{trailers}");
}

#[tokio::test]
async fn connect_unary_rules() {
    let daemon = Daemon::start();
    // An empty body is the default message: Stat of "" is the home directory.
    let response = http()
        .post(daemon.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/json")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let json: serde_json::Value = response.json().await.expect("json");
    assert_eq!(json["entry"]["type"], "FILE_TYPE_DIRECTORY");

    // Unknown fields are ignored; proto field names are accepted.
    let (status, _) = connect_json(
        &daemon,
        "/filesystem.Filesystem/ListDir",
        serde_json::json!({"path": "/", "futureField": 1}),
    )
    .await;
    assert_eq!(status, 200);

    // Bad JSON is invalid_argument.
    let response = http()
        .post(daemon.url("/filesystem.Filesystem/Stat"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    let json: serde_json::Value = response.json().await.expect("json");
    assert_eq!(json["code"], "invalid_argument");

    // Unknown methods are unimplemented.
    let (status, json) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Frobnicate",
        serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 501);
    assert_eq!(json["code"], "unimplemented");

    // A garbage timeout is invalid_argument; a sane one is honoured.
    for (timeout, want) in [("soon", 400u16), ("5000", 200)] {
        let response = http()
            .post(daemon.url("/filesystem.Filesystem/Stat"))
            .header("content-type", "application/json")
            .header("connect-timeout-ms", timeout)
            .body(r#"{"path":"/"}"#)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), want, "timeout {timeout}");
    }
}

#[tokio::test]
async fn connect_stream_errors_are_200_with_an_end_stream_error() {
    let daemon = Daemon::start();
    // WatchDir of a missing path fails before its first message.
    let request = envelope(0, br#"{"path":"/no/such/dir"}"#);
    let response = http()
        .post(daemon.url("/filesystem.Filesystem/WatchDir"))
        .header("content-type", "application/connect+json")
        .body(request)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/connect+json"
    );
    let frames = envelopes(response.bytes().await.expect("body"));
    let (flags, payload) = frames.last().expect("end-stream envelope");
    assert_eq!(*flags, 0x02);
    let end: serde_json::Value = serde_json::from_slice(payload).expect("json");
    assert!(end["error"]["code"].is_string(), "{end}");
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let daemon = Daemon::start();
    let mut client = ServerReflectionClient::new(grpc_channel(&daemon).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures_util::stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("message")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["filesystem.Filesystem", "process.Process"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}
