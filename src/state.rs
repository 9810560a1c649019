//! State shared by every request handler.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::token::{NoHostTokenHash, TokenStore};
use crate::config::Config;
use crate::env::EnvStore;
use crate::fs::journal::Journal;
use crate::host::metrics::CpuSampler;
use crate::identity::Identity;
use crate::init::{InitPolicy, Initializer};
use crate::server::slots::ConnectionSlots;

/// Everything a handler may need, cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Default user and workdir; request identities.
    pub identity: Arc<Identity>,
    /// The environment new processes get.
    pub env: Arc<EnvStore>,
    /// Fired once when the daemon starts shutting down: streams end cleanly on it.
    pub shutdown: CancellationToken,
    /// The access token in force: the gate and signed URLs check against it.
    pub access: Arc<TokenStore>,
    /// `/init`'s lock and memory (newest timestamp, installed CA).
    pub init: Arc<Initializer>,
    /// The previous CPU reading, so `/metrics` reports usage since the last call.
    pub cpu: Arc<CpuSampler>,
    /// Connection slots: the accept loop takes them, `/metrics` counts them.
    pub connections: Arc<ConnectionSlots>,
    /// The upload journal, when one is configured and could be opened: uploads record their
    /// temp files in it so the next start can remove what a crash left.
    pub uploads: Option<Arc<Journal>>,
}

impl AppState {
    /// Fresh state for `config`. Opens the upload journal, which removes the temp files of
    /// uploads a previous daemon did not finish: call it before accepting connections.
    pub fn new(config: Config) -> Self {
        AppState {
            connections: Arc::new(ConnectionSlots::new(config.limits.max_connections)),
            uploads: config.upload_journal.as_deref().and_then(open_journal),
            identity: Arc::new(Identity::new(&config.default_user)),
            env: Arc::new(EnvStore::new()),
            access: Arc::new(TokenStore::default()),
            init: Arc::new(Initializer::new(
                InitPolicy {
                    set_clock: config.set_clock,
                    ca: config.ca.clone(),
                },
                Arc::new(NoHostTokenHash),
            )),
            cpu: Arc::new(CpuSampler::default()),
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
        }
    }
}

/// Opens the upload journal in `dir`; without one (unwritable, or another daemon's), uploads
/// are still atomic, only a crash's temp files are not cleaned up by the next start.
fn open_journal(dir: &std::path::Path) -> Option<Arc<Journal>> {
    match Journal::open(dir) {
        Ok((journal, sweep)) => {
            if sweep.entries > 0 {
                tracing::info!(dir = %dir.display(), unfinished = sweep.entries, removed = sweep.removed, "cleaned up uploads a previous run left unfinished");
            }
            Some(Arc::new(journal))
        }
        Err(err) => {
            tracing::warn!(dir = %dir.display(), %err, "no upload journal: temp files of uploads interrupted by a crash will not be removed at the next start");
            None
        }
    }
}
