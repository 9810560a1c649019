//! State shared by every request handler.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::token::{NoHostTokenHash, TokenStore};
use crate::config::Config;
use crate::env::EnvStore;
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
}

impl AppState {
    /// Fresh state for `config`.
    pub fn new(config: Config) -> Self {
        AppState {
            connections: Arc::new(ConnectionSlots::new(config.limits.max_connections)),
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

