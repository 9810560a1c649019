//! The `filesystem.Filesystem` service: thin adapters from protobuf to `fs` and back.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::fs::ops;
use crate::identity::Requester;
use crate::proto::filesystem::{self as pb, filesystem_server::Filesystem};
use crate::rpc::blocking;
use crate::state::AppState;

/// The filesystem RPCs.
#[derive(Debug, Clone)]
pub struct FilesystemService {
    state: AppState,
}

impl FilesystemService {
    /// A service over the shared state.
    pub fn new(state: AppState) -> Self {
        FilesystemService { state }
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

fn watchers_unavailable() -> Status {
    Error::Unimplemented("directory watching is not available in this build".into()).into()
}

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
        _request: Request<pb::WatchDirRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        Err(watchers_unavailable())
    }

    async fn create_watcher(
        &self,
        _request: Request<pb::CreateWatcherRequest>,
    ) -> Result<Response<pb::CreateWatcherResponse>, Status> {
        Err(watchers_unavailable())
    }

    async fn get_watcher_events(
        &self,
        _request: Request<pb::GetWatcherEventsRequest>,
    ) -> Result<Response<pb::GetWatcherEventsResponse>, Status> {
        Err(watchers_unavailable())
    }

    async fn remove_watcher(
        &self,
        _request: Request<pb::RemoveWatcherRequest>,
    ) -> Result<Response<pb::RemoveWatcherResponse>, Status> {
        Err(watchers_unavailable())
    }
}
