//! `/files`: download (`GET`) and upload (`POST`) of whole files.

pub mod disposition;
pub mod download;
pub mod encoding;
pub mod metadata;
pub mod multipart;
pub mod upload;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::auth::gate::ACCESS_TOKEN_HEADER;
use crate::auth::signature::{self, FileAccess, Operation};
use crate::error::Error;
use crate::state::AppState;

/// The query parameters of `/files`. Each may appear at most once.
#[derive(Debug, Default, Clone)]
pub struct FilesQuery {
    /// The file's path (resolved against the user's home when relative).
    pub path: Option<String>,
    /// The user to act as.
    pub username: Option<String>,
    /// A signed-URL signature.
    pub signature: Option<String>,
    /// Expiry of a signed URL (Unix seconds).
    pub signature_expiration: Option<i64>,
}

impl FilesQuery {
    /// Parses a raw query string.
    ///
    /// # Errors
    /// [`QueryError`] when a parameter repeats, or `signature_expiration` is not an integer.
    pub fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let mut parsed = FilesQuery::default();
        let mut expiration: Option<String> = None;
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let slot = match name.as_ref() {
                "path" => &mut parsed.path,
                "username" => &mut parsed.username,
                "signature" => &mut parsed.signature,
                "signature_expiration" => &mut expiration,
                _ => continue,
            };
            if slot.is_some() {
                return Err(QueryError(format!(
                    "Invalid format for parameter {name}: multiple values for single value parameter '{name}'"
                )));
            }
            *slot = Some(value.into_owned());
        }
        if let Some(text) = expiration {
            let value = text.parse::<i64>().map_err(|err| {
                QueryError(format!(
                    "Invalid format for parameter signature_expiration: {text:?} is not an integer: {err}"
                ))
            })?;
            parsed.signature_expiration = Some(value);
        }
        Ok(parsed)
    }

    /// Checks that the request may do `operation`: the access token in the header, or a
    /// valid signed URL, once a token is in force (reference §2.4).
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] naming what is wrong.
    pub fn authorize(
        &self,
        state: &AppState,
        headers: &HeaderMap,
        operation: Operation,
    ) -> Result<(), Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let access = FileAccess {
            header_token: headers.get(ACCESS_TOKEN_HEADER).map(|v| v.as_bytes()),
            path: self.path.as_deref().unwrap_or(""),
            username: self.username.as_deref().unwrap_or(""),
            signature: self.signature.as_deref(),
            expiration: self.signature_expiration,
        };
        signature::check(&state.access, &access, operation, now)
    }
}

/// A malformed query: answered 400 in plain text, as envd's parameter binding does.
#[derive(Debug)]
pub struct QueryError(String);

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let mut response = (StatusCode::BAD_REQUEST, format!("{}\n", self.0)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_repeats() {
        let q =
            FilesQuery::parse(Some("path=%2Ftmp%2Fa%20b.txt&username=root&x=1")).expect("parse");
        assert_eq!(q.path.as_deref(), Some("/tmp/a b.txt"));
        assert_eq!(q.username.as_deref(), Some("root"));
        let q = FilesQuery::parse(Some("path=")).expect("parse");
        assert_eq!(q.path.as_deref(), Some(""));
        let err = FilesQuery::parse(Some("path=a&path=b")).expect_err("repeat");
        assert_eq!(err.into_response().status(), StatusCode::BAD_REQUEST);
        let q = FilesQuery::parse(Some("signature=v1_x&signature_expiration=-5")).expect("parse");
        assert_eq!(q.signature_expiration, Some(-5));
        for bad in ["soon", "1.5", "", "99999999999999999999"] {
            let err =
                FilesQuery::parse(Some(&format!("signature_expiration={bad}"))).expect_err(bad);
            assert_eq!(err.into_response().status(), StatusCode::BAD_REQUEST);
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any query string parses or is refused, without a panic.
            #[test]
            fn any_query_is_parsed_or_refused(query in ".{0,80}") {
                let _ = FilesQuery::parse(Some(&query));
            }

            /// What a client encodes is what the daemon reads, whatever the characters.
            #[test]
            fn encoded_values_round_trip(
                path in ".{0,30}",
                username in ".{0,10}",
                signature in ".{0,20}",
                expiration in any::<i64>(),
            ) {
                let query = form_urlencoded::Serializer::new(String::new())
                    .append_pair("path", &path)
                    .append_pair("username", &username)
                    .append_pair("signature", &signature)
                    .append_pair("signature_expiration", &expiration.to_string())
                    .finish();
                let parsed = FilesQuery::parse(Some(&query)).expect("well-formed");
                prop_assert_eq!(parsed.path, Some(path));
                prop_assert_eq!(parsed.username, Some(username));
                prop_assert_eq!(parsed.signature, Some(signature));
                prop_assert_eq!(parsed.signature_expiration, Some(expiration));
            }
        }
    }
}
