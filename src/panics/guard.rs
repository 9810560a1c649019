//! The guard: a tower service around a stack whose handler future, or whose response body,
//! may panic. A panic before the response is answered with [`Answer::handler_panicked`];
//! a panic while the body streams ends the body with [`Answer::body_panicked`].

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::IntoResponse;
use bytes::Bytes;
use futures_util::future::{BoxFuture, poll_fn};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};

use crate::error::Error;
use crate::panics::catching;

/// Error type the bodies of both stacks convert into.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a protocol stack answers a panic.
pub trait Answer: Send + Sync + 'static {
    /// The stack's response body.
    type Body: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static;

    /// The response when the handler panicked before answering. Logs `detail` once.
    fn handler_panicked(detail: String) -> Response<Self::Body>;

    /// The last frame of a body that panicked: an error, or a final status. Logs `detail`
    /// once.
    fn body_panicked(detail: String) -> Result<Frame<Bytes>, <Self::Body as Body>::Error>;

    /// Boxes any body into the stack's body type.
    fn boxed<B>(body: B) -> Self::Body
    where
        B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;
}

/// The REST stack (and anything the RPC guard did not catch): envd's JSON 500.
#[derive(Debug)]
pub struct Rest;

impl Answer for Rest {
    type Body = axum::body::Body;

    fn handler_panicked(detail: String) -> Response<Self::Body> {
        Error::Internal(format!("request handler {detail}")).into_response()
    }

    fn body_panicked(detail: String) -> Result<Frame<Bytes>, axum::Error> {
        // The status line is gone: all the client can be told is that the body broke off.
        tracing::error!(detail = %format!("response body {detail}"), "internal error");
        Err(axum::Error::new(std::io::Error::other(
            "internal error while sending the response",
        )))
    }

    fn boxed<B>(body: B) -> Self::Body
    where
        B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
    {
        axum::body::Body::new(body)
    }
}

/// The RPC stack: an `internal` gRPC status, which tonic-web and the Connect layer
/// translate into their own error forms.
#[derive(Debug)]
pub struct Grpc;

impl Answer for Grpc {
    type Body = tonic::body::Body;

    fn handler_panicked(detail: String) -> Response<Self::Body> {
        tonic::Status::from(Error::Internal(format!("RPC handler {detail}"))).into_http()
    }

    fn body_panicked(detail: String) -> Result<Frame<Bytes>, tonic::Status> {
        let status = tonic::Status::from(Error::Internal(format!("RPC stream {detail}")));
        let mut trailers = HeaderMap::new();
        status.add_header(&mut trailers)?;
        Ok(Frame::trailers(trailers))
    }

    fn boxed<B>(body: B) -> Self::Body
    where
        B: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static,
    {
        tonic::body::Body::new(body)
    }
}

/// Guards `inner`, answering panics the way `P` does.
pub struct CatchPanic<S, P> {
    inner: S,
    answer: PhantomData<fn() -> P>,
}

impl<S, P> CatchPanic<S, P> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        CatchPanic {
            inner,
            answer: PhantomData,
        }
    }
}

impl<S: Clone, P> Clone for CatchPanic<S, P> {
    fn clone(&self) -> Self {
        CatchPanic::new(self.inner.clone())
    }
}

impl<S, P, B> tower::Service<Request<B>> for CatchPanic<S, P>
where
    S: tower::Service<Request<B>, Response = Response<P::Body>, Error = Infallible>,
    S::Future: Send + 'static,
    P: Answer,
{
    type Response = Response<P::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<P::Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let future = match catching(|| self.inner.call(request)) {
            Ok(future) => future,
            Err(detail) => return Box::pin(std::future::ready(Ok(P::handler_panicked(detail)))),
        };
        let mut future = Box::pin(future);
        Box::pin(async move {
            let outcome = poll_fn(|cx| match catching(|| future.as_mut().poll(cx)) {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
                Err(detail) => Poll::Ready(Err(detail)),
            })
            .await;
            Ok(match outcome {
                Ok(Ok(response)) => response.map(|body| P::boxed(GuardedBody::<P>::new(body))),
                Ok(Err(never)) => match never {},
                Err(detail) => P::handler_panicked(detail),
            })
        })
    }
}

/// A response body whose panics end it with [`Answer::body_panicked`].
pub struct GuardedBody<P: Answer> {
    inner: P::Body,
    /// Set once the body panicked: it is never polled again.
    broken: bool,
}

impl<P: Answer> GuardedBody<P> {
    fn new(inner: P::Body) -> Self {
        GuardedBody {
            inner,
            broken: false,
        }
    }
}

impl<P: Answer> Body for GuardedBody<P> {
    type Data = Bytes;
    type Error = <P::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.broken {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        match catching(|| Pin::new(&mut this.inner).poll_frame(cx)) {
            Ok(poll) => poll,
            Err(detail) => {
                this.broken = true;
                Poll::Ready(Some(P::body_panicked(detail)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.broken || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
