//! State shared by every request handler.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::env::EnvStore;
use crate::identity::Identity;

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
}

impl AppState {
    /// Fresh state for `config`.
    pub fn new(config: Config) -> Self {
        AppState {
            identity: Arc::new(Identity::new(&config.default_user)),
            env: Arc::new(EnvStore::new()),
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
        }
    }
}
