//! Fault injection for the panic tests, compiled into debug builds only (`cargo build
//! --release` leaves this module out, so no client of a release binary can reach it) and
//! off unless the daemon is started with `ENVD_FAULT_INJECTION=1`.
//!
//! With both, a request carrying `x-envd-fault: panic` panics in its handler's future, and
//! one carrying `x-envd-fault: panic-body` panics when its response body is first polled,
//! after the response head exists. The injection sits inside the guards, where a handler
//! would panic: the REST one around the router, the RPC one in front of the services.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};

use crate::panics::guard::Answer;

/// The environment variable that turns injection on (value `1`).
pub const FAULT_ENV: &str = "ENVD_FAULT_INJECTION";
/// The request header that asks for a fault.
pub const FAULT_HEADER: &str = "x-envd-fault";

/// True when the daemon was started with [`FAULT_ENV`] set to `1`.
pub fn enabled() -> bool {
    std::env::var_os(FAULT_ENV).is_some_and(|value| value == "1")
}

/// Injects faults into `inner` when asked, for the paths `scope` accepts.
pub struct Faults<S, P> {
    inner: S,
    /// Which request paths this layer injects into (the REST layer leaves RPCs to the RPC
    /// layer, so that each guard is exercised).
    scope: fn(&str) -> bool,
    answer: PhantomData<fn() -> P>,
}

impl<S, P> Faults<S, P> {
    /// Wraps `inner`.
    pub fn new(inner: S, scope: fn(&str) -> bool) -> Self {
        Faults {
            inner,
            scope,
            answer: PhantomData,
        }
    }
}

impl<S: Clone, P> Clone for Faults<S, P> {
    fn clone(&self) -> Self {
        Faults::new(self.inner.clone(), self.scope)
    }
}

impl<S, P, B> tower::Service<Request<B>> for Faults<S, P>
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
        let fault = request
            .headers()
            .get(FAULT_HEADER)
            .filter(|_| (self.scope)(request.uri().path()))
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let future = self.inner.call(request);
        Box::pin(async move {
            match fault.as_deref() {
                Some("panic") => panic!("injected fault: handler"),
                Some("panic-body") => {
                    let response = future.await?;
                    Ok(response.map(|_| P::boxed(PanickingBody)))
                }
                _ => future.await,
            }
        })
    }
}

/// A body that panics when polled.
struct PanickingBody;

impl Body for PanickingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        panic!("injected fault: response body")
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
