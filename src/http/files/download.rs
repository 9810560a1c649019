//! `GET /files`: stream a file to the client, gzip-encoded when asked for, with range and
//! conditional requests served for the identity encoding.

use async_compression::tokio::bufread::GzipEncoder;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};
use tokio_util::io::ReaderStream;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use crate::auth::signature::Operation;
use crate::error::Error;
use crate::fs::entry::base_name;
use crate::http::files::encoding::{self, Coding};
use crate::http::files::{FilesQuery, disposition};
use crate::state::AppState;

/// Read size for streaming a file to a socket.
const CHUNK_BYTES: usize = 256 * 1024;

/// Serves `GET /files`.
pub async fn download(State(state): State<AppState>, request: Request) -> Response {
    match serve(state, request).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn serve(state: AppState, request: Request) -> Result<Response, Response> {
    let query = FilesQuery::parse(request.uri().query()).map_err(IntoResponse::into_response)?;
    query
        .authorize(&state, request.headers(), Operation::Read)
        .map_err(IntoResponse::into_response)?;
    let requester = state
        .identity
        .for_files(query.username.as_deref())
        .map_err(IntoResponse::into_response)?;
    let raw_path = query.path.clone().unwrap_or_default();
    let path = requester.resolve(&raw_path).map_err(|err| {
        Error::InvalidArgument(format!(
            "error expanding and resolving path '{raw_path}': {err}"
        ))
        .into_response()
    })?;
    let meta = match tokio::fs::metadata(&path).await {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(
                Error::NotFound(format!("path '{}' does not exist", path.display()))
                    .into_response(),
            );
        }
        Err(err) => {
            return Err(Error::io(
                format!("error checking if path exists '{}'", path.display()),
                err,
            )
            .into_response());
        }
    };
    if meta.is_dir() {
        return Err(
            Error::InvalidArgument(format!("path '{}' is a directory", path.display()))
                .into_response(),
        );
    }
    let accept = request
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Some(mut coding) = encoding::negotiate(accept.as_deref()) else {
        return Err(Error::NotAcceptable(
            "error parsing Accept-Encoding: no acceptable encoding found, supported: [gzip]".into(),
        )
        .into_response());
    };
    let conditional = [
        header::RANGE,
        header::IF_MODIFIED_SINCE,
        header::IF_NONE_MATCH,
        header::IF_RANGE,
    ]
    .iter()
    .any(|h| request.headers().contains_key(h));
    if conditional && coding == Coding::Gzip {
        if encoding::identity_rejected(accept.as_deref()) {
            return Err(Error::NotAcceptable(
                "identity encoding not acceptable for Range or conditional request".into(),
            )
            .into_response());
        }
        coding = Coding::Identity;
    }
    let content_disposition = HeaderValue::from_str(&disposition::inline(&base_name(&path))).ok();
    let mut response = match coding {
        Coding::Identity => {
            let served = ServeFile::new(&path)
                .with_buf_chunk_size(CHUNK_BYTES)
                .oneshot(request)
                .await;
            match served {
                Ok(response) => response.map(Body::new),
                Err(never) => match never {},
            }
        }
        Coding::Gzip => {
            let file = tokio::fs::File::open(&path).await.map_err(|err| {
                Error::io(format!("error opening file '{}'", path.display()), err).into_response()
            })?;
            let reader = tokio::io::BufReader::with_capacity(CHUNK_BYTES, file);
            let body = Body::from_stream(ReaderStream::with_capacity(
                GzipEncoder::new(reader),
                CHUNK_BYTES,
            ));
            let mut response = Response::new(body);
            let mime = mime_guess::from_path(&raw_path).first_or_octet_stream();
            let content_type =
                if mime.type_() == mime_guess::mime::TEXT && mime.get_param("charset").is_none() {
                    format!("{mime}; charset=utf-8")
                } else {
                    mime.to_string()
                };
            let headers = response.headers_mut();
            if let Ok(value) = HeaderValue::from_str(&content_type) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    if let Some(value) = content_disposition {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
