//! `/files`: download (`GET`) and upload (`POST`) of whole files.

pub mod disposition;
pub mod download;
pub mod encoding;
pub mod upload;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

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
    pub signature_expiration: Option<String>,
}

impl FilesQuery {
    /// Parses a raw query string.
    ///
    /// # Errors
    /// [`QueryError`] when a parameter repeats.
    pub fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let mut parsed = FilesQuery::default();
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let slot = match name.as_ref() {
                "path" => &mut parsed.path,
                "username" => &mut parsed.username,
                "signature" => &mut parsed.signature,
                "signature_expiration" => &mut parsed.signature_expiration,
                _ => continue,
            };
            if slot.is_some() {
                return Err(QueryError(format!(
                    "Invalid format for parameter {name}: multiple values for single value parameter '{name}'"
                )));
            }
            *slot = Some(value.into_owned());
        }
        Ok(parsed)
    }
}

/// A malformed query: answered 400 in plain text, as envd's parameter binding does.
#[derive(Debug)]
pub struct QueryError(String);

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
    }
}
