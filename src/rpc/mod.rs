//! RPC: the tonic services (each RPC implemented once) and the protocol layers in front of
//! them. gRPC reaches the services directly; gRPC-Web (tonic-web) and Connect
//! ([`connect`]) are translations into gRPC. Every protocol passes through [`access`], the
//! access-token gate, and [`lifetime`], which applies the call's deadline and the daemon's
//! shutdown. A panic anywhere behind that point is caught by the RPC guard
//! ([`crate::panics`]) and becomes an `internal` status in the call's own protocol.

pub mod access;
pub mod codec;
pub mod connect;
pub mod convert;
pub mod envelope;
pub mod ext_metadata;
pub mod ext_processes;
pub mod filesystem;
pub mod lifetime;
pub mod process;
pub mod reflection;
pub mod trailers;

use std::convert::Infallible;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{Request, StatusCode, header};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::error::Error;
use crate::panics::guard::{CatchPanic, Grpc};
use crate::proto::envd_ext::metadata_server::MetadataServer;
use crate::proto::envd_ext::processes_server::ProcessesServer;
use crate::proto::{
    filesystem::filesystem_server::FilesystemServer, process::process_server::ProcessServer,
};
use crate::state::AppState;

/// The gRPC core every protocol ends in.
pub type GrpcService =
    BoxCloneSyncService<Request<tonic::body::Body>, http::Response<tonic::body::Body>, Infallible>;

/// Runs blocking core work off the async runtime.
///
/// # Errors
/// The work's own error, or [`Error::Internal`] if it panicked.
pub async fn blocking<T, F>(work: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}

/// Keepalive interval when the client asks for none (or for nonsense), as envd.
pub const DEFAULT_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(90);

/// `Keepalive-Ping-Interval` in seconds; anything but a positive integer means
/// [`DEFAULT_KEEPALIVE`] (envd panics on zero or less).
pub fn keepalive_interval(metadata: &tonic::metadata::MetadataMap) -> std::time::Duration {
    metadata
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|seconds| *seconds > 0)
        .map_or(DEFAULT_KEEPALIVE, std::time::Duration::from_secs)
}

/// The RPC side of the server: routes by protocol to the one set of services.
#[derive(Clone)]
pub struct Rpc {
    grpc: GrpcService,
    /// Bounds on request messages, for the Connect layer (tonic applies the same size
    /// limit to gRPC and gRPC-Web itself).
    limits: connect::MessageLimits,
}

impl Rpc {
    /// Builds the services (filesystem, process, reflection) over the shared state.
    /// Reflection is built on its first call ([`reflection`]).
    pub fn new(state: AppState) -> Self {
        let table = state.processes.clone();
        let max_message = state.config.limits.max_message_bytes;
        let routes = tonic::service::Routes::new(
            FilesystemServer::new(filesystem::FilesystemService::new(state.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            ProcessServer::new(process::ProcessService::new(state.clone(), table.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            MetadataServer::new(ext_metadata::MetadataExt::new(state.clone()))
                .max_decoding_message_size(max_message),
        )
        .add_service(
            ProcessesServer::new(ext_processes::ProcessesExt::new(
                table,
                state.config.max_process_timeout,
            ))
            .max_decoding_message_size(max_message),
        )
        .add_service(reflection::v1())
        .add_service(reflection::v1alpha());
        let services = GrpcService::new(routes);
        let shutdown = state.shutdown.clone();
        let tokens = state.access.clone();
        let grpc = tower::service_fn(move |request: Request<tonic::body::Body>| {
            let services = services.clone();
            let shutdown = shutdown.clone();
            // Every protocol passes here, so one check gates every RPC.
            let refusal = access::refusal(&tokens, &request);
            async move {
                if let Some(refusal) = refusal {
                    return Ok(refusal);
                }
                Ok::<_, Infallible>(lifetime::call(services, request, shutdown).await)
            }
        });
        #[cfg(debug_assertions)]
        let grpc = GrpcService::new(grpc);
        #[cfg(debug_assertions)]
        let grpc = if crate::panics::fault::enabled() {
            GrpcService::new(crate::panics::fault::Faults::<_, Grpc>::new(grpc, |_| true))
        } else {
            grpc
        };
        Rpc {
            grpc: GrpcService::new(CatchPanic::<_, Grpc>::new(grpc)),
            limits: connect::MessageLimits::of(&state.config.limits),
        }
    }

    /// True when `path` names an RPC (`/package.Service/Method`), not a REST resource.
    pub fn is_rpc_path(path: &str) -> bool {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or("");
        let method = parts.next().unwrap_or("");
        service.contains('.') && !method.is_empty() && !method.contains('/')
    }

    /// True when the request of the RPC at `path` is a stream (client streaming, or the
    /// bidirectional reflection service): such a request body may legitimately be quiet
    /// for a long time, so it gets no idle timeout. False for REST paths.
    pub fn request_is_stream(path: &str) -> bool {
        Rpc::is_rpc_path(path)
            && codec::method(path).is_none_or(|method| method.kind == codec::Kind::ClientStream)
    }

    /// Serves one RPC request by whichever protocol its content type names.
    pub async fn serve(self, request: Request<Body>) -> Response {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("application/grpc-web") {
            let web = tonic_web::GrpcWebLayer::new().layer(self.grpc);
            return match web.oneshot(request).await {
                Ok(response) => response.map(Body::new),
                Err(never) => match never {},
            };
        }
        if content_type.starts_with("application/grpc") {
            return match self.grpc.oneshot(request.map(tonic::body::Body::new)).await {
                Ok(response) => response.map(Body::new),
                Err(never) => match never {},
            };
        }
        match connect::Shape::from_content_type(&content_type) {
            Some(shape) => connect::serve(self.grpc, request, shape, self.limits).await,
            None => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported content type for an RPC: use gRPC, gRPC-Web or Connect",
            )
                .into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_rpc_paths_from_rest_paths() {
        assert!(Rpc::is_rpc_path("/filesystem.Filesystem/Stat"));
        assert!(Rpc::is_rpc_path(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!Rpc::is_rpc_path("/files"));
        assert!(!Rpc::is_rpc_path("/health"));
        assert!(!Rpc::is_rpc_path("/filesystem.Filesystem/"));
        assert!(!Rpc::is_rpc_path("/a.b/c/d"));
    }

    #[test]
    fn only_client_streams_have_streaming_requests() {
        assert!(Rpc::request_is_stream("/process.Process/StreamInput"));
        assert!(Rpc::request_is_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        for path in [
            "/process.Process/Start",
            "/filesystem.Filesystem/Stat",
            "/filesystem.Filesystem/WatchDir",
            "/files",
            "/init",
        ] {
            assert!(!Rpc::request_is_stream(path), "{path}");
        }
    }
}
