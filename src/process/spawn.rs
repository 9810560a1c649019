//! What a new process gets: its command line, environment, working directory, user and
//! stdio, resolved by the daemon into the [`KeeperSpec`] its keeper starts it from. Every
//! child leads its own session, so a signal can reach the whole group it starts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::fs::user::User;
use crate::process::keeper::KeeperSpec;

/// PATH given to children when the daemon has none (systemd's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Children are killed before anything else when memory runs out (envd's value).
const CHILD_OOM_SCORE_ADJ: i32 = 100;

/// Everything needed to start one process.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Program.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Variables from the request; they win over every other source.
    pub envs: BTreeMap<String, String>,
    /// Variables every process gets (internal and `/init` ones).
    pub base_env: BTreeMap<String, String>,
    /// Resolved working directory.
    pub cwd: PathBuf,
    /// The user to run as.
    pub user: User,
    /// Terminal size `(cols, rows)`, for a PTY process.
    pub pty: Option<(u16, u16)>,
    /// Whether stdin is an open pipe (else `/dev/null`); ignored with a PTY.
    pub stdin: bool,
}

/// Resolves `spec` into what a keeper runs.
///
/// # Errors
/// [`Error::PermissionDenied`] when another user is asked for and the daemon is not root.
pub fn keeper_spec(spec: &Spec) -> Result<KeeperSpec> {
    Ok(KeeperSpec {
        program: spec.cmd.clone(),
        args: spec.args.clone(),
        env: environment(spec),
        cwd: spec.cwd.clone(),
        credentials: credentials(spec)?,
        pty: spec.pty,
        stdin: spec.stdin,
        oom_score_adj: Some(CHILD_OOM_SCORE_ADJ),
    })
}

fn credentials(spec: &Spec) -> Result<Option<(u32, u32, Vec<u32>)>> {
    let daemon_uid = nix::unistd::geteuid();
    let credentials = if daemon_uid.is_root() {
        let groups = crate::fs::lookups::groups(&spec.user.name, spec.user.gid)?;
        Some((spec.user.uid, spec.user.gid, groups))
    } else if spec.user.uid == daemon_uid.as_raw() {
        None
    } else {
        return Err(Error::PermissionDenied(format!(
            "running a process as '{}' needs root: envd runs as uid {}",
            spec.user.name,
            daemon_uid.as_raw()
        )));
    };
    Ok(credentials)
}

/// The environment, later sources winning: PATH, HOME, USER, LOGNAME, SHELL, the daemon's
/// store, the request's variables.
fn environment(spec: &Spec) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_owned(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned()),
    );
    env.insert(
        "HOME".to_owned(),
        spec.user.home.to_string_lossy().into_owned(),
    );
    env.insert("USER".to_owned(), spec.user.name.clone());
    env.insert("LOGNAME".to_owned(), spec.user.name.clone());
    env.insert(
        "SHELL".to_owned(),
        spec.user.shell.to_string_lossy().into_owned(),
    );
    env.extend(spec.base_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(spec.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// A child started directly by the daemon (not through a keeper), with stdout and stderr
/// piped and stdin from `/dev/null`: for work that lives and ends within one request, such
/// as a patch.
pub struct Direct {
    /// The child, to wait for.
    pub child: tokio::process::Child,
    /// Its pid (also its process group and session id).
    pub pid: u32,
    /// Read end of stdout.
    pub stdout: tokio::process::ChildStdout,
    /// Read end of stderr.
    pub stderr: tokio::process::ChildStderr,
}

/// Starts `spec` as the daemon's own child (no terminal, no stdin), as its user, in its own
/// session.
///
/// # Errors
/// [`Error::PermissionDenied`] when another user is asked for and the daemon is not root;
/// [`Error::InvalidArgument`] when the program cannot be started.
pub fn spawn_direct(spec: &Spec) -> Result<Direct> {
    use std::process::Stdio;
    let resolved = keeper_spec(spec)?;
    let mut command = tokio::process::Command::new(&resolved.program);
    command
        .args(&resolved.args)
        .env_clear()
        .envs(&resolved.env)
        .current_dir(&resolved.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    crate::sys::configure_child(
        command.as_std_mut(),
        crate::sys::ChildSetup {
            credentials: resolved.credentials,
            controlling_tty: false,
            oom_score_adj: resolved.oom_score_adj,
            die_with_parent: false,
        },
    );
    let mut child = command.spawn().map_err(|err| {
        Error::InvalidArgument(format!(
            "error starting process '{}': {err}",
            resolved.program
        ))
    })?;
    let missing = || Error::Internal("a piped stdio of a new child is missing".into());
    Ok(Direct {
        pid: child.id().ok_or_else(missing)?,
        stdout: child.stdout.take().ok_or_else(missing)?,
        stderr: child.stderr.take().ok_or_else(missing)?,
        child,
    })
}
