//! The `process.Process` service. Registered so every protocol routes to it; its methods
//! answer `unimplemented` until the process core lands.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::process::{self as pb, process_server::Process};

/// The process RPCs.
#[derive(Debug, Clone, Default)]
pub struct ProcessService;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unavailable<T>() -> Result<T, Status> {
    Err(Status::unimplemented(
        "process management is not available in this build",
    ))
}

#[tonic::async_trait]
impl Process for ProcessService {
    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        unavailable()
    }

    type ConnectStream = EventStream<pb::ConnectResponse>;

    async fn connect(
        &self,
        _: Request<pb::ConnectRequest>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        unavailable()
    }

    type StartStream = EventStream<pb::StartResponse>;

    async fn start(
        &self,
        _: Request<pb::StartRequest>,
    ) -> Result<Response<Self::StartStream>, Status> {
        unavailable()
    }

    async fn update(
        &self,
        _: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        unavailable()
    }

    async fn stream_input(
        &self,
        _: Request<Streaming<pb::StreamInputRequest>>,
    ) -> Result<Response<pb::StreamInputResponse>, Status> {
        unavailable()
    }

    async fn send_input(
        &self,
        _: Request<pb::SendInputRequest>,
    ) -> Result<Response<pb::SendInputResponse>, Status> {
        unavailable()
    }

    async fn send_signal(
        &self,
        _: Request<pb::SendSignalRequest>,
    ) -> Result<Response<pb::SendSignalResponse>, Status> {
        unavailable()
    }

    async fn close_stdin(
        &self,
        _: Request<pb::CloseStdinRequest>,
    ) -> Result<Response<pb::CloseStdinResponse>, Status> {
        unavailable()
    }
}
