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
use crate::patch::Patcher;
use crate::persist::StateDir;
use crate::process::registry::ProcessTable;
use crate::server::slots::ConnectionSlots;

/// Everything a handler may need: one `Arc`, so that a clone (several per request: the
/// router, the gate, each extractor) is one atomic increment rather than one per part.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
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
    /// Where state that survives a restart is kept; `None` keeps nothing.
    pub state_dir: Option<Arc<StateDir>>,
    /// The managed processes.
    pub processes: Arc<ProcessTable>,
    /// Where applied patches are recorded, and the lock that runs one attempt at a time.
    pub patches: Arc<Patcher>,
    /// Connection slots: the accept loop takes them, `/metrics` counts them.
    pub connections: Arc<ConnectionSlots>,
    /// The upload journal, when one is configured and could be opened: uploads record their
    /// temp files in it so the next start can remove what a crash left.
    pub uploads: Option<Arc<Journal>>,
}

impl AppState {
    /// Fresh state for `config`, with `state_dir` (opened by the caller) for what must
    /// survive a restart. Needs a runtime (it starts the process table's tasks).
    pub fn new(config: Config, state_dir: Option<StateDir>) -> Self {
        let state_dir = state_dir.map(Arc::new);
        let keeper_dir = match &state_dir {
            Some(dir) => dir.path().join("keepers"),
            None => std::env::temp_dir().join(format!("envd-keepers-{}", std::process::id())),
        };
        if let Err(err) = std::fs::create_dir_all(&keeper_dir) {
            tracing::error!(dir = %keeper_dir.display(), %err, "creating the keepers' socket directory");
        }
        AppState(Arc::new(Shared {
            connections: Arc::new(ConnectionSlots::new(config.limits.max_connections)),
            uploads: config.upload_journal.as_deref().and_then(open_journal),
            processes: ProcessTable::new(config.kill_grace, keeper_dir, state_dir.clone()),
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
            state_dir,
            patches: Arc::new(Patcher::new(
                config.patch_record_file.clone(),
                config.kill_grace,
                config.max_process_timeout,
            )),
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
        }))
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
