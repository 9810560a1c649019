//! The process service's event streams (Start and Connect) as the tests read them: to the
//! `start` event, to some output, or to their end; and waiting for a process to end.

use std::time::Duration;

use envd::proto::process::{
    self as pb, process_client::ProcessClient, process_event::Event,
    process_event::data_event::Output,
};
use tonic::transport::Channel;

/// A message of a process event stream: Start and Connect wrap the same event in
/// messages of their own.
pub trait EventMessage {
    /// The event it carries.
    fn into_event(self) -> Option<pb::ProcessEvent>;
}

impl EventMessage for pb::StartResponse {
    fn into_event(self) -> Option<pb::ProcessEvent> {
        self.event
    }
}

impl EventMessage for pb::ConnectResponse {
    fn into_event(self) -> Option<pb::ProcessEvent> {
        self.event
    }
}

/// What a process event stream carried, read to its end.
#[derive(Debug, Default)]
pub struct Collected {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub keepalives: usize,
    pub end: Option<pb::process_event::EndEvent>,
    /// The status the stream failed with, if it did not close cleanly.
    pub error: Option<tonic::Status>,
}

impl Collected {
    /// The exit code of the end event, which must have come before the stream closed.
    pub fn exit_code(&self) -> i32 {
        match &self.end {
            Some(end) => end.exit_code,
            None => panic!(
                "an end before the stream closes (stream error: {:?})",
                self.error
            ),
        }
    }
}

/// Reads a stream of events until it closes (or fails). The first event must be `start`,
/// and there is at most one `end`.
pub async fn collect<T: EventMessage>(stream: tonic::Streaming<T>) -> Collected {
    collect_from(stream, true).await
}

/// [`collect`] for a stream whose `start` event was already read (see [`started`]).
pub async fn collect_rest<T: EventMessage>(stream: tonic::Streaming<T>) -> Collected {
    collect_from(stream, false).await
}

async fn collect_from<T: EventMessage>(
    mut stream: tonic::Streaming<T>,
    expect_start: bool,
) -> Collected {
    let mut out = Collected::default();
    let mut first = expect_start;
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let event = message
                    .into_event()
                    .and_then(|e| e.event)
                    .expect("an event");
                if first {
                    assert!(
                        matches!(event, Event::Start(_)),
                        "the first event is start, got {event:?}"
                    );
                    first = false;
                }
                match event {
                    Event::Start(start) => out.pid = start.pid,
                    Event::Data(data) => match data.output.expect("output") {
                        Output::Stdout(b) => out.stdout.extend(b),
                        Output::Stderr(b) => out.stderr.extend(b),
                        Output::Pty(b) => out.pty.extend(b),
                    },
                    Event::End(end) => {
                        assert!(out.end.is_none(), "exactly one end event");
                        out.end = Some(end);
                    }
                    Event::Keepalive(_) => out.keepalives += 1,
                }
            }
            Ok(None) => return out,
            Err(status) => {
                out.error = Some(status);
                return out;
            }
        }
    }
}

/// Opens a Start stream and returns it once its `start` event has arrived, with the pid.
pub async fn started(
    client: &mut ProcessClient<Channel>,
    request: impl tonic::IntoRequest<pb::StartRequest>,
) -> (u32, tonic::Streaming<pb::StartResponse>) {
    let mut stream = client.start(request).await.expect("start").into_inner();
    let pid = read_start(&mut stream).await;
    (pid, stream)
}

/// Reads a stream's first event, which must be `start`; returns the pid.
pub async fn read_start<T: EventMessage>(stream: &mut tonic::Streaming<T>) -> u32 {
    let first = stream
        .message()
        .await
        .expect("first event")
        .expect("stream open");
    match first.into_event().and_then(|e| e.event) {
        Some(Event::Start(start)) => start.pid,
        other => panic!("expected start, got {other:?}"),
    }
}

/// Reads events until the stdout seen so far satisfies `enough`; returns that stdout.
/// Other events are passed over; the stream must stay open until then.
pub async fn read_stdout_until<T: EventMessage>(
    stream: &mut tonic::Streaming<T>,
    enough: impl Fn(&str) -> bool,
) -> String {
    let mut seen = Vec::new();
    while !enough(&String::from_utf8_lossy(&seen)) {
        let message = stream.message().await.expect("event").expect("open");
        if let Some(Event::Data(pb::process_event::DataEvent {
            output: Some(Output::Stdout(bytes)),
        })) = message.into_event().and_then(|e| e.event)
        {
            seen.extend(bytes);
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// True while `pid` runs (a zombie has ended).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Waits (yielding, no sleeps) until `pid` has ended, for at most 20 seconds.
pub async fn wait_dead(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} is still alive"
        );
        tokio::task::yield_now().await;
    }
}
