//! The `filesystem.Filesystem` service: thin adapters from protobuf to `fs` and back.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::fs::ops;
use crate::fs::watch::polling::PollingWatchers;
use crate::fs::watch::{Notice, Watch, WatchLimits, WatchSpec};
use crate::identity::Requester;
use crate::proto::filesystem::{self as pb, filesystem_server::Filesystem, watch_dir_response};
use crate::rpc::{blocking, keepalive_interval};
use crate::state::AppState;

/// Events buffered between a watch stream's producer and the client.
const STREAM_BUFFER: usize = 64;

/// The filesystem RPCs.
#[derive(Clone)]
pub struct FilesystemService {
    state: AppState,
    limits: Arc<WatchLimits>,
    polling: Arc<PollingWatchers>,
}

impl FilesystemService {
    /// A service over the shared state; starts the sweeper of idle polling watchers.
    pub fn new(state: AppState) -> Self {
        let limits = WatchLimits::new(state.config.max_watchers);
        let polling = PollingWatchers::new(limits.clone(), state.config.watcher_idle_timeout);
        let sweeper = Arc::downgrade(&polling);
        let period = (state.config.watcher_idle_timeout / 4).max(std::time::Duration::from_secs(1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            loop {
                ticker.tick().await;
                match sweeper.upgrade() {
                    Some(polling) => polling.sweep(),
                    None => return,
                }
            }
        });
        FilesystemService {
            state,
            limits,
            polling,
        }
    }

    /// The watch a WatchDir or CreateWatcher request asks for, its path resolved for the
    /// caller.
    fn watch_spec<T: WatchRequest>(&self, request: Request<T>) -> Result<WatchSpec, Status> {
        let requester = self.requester(&request)?;
        request.into_inner().into_spec(&requester)
    }

    fn requester<T>(&self, request: &Request<T>) -> Result<Requester, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        Ok(self.state.identity.for_rpc(authorization)?)
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A request to watch one directory: WatchDir (a stream) and CreateWatcher (polling) ask
/// for the same thing with the same fields.
trait WatchRequest {
    /// The watch asked for, its path resolved for `requester`.
    fn into_spec(self, requester: &Requester) -> Result<WatchSpec, Status>;
}

/// The two messages are distinct generated types with identical fields, so one body
/// serves both. The exhaustive destructuring makes a field added to either a compile
/// error here rather than a silently ignored option.
macro_rules! impl_watch_request {
    ($($message:ident),+) => {$(
        impl WatchRequest for pb::$message {
            fn into_spec(self, requester: &Requester) -> Result<WatchSpec, Status> {
                let pb::$message {
                    path,
                    recursive,
                    include_entry,
                    allow_network_mounts,
                } = self;
                Ok(WatchSpec {
                    path: requester.resolve(&path)?,
                    recursive,
                    include_entry,
                    allow_network_mounts,
                })
            }
        }
    )+};
}

impl_watch_request!(WatchDirRequest, CreateWatcherRequest);

#[tonic::async_trait]
impl Filesystem for FilesystemService {
    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::StatResponse>, Status> {
        let requester = self.requester(&request)?;
        let path = request.into_inner().path;
        let entry = blocking(move || ops::stat(&requester.resolve(&path)?)).await?;
        Ok(Response::new(pb::StatResponse {
            entry: Some(entry.into()),
        }))
    }

    async fn make_dir(
        &self,
        request: Request<pb::MakeDirRequest>,
    ) -> Result<Response<pb::MakeDirResponse>, Status> {
        let requester = self.requester(&request)?;
        let path = request.into_inner().path;
        let entry =
            blocking(move || ops::make_dir(&requester.resolve(&path)?, &requester.user)).await?;
        Ok(Response::new(pb::MakeDirResponse {
            entry: Some(entry.into()),
        }))
    }

    async fn r#move(
        &self,
        request: Request<pb::MoveRequest>,
    ) -> Result<Response<pb::MoveResponse>, Status> {
        let requester = self.requester(&request)?;
        let pb::MoveRequest {
            source,
            destination,
        } = request.into_inner();
        let entry = blocking(move || {
            let source = requester.resolve(&source)?;
            let destination = requester.resolve(&destination)?;
            ops::rename(&source, &destination, &requester.user)
        })
        .await?;
        Ok(Response::new(pb::MoveResponse {
            entry: Some(entry.into()),
        }))
    }

    async fn list_dir(
        &self,
        request: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        let requester = self.requester(&request)?;
        let pb::ListDirRequest { path, depth } = request.into_inner();
        let entries = blocking(move || ops::list_dir(&requester.resolve(&path)?, depth)).await?;
        Ok(Response::new(pb::ListDirResponse {
            entries: entries.into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        let requester = self.requester(&request)?;
        let path = request.into_inner().path;
        if path.trim().is_empty() {
            // envd resolves "" to the home directory and deletes it; nobody means that.
            return Err(Error::InvalidArgument("path must not be empty".into()).into());
        }
        blocking(move || {
            let resolved = requester.resolve(&path)?;
            if ops::is_protected(&resolved) {
                return Err(Error::InvalidArgument(format!(
                    "refusing to remove {}",
                    resolved.display()
                )));
            }
            ops::remove(&resolved)
        })
        .await?;
        Ok(Response::new(pb::RemoveResponse {}))
    }

    type WatchDirStream = EventStream<pb::WatchDirResponse>;

    async fn watch_dir(
        &self,
        request: Request<pb::WatchDirRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        let keepalive = keepalive_interval(request.metadata());
        let spec = self.watch_spec(request)?;
        let limits = self.limits.clone();
        let watch = blocking(move || Watch::open(spec, &limits)).await?;
        Ok(Response::new(watch_stream(watch, keepalive)))
    }

    async fn create_watcher(
        &self,
        request: Request<pb::CreateWatcherRequest>,
    ) -> Result<Response<pb::CreateWatcherResponse>, Status> {
        let spec = self.watch_spec(request)?;
        let polling = self.polling.clone();
        let watcher_id = blocking(move || polling.create(spec)).await?;
        Ok(Response::new(pb::CreateWatcherResponse { watcher_id }))
    }

    async fn get_watcher_events(
        &self,
        request: Request<pb::GetWatcherEventsRequest>,
    ) -> Result<Response<pb::GetWatcherEventsResponse>, Status> {
        let events = self.polling.events(&request.into_inner().watcher_id)?;
        Ok(Response::new(pb::GetWatcherEventsResponse {
            events: events.into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove_watcher(
        &self,
        request: Request<pb::RemoveWatcherRequest>,
    ) -> Result<Response<pb::RemoveWatcherResponse>, Status> {
        self.polling.remove(&request.into_inner().watcher_id)?;
        Ok(Response::new(pb::RemoveWatcherResponse {}))
    }
}

fn watch_event(event: watch_dir_response::Event) -> pb::WatchDirResponse {
    pb::WatchDirResponse { event: Some(event) }
}

/// `start`, then filesystem events and keepalives, until the watch ends (with its error)
/// or the client leaves (which drops the watch and its kernel watches).
fn watch_stream(
    mut watch: Watch,
    keepalive: std::time::Duration,
) -> EventStream<pb::WatchDirResponse> {
    let (tx, rx) = mpsc::channel::<Result<pb::WatchDirResponse, Status>>(STREAM_BUFFER);
    tokio::spawn(async move {
        let start = watch_event(watch_dir_response::Event::Start(
            watch_dir_response::StartEvent {},
        ));
        if tx.send(Ok(start)).await.is_err() {
            return;
        }
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        loop {
            let message = tokio::select! {
                notice = watch.next() => match notice {
                    Some(Notice::Event(event)) => {
                        ticker.reset();
                        Ok(watch_event(watch_dir_response::Event::Filesystem(event.into())))
                    }
                    Some(Notice::Ended(err)) => Err(Status::from(err)),
                    None => Err(Status::internal("the watcher stopped")),
                },
                _ = ticker.tick() => Ok(watch_event(watch_dir_response::Event::Keepalive(watch_dir_response::KeepAlive {}))),
                () = tx.closed() => return,
            };
            let last = message.is_err();
            if tx.send(message).await.is_err() || last {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}
