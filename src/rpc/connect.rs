//! The Connect protocol (unary JSON/proto, streaming connect+json/connect+proto) as a
//! translation into gRPC: a Connect request becomes a gRPC request to the one tonic
//! implementation, and its gRPC response becomes a Connect response. No handler exists
//! twice.
//!
//! What the SDKs rely on: unary errors are `{"code","message"}` with the HTTP status of the
//! code; stream errors, even before the first message, are HTTP 200 plus an end-of-stream
//! envelope carrying the error; every stream ends with an end-of-stream envelope.

use std::io::Read;

use axum::body::Body;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use http::{HeaderMap, HeaderValue, Method as HttpMethod, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Limited, StreamBody};
use tonic::{Code, Status};

use crate::rpc::GrpcService;
use crate::rpc::codec::{self, Kind, Method};
use crate::rpc::envelope::{self, Decoder, FLAG_COMPRESSED, FLAG_END_STREAM};

/// Largest response message the translation decodes from the services' gRPC frames. Request
/// messages are bounded by [`MessageLimits`] instead (`--max-message-bytes`).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Longest `Connect-Timeout-Ms` value the protocol allows (10 digits).
const MAX_TIMEOUT_DIGITS: usize = 10;

/// The bounds request messages are read with (see [`crate::limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    /// Bytes of one message, after decompression.
    pub max_bytes: usize,
    /// Nesting of a JSON message.
    pub max_json_nesting: usize,
}

impl MessageLimits {
    /// The message limits of `limits`.
    pub fn of(limits: &crate::limits::Limits) -> Self {
        MessageLimits {
            max_bytes: limits.max_message_bytes,
            max_json_nesting: limits.max_json_nesting,
        }
    }
}

/// The wire form of Connect messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Canonical protobuf JSON.
    Json,
    /// Protobuf binary.
    Proto,
}

/// What the content type says a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `application/json` or `application/proto`.
    Unary(Codec),
    /// `application/connect+json` or `application/connect+proto`.
    Stream(Codec),
}

impl Shape {
    /// Classifies a content type; `None` when it is not a Connect one.
    pub fn from_content_type(content_type: &str) -> Option<Shape> {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/json" => Some(Shape::Unary(Codec::Json)),
            "application/proto" => Some(Shape::Unary(Codec::Proto)),
            "application/connect+json" => Some(Shape::Stream(Codec::Json)),
            "application/connect+proto" => Some(Shape::Stream(Codec::Proto)),
            _ => None,
        }
    }
}

/// Serves one Connect request through `grpc`.
pub async fn serve(
    grpc: GrpcService,
    request: Request<Body>,
    shape: Shape,
    limits: MessageLimits,
) -> Response<Body> {
    let codec = match shape {
        Shape::Unary(codec) | Shape::Stream(codec) => codec,
    };
    let fail = |status: Status| match shape {
        Shape::Unary(_) => unary_error(&status),
        Shape::Stream(codec) => stream_error_response(codec, &status),
    };
    if request.method() != HttpMethod::POST {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "Connect calls must use POST",
        );
    }
    let Some(method) = codec::method(request.uri().path()) else {
        return fail(Status::unimplemented(format!(
            "unknown method {}",
            request.uri().path()
        )));
    };
    let shape_matches = match shape {
        Shape::Unary(_) => method.kind == Kind::Unary,
        Shape::Stream(_) => method.kind != Kind::Unary,
    };
    if !shape_matches {
        return plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type does not match the method's streaming shape",
        );
    }
    let grpc_timeout = match timeout_header(request.headers()) {
        Ok(timeout) => timeout,
        Err(status) => return fail(status),
    };
    match shape {
        Shape::Unary(_) => unary(grpc, request, method, codec, grpc_timeout, limits).await,
        Shape::Stream(_) => streaming(grpc, request, method, codec, grpc_timeout, limits).await,
    }
}

/// Translates `Connect-Timeout-Ms` into a `grpc-timeout` value.
fn timeout_header(headers: &HeaderMap) -> Result<Option<HeaderValue>, Status> {
    let Some(value) = headers.get("connect-timeout-ms") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    if text.is_empty()
        || text.len() > MAX_TIMEOUT_DIGITS
        || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Status::invalid_argument(format!(
            "protocol error: invalid connect-timeout-ms {text:?}"
        )));
    }
    let millis: u64 = text.parse().unwrap_or(u64::MAX);
    // grpc-timeout allows at most 8 digits per unit.
    let grpc = if millis < 100_000_000 {
        format!("{millis}m")
    } else {
        format!("{}S", millis.div_ceil(1000).min(99_999_999))
    };
    Ok(HeaderValue::from_str(&grpc).ok())
}

/// The gRPC request for a Connect one: same path and metadata, gRPC framing.
fn grpc_request(
    parts: http::request::Parts,
    body: tonic::body::Body,
    timeout: Option<HeaderValue>,
) -> Request<tonic::body::Body> {
    let mut builder = Request::builder()
        .method(HttpMethod::POST)
        .uri(parts.uri)
        .version(http::Version::HTTP_2);
    if let Some(headers) = builder.headers_mut() {
        for (name, value) in &parts.headers {
            let skip = matches!(
                name.as_str(),
                "content-type" | "content-length" | "content-encoding" | "accept-encoding" | "te"
            ) || name.as_str().starts_with("connect-")
                || name.as_str().starts_with("grpc-");
            if !skip {
                headers.append(name, value.clone());
            }
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        if let Some(timeout) = timeout {
            headers.insert("grpc-timeout", timeout);
        }
    }
    let mut request = builder
        .body(body)
        .unwrap_or_else(|_| Request::new(tonic::body::Body::empty()));
    *request.extensions_mut() = parts.extensions;
    request
}

async fn unary(
    grpc: GrpcService,
    request: Request<Body>,
    method: &Method,
    codec: Codec,
    timeout: Option<HeaderValue>,
    limits: MessageLimits,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let encoding = parts.headers.get(header::CONTENT_ENCODING).cloned();
    let payload = match Limited::new(body, limits.max_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            let status = if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large(limits)
            } else {
                reading_failed(err.as_ref())
            };
            return unary_error(&status);
        }
    };
    let payload = match decompress(encoding.as_ref(), payload, limits) {
        Ok(payload) => payload,
        Err(status) => return unary_error(&status),
    };
    let binary = match to_binary(method, codec, &payload, limits) {
        Ok(binary) => binary,
        Err(status) => return unary_error(&status),
    };
    let body = tonic::body::Body::new(http_body_util::Full::new(envelope::encode(0, &binary)));
    let response = call(grpc, grpc_request(parts, body, timeout)).await;
    let (head, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&head.headers) {
        if status.code() != Code::Ok {
            return unary_error(&status);
        }
    }
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(err) => return unary_error(&Status::internal(format!("reading response: {err}"))),
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let data = collected.to_bytes();
    match Status::from_header_map(&trailers) {
        Some(status) if status.code() == Code::Ok => {}
        Some(status) => return unary_error(&status),
        None => return unary_error(&Status::internal("response ended without a status")),
    }
    let mut decoder = Decoder::new(MAX_RESPONSE_BYTES);
    decoder.push(&data);
    let message = match decoder.next_frame() {
        Ok(Some((_, message))) => message,
        _ => return unary_error(&Status::internal("response carried no message")),
    };
    let out = match from_binary(method, codec, message) {
        Ok(out) => out,
        Err(status) => return unary_error(&status),
    };
    let content_type = match codec {
        Codec::Json => "application/json",
        Codec::Proto => "application/proto",
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(out))
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "building response"))
}

async fn streaming(
    grpc: GrpcService,
    request: Request<Body>,
    method: &'static Method,
    codec: Codec,
    timeout: Option<HeaderValue>,
    limits: MessageLimits,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let compressed = match stream_encoding(parts.headers.get("connect-content-encoding")) {
        Ok(compressed) => compressed,
        Err(status) => return stream_error_response(codec, &status),
    };
    let frames = request_frames(body, method, codec, compressed, limits);
    let body = tonic::body::Body::new(StreamBody::new(frames));
    let response = call(grpc, grpc_request(parts, body, timeout)).await;
    let (head, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&head.headers) {
        // A trailers-only response: the call failed (or ended) before any message.
        return stream_response(codec, stream::iter([Ok(end_stream(codec, &status))]));
    }
    stream_response(codec, response_envelopes(body, method, codec))
}

/// Connect envelopes of the request → gRPC frames, one message at a time (client streams
/// are consumed incrementally).
fn request_frames(
    body: Body,
    method: &'static Method,
    codec: Codec,
    compressed: bool,
    limits: MessageLimits,
) -> impl Stream<Item = Result<Frame<Bytes>, Status>> + Send + 'static {
    struct State {
        body: BodyStream<Body>,
        decoder: Decoder,
        done: bool,
    }
    let state = State {
        body: BodyStream::new(body),
        decoder: Decoder::new(limits.max_bytes),
        done: false,
    };
    stream::unfold(state, move |mut state| async move {
        loop {
            if state.done {
                return None;
            }
            match state.decoder.next_frame() {
                // Clients end their streams by EOF; an explicit end message ends it too.
                Ok(Some((flags, _))) if flags & FLAG_END_STREAM != 0 => return None,
                Ok(Some((flags, payload))) => {
                    let payload = if flags & FLAG_COMPRESSED != 0 {
                        if !compressed {
                            state.done = true;
                            return Some((
                                Err(Status::internal(
                                    "protocol error: compressed message without an encoding",
                                )),
                                state,
                            ));
                        }
                        gunzip(&payload, limits)
                    } else {
                        Ok(payload)
                    };
                    let item = payload
                        .and_then(|payload| to_binary(method, codec, &payload, limits))
                        .map(|binary| Frame::data(envelope::encode(0, &binary)));
                    state.done = item.is_err();
                    return Some((item, state));
                }
                Ok(None) => {}
                Err(err) => {
                    state.done = true;
                    return Some((Err(Status::resource_exhausted(err.to_string())), state));
                }
            }
            match state.body.next().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        state.decoder.push(data);
                    }
                }
                Some(Err(err)) => {
                    state.done = true;
                    return Some((Err(reading_failed(&err)), state));
                }
                None => {
                    state.done = true;
                    return match state.decoder.finish() {
                        Ok(()) => None,
                        Err(err) => Some((Err(Status::invalid_argument(err.to_string())), state)),
                    };
                }
            }
        }
    })
}

/// gRPC frames and trailers of the response → Connect envelopes, ending with exactly one
/// end-of-stream envelope.
fn response_envelopes(
    body: tonic::body::Body,
    method: &'static Method,
    codec: Codec,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    struct State {
        body: BodyStream<tonic::body::Body>,
        decoder: Decoder,
        done: bool,
    }
    let state = State {
        body: BodyStream::new(body),
        decoder: Decoder::new(MAX_RESPONSE_BYTES),
        done: false,
    };
    stream::unfold(state, move |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            match state.decoder.next_frame() {
                Ok(Some((_, message))) => {
                    let item = match from_binary(method, codec, message) {
                        Ok(out) => envelope::encode(0, &out),
                        Err(status) => {
                            state.done = true;
                            end_stream(codec, &status)
                        }
                    };
                    return Some((Ok(item), state));
                }
                Ok(None) => {}
                Err(err) => {
                    state.done = true;
                    return Some((
                        Ok(end_stream(codec, &Status::internal(err.to_string()))),
                        state,
                    ));
                }
            }
            let status = match state.body.next().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        state.decoder.push(&data);
                        continue;
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            let status = Status::from_header_map(&trailers).unwrap_or_else(|| {
                                Status::unknown("stream ended without a status")
                            });
                            state.done = true;
                            return Some((Ok(end_stream_with(&status, &trailers)), state));
                        }
                        Err(_) => continue,
                    },
                },
                Some(Err(err)) => Status::from_error(err.into()),
                None => Status::unknown("stream ended without a status"),
            };
            state.done = true;
            return Some((Ok(end_stream(codec, &status)), state));
        }
    })
}

async fn call(
    grpc: GrpcService,
    request: Request<tonic::body::Body>,
) -> Response<tonic::body::Body> {
    use tower::ServiceExt;
    match grpc.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

fn to_binary(
    method: &Method,
    codec: Codec,
    payload: &[u8],
    limits: MessageLimits,
) -> Result<Vec<u8>, Status> {
    match codec {
        Codec::Proto => Ok(payload.to_vec()),
        Codec::Json => {
            if crate::limits::json_nesting(payload) > limits.max_json_nesting {
                return Err(Status::invalid_argument(format!(
                    "unmarshal request: JSON nested deeper than {} levels",
                    limits.max_json_nesting
                )));
            }
            (method.request_from_json)(payload)
                .map_err(|err| Status::invalid_argument(format!("unmarshal request: {err}")))
        }
    }
}

/// The request body failed: a stall (`--body-idle-timeout-secs`) is `deadline_exceeded`,
/// anything else (the client went away) `canceled`.
fn reading_failed(err: &(dyn std::error::Error + 'static)) -> Status {
    match crate::error::Error::reading_body(err) {
        stalled @ crate::error::Error::TimedOut(_) => Status::from(stalled),
        _ => Status::cancelled(format!("reading request: {err}")),
    }
}

fn too_large(limits: MessageLimits) -> Status {
    Status::resource_exhausted(format!("message exceeds {} bytes", limits.max_bytes))
}

fn from_binary(method: &Method, codec: Codec, message: Bytes) -> Result<Vec<u8>, Status> {
    match codec {
        Codec::Proto => Ok(message.to_vec()),
        Codec::Json => (method.response_to_json)(&message)
            .map_err(|err| Status::internal(format!("marshal response: {err}"))),
    }
}

fn decompress(
    encoding: Option<&HeaderValue>,
    payload: Bytes,
    limits: MessageLimits,
) -> Result<Bytes, Status> {
    match encoding.map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase()) {
        None => Ok(payload),
        Some(e) if e.is_empty() || e == "identity" => Ok(payload),
        Some(e) if e == "gzip" => gunzip(&payload, limits),
        Some(other) => Err(Status::unimplemented(format!(
            "unknown compression {other:?}: supported encodings are gzip, identity"
        ))),
    }
}

fn stream_encoding(encoding: Option<&HeaderValue>) -> Result<bool, Status> {
    match encoding.map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(e) if e.is_empty() || e == "identity" => Ok(false),
        Some(e) if e == "gzip" => Ok(true),
        Some(other) => Err(Status::unimplemented(format!(
            "unknown compression {other:?}: supported encodings are gzip, identity"
        ))),
    }
}

fn gunzip(payload: &[u8], limits: MessageLimits) -> Result<Bytes, Status> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(payload)
        .take(limits.max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|err| Status::invalid_argument(format!("decompressing message: {err}")))?;
    if out.len() > limits.max_bytes {
        return Err(too_large(limits));
    }
    Ok(out.into())
}

/// Connect's name for a code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status the Connect protocol gives a code on unary calls.
pub fn http_status(code: Code) -> StatusCode {
    let status = match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::PermissionDenied => 403,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::Unauthenticated => 401,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    };
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// `{"code": "...", "message": "..."}` (message omitted when empty).
fn error_json(status: &Status) -> serde_json::Value {
    let mut error = serde_json::json!({ "code": code_name(status.code()) });
    if !status.message().is_empty() {
        error["message"] = serde_json::Value::from(status.message());
    }
    error
}

/// A unary Connect error response.
pub fn unary_error(status: &Status) -> Response<Body> {
    let body = serde_json::to_vec(&error_json(status)).unwrap_or_default();
    Response::builder()
        .status(http_status(status.code()))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "building response"))
}

/// The end-of-stream envelope: `{}` after success, `{"error": {...}}` after a failure.
fn end_stream(_codec: Codec, status: &Status) -> Bytes {
    end_stream_with(status, &HeaderMap::new())
}

/// [`end_stream`] carrying the call's trailers as `metadata` (`{"name": ["value"]}`). The
/// end-of-stream message is JSON in both codecs (Connect protocol).
fn end_stream_with(status: &Status, trailers: &HeaderMap) -> Bytes {
    let mut json = if status.code() == Code::Ok {
        serde_json::json!({})
    } else {
        serde_json::json!({ "error": error_json(status) })
    };
    let mut metadata = serde_json::Map::new();
    for (name, value) in trailers {
        if name.as_str().starts_with("grpc-") {
            continue;
        }
        if let Ok(value) = value.to_str() {
            let values = metadata
                .entry(name.as_str().to_owned())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let serde_json::Value::Array(values) = values {
                values.push(serde_json::Value::from(value));
            }
        }
    }
    if !metadata.is_empty() {
        json["metadata"] = serde_json::Value::Object(metadata);
    }
    envelope::encode(
        FLAG_END_STREAM,
        &serde_json::to_vec(&json).unwrap_or_default(),
    )
}

/// A streaming response that only carries an error.
pub fn stream_error_response(codec: Codec, status: &Status) -> Response<Body> {
    stream_response(codec, stream::iter([Ok(end_stream(codec, status))]))
}

fn stream_response(
    codec: Codec,
    envelopes: impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response<Body> {
    let content_type = match codec {
        Codec::Json => "application/connect+json",
        Codec::Proto => "application/connect+proto",
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(envelopes))
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "building response"))
}

fn plain(status: StatusCode, message: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(
            Shape::from_content_type("application/json; charset=utf-8"),
            Some(Shape::Unary(Codec::Json))
        );
        assert_eq!(
            Shape::from_content_type("application/proto"),
            Some(Shape::Unary(Codec::Proto))
        );
        assert_eq!(
            Shape::from_content_type("Application/Connect+JSON"),
            Some(Shape::Stream(Codec::Json))
        );
        assert_eq!(
            Shape::from_content_type("application/connect+proto"),
            Some(Shape::Stream(Codec::Proto))
        );
        assert_eq!(Shape::from_content_type("application/grpc"), None);
        assert_eq!(Shape::from_content_type("multipart/form-data"), None);
    }

    #[test]
    fn timeouts_translate_and_garbage_is_refused() {
        let mut headers = HeaderMap::new();
        assert_eq!(timeout_header(&headers).expect("absent"), None);
        headers.insert("connect-timeout-ms", HeaderValue::from_static("60000"));
        assert_eq!(
            timeout_header(&headers).expect("ok"),
            Some(HeaderValue::from_static("60000m"))
        );
        headers.insert("connect-timeout-ms", HeaderValue::from_static("9999999999"));
        assert_eq!(
            timeout_header(&headers).expect("ok"),
            Some(HeaderValue::from_static("10000000S"))
        );
        for bad in ["", "12a", "-5", "12345678901"] {
            headers.insert(
                "connect-timeout-ms",
                HeaderValue::from_str(bad).expect("value"),
            );
            let status = timeout_header(&headers).expect_err(bad);
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn codes_map_to_the_connect_table() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::Unimplemented),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(http_status(Code::Cancelled).as_u16(), 499);
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(code_name(Code::Cancelled), "canceled");
        let end = end_stream(Codec::Json, &Status::not_found("nope"));
        assert_eq!(end[0], FLAG_END_STREAM);
        let json: serde_json::Value = serde_json::from_slice(&end[5..]).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"error":{"code":"not_found","message":"nope"}})
        );
    }
}
