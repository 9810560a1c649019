//! The `process.Process` service: thin adapters from protobuf to the process core and back.
//! Event streams are fed by one producer task per stream through a bounded channel; a
//! failed send means the client left (the process keeps running).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::process::output::{Ended, Event, Stream as OutputStream, Subscription};
use crate::process::registry::{Config, Found, Process, ProcessTable, Selector};
use crate::process::spawn::Spec;
use crate::proto::process::{self as pb, process_event, process_server::Process as ProcessRpc};
use crate::rpc::keepalive_interval;
use crate::rpc::lifetime::parse_grpc_timeout;
use crate::rpc::trailers::ExtraTrailers;
use crate::state::AppState;

/// Events buffered between a stream's producer and the client.
const STREAM_BUFFER: usize = 16;

/// The process RPCs.
#[derive(Clone)]
pub struct ProcessService {
    state: AppState,
    table: Arc<ProcessTable>,
}

impl ProcessService {
    /// A service over the shared state and process table.
    pub fn new(state: AppState, table: Arc<ProcessTable>) -> Self {
        ProcessService { state, table }
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn selector(selector: Option<pb::ProcessSelector>) -> Result<Selector, Status> {
    match selector.and_then(|s| s.selector) {
        Some(pb::process_selector::Selector::Pid(pid)) => Ok(Selector::Pid(pid)),
        Some(pb::process_selector::Selector::Tag(tag)) => Ok(Selector::Tag(tag)),
        None => Err(Status::invalid_argument(
            "a process selector (pid or tag) is required",
        )),
    }
}

fn event(event: process_event::Event) -> pb::ProcessEvent {
    pb::ProcessEvent { event: Some(event) }
}

/// The trailer that says why a process ended (`exit`, `deadline` or `signal`): clients
/// read it from gRPC trailers or the Connect end-of-stream `metadata`.
pub const END_REASON_TRAILER: &str = "envd-end-reason";

fn end_event(ended: Ended) -> pb::ProcessEvent {
    event(process_event::Event::End(ended.exit.into()))
}

fn data_event(stream: OutputStream, data: bytes::Bytes) -> pb::ProcessEvent {
    use process_event::data_event::Output;
    let output = match stream {
        OutputStream::Stdout => Output::Stdout(data.to_vec()),
        OutputStream::Stderr => Output::Stderr(data.to_vec()),
        OutputStream::Pty => Output::Pty(data.to_vec()),
    };
    event(process_event::Event::Data(process_event::DataEvent {
        output: Some(output),
    }))
}

/// Streams `start`, then output and keepalives, then the end, wrapping each event with
/// `wrap` (StartResponse or ConnectResponse).
fn event_stream<T: Send + 'static>(
    pid: u32,
    source: Result<Subscription, Ended>,
    keepalive: Duration,
    wrap: fn(pb::ProcessEvent) -> T,
) -> Response<EventStream<T>> {
    let trailers = ExtraTrailers::default();
    let end_trailers = trailers.clone();
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(STREAM_BUFFER);
    tokio::spawn(async move {
        let start = event(process_event::Event::Start(process_event::StartEvent {
            pid,
        }));
        if tx.send(Ok(wrap(start))).await.is_err() {
            return;
        }
        let mut subscription = match source {
            Ok(subscription) => subscription,
            Err(ended) => {
                end_trailers.insert(END_REASON_TRAILER, ended.reason.as_str());
                let _ = tx.send(Ok(wrap(end_event(ended)))).await;
                return;
            }
        };
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        loop {
            let message = tokio::select! {
                next = subscription.next() => match next {
                    Event::Data(chunk) => {
                        ticker.reset();
                        Ok(wrap(data_event(chunk.stream, chunk.data)))
                    }
                                        Event::End(ended) => {
                        end_trailers.insert(END_REASON_TRAILER, ended.reason.as_str());
                        let _ = tx.send(Ok(wrap(end_event(ended)))).await;
                        return;
                    }
                    Event::Evicted => Err(Status::resource_exhausted(
                        "this client fell too far behind the process output and was dropped; reconnect to resume",
                    )),
                },
                _ = ticker.tick() => Ok(wrap(event(process_event::Event::Keepalive(process_event::KeepAlive {})))),
                () = tx.closed() => return,
            };
            let last = message.is_err();
            if tx.send(message).await.is_err() || last {
                return;
            }
        }
    });
    let stream: EventStream<T> = Box::pin(ReceiverStream::new(rx));
    let mut response = Response::new(stream);
    response.extensions_mut().insert(trailers);
    response
}

#[tonic::async_trait]
impl ProcessRpc for ProcessService {
    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let processes = self
            .table
            .list()
            .into_iter()
            .map(|p| pb::ProcessInfo {
                config: Some((&p.config).into()),
                pid: p.pid,
                tag: p.tag.clone(),
            })
            .collect();
        Ok(Response::new(pb::ListResponse { processes }))
    }

    type ConnectStream = EventStream<pb::ConnectResponse>;

    async fn connect(
        &self,
        request: Request<pb::ConnectRequest>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let keepalive = keepalive_interval(request.metadata());
        let selector = selector(request.into_inner().process)?;
        let (pid, source) = match self.table.find(&selector)? {
            Found::Live(process) => (process.pid, process.subscribe()),
            Found::Ended(pid, ended) => (pid, Err(ended)),
        };
        let wrap = |event| pb::ConnectResponse { event: Some(event) };
        Ok(event_stream(pid, source, keepalive, wrap))
    }

    type StartStream = EventStream<pb::StartResponse>;

    async fn start(
        &self,
        request: Request<pb::StartRequest>,
    ) -> Result<Response<Self::StartStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec());
        let requester = self.state.identity.for_rpc(authorization.as_deref())?;
        let keepalive = keepalive_interval(request.metadata());
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|_| parse_grpc_timeout(request.metadata().as_ref()))
            .filter(|limit| !limit.is_zero());
        let pb::StartRequest {
            process,
            pty,
            tag,
            stdin,
        } = request.into_inner();
        let process =
            process.ok_or_else(|| Status::invalid_argument("process config is required"))?;
        let size = pty.map(|pty| {
            let size = pty.size.unwrap_or_default();
            (clamp_u16(size.cols), clamp_u16(size.rows))
        });
        let config = Config {
            cmd: process.cmd.clone(),
            args: process.args.clone(),
            envs: process.envs.clone().into_iter().collect(),
            cwd: process.cwd.clone(),
        };
        let cwd = requester.resolve(process.cwd.as_deref().unwrap_or(""))?;
        let spec = Spec {
            cmd: process.cmd,
            args: process.args,
            envs: config.envs.clone(),
            base_env: self.state.env.snapshot(),
            cwd,
            user: requester.user,
            pty: size,
            stdin: stdin.unwrap_or(true),
        };
        // The keeper checks the working directory (and says so if it is missing): no trip
        // to the blocking pool on the way to a start.
        let (process, subscription) = self.table.start(&spec, config, tag, deadline).await?;
        let wrap = |event| pb::StartResponse { event: Some(event) };
        Ok(event_stream(process.pid, Ok(subscription), keepalive, wrap))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateResponse>, Status> {
        let pb::UpdateRequest { process, pty } = request.into_inner();
        let process = self.table.live(&selector(process)?)?;
        if let Some(pty) = pty {
            let size = pty.size.unwrap_or_default();
            process
                .resize(clamp_u16(size.cols), clamp_u16(size.rows))
                .await?;
        }
        Ok(Response::new(pb::UpdateResponse {}))
    }

    async fn stream_input(
        &self,
        request: Request<Streaming<pb::StreamInputRequest>>,
    ) -> Result<Response<pb::StreamInputResponse>, Status> {
        use pb::stream_input_request::Event as InputEvent;
        let mut messages = request.into_inner();
        let mut target: Option<Arc<Process>> = None;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|status| {
                Status::unknown(format!("error streaming input: {}", status.message()))
            })?;
            match message.event {
                Some(InputEvent::Start(start)) => {
                    target = Some(self.table.live(&selector(start.process)?)?)
                }
                Some(InputEvent::Data(data)) => {
                    let process = target.as_ref().ok_or_else(|| {
                        Status::failed_precondition(
                            "input arrived before the start message that selects the process",
                        )
                    })?;
                    write_input(process, data.input).await?;
                }
                Some(InputEvent::Keepalive(_)) | None => {}
            }
        }
        Ok(Response::new(pb::StreamInputResponse {}))
    }

    async fn send_input(
        &self,
        request: Request<pb::SendInputRequest>,
    ) -> Result<Response<pb::SendInputResponse>, Status> {
        let pb::SendInputRequest { process, input } = request.into_inner();
        let process = self.table.live(&selector(process)?)?;
        write_input(&process, input).await?;
        Ok(Response::new(pb::SendInputResponse {}))
    }

    async fn send_signal(
        &self,
        request: Request<pb::SendSignalRequest>,
    ) -> Result<Response<pb::SendSignalResponse>, Status> {
        let pb::SendSignalRequest { process, signal } = request.into_inner();
        let signal = match pb::Signal::try_from(signal) {
            Ok(pb::Signal::Sigkill) => Signal::SIGKILL,
            Ok(pb::Signal::Sigterm) => Signal::SIGTERM,
            _ => return Err(Status::unimplemented(format!("invalid signal: {signal}"))),
        };
        self.table.live(&selector(process)?)?.signal(signal);
        Ok(Response::new(pb::SendSignalResponse {}))
    }

    async fn close_stdin(
        &self,
        request: Request<pb::CloseStdinRequest>,
    ) -> Result<Response<pb::CloseStdinResponse>, Status> {
        let process = self.table.live(&selector(request.into_inner().process)?)?;
        process.close_stdin().await?;
        Ok(Response::new(pb::CloseStdinResponse {}))
    }
}

async fn write_input(process: &Process, input: Option<pb::ProcessInput>) -> Result<(), Status> {
    match input.and_then(|i| i.input) {
        Some(pb::process_input::Input::Stdin(data)) => Ok(process.write_stdin(&data).await?),
        Some(pb::process_input::Input::Pty(data)) => Ok(process.write_pty(&data).await?),
        None => Err(Status::unimplemented("input must be stdin or pty bytes")),
    }
}

fn clamp_u16(value: u32) -> u16 {
    u16::try_from(value).unwrap_or(u16::MAX)
}
