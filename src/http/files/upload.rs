//! `POST /files`: multipart (every `file` part) or `application/octet-stream` uploads,
//! optionally gzip-encoded, streamed to disk through [`crate::fs::write::Upload`].
//!
//! The body is read on the runtime and written on blocking threads one batch of chunks at a
//! time, so an upload holds a blocking thread only while its data is being written: slow
//! or stalled clients cannot pin the pool that every filesystem operation shares.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use async_compression::tokio::bufread::GzipDecoder;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::task::JoinHandle;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::auth::signature::Operation;
use crate::error::Error;
use crate::fs::entry::base_name;
use crate::fs::journal::Journal;
use crate::fs::metadata::{self, Metadata};
use crate::fs::user::User;
use crate::fs::write::Upload;
use crate::http::files::encoding::{self, Coding};
use crate::http::files::multipart::{self, ByteStream};
use crate::http::files::{FilesQuery, disposition};
use crate::identity::Requester;
use crate::rpc::blocking;
use crate::state::AppState;

/// Most bytes written in one trip to a blocking thread. A fast client's body is gathered
/// into batches this large while the last one is written, so it costs few trips (and few
/// thread wake-ups); a body that pauses has what came so far written during the pause.
const MAX_WRITE_BATCH: usize = 1024 * 1024;

/// A file's bytes as they come: a whole request body, or one part of a form.
type FileBytes<'a> = dyn Stream<Item = Result<Bytes, Error>> + Send + Unpin + 'a;

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
    let mut body = decoded_body(body, coding);
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
            .write(path, &mut body)
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
        let boundary = multipart::boundary(content_type)
            .map_err(|err| reject(format!("error parsing multipart form: {err}")))?;
        let mut form = multipart::Form::new(body, &boundary);
        let mut entries: Vec<UploadedEntry> = Vec::new();
        let mut written: HashSet<PathBuf> = HashSet::new();
        loop {
            let headers = match form.next_part().await {
                Ok(Some(headers)) => headers,
                Ok(None) => break,
                Err(err) => return Err(err.into_response()),
            };
            let content_disposition = headers
                .get(header::CONTENT_DISPOSITION)
                .and_then(|v| v.to_str().ok());
            if content_disposition.and_then(disposition::name).as_deref() != Some("file") {
                continue;
            }
            let raw_path = match query_path {
                Some(path) => path.to_owned(),
                None => content_disposition
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
            entries.push(
                self.write(path, &mut form.data())
                    .await
                    .map_err(IntoResponse::into_response)?,
            );
        }
        Ok(entries)
    }

    /// Streams one file to disk and publishes it with the request's metadata.
    async fn write(&self, path: PathBuf, body: &mut FileBytes<'_>) -> Result<UploadedEntry, Error> {
        let mut writer = DiskWriter::new(Target {
            path: path.clone(),
            owner: self.requester.user.clone(),
            metadata: self.metadata.clone(),
            declared_len: self.declared_len,
            journal: self.journal.clone(),
        });
        let mut batch = Batch::default();
        loop {
            // What the socket has now joins the batch, and a full batch goes to disk. When
            // the socket has nothing more for the moment, what came so far goes to disk as
            // soon as the last batch is written (unless more comes first): a slow client's
            // bytes are not held back.
            let next = match body.next().now_or_never() {
                Some(next) => next,
                None if batch.is_empty() => body.next().await,
                None => {
                    tokio::select! {
                        next = body.next() => next,
                        () = writer.settled() => {
                            if let Err(err) = writer.write(batch.take()).await {
                                return Err(drained(body, err).await);
                            }
                            body.next().await
                        }
                    }
                }
            };
            match next {
                Some(Ok(data)) => {
                    batch.push(data);
                    if batch.len >= MAX_WRITE_BATCH {
                        if let Err(err) = writer.write(batch.take()).await {
                            return Err(drained(body, err).await);
                        }
                    }
                }
                Some(Err(err)) => {
                    // Waited for, so that no temp file outlives the answer.
                    writer.abandon().await;
                    return Err(err);
                }
                None => break,
            }
        }
        let stored = writer.finish(batch.take()).await?;
        Ok(UploadedEntry {
            metadata: (!stored.is_empty()).then_some(stored),
            name: base_name(&path),
            path: path.to_string_lossy().into_owned(),
            kind: "file",
        })
    }
}

/// Reads (and drops) a bounded rest of a body whose upload failed, and gives back `err`:
/// answering while the client is still sending makes the connection close under it, and
/// it would see a broken pipe, not the error. Past the bound the connection is closed.
async fn drained(body: &mut FileBytes<'_>, err: Error) -> Error {
    let mut drained = 0usize;
    while drained < DRAIN_ON_ERROR_BYTES {
        match body.next().await {
            Some(Ok(rest)) => drained += rest.len(),
            _ => break,
        }
    }
    err
}

/// How much of a failed upload's remaining body is read and dropped so the client hears
/// the error (past that, the connection is closed).
const DRAIN_ON_ERROR_BYTES: usize = 1024 * 1024;

/// Body chunks waiting to be written together.
#[derive(Default)]
struct Batch {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Batch {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        self.chunks.push(data);
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    fn take(&mut self) -> Vec<Bytes> {
        self.len = 0;
        std::mem::take(&mut self.chunks)
    }
}

/// Where and how one file is written.
struct Target {
    path: PathBuf,
    owner: User,
    metadata: Metadata,
    declared_len: Option<u64>,
    journal: Option<Arc<Journal>>,
}

/// The disk side of an upload: one batch at a time is written on a blocking thread while
/// the next one is read, so an upload holds a blocking thread only while it writes. The
/// upload begins with the first batch (or at the end, for a body that came whole: begin,
/// write and publish are then one trip to the blocking pool), is published by
/// [`DiskWriter::finish`], and is discarded when the writer is dropped before that (the
/// client left, the body failed).
struct DiskWriter {
    target: Arc<Target>,
    state: Writing,
}

enum Writing {
    /// No batch in flight; the upload once begun.
    Idle(Option<Upload>),
    /// A batch being written; the upload comes back with its result.
    Busy(JoinHandle<Result<Upload, Error>>),
    /// Writing a batch failed (the upload is discarded).
    Failed(Error),
    /// Taken: finished, or failed and reported.
    Over,
}

impl DiskWriter {
    fn new(target: Target) -> DiskWriter {
        DiskWriter {
            target: Arc::new(target),
            state: Writing::Idle(None),
        }
    }

    /// Resolves once no batch is in flight. Cancel-safe: a batch still in flight stays so.
    async fn settled(&mut self) {
        if let Writing::Busy(handle) = &mut self.state {
            let result = handle.await;
            self.state = match result.map_err(Error::from).and_then(|written| written) {
                Ok(upload) => Writing::Idle(Some(upload)),
                Err(err) => Writing::Failed(err),
            };
        }
    }

    /// Waits for the batch in flight; the upload (if begun), or why writing failed.
    async fn settle(&mut self) -> Result<Option<Upload>, Error> {
        self.settled().await;
        match std::mem::replace(&mut self.state, Writing::Over) {
            Writing::Idle(upload) => Ok(upload),
            Writing::Failed(err) => Err(err),
            Writing::Busy(_) | Writing::Over => {
                Err(Error::Internal("the upload already ended".into()))
            }
        }
    }

    /// Sends `batch` to disk once the one before it is written; the error of an earlier
    /// batch (the upload is then discarded).
    async fn write(&mut self, batch: Vec<Bytes>) -> Result<(), Error> {
        let upload = self.settle().await?;
        let target = Arc::clone(&self.target);
        self.state = Writing::Busy(tokio::task::spawn_blocking(move || {
            let mut upload = begun(upload, &target)?;
            write_batch(&mut upload, &batch)?;
            Ok(upload)
        }));
        Ok(())
    }

    /// Writes the last batch and publishes the upload; the metadata as stored.
    async fn finish(mut self, batch: Vec<Bytes>) -> Result<Metadata, Error> {
        let upload = self.settle().await?;
        let target = Arc::clone(&self.target);
        blocking(move || {
            let mut upload = begun(upload, &target)?;
            write_batch(&mut upload, &batch)?;
            upload.commit(&target.metadata)
        })
        .await
    }

    /// Discards the upload and waits until its temp file is gone.
    async fn abandon(mut self) {
        if let Ok(Some(upload)) = self.settle().await {
            let _ = tokio::task::spawn_blocking(move || discard(upload)).await;
        }
    }
}

/// Drops an unfinished upload (its temp file is removed): a blocking syscall.
fn discard(upload: Upload) {
    tracing::debug!(written = upload.written(), "upload abandoned");
    drop(upload);
}

impl Drop for DiskWriter {
    /// An unfinished upload is discarded; removing its temp file is a blocking syscall, so
    /// it happens on a blocking thread (a batch in flight drops it there when done).
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, Writing::Over) {
            Writing::Idle(Some(upload)) => {
                tokio::task::spawn_blocking(move || discard(upload));
            }
            Writing::Busy(handle) => {
                tokio::spawn(async move {
                    if let Ok(Ok(upload)) = handle.await {
                        let _ = tokio::task::spawn_blocking(move || discard(upload)).await;
                    }
                });
            }
            Writing::Idle(None) | Writing::Failed(_) | Writing::Over => {}
        }
    }
}

/// `upload`, or a new one for `target` (the first batch, or an empty body).
fn begun(upload: Option<Upload>, target: &Target) -> Result<Upload, Error> {
    match upload {
        Some(upload) => Ok(upload),
        None => Upload::begin(
            &target.path,
            &target.owner,
            target.declared_len,
            target.journal.as_ref(),
        ),
    }
}

fn write_batch(upload: &mut Upload, batch: &[Bytes]) -> Result<(), Error> {
    let chunks: Vec<&[u8]> = batch.iter().map(Bytes::as_ref).collect();
    upload.write_chunks(&chunks)
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

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn reject(message: String) -> Response {
    Error::InvalidArgument(message).into_response()
}
