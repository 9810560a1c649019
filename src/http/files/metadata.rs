//! `PATCH /files/metadata`: merge-style edits of an existing entry's metadata.
//!
//! Body `{"metadata": {...}}`: a string value sets the key, `null` or `""` removes it, keys
//! not named are left alone; `{"metadata": null}` removes every key. Anything else (nested
//! objects, numbers, arrays, booleans, a missing `metadata`) is 400. Auth as `/files`:
//! the access token in `X-Access-Token`, or a URL signed for the `write` operation.

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};

use crate::auth::signature::Operation;
use crate::error::Error;
use crate::fs::entry;
use crate::fs::metadata::patch::{self, Change, Patch};
use crate::fs::user::NameCache;
use crate::http::files::FilesQuery;
use crate::http::json::json_no_store;
use crate::proto::filesystem as pb;
use crate::rpc::blocking;
use crate::state::AppState;

/// Serves `PATCH /files/metadata`.
pub async fn patch_metadata(State(state): State<AppState>, request: Request) -> Response {
    match serve(state, request).await {
        Ok(entry) => json_no_store(&entry),
        Err(err) => err.into_response(),
    }
}

async fn serve(state: AppState, request: Request) -> Result<pb::EntryInfo, Error> {
    let query = FilesQuery::parse(request.uri().query())
        .map_err(|err| Error::InvalidArgument(err.to_string()))?;
    query.authorize(&state, request.headers(), Operation::Write)?;
    let requester = state.identity.for_files(query.username.as_deref())?;
    let raw_path = query.path.clone().unwrap_or_default();
    if raw_path.is_empty() {
        return Err(Error::InvalidArgument(
            "path query parameter is required".into(),
        ));
    }
    let path = requester.resolve(&raw_path)?;
    let limits = &state.config.limits;
    let body = to_bytes(request.into_body(), limits.max_json_body_bytes)
        .await
        .map_err(|err| Error::reading_body(&err))?;
    limits
        .check_json_nesting(&body)
        .map_err(|err| Error::InvalidArgument(format!("invalid request body: {err}")))?;
    let patch = parse_body(&body)?;
    let entry = blocking(move || {
        let metadata = patch::apply_to(&path, &patch)?;
        let mut info = entry::describe(&path, &path, &mut NameCache::default())?;
        info.metadata = metadata;
        Ok(info)
    })
    .await?;
    Ok(entry.into())
}

/// Parses `{"metadata": {...} | null}` into a patch.
///
/// # Errors
/// [`Error::InvalidArgument`] for anything but an object of strings and nulls, or null.
pub fn parse_body(body: &[u8]) -> Result<Patch, Error> {
    let invalid = |reason: &str| Error::InvalidArgument(format!("invalid request body: {reason}"));
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|err| invalid(&err.to_string()))?;
    let serde_json::Value::Object(top) = value else {
        return Err(invalid("expected a JSON object"));
    };
    match top.get("metadata") {
        None => Err(invalid("\"metadata\" is required")),
        Some(serde_json::Value::Null) => Ok(Patch {
            clear: true,
            ..Patch::default()
        }),
        Some(serde_json::Value::Object(entries)) => {
            let mut patch = Patch::default();
            for (key, value) in entries {
                let change = match value {
                    serde_json::Value::Null => Change::Remove,
                    serde_json::Value::String(s) if s.is_empty() => Change::Remove,
                    serde_json::Value::String(s) => Change::Set(s.clone()),
                    _ => {
                        return Err(invalid(&format!(
                            "the value of {key:?} must be a string or null"
                        )));
                    }
                };
                patch.changes.insert(key.clone(), change);
            }
            Ok(patch)
        }
        Some(_) => Err(invalid("\"metadata\" must be an object or null")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_rules() {
        let ok: &[(&str, Patch)] = &[
            (
                r#"{"metadata":null}"#,
                Patch {
                    clear: true,
                    ..Patch::default()
                },
            ),
            (r#"{"metadata":{}}"#, Patch::default()),
            (
                r#"{"metadata":{"a":"1","b":null,"c":""},"other":1}"#,
                Patch {
                    clear: false,
                    changes: [
                        ("a".to_owned(), Change::Set("1".into())),
                        ("b".to_owned(), Change::Remove),
                        ("c".to_owned(), Change::Remove),
                    ]
                    .into(),
                },
            ),
        ];
        for (body, want) in ok {
            assert_eq!(&parse_body(body.as_bytes()).expect(body), want, "{body}");
        }
        for body in [
            "",
            "[]",
            "{}",
            r#"{"metadata":"x"}"#,
            r#"{"metadata":{"a":1}}"#,
            r#"{"metadata":{"a":true}}"#,
            r#"{"metadata":{"a":["x"]}}"#,
            r#"{"metadata":{"a":{"nested":"x"}}}"#,
        ] {
            let err = parse_body(body.as_bytes()).expect_err(body);
            assert!(matches!(err, Error::InvalidArgument(_)), "{body}");
        }
    }
}
