//! Bounds every RPC, whatever protocol it arrived by: the `grpc-timeout` deadline (Connect's
//! `Connect-Timeout-Ms` is translated into it) and the daemon's shutdown. A call still
//! running when either fires ends cleanly with `deadline_exceeded` or `unavailable`: a
//! unary call gets the status instead of its response, a stream gets it as its trailers.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;
use tower::ServiceExt;

use crate::rpc::GrpcService;
use crate::rpc::trailers::ExtraTrailers;

/// Calls `inner` with the request's deadline and the daemon's shutdown applied.
pub async fn call(
    inner: GrpcService,
    request: Request<tonic::body::Body>,
    shutdown: CancellationToken,
) -> Response<tonic::body::Body> {
    let deadline = parse_grpc_timeout(request.headers()).map(|t| Instant::now() + t);
    let response = inner.oneshot(request);
    let mut cancelled = Box::pin(shutdown.clone().cancelled_owned());
    let response = match deadline {
        Some(deadline) => tokio::select! {
            response = response => response,
            () = tokio::time::sleep_until(deadline) => return status_response(deadline_status()),
            () = &mut cancelled => return status_response(shutdown_status()),
        },
        None => tokio::select! {
            response = response => response,
            () = &mut cancelled => return status_response(shutdown_status()),
        },
    };
    let response = match response {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let extra = response.extensions().get::<ExtraTrailers>().cloned();
    response.map(|body| {
        tonic::body::Body::new(Bounded {
            inner: body,
            extra,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            shutdown: cancelled,
            finished: false,
        })
    })
}

fn deadline_status() -> Status {
    Status::deadline_exceeded("deadline exceeded")
}

fn shutdown_status() -> Status {
    Status::unavailable("envd is shutting down")
}

fn status_response(status: Status) -> Response<tonic::body::Body> {
    status.into_http()
}

/// Parses gRPC's `grpc-timeout` (`<digits><unit>`, at most 8 digits).
pub fn parse_grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// A response body that ends with a status trailer when the deadline or shutdown fires.
struct Bounded {
    inner: tonic::body::Body,
    /// Trailers the handler adds to its final status.
    extra: Option<ExtraTrailers>,
    deadline: Option<Pin<Box<Sleep>>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    finished: bool,
}

impl HttpBody for Bounded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if frame.is_none() {
                self.finished = true;
            }
            let extra = self.extra.clone();
            return Poll::Ready(frame.map(|frame| {
                frame.map(|frame| match (extra, frame.is_trailers()) {
                    (Some(extra), true) => match frame.into_trailers() {
                        Ok(mut trailers) => {
                            trailers.extend(extra.take());
                            Frame::trailers(trailers)
                        }
                        Err(frame) => frame,
                    },
                    _ => frame,
                })
            }));
        }
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|deadline| deadline.poll_unpin(cx).is_ready());
        let status = if expired {
            deadline_status()
        } else if self.shutdown.poll_unpin(cx).is_ready() {
            shutdown_status()
        } else {
            return Poll::Pending;
        };
        self.finished = true;
        let mut trailers = HeaderMap::new();
        if let Err(err) = status.add_header(&mut trailers) {
            tracing::warn!(%err, "encoding a status trailer");
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut headers = HeaderMap::new();
        for (text, want) in [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5u", Some(Duration::from_micros(5))),
            ("123456789m", None),
            ("m", None),
            ("10x", None),
        ] {
            headers.insert("grpc-timeout", text.parse().expect("value"));
            assert_eq!(parse_grpc_timeout(&headers), want, "{text}");
        }
    }
}
