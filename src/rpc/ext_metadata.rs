//! `envd_ext.Metadata`: the metadata patch as an RPC (the same core as
//! `PATCH /files/metadata`).

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::fs::entry;
use crate::fs::metadata::patch::{self, Change, Patch};
use crate::fs::user::NameCache;
use crate::proto::envd_ext::{self as pb, metadata_server::Metadata};
use crate::rpc::blocking;
use crate::state::AppState;

/// The extension service.
pub struct MetadataExt {
    state: AppState,
}

impl MetadataExt {
    /// A service over the shared state.
    pub fn new(state: AppState) -> Self {
        MetadataExt { state }
    }
}

#[tonic::async_trait]
impl Metadata for MetadataExt {
    async fn patch(
        &self,
        request: Request<pb::PatchMetadataRequest>,
    ) -> Result<Response<pb::PatchMetadataResponse>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec());
        let requester = self.state.identity.for_rpc(authorization.as_deref())?;
        let pb::PatchMetadataRequest {
            path,
            set,
            remove,
            clear,
        } = request.into_inner();
        if let Some(key) = remove.iter().find(|key| set.contains_key(*key)) {
            return Err(
                Error::InvalidArgument(format!("key {key:?} is both set and removed")).into(),
            );
        }
        let mut patch = Patch {
            clear,
            ..Patch::default()
        };
        patch
            .changes
            .extend(set.into_iter().map(|(k, v)| (k, Change::Set(v))));
        patch
            .changes
            .extend(remove.into_iter().map(|k| (k, Change::Remove)));
        let path = requester.resolve(&path)?;
        let entry = blocking(move || {
            let metadata = patch::apply_to(&path, &patch)?;
            let mut info = entry::describe(&path, &path, &mut NameCache::default())?;
            info.metadata = metadata;
            Ok(info)
        })
        .await?;
        Ok(Response::new(pb::PatchMetadataResponse {
            entry: Some(entry.into()),
        }))
    }
}
