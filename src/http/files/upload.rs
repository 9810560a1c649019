//! `POST /files`: multipart (every `file` part) or `application/octet-stream` uploads,
//! optionally gzip-encoded, streamed to disk through [`crate::fs::write::Upload`].
//!
//! The body is read on the runtime and written on blocking threads one batch of chunks at a
//! time, so an upload holds a blocking thread only while its data is being written: slow
//! or stalled clients cannot pin the pool that every filesystem operation shares.

use std::collections::HashSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use async_compression::tokio::bufread::GzipDecoder;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::mpsc;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::auth::signature::Operation;
use crate::error::Error;
use crate::fs::entry::base_name;
use crate::fs::journal::Journal;
use crate::fs::metadata::{self, Metadata};
use crate::fs::user::User;
use crate::fs::write::Upload;
use crate::http::files::encoding::{self, Coding};
use crate::http::files::{FilesQuery, disposition};
use crate::identity::Requester;
use crate::rpc::blocking;
use crate::state::AppState;

/// Body chunks queued between the socket and the disk writer.
const WRITE_QUEUE_DEPTH: usize = 16;
/// Most bytes written in one trip to a blocking thread: the chunks that queued up while the
/// previous batch was written, so a fast client costs few trips.
const MAX_WRITE_BATCH: usize = 1024 * 1024;

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

/// One uploaded file, as the response lists it.
#[derive(Debug, serde::Serialize)]
pub struct UploadedEntry {
    /// The stored `user.e2b.*` set, omitted when empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// Base name.
    pub name: String,
    /// Absolute resolved path.
    pub path: String,
    /// Always `"file"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// Serves `POST /files`.
pub async fn upload(State(state): State<AppState>, request: Request) -> Response {
    match serve(state, request).await {
        Ok(entries) => {
            let body = serde_json::to_vec(&entries).unwrap_or_default();
            let mut response = (StatusCode::OK, body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(response) => response,
    }
}

async fn serve(state: AppState, request: Request) -> Result<Vec<UploadedEntry>, Response> {
    let query = FilesQuery::parse(request.uri().query()).map_err(IntoResponse::into_response)?;
    query
        .authorize(&state, request.headers(), Operation::Write)
        .map_err(IntoResponse::into_response)?;
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let coding = encoding::request_coding(header_str(&headers, header::CONTENT_ENCODING)).map_err(|hdr| {
        reject(format!(
            "error decompressing request body: unsupported Content-Encoding: {hdr}, supported: [gzip]"
        ))
    })?;
    let requester = state
        .identity
        .for_files(query.username.as_deref())
        .map_err(IntoResponse::into_response)?;
    let metadata = metadata::from_headers(&headers, state.config.limits.max_metadata_headers)
        .map_err(IntoResponse::into_response)?;
    let declared_len =
        header_str(&headers, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    let content_type = header_str(&headers, header::CONTENT_TYPE)
        .unwrap_or("")
        .to_owned();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let body = decoded_body(body, coding);
    let job = Job {
        requester,
        metadata,
        declared_len,
        journal: state.uploads.clone(),
    };
    if media == "application/octet-stream" {
        let Some(raw_path) = query.path else {
            return Err(reject(
                "path query parameter is required for raw body upload".into(),
            ));
        };
        let path = job
            .requester
            .resolve(&raw_path)
            .map_err(|err| reject(format!("error resolving path: {err}")))?;
        let entry = job
            .write(path, body)
            .await
            .map_err(IntoResponse::into_response)?;
        return Ok(vec![entry]);
    }
    if media.starts_with("multipart/") {
        return job
            .multipart(&content_type, query.path.as_deref(), body)
            .await;
    }
    Err(reject(format!(
        "unsupported content type: {content_type}, expected multipart/form-data or application/octet-stream"
    )))
}

/// What every file of one request shares.
struct Job {
    requester: Requester,
    metadata: Metadata,
    declared_len: Option<u64>,
    journal: Option<Arc<Journal>>,
}

impl Job {
    async fn multipart(
        &self,
        content_type: &str,
        query_path: Option<&str>,
        body: ByteStream,
    ) -> Result<Vec<UploadedEntry>, Response> {
        let boundary = multer::parse_boundary(content_type)
            .map_err(|err| reject(format!("error parsing multipart form: {err}")))?;
        let mut form = multer::Multipart::new(body, boundary);
        let mut entries: Vec<UploadedEntry> = Vec::new();
        let mut written: HashSet<PathBuf> = HashSet::new();
        loop {
            let field = match form.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(err) => return Err(form_error(err).into_response()),
            };
            if field.name() != Some("file") {
                continue;
            }
            let raw_path = match query_path {
                Some(path) => path.to_owned(),
                None => field
                    .headers()
                    .get(header::CONTENT_DISPOSITION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(disposition::filename)
                    .ok_or_else(|| {
                        reject(
                            "error getting multipart custom part file name: filename not found in Content-Disposition header"
                                .into(),
                        )
                    })?,
            };
            let path = self
                .requester
                .resolve(&raw_path)
                .map_err(|err| reject(format!("error resolving path: {err}")))?;
            if !written.insert(path.clone()) {
                let mut message = format!(
                    "you cannot upload multiple files to the same path '{}' in one upload request, only the first specified file was uploaded",
                    path.display()
                );
                let others: Vec<&str> = entries
                    .iter()
                    .filter(|e| std::path::Path::new(&e.path) != path)
                    .map(|e| e.path.as_str())
                    .collect();
                if others.len() >= 2 {
                    message.push_str(&format!(
                        ", also the following files were uploaded: {}",
                        others.join(", ")
                    ));
                }
                return Err(reject(message));
            }
            let stream: ByteStream = Box::pin(field.map_err(form_error));
            entries.push(
                self.write(path, stream)
                    .await
                    .map_err(IntoResponse::into_response)?,
            );
        }
        Ok(entries)
    }

    /// Streams one file to disk and publishes it with the request's metadata.
    async fn write(&self, path: PathBuf, mut body: ByteStream) -> Result<UploadedEntry, Error> {
        let (tx, rx) = mpsc::channel::<Piece>(WRITE_QUEUE_DEPTH);
        let target = Target {
            path: path.clone(),
            owner: self.requester.user.clone(),
            metadata: self.metadata.clone(),
            declared_len: self.declared_len,
            journal: self.journal.clone(),
        };
        // A task of its own: if this request is dropped (the client left), the writer still
        // sees the channel close and discards the upload.
        let writer = tokio::spawn(write_to_disk(target, rx));
        while let Some(chunk) = body.next().await {
            let data = match chunk {
                Ok(data) => data,
                Err(err) => {
                    // The sender is dropped unfinished, so the writer discards the upload;
                    // waiting for it means no temp file outlives the answer.
                    drop(tx);
                    let _ = writer.await;
                    return Err(err);
                }
            };
            if tx.send(Piece::Data(data)).await.is_err() {
                // The writer failed; its error is reported below. Read (and drop) a bounded
                // rest of the body first: answering while the client is still sending makes
                // the connection close under it, and it sees a broken pipe, not the error.
                let mut drained = 0usize;
                while drained < DRAIN_ON_ERROR_BYTES {
                    match body.next().await {
                        Some(Ok(rest)) => drained += rest.len(),
                        _ => break,
                    }
                }
                break;
            }
        }
        // A send error means the writer failed already; its result says why.
        let _ = tx.send(Piece::End).await;
        let stored = writer
            .await??
            .ok_or_else(|| Error::Internal("upload ended without a result".into()))?;
        Ok(UploadedEntry {
            metadata: (!stored.is_empty()).then_some(stored),
            name: base_name(&path),
            path: path.to_string_lossy().into_owned(),
            kind: "file",
        })
    }
}

/// How much of a failed upload's remaining body is read and dropped so the client hears
/// the error (past that, the connection is closed).
const DRAIN_ON_ERROR_BYTES: usize = 1024 * 1024;

enum Piece {
    Data(Bytes),
    End,
}

/// Where and how one file is written.
struct Target {
    path: PathBuf,
    owner: User,
    metadata: Metadata,
    declared_len: Option<u64>,
    journal: Option<Arc<Journal>>,
}

/// The disk side of an upload. Chunks are written in batches on a blocking thread; the
/// upload begins with the first batch (or the end, for an empty body) and is published after
/// `End`, and a channel closed without it (client gone, body error) discards it. A body that
/// arrives whole before the first batch is written (a small file) costs one trip to the
/// blocking pool: begin, write and publish together.
async fn write_to_disk(
    target: Target,
    mut rx: mpsc::Receiver<Piece>,
) -> Result<Option<Metadata>, Error> {
    // Shared with each batch's trip to the blocking pool, not copied for it.
    let target = Arc::new(target);
    let mut upload: Option<Upload> = None;
    loop {
        let (batch, ended) = match rx.recv().await {
            Some(Piece::Data(data)) => gather(&mut rx, data),
            Some(Piece::End) => (Vec::new(), true),
            None => {
                // Removing the temp file is a blocking syscall too.
                if let Some(upload) = upload {
                    blocking(move || {
                        tracing::debug!(written = upload.written(), "upload abandoned");
                        drop(upload);
                        Ok(())
                    })
                    .await?;
                }
                return Ok(None);
            }
        };
        let target = Arc::clone(&target);
        // On an error the upload is dropped on the blocking thread (temp file removed).
        let step = blocking(move || {
            let mut upload = match upload {
                Some(upload) => upload,
                None => Upload::begin(
                    &target.path,
                    &target.owner,
                    target.declared_len,
                    target.journal.as_ref(),
                )?,
            };
            for data in &batch {
                upload.write_all(data)?;
            }
            if ended {
                return upload.commit(&target.metadata).map(Step::Published);
            }
            Ok(Step::Writing(upload))
        })
        .await?;
        match step {
            Step::Writing(written) => upload = Some(written),
            Step::Published(stored) => return Ok(Some(stored)),
        }
    }
}

enum Step {
    Writing(Upload),
    Published(Metadata),
}

/// `first` and whatever else is already queued, up to [`MAX_WRITE_BATCH`] bytes; and whether
/// the end came with them.
fn gather(rx: &mut mpsc::Receiver<Piece>, first: Bytes) -> (Vec<Bytes>, bool) {
    let mut size = first.len();
    let mut batch = vec![first];
    while size < MAX_WRITE_BATCH {
        match rx.try_recv() {
            Ok(Piece::Data(data)) => {
                size += data.len();
                batch.push(data);
            }
            Ok(Piece::End) => return (batch, true),
            Err(_) => break,
        }
    }
    (batch, false)
}

/// The request body as a stream of bytes, gunzipped when it is gzip-encoded.
fn decoded_body(body: Body, coding: Coding) -> ByteStream {
    let raw = body
        .into_data_stream()
        .map_err(|err| std::io::Error::other(err.into_inner()));
    match coding {
        Coding::Identity => Box::pin(raw.map_err(|err| Error::reading_body(&err))),
        Coding::Gzip => {
            let mut decoder = GzipDecoder::new(StreamReader::new(raw));
            decoder.multiple_members(true);
            Box::pin(
                ReaderStream::new(decoder).map_err(|err| match Error::reading_body(&err) {
                    stalled @ Error::TimedOut(_) => stalled,
                    _ => Error::InvalidArgument(format!("error decompressing request body: {err}")),
                }),
            )
        }
    }
}

/// A multipart error: the body's own error when reading it failed (a stall stays a 408),
/// else the form is malformed (400).
fn form_error(err: multer::Error) -> Error {
    if let multer::Error::StreamReadFailed(source) = &err {
        if let Some(Error::TimedOut(message)) = source.downcast_ref::<Error>() {
            return Error::TimedOut(message.clone());
        }
    }
    Error::InvalidArgument(format!("error reading form: {err}"))
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn reject(message: String) -> Response {
    Error::InvalidArgument(message).into_response()
}
