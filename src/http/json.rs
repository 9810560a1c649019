//! JSON responses written the way envd writes them: a trailing newline, never cached.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::error::Error;

/// `200` with `value` as JSON plus a newline (as envd's encoder writes it), never cached.
pub fn json_no_store(value: &impl serde::Serialize) -> Response {
    let mut body = match serde_json::to_vec(value) {
        Ok(body) => body,
        Err(err) => {
            return Error::Internal(format!("encoding JSON: {err}")).into_response();
        }
    };
    body.push(b'\n');
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
