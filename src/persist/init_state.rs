//! The `/init` state that survives a restart: the token, the user environment, the
//! default user and workdir, the newest timestamp applied and the CA installed. Saved
//! after every applied `/init`; restored before the listener accepts anything, so the
//! token is enforced from the first request after a restart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::auth::token::AccessToken;
use crate::state::AppState;

/// The state file's name in the state directory.
pub const FILE: &str = "init.json";

/// What `/init` leaves behind. Holds the token: the file is 0600 in a 0700 directory and
/// this type's `Debug` never shows it.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct InitState {
    /// The access token in force.
    pub access_token: Option<String>,
    /// User environment variables.
    pub env_vars: BTreeMap<String, String>,
    /// Default user.
    pub default_user: String,
    /// Default workdir.
    pub default_workdir: Option<String>,
    /// Newest `/init` timestamp applied (Unix nanoseconds).
    pub newest_timestamp: Option<i64>,
    /// The CA PEM installed last.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for InitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitState")
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field("env_vars", &self.env_vars.keys().collect::<Vec<_>>())
            .field("default_user", &self.default_user)
            .field("default_workdir", &self.default_workdir)
            .field("newest_timestamp", &self.newest_timestamp)
            .finish_non_exhaustive()
    }
}

impl InitState {
    /// What the daemon holds now (`newest` and `ca_pem` from `/init`'s own memory).
    pub fn capture(
        state: &AppState,
        newest_timestamp: Option<i64>,
        ca_pem: Option<String>,
    ) -> InitState {
        let defaults = state.identity.defaults();
        InitState {
            access_token: state.access.current().map(|t| t.expose_secret().to_owned()),
            env_vars: state.env.user_vars(),
            default_user: defaults.user,
            default_workdir: defaults.workdir.map(|d| d.to_string_lossy().into_owned()),
            newest_timestamp,
            ca_pem,
        }
    }

    /// Puts the state back into a fresh daemon.
    pub fn restore(self, state: &AppState) {
        match self.access_token.map(AccessToken::new) {
            Some(Ok(token)) => state.access.replace(Some(token)),
            Some(Err(err)) => {
                tracing::error!(%err, "the saved access token is unusable; none restored")
            }
            None => {}
        }
        state.env.replace_user(&self.env_vars);
        state.identity.set_defaults(
            Some(&self.default_user),
            self.default_workdir.as_deref().map(std::path::Path::new),
        );
        state.init.restore(self.newest_timestamp, self.ca_pem);
    }
}
