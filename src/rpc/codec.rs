//! The RPC method table and the protobuf ⇄ JSON transcoding the Connect layer needs.
//!
//! Each method is listed once with its request and response types; the JSON forms are
//! protobuf's canonical JSON (pbjson): lowerCamelCase names, defaults omitted, enums as
//! names, 64-bit integers as strings; decoding also takes proto names, enum numbers and
//! numeric 64-bit values, and ignores unknown fields.

use std::collections::HashMap;
use std::sync::LazyLock;

use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::proto::{envd_ext as ext, filesystem as fs, process as pr};

/// The streaming shape of a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One request, one response.
    Unary,
    /// One request, a stream of responses.
    ServerStream,
    /// A stream of requests, one response.
    ClientStream,
}

/// Transcoder from one wire form of a message to the other.
pub type Transcode = fn(&[u8]) -> Result<Vec<u8>, String>;

/// One RPC method.
#[derive(Debug)]
pub struct Method {
    /// Streaming shape.
    pub kind: Kind,
    /// Request JSON → protobuf binary.
    pub request_from_json: Transcode,
    /// Response protobuf binary → JSON.
    pub response_to_json: Transcode,
}

fn from_json<M: Message + DeserializeOwned + Default>(json: &[u8]) -> Result<Vec<u8>, String> {
    let message = if json.iter().all(u8::is_ascii_whitespace) {
        M::default()
    } else {
        serde_json::from_slice::<M>(json).map_err(|err| err.to_string())?
    };
    Ok(message.encode_to_vec())
}

fn to_json<M: Message + Serialize + Default>(binary: &[u8]) -> Result<Vec<u8>, String> {
    let message = M::decode(binary).map_err(|err| err.to_string())?;
    serde_json::to_vec(&message).map_err(|err| err.to_string())
}

macro_rules! methods {
    ($($path:literal => $kind:ident, $request:ty, $response:ty;)*) => {
        [$((
            $path,
            Method {
                kind: Kind::$kind,
                request_from_json: from_json::<$request>,
                response_to_json: to_json::<$response>,
            },
        ),)*]
    };
}

static METHODS: LazyLock<HashMap<&'static str, Method>> = LazyLock::new(|| {
    HashMap::from(methods! {
        "/filesystem.Filesystem/Stat" => Unary, fs::StatRequest, fs::StatResponse;
        "/filesystem.Filesystem/MakeDir" => Unary, fs::MakeDirRequest, fs::MakeDirResponse;
        "/filesystem.Filesystem/Move" => Unary, fs::MoveRequest, fs::MoveResponse;
        "/filesystem.Filesystem/ListDir" => Unary, fs::ListDirRequest, fs::ListDirResponse;
        "/filesystem.Filesystem/Remove" => Unary, fs::RemoveRequest, fs::RemoveResponse;
        "/filesystem.Filesystem/WatchDir" => ServerStream, fs::WatchDirRequest, fs::WatchDirResponse;
        "/filesystem.Filesystem/CreateWatcher" => Unary, fs::CreateWatcherRequest, fs::CreateWatcherResponse;
        "/filesystem.Filesystem/GetWatcherEvents" => Unary, fs::GetWatcherEventsRequest, fs::GetWatcherEventsResponse;
        "/filesystem.Filesystem/RemoveWatcher" => Unary, fs::RemoveWatcherRequest, fs::RemoveWatcherResponse;
        "/process.Process/List" => Unary, pr::ListRequest, pr::ListResponse;
        "/process.Process/Connect" => ServerStream, pr::ConnectRequest, pr::ConnectResponse;
        "/process.Process/Start" => ServerStream, pr::StartRequest, pr::StartResponse;
        "/process.Process/Update" => Unary, pr::UpdateRequest, pr::UpdateResponse;
        "/process.Process/StreamInput" => ClientStream, pr::StreamInputRequest, pr::StreamInputResponse;
        "/process.Process/SendInput" => Unary, pr::SendInputRequest, pr::SendInputResponse;
        "/process.Process/SendSignal" => Unary, pr::SendSignalRequest, pr::SendSignalResponse;
                "/process.Process/CloseStdin" => Unary, pr::CloseStdinRequest, pr::CloseStdinResponse;
        "/envd_ext.Processes/List" => Unary, ext::ListProcessesRequest, ext::ListProcessesResponse;
                "/envd_ext.Processes/SetTimeout" => Unary, ext::SetTimeoutRequest, ext::SetTimeoutResponse;
        "/envd_ext.Metadata/Patch" => Unary, ext::PatchMetadataRequest, ext::PatchMetadataResponse;
    })
});

/// The method served at `path` (`/package.Service/Method`), if any.
pub fn method(path: &str) -> Option<&'static Method> {
    METHODS.get(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_decoding_is_lenient_and_encoding_canonical() {
        let stat = method("/filesystem.Filesystem/ListDir").expect("listed");
        let binary = (stat.request_from_json)(br#"{"path":"/tmp","depth":2,"unknownField":[1]}"#)
            .expect("decodes");
        let decoded = fs::ListDirRequest::decode(binary.as_slice()).expect("proto");
        assert_eq!(decoded.path, "/tmp");
        assert_eq!(decoded.depth, 2);
        assert!(
            (stat.request_from_json)(b"")
                .expect("empty body")
                .is_empty()
        );
        assert!((stat.request_from_json)(b"{not json").is_err());

        let entry = fs::EntryInfo {
            name: "a".into(),
            r#type: fs::FileType::File as i32,
            size: 12,
            metadata: [("k".to_owned(), "v".to_owned())].into(),
            ..Default::default()
        };
        let response = fs::StatResponse { entry: Some(entry) }.encode_to_vec();
        let json = (method("/filesystem.Filesystem/Stat")
            .expect("listed")
            .response_to_json)(&response)
        .expect("encodes");
        let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"entry":{"name":"a","type":"FILE_TYPE_FILE","size":"12","metadata":{"k":"v"}}})
        );
    }

    #[test]
    fn process_json_uses_names_and_oneofs() {
        let start = method("/process.Process/Start").expect("listed");
        let binary = (start.request_from_json)(
            br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"]},"stdin":false}"#,
        )
        .expect("decodes");
        let request = pr::StartRequest::decode(binary.as_slice()).expect("proto");
        assert_eq!(request.stdin, Some(false));
        assert_eq!(request.process.expect("process").args.len(), 3);
        let signal = method("/process.Process/SendSignal").expect("listed");
        for json in [&br#"{"signal":"SIGNAL_SIGKILL"}"#[..], br#"{"signal":9}"#] {
            let binary = (signal.request_from_json)(json).expect("decodes");
            let request = pr::SendSignalRequest::decode(binary.as_slice()).expect("proto");
            assert_eq!(request.signal, pr::Signal::Sigkill as i32);
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Decodes `binary` as `M` and, when it decodes, checks that its canonical JSON is
        /// read back by the method's decoder as the same message.
        fn round_trip<M>(path: &str, binary: &[u8]) -> Result<(), TestCaseError>
        where
            M: Message + Serialize + DeserializeOwned + Default + PartialEq + std::fmt::Debug,
        {
            let method =
                method(path).ok_or_else(|| TestCaseError::fail(format!("{path} listed")))?;
            let Ok(message) = M::decode(binary) else {
                return Ok(());
            };
            // Enum fields holding numbers no variant has cannot be written as JSON.
            let Ok(json) = serde_json::to_vec(&message) else {
                return Ok(());
            };
            let back = (method.request_from_json)(&json)
                .map_err(|err| TestCaseError::fail(format!("{path}: {err}")))?;
            prop_assert_eq!(M::decode(back.as_slice()).ok(), Some(message), "{}", path);
            Ok(())
        }

        macro_rules! every_request {
            ($binary:expr; $($path:literal => $request:ty,)*) => {{
                let paths: &[&str] = &[$($path),*];
                $(round_trip::<$request>($path, $binary)?;)*
                paths
            }};
        }

        proptest! {
            /// For every method: arbitrary bytes as a binary request decode or fail cleanly,
            /// and what decodes survives the trip through canonical JSON; arbitrary bytes as
            /// a JSON request or a binary response transcode or fail cleanly.
            #[test]
            fn every_method_transcodes_any_input(binary in prop::collection::vec(any::<u8>(), 0..128)) {
                let paths = every_request! { &binary;
                    "/filesystem.Filesystem/Stat" => fs::StatRequest,
                    "/filesystem.Filesystem/MakeDir" => fs::MakeDirRequest,
                    "/filesystem.Filesystem/Move" => fs::MoveRequest,
                    "/filesystem.Filesystem/ListDir" => fs::ListDirRequest,
                    "/filesystem.Filesystem/Remove" => fs::RemoveRequest,
                    "/filesystem.Filesystem/WatchDir" => fs::WatchDirRequest,
                    "/filesystem.Filesystem/CreateWatcher" => fs::CreateWatcherRequest,
                    "/filesystem.Filesystem/GetWatcherEvents" => fs::GetWatcherEventsRequest,
                    "/filesystem.Filesystem/RemoveWatcher" => fs::RemoveWatcherRequest,
                    "/process.Process/List" => pr::ListRequest,
                    "/process.Process/Connect" => pr::ConnectRequest,
                    "/process.Process/Start" => pr::StartRequest,
                    "/process.Process/Update" => pr::UpdateRequest,
                    "/process.Process/StreamInput" => pr::StreamInputRequest,
                    "/process.Process/SendInput" => pr::SendInputRequest,
                    "/process.Process/SendSignal" => pr::SendSignalRequest,
                    "/process.Process/CloseStdin" => pr::CloseStdinRequest,
                    "/envd_ext.Processes/List" => ext::ListProcessesRequest,
                    "/envd_ext.Processes/SetTimeout" => ext::SetTimeoutRequest,
                    "/envd_ext.Metadata/Patch" => ext::PatchMetadataRequest,
                };
                prop_assert_eq!(paths.len(), METHODS.len(), "every method is covered");
                for path in paths {
                    let method = method(path).expect("listed");
                    let _ = (method.request_from_json)(&binary);
                    let _ = (method.response_to_json)(&binary);
                }
            }

            /// JSON-shaped requests with the real field names and values of any type.
            #[test]
            fn json_requests_transcode_or_fail_cleanly(
                fields in prop::collection::btree_map(
                    prop::sample::select(vec![
                        "path", "depth", "source", "destination", "recursive", "process", "cmd",
                        "args", "envs", "cwd", "pty", "size", "cols", "rows", "tag", "stdin",
                        "input", "stdout", "signal", "pid", "watcherId", "timeoutMs", "set",
                        "remove", "clear", "selector",
                    ]).prop_map(str::to_owned),
                    prop_oneof![
                        Just(serde_json::Value::Null),
                        any::<bool>().prop_map(serde_json::Value::from),
                        any::<i64>().prop_map(serde_json::Value::from),
                        any::<f64>().prop_map(serde_json::Value::from),
                        ".{0,8}".prop_map(serde_json::Value::from),
                        Just(serde_json::json!({"pid": 1, "tag": "t", "cmd": "x", "cols": 80})),
                        Just(serde_json::json!(["a", 1, null])),
                        Just(serde_json::json!({"a": "b"})),
                    ],
                    0..6,
                ),
            ) {
                let json = serde_json::to_vec(&fields).expect("serialize");
                for path in METHODS.keys() {
                    let _ = (method(path).expect("listed").request_from_json)(&json);
                }
            }
        }
    }
}
