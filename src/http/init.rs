//! `POST /init`: parses the control plane's JSON body into an [`InitRequest`] and hands it
//! to [`crate::init`]. Answers 204; failures in plain text, as envd does; every answer
//! carries `X-Envd-Version`.

use std::collections::BTreeMap;

use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Deserializer};

use crate::auth::token::AccessToken;
use crate::error::{Error, Result};
use crate::init::{self, InitRequest};
use crate::limits::Limits;
use crate::state::AppState;

/// The envd version this daemon is wire-compatible with, sent as `X-Envd-Version` so a
/// control plane that gates features on it treats this daemon as that envd.
pub const COMPATIBLE_ENVD_VERSION: &str = "0.6.13";

/// Serves `POST /init`.
pub async fn init(State(state): State<AppState>, body: Body) -> Response {
    let mut response = match serve(&state, body).await {
        // A stale /init is acknowledged like an applied one (the core logs it).
        Ok(init::Outcome::Applied | init::Outcome::Stale) => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(err) => err.into_plain_response(),
    };
    response.headers_mut().insert(
        "x-envd-version",
        HeaderValue::from_static(COMPATIBLE_ENVD_VERSION),
    );
    response
}

async fn serve(state: &AppState, body: Body) -> Result<init::Outcome> {
    let limits = &state.config.limits;
    let max = limits.max_json_body_bytes;
    let body = to_bytes(body, max)
        .await
        .map_err(|err| match Error::reading_body(&err) {
            stalled @ Error::TimedOut(_) => stalled,
            _ => Error::InvalidArgument(format!(
                "error reading the request body (at most {max} bytes): {err}"
            )),
        })?;
    let request = parse(&body, limits)?;
    init::init(state, request).await
}

/// The `/init` body as sent. Unknown fields (and the Firecracker-only ones) are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitBody {
    #[serde(default, deserialize_with = "strict_token")]
    access_token: Option<AccessToken>,
    timestamp: Option<String>,
    env_vars: Option<BTreeMap<String, String>>,
    default_user: Option<String>,
    default_workdir: Option<String>,
    ca_bundle: Option<String>,
}

/// Parses an `/init` body. An empty body (or `null`) is a request with no fields.
///
/// # Errors
/// [`Error::InvalidArgument`] when the body is not a JSON object of the expected shape,
/// nests deeper than `--max-json-nesting`, carries an empty, escaped or non-string
/// `accessToken`, or a `timestamp` that is not RFC 3339.
pub fn parse(body: &[u8], limits: &Limits) -> Result<InitRequest> {
    if body.is_empty() {
        return Ok(InitRequest::default());
    }
    limits
        .check_json_nesting(body)
        .map_err(|err| Error::InvalidArgument(format!("error decoding the request body: {err}")))?;
    let parsed: Option<InitBody> = serde_json::from_slice(body)
        .map_err(|err| Error::InvalidArgument(format!("error decoding the request body: {err}")))?;
    let parsed = parsed.unwrap_or_default();
    let timestamp = parsed
        .timestamp
        .as_deref()
        .map(|text| {
            chrono::DateTime::parse_from_rfc3339(text)
                .ok()
                .and_then(|time| time.timestamp_nanos_opt())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "error decoding the request body: timestamp {text:?} is not an RFC 3339 time"
                    ))
                })
        })
        .transpose()?;
    Ok(InitRequest {
        access_token: parsed.access_token,
        timestamp,
        env_vars: parsed.env_vars,
        default_user: parsed.default_user,
        default_workdir: parsed.default_workdir,
        ca_bundle: parsed.ca_bundle,
    })
}

/// `accessToken` as envd reads it: `null` or absent is no token; otherwise a non-empty JSON
/// string without escape sequences (a borrowed `&str` cannot hold an unescaped copy, so
/// serde refuses escaped strings here).
fn strict_token<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<AccessToken>, D::Error> {
    let raw: Option<&'de str> = Option::deserialize(deserializer)?;
    raw.map(|text| {
        AccessToken::new(text).map_err(|_| serde::de::Error::custom("accessToken is empty"))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_field() {
        let body = br#"{
            "accessToken": "tok",
            "timestamp": "2024-05-06T07:08:09.123456789Z",
            "envVars": {"A": "1", "B": ""},
            "defaultUser": "user",
            "defaultWorkdir": "/home/user",
            "caBundle": "PEM",
            "volumeMounts": [{"nfs_target": "x", "path": "/mnt"}],
            "hyperloopIP": "10.0.0.1",
            "futureField": {"nested": [1, 2]}
        }"#;
        let request = parse(body, &Limits::default()).expect("parse");
        assert!(request.access_token.expect("token").matches(b"tok"));
        assert_eq!(request.timestamp, Some(1_714_979_289_123_456_789));
        let vars = request.env_vars.expect("vars");
        assert_eq!(vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(request.default_user.as_deref(), Some("user"));
        assert_eq!(request.default_workdir.as_deref(), Some("/home/user"));
        assert_eq!(request.ca_bundle.as_deref(), Some("PEM"));
    }

    #[test]
    fn empty_and_null_bodies_carry_nothing() {
        for body in [
            &b""[..],
            b"null",
            b"{}",
            br#"{"accessToken": null, "envVars": null}"#,
        ] {
            let request =
                parse(body, &Limits::default()).unwrap_or_else(|err| panic!("{body:?}: {err}"));
            assert!(request.access_token.is_none());
            assert!(request.env_vars.is_none());
            assert!(request.timestamp.is_none());
        }
    }

    #[test]
    fn refuses_malformed_bodies() {
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(20), "]".repeat(20));
        let cases: &[&[u8]] = &[
            b"{",
            b"[]",
            b"\"str\"",
            b" ",
            br#"{"accessToken": ""}"#,
            br#"{"accessToken": 5}"#,
            br#"{"accessToken": "a\u0062"}"#,
            br#"{"accessToken": "a\\b"}"#,
            br#"{"accessToken": ["tok"]}"#,
            br#"{"envVars": {"A": 1}}"#,
            br#"{"envVars": ["A"]}"#,
            br#"{"timestamp": "yesterday"}"#,
            br#"{"timestamp": 1714979289}"#,
            br#"{"defaultUser": 7}"#,
            deep.as_bytes(),
        ];
        for body in cases {
            let err = parse(body, &Limits::default()).expect_err(&String::from_utf8_lossy(body));
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(err.http_status(), StatusCode::BAD_REQUEST);
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// JSON values of bounded size and depth.
        fn json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                ".{0,12}".prop_map(serde_json::Value::from),
                "[0-9T:.Z+-]{0,30}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(10, 48, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                    prop::collection::btree_map(".{0,8}", inner, 0..4)
                        .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
                ]
            })
        }

        /// `/init` bodies built from the real field names with values of any type.
        fn init_body() -> impl Strategy<Value = serde_json::Value> {
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "accessToken",
                    "timestamp",
                    "envVars",
                    "defaultUser",
                    "defaultWorkdir",
                    "caBundle",
                    "volumeMounts",
                    "other",
                ])
                .prop_map(str::to_owned),
                json(),
                0..6,
            )
            .prop_map(|map| serde_json::Value::Object(map.into_iter().collect()))
        }

        proptest! {
            /// Any bytes: parsed or refused with a 400, never a panic.
            #[test]
            fn any_bytes_are_parsed_or_refused(body in prop::collection::vec(any::<u8>(), 0..256)) {
                if let Err(err) = parse(&body, &Limits::default()) {
                    prop_assert!(matches!(err, Error::InvalidArgument(_)));
                }
            }

            /// Bodies shaped like real ones, with wrong types and deep nesting: the same, and
            /// anything nested deeper than the limit is refused before it is parsed.
            #[test]
            fn init_shaped_bodies_are_parsed_or_refused(body in init_body()) {
                let text = serde_json::to_vec(&body).expect("serialize");
                let limits = Limits::default();
                match parse(&text, &limits) {
                    Ok(_) => prop_assert!(crate::limits::json_nesting(&text) <= limits.max_json_nesting),
                    Err(err) => prop_assert!(matches!(err, Error::InvalidArgument(_))),
                }
            }
        }
    }
}
