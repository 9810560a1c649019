//! `/init`: the control plane's setup of the sandbox (reference §2.3, §3.3) — access
//! token, environment variables, default user and workdir, clock, CA certificate.
//! Transport-free: the HTTP handler parses the body into an [`InitRequest`] and calls
//! [`init`].
//!
//! One `/init` runs at a time. Calls are idempotent: the same request applied twice (a
//! retry, or a re-send after a daemon restart or a sandbox resume) leaves the same state.
//! A request whose timestamp is older than the newest one applied changes nothing.
//! Firecracker-only fields (`volumeMounts`, `lifecycleID`, `hyperloopIP`) are not handled.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::auth::token::{AccessToken, HostTokenHash, authorize_change};
use crate::error::Result;
use crate::host::ca::CaStore;
use crate::host::clock;
use crate::persist::init_state::{self, InitState};
use crate::state::AppState;

/// One `/init` call, parsed. Every field is optional.
#[derive(Debug, Default, Clone)]
pub struct InitRequest {
    /// The token to put in force; `None` asks to clear it (allowed only when none is set,
    /// or the host vouches for the reset).
    pub access_token: Option<AccessToken>,
    /// The host's time (Unix nanoseconds): orders `/init` calls and sets the clock.
    pub timestamp: Option<i64>,
    /// User environment variables, replacing the previous set (even when empty).
    pub env_vars: Option<BTreeMap<String, String>>,
    /// The new default user; ignored when empty. Not checked against `/etc/passwd` (as
    /// envd): requests acting as it fail later if it does not exist.
    pub default_user: Option<String>,
    /// The new default workdir; ignored when empty. Not checked (as envd).
    pub default_workdir: Option<String>,
    /// A PEM to add to the system trust store; ignored when empty.
    pub ca_bundle: Option<String>,
}

/// What [`init`] did with a request that passed the token check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request was applied.
    Applied,
    /// The request was older than the newest applied one and changed nothing.
    Stale,
}

/// How `/init` may touch the machine, from the configuration.
#[derive(Debug, Clone)]
pub struct InitPolicy {
    /// Whether the daemon may set the system clock.
    pub set_clock: bool,
    /// Where a CA certificate is installed.
    pub ca: CaStore,
}

/// What `/init` remembers between calls, behind the lock that serializes them.
#[derive(Debug)]
pub struct Initializer {
    policy: InitPolicy,
    host_hash: Arc<dyn HostTokenHash>,
    applied: Mutex<Applied>,
}

#[derive(Debug, Default)]
struct Applied {
    /// The newest timestamp applied (Unix nanoseconds).
    newest: Option<i64>,
    /// The CA PEM installed last, as installed.
    ca_pem: Option<String>,
}

impl Initializer {
    /// An initializer that has applied nothing yet.
    pub fn new(policy: InitPolicy, host_hash: Arc<dyn HostTokenHash>) -> Self {
        Initializer {
            policy,
            host_hash,
            applied: Mutex::new(Applied::default()),
        }
    }
}

impl Initializer {
    /// Restores what a previous run applied (from the state directory).
    pub fn restore(&self, newest: Option<i64>, ca_pem: Option<String>) {
        if let Ok(mut applied) = self.applied.try_lock() {
            applied.newest = newest;
            applied.ca_pem = ca_pem;
        }
    }
}

/// Applies one `/init` call: checks the token change, then — unless the request is stale —
/// sets the clock, the environment, the token, the defaults and the CA certificate, in that
/// order. The first failure stops the rest (earlier steps stay applied, as in envd).
///
/// # Errors
/// [`crate::error::Error::Unauthenticated`] when the token change is not allowed (nothing
/// is applied); the CA installation's error when that fails.
pub async fn init(state: &AppState, request: InitRequest) -> Result<Outcome> {
    let initializer = &state.init;
    // Waiting here is cancelled with the request: a caller that goes away stops queueing.
    let mut applied = initializer.applied.lock().await;
    let current = state.access.current();
    authorize_change(
        current.as_ref(),
        request.access_token.as_ref(),
        initializer.host_hash.as_ref(),
    )
    .await?;
    if let Some(timestamp) = request.timestamp {
        // Equal counts as newer, so a retry of the newest request applies again.
        if applied.newest.is_some_and(|newest| timestamp < newest) {
            tracing::info!("ignoring an /init older than the last one applied");
            return Ok(Outcome::Stale);
        }
        applied.newest = Some(timestamp);
        clock::sync(timestamp, initializer.policy.set_clock);
    }
    if let Some(vars) = &request.env_vars {
        state.env.replace_user(vars);
    }
    state.access.replace(request.access_token);
    state.identity.set_defaults(
        request.default_user.as_deref(),
        request.default_workdir.as_deref().map(std::path::Path::new),
    );
    if let Some(pem) = request.ca_bundle.filter(|pem| !pem.trim().is_empty()) {
        let ca = initializer.policy.ca.clone();
        let previous = applied.ca_pem.clone();
        let installed =
            tokio::task::spawn_blocking(move || ca.install(&pem, previous.as_deref())).await??;
        applied.ca_pem = Some(installed);
    }
    if let Some(dir) = state.state_dir.clone() {
        let snapshot = InitState::capture(state, applied.newest, applied.ca_pem.clone());
        let saved =
            tokio::task::spawn_blocking(move || dir.save(init_state::FILE, &snapshot)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(%err, "saving the /init state; a restart will lose it"),
            Err(err) => tracing::error!(%err, "saving the /init state"),
        }
    }
    Ok(Outcome::Applied)
}
