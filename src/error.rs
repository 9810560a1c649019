//! The core error enum, and the only place where it becomes an HTTP status or an RPC code.
//!
//! Errors are built at the point of failure with the operation and the path in their
//! message. Client-caused errors carry that message to the client; [`Error::Internal`]
//! carries a generic one and its detail is logged once, here, when it is converted.

use std::io;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// Everything the core can fail with. The variant decides the wire status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed or names something unusable.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named entry (file, directory, user, process) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The entry the request would create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state where the request can succeed (e.g. a symlink cycle).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request contradicts what the daemon has recorded, e.g. a patch sequence that was
    /// applied with another script. Retrying the same request can never succeed; the
    /// caller must change it.
    #[error("{0}")]
    Conflict(String),
    /// State the daemon keeps on disk is unreadable (a corrupt record). Not the client's
    /// fault and not a bug: the message names the file so an operator can repair it.
    #[error("{0}")]
    DataLoss(String),
    /// The caller could not be identified (unknown user, missing or wrong token).
    #[error("{0}")]
    Unauthenticated(String),
    /// The daemon lacks a privilege the operation needs, e.g. it does not run as root and
    /// was asked to give a file to another user. The message names what is missing.
    #[error("{0}")]
    PermissionDenied(String),
    /// No representation the client accepts can be produced (HTTP 406).
    #[error("{0}")]
    NotAcceptable(String),
    /// The disk, the inode table or the quota is full (HTTP 507).
    #[error("{0}")]
    InsufficientStorage(String),
    /// A limit of the daemon or the kernel is reached (too many watchers, a full queue).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The operation is not supported by this daemon (yet).
    #[error("{0}")]
    Unimplemented(String),
    /// The client took too long: its request body sent nothing for the configured time.
    #[error("{0}")]
    TimedOut(String),
    /// An operating-system error while doing what the client asked, e.g. EXDEV on a move.
    /// The message names the operation and path; the OS error text follows it.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and to which path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A bug or an unexpected state in the daemon itself. The detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

/// Result alias for the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An OS error while doing `context`. ENOSPC and EDQUOT become
    /// [`Error::InsufficientStorage`], so every caller gets 507 for a full disk; EMFILE and
    /// ENFILE become [`Error::ResourceExhausted`], so a client told "too many open files"
    /// knows to retry.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if is_no_space(&source) {
            return Error::InsufficientStorage(format!("{context}: {source}"));
        }
        if is_out_of_descriptors(&source) {
            return Error::ResourceExhausted(format!("{context}: {source}"));
        }
        Error::Io { context, source }
    }

    /// A failure reading a request body: [`Error::TimedOut`] when the body stalled (an
    /// [`io::ErrorKind::TimedOut`] anywhere in its source chain), else
    /// [`Error::InvalidArgument`].
    pub fn reading_body(err: &(dyn std::error::Error + 'static)) -> Self {
        if stalled(err) {
            Error::TimedOut(format!("error reading request body: {err}"))
        } else {
            Error::InvalidArgument(format!("error reading request body: {err}"))
        }
    }

    /// The HTTP status of this error on REST routes.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Error::InvalidArgument(_) | Error::FailedPrecondition(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::AlreadyExists(_) | Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Error::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Error::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            Error::DataLoss(_) | Error::Io { .. } | Error::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The RPC code of this error on gRPC, Connect and gRPC-Web.
    pub fn rpc_code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) | Error::NotAcceptable(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            // A conflict is "the thing at this key exists, and differs": `already_exists`
            // (HTTP 409 in Connect too). Not `aborted`, which tells clients to retry: the
            // same request would conflict again.
            Error::AlreadyExists(_) | Error::Conflict(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::InsufficientStorage(_) | Error::ResourceExhausted(_) => {
                tonic::Code::ResourceExhausted
            }
            Error::Unimplemented(_) => tonic::Code::Unimplemented,
            Error::DataLoss(_) => tonic::Code::DataLoss,
            Error::TimedOut(_) => tonic::Code::DeadlineExceeded,
            Error::Io { .. } | Error::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The message a client sees. Internal details are logged here instead.
    fn client_message(&self) -> String {
        if let Error::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
        self.to_string()
    }
}

/// True for "no space left on device" and "disk quota exceeded".
pub fn is_no_space(err: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(err.raw_os_error(), Some(code) if code == Errno::ENOSPC as i32 || code == Errno::EDQUOT as i32)
}

/// True when `err` or anything it wraps is an [`io::ErrorKind::TimedOut`] (an `io::Error`'s
/// own payload is not its `source()`, so it is looked into too).
fn stalled(err: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(io) = err.downcast_ref::<io::Error>() {
        if io.kind() == io::ErrorKind::TimedOut {
            return true;
        }
        if let Some(inner) = io.get_ref() {
            if stalled(inner) {
                return true;
            }
        }
    }
    err.source().is_some_and(stalled)
}

/// True for "too many open files" (the daemon's limit, EMFILE, or the system's, ENFILE).
pub fn is_out_of_descriptors(err: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(err.raw_os_error(), Some(code) if code == Errno::EMFILE as i32 || code == Errno::ENFILE as i32)
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.rpc_code(), err.client_message())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(err: tokio::task::JoinError) -> Self {
        Error::Internal(format!("blocking task failed: {err}"))
    }
}

/// The REST error body: `{"code": <http status>, "message": "..."}` and a newline, as envd
/// writes it.
#[derive(serde::Serialize)]
struct RestErrorBody<'a> {
    code: u16,
    message: &'a str,
}

/// Builds a REST error response with envd's JSON shape and headers.
pub fn rest_error(status: StatusCode, message: &str) -> Response {
    let mut body = serde_json::to_vec(&RestErrorBody {
        code: status.as_u16(),
        message,
    })
    .unwrap_or_default();
    body.push(b'\n');
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.http_status();
        rest_error(status, &self.client_message())
    }
}

impl Error {
    /// The error as a plain-text response: envd answers `/init` failures this way rather
    /// than with its JSON error shape. Same status as [`IntoResponse`].
    pub fn into_plain_response(self) -> Response {
        let status = self.http_status();
        let mut response = (status, format!("{}\n", self.client_message())).into_response();
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
    fn no_space_errors_become_507_and_resource_exhausted() {
        let err = Error::io(
            "writing /x",
            io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
        );
        assert_eq!(err.http_status(), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(err.rpc_code(), tonic::Code::ResourceExhausted);
        let err = Error::io(
            "writing /x",
            io::Error::from_raw_os_error(nix::errno::Errno::EDQUOT as i32),
        );
        assert_eq!(err.http_status(), StatusCode::INSUFFICIENT_STORAGE);
    }

    #[test]
    fn out_of_descriptors_is_resource_exhausted_and_stalls_are_timeouts() {
        let err = Error::io(
            "error opening file /x",
            io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32),
        );
        assert_eq!(err.http_status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.rpc_code(), tonic::Code::ResourceExhausted);
        assert!(
            err.to_string().starts_with("error opening file /x: "),
            "{err}"
        );

        let stalled = io::Error::new(io::ErrorKind::TimedOut, "request body sent nothing");
        let wrapped = axum::Error::new(stalled);
        let err = Error::reading_body(&wrapped);
        assert_eq!(err.http_status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(err.rpc_code(), tonic::Code::DeadlineExceeded);
        let err = Error::reading_body(&io::Error::other("connection reset"));
        assert_eq!(err.http_status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn internal_errors_hide_their_detail() {
        let status = tonic::Status::from(Error::Internal("secret detail".into()));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn every_variant_has_one_http_status_and_one_rpc_code() {
        let cases = [
            (
                Error::InvalidArgument("x".into()),
                400,
                tonic::Code::InvalidArgument,
            ),
            (Error::NotFound("x".into()), 404, tonic::Code::NotFound),
            (
                Error::Unauthenticated("x".into()),
                401,
                tonic::Code::Unauthenticated,
            ),
            (
                Error::PermissionDenied("x".into()),
                403,
                tonic::Code::PermissionDenied,
            ),
            (
                Error::NotAcceptable("x".into()),
                406,
                tonic::Code::InvalidArgument,
            ),
            (Error::Conflict("x".into()), 409, tonic::Code::AlreadyExists),
            (Error::DataLoss("x".into()), 500, tonic::Code::DataLoss),
            (Error::Internal("x".into()), 500, tonic::Code::Internal),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.http_status().as_u16(), status, "{err:?}");
            assert_eq!(err.rpc_code(), code, "{err:?}");
        }
    }

    #[test]
    fn plain_responses_keep_the_status() {
        let response =
            Error::Unauthenticated("access token validation failed".into()).into_plain_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }

    #[test]
    fn io_errors_name_the_operation() {
        let err = Error::io(
            "error renaming /a",
            io::Error::from_raw_os_error(nix::errno::Errno::EXDEV as i32),
        );
        assert_eq!(err.rpc_code(), tonic::Code::Internal);
        assert!(err.to_string().starts_with("error renaming /a: "));
    }
}
