//! gRPC server reflection (v1 and v1alpha), each built on its first call. Building one
//! decodes the whole descriptor set into messages and a symbol table, about 130 KiB of
//! heap per version; built at start, they were half of the idle daemon's heap for a service
//! that most sandboxes never see called (README, "Benchmark", `idle_rss`).

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::Request;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::{Service, ServiceExt};

/// What a reflection call returns.
pub type ReflectionFuture = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

/// What each reflection service is: a tonic service, built on its first call.
pub trait Reflection:
    Service<
        Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = ReflectionFuture,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Reflection for T where
    T: Service<
            Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future = ReflectionFuture,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The builder both versions start from: the daemon's descriptor set.
fn builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
}

/// The v1 reflection service.
pub fn v1() -> impl Reflection {
    Lazy::new(|| builder().build_v1())
}

/// The v1alpha reflection service (grpcurl and older clients).
pub fn v1alpha() -> impl Reflection {
    Lazy::new(|| builder().build_v1alpha())
}

type Built<S> = Result<S, String>;

/// A service built by `build` on its first call and shared by every clone after that.
struct Lazy<S, F> {
    service: Arc<OnceLock<Built<S>>>,
    build: F,
}

impl<S, F: Clone> Clone for Lazy<S, F> {
    fn clone(&self) -> Self {
        Lazy {
            service: self.service.clone(),
            build: self.build.clone(),
        }
    }
}

impl<S, F> Lazy<S, F>
where
    F: Fn() -> Result<S, tonic_reflection::server::Error>,
{
    fn new(build: F) -> Self {
        Lazy {
            service: Arc::new(OnceLock::new()),
            build,
        }
    }

    fn get(&self) -> &Built<S> {
        self.service
            .get_or_init(|| (self.build)().map_err(|err| err.to_string()))
    }
}

impl<S, F> Service<Request<Body>> for Lazy<S, F>
where
    S: Service<Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    F: Fn() -> Result<S, tonic_reflection::server::Error>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ReflectionFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The built services are always ready (tonic's generated servers are).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match self.get() {
            Ok(service) => Box::pin(service.clone().oneshot(request)),
            Err(err) => {
                // The embedded descriptor set does not decode: a build defect, which the
                // tests below catch. Logged on every call: only reflection is affected.
                tracing::error!(%err, "building the reflection service");
                let status = tonic::Status::internal("reflection is unavailable");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

impl<S: NamedService, F> NamedService for Lazy<S, F> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_descriptor_set_builds_both_versions() {
        builder().build_v1().expect("v1");
        builder().build_v1alpha().expect("v1alpha");
    }

    #[test]
    fn a_lazy_service_is_built_once_and_shared_by_its_clones() {
        let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = builds.clone();
        let lazy = Lazy::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, tonic_reflection::server::Error>(())
        });
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 0);
        let clone = lazy.clone();
        assert!(lazy.get().is_ok());
        assert!(clone.get().is_ok());
        assert_eq!(builds.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
