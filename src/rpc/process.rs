//! The `process.Process` service: thin adapters from protobuf to the process core and back.
//! Event streams read the process's output subscription as the client's connection polls
//! them; a client that leaves drops its stream (the process keeps running).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use nix::sys::signal::Signal;
use tonic::{Request, Response, Status, Streaming};

use crate::process::output::{Ended, Event, Stream as OutputStream, Subscription};
use crate::process::registry::{Config, Found, Process, ProcessTable, Selector};
use crate::process::spawn::Spec;
use crate::proto::process::{self as pb, process_event, process_server::Process as ProcessRpc};
use crate::rpc::keepalive_interval;
use crate::rpc::lifetime::parse_grpc_timeout;
use crate::rpc::trailers::ExtraTrailers;
use crate::state::AppState;

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
///
/// The stream reads the subscription itself, polled by the connection that sends it: no
/// task and no channel between the process's output and the client, so the end of a short
/// command reaches the client one wake-up after the keeper reports it. A client that
/// leaves drops the stream, and with it the subscription (the process keeps running).
fn event_stream<T: Send + 'static>(
    pid: u32,
    source: Result<Subscription, Ended>,
    keepalive: Duration,
    wrap: fn(pb::ProcessEvent) -> T,
) -> Response<EventStream<T>> {
    let trailers = ExtraTrailers::default();
    let state = (Next::Start(source), trailers.clone());
    let stream = futures_util::stream::unfold(state, move |(next, trailers)| async move {
        // The end goes out with its reason as a trailer, whether the process ended before
        // the stream began or while it ran.
        let end = |ended: Ended| {
            trailers.insert(END_REASON_TRAILER, ended.reason.as_str());
            (Ok(end_event(ended)), Next::Done)
        };
        let (message, next) = match next {
            Next::Start(source) => {
                let start = event(process_event::Event::Start(process_event::StartEvent {
                    pid,
                }));
                let next = match source {
                    Ok(subscription) => {
                        let first = tokio::time::Instant::now() + keepalive;
                        let ticker = tokio::time::interval_at(first, keepalive);
                        Next::Live(Box::new(subscription), ticker)
                    }
                    Err(ended) => Next::End(ended),
                };
                (Ok(start), next)
            }
            Next::End(ended) => end(ended),
            Next::Live(mut subscription, mut ticker) => {
                let output = tokio::select! {
                    next = subscription.next() => Some(next),
                    _ = ticker.tick() => None,
                };
                match output {
                    Some(Event::Data(chunk)) => {
                        ticker.reset();
                        let data = data_event(chunk.stream, chunk.data);
                        (Ok(data), Next::Live(subscription, ticker))
                    }
                    Some(Event::End(ended)) => end(ended),
                    Some(Event::Evicted) => (
                        Err(Status::resource_exhausted(
                            "this client fell too far behind the process output and was dropped; reconnect to resume",
                        )),
                        Next::Done,
                    ),
                    None => {
                        let keepalive =
                            event(process_event::Event::Keepalive(process_event::KeepAlive {}));
                        (Ok(keepalive), Next::Live(subscription, ticker))
                    }
                }
            }
            Next::Done => return None,
        };
        Some((message.map(wrap), (next, trailers)))
    });
    let stream: EventStream<T> = Box::pin(stream);
    let mut response = Response::new(stream);
    response.extensions_mut().insert(trailers);
    response
}

/// What an event stream sends next.
enum Next {
    /// The `start` event; then the subscription's events, or at once the end it carries.
    Start(Result<Subscription, Ended>),
    /// Output and keepalives until the end.
    Live(Box<Subscription>, tokio::time::Interval),
    /// The end of a process that had ended before the stream began.
    End(Ended),
    /// Nothing more.
    Done,
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
