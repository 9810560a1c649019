//! Starting a child: its command line, environment, working directory, user, and stdio
//! (pipes, `/dev/null` or a terminal). Every child leads its own session, so a signal can
//! reach the whole group it starts.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use crate::error::{Error, Result};
use crate::fs::user::User;
use crate::process::pty::{self, Master};
use crate::sys::{ChildSetup, configure_child};

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

/// A started child and the daemon's ends of its stdio.
pub struct Spawned {
    /// The child, to wait for.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// Its stdio.
    pub io: Io,
}

/// The daemon's ends of a child's stdio.
pub enum Io {
    /// Separate pipes (stdin absent when it is `/dev/null`).
    Pipes {
        /// Write end of stdin.
        stdin: Option<ChildStdin>,
        /// Read end of stdout.
        stdout: ChildStdout,
        /// Read end of stderr.
        stderr: ChildStderr,
    },
    /// A terminal for all three.
    Pty(Master),
}

/// Starts the process. A program that cannot be executed (missing, not executable) is
/// started through `/bin/sh` instead, so the client sees the shell's message on stderr and
/// exit status 127 or 126, as with envd.
///
/// # Errors
/// [`Error::PermissionDenied`] when another user is asked for and the daemon is not
/// root; [`Error::InvalidArgument`] when the process cannot be started.
pub fn spawn(spec: &Spec) -> Result<Spawned> {
    let setup = child_setup(spec)?;
    match start(spec, &spec.cmd, &spec.args, setup.clone()) {
        Err(err) if is_exec_failure(&err) => {
            let mut args = vec![
                "-c".to_owned(),
                "exec \"$0\" \"$@\"".to_owned(),
                spec.cmd.clone(),
            ];
            args.extend(spec.args.iter().cloned());
            start(spec, "/bin/sh", &args, setup).map_err(|err| start_error(spec, &err))
        }
        other => other.map_err(|err| start_error(spec, &err)),
    }
}

fn is_exec_failure(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR)
    )
}

fn start_error(spec: &Spec, err: &io::Error) -> Error {
    let line = std::iter::once(spec.cmd.as_str())
        .chain(spec.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    if spec.pty.is_some() {
        Error::InvalidArgument(format!("error starting pty with command '{line}': {err}"))
    } else {
        Error::InvalidArgument(format!("error starting process '{line}': {err}"))
    }
}

fn child_setup(spec: &Spec) -> Result<ChildSetup> {
    let daemon_uid = nix::unistd::geteuid();
    let credentials = if daemon_uid.is_root() {
        let name = CString::new(spec.user.name.clone())
            .map_err(|_| Error::InvalidArgument("user name contains NUL".into()))?;
        let groups = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(spec.user.gid))
            .map_err(|err| {
                Error::io(
                    format!("looking up the groups of '{}'", spec.user.name),
                    err.into(),
                )
            })?;
        Some((
            spec.user.uid,
            spec.user.gid,
            groups.into_iter().map(|g| g.as_raw()).collect(),
        ))
    } else if spec.user.uid == daemon_uid.as_raw() {
        None
    } else {
        return Err(Error::PermissionDenied(format!(
            "running a process as '{}' needs root: envd runs as uid {}",
            spec.user.name,
            daemon_uid.as_raw()
        )));
    };
    Ok(ChildSetup {
        credentials,
        controlling_tty: spec.pty.is_some(),
        oom_score_adj: Some(CHILD_OOM_SCORE_ADJ),
    })
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
    if let Some(shell) = nix::unistd::User::from_name(&spec.user.name)
        .ok()
        .flatten()
        .map(|u| u.shell)
    {
        env.insert("SHELL".to_owned(), shell.to_string_lossy().into_owned());
    }
    env.extend(spec.base_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(spec.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

fn start(spec: &Spec, program: &str, args: &[String], setup: ChildSetup) -> io::Result<Spawned> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(environment(spec))
        .current_dir(&spec.cwd)
        .kill_on_drop(false);
    let pair = match spec.pty {
        Some((cols, rows)) => {
            let pair = pty::open(cols, rows)?;
            command
                .stdin(Stdio::from(pair.slave.try_clone()?))
                .stdout(Stdio::from(pair.slave.try_clone()?))
                .stderr(Stdio::from(pair.slave.try_clone()?));
            Some(pair)
        }
        None => {
            command
                .stdin(if spec.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    configure_child(&mut command, setup);
    let mut child = command.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the child exited before its pid was read"))?;
    let io = match pair {
        // The slave copies in `command` and `pair` are dropped here, so the terminal reports
        // its end once the child (and its descendants) close theirs.
        Some(pair) => Io::Pty(pair.master),
        None => Io::Pipes {
            stdin: child.stdin.take(),
            stdout: child
                .stdout
                .take()
                .ok_or_else(|| io::Error::other("stdout pipe missing"))?,
            stderr: child
                .stderr
                .take()
                .ok_or_else(|| io::Error::other("stderr pipe missing"))?,
        },
    };
    Ok(Spawned { child, pid, io })
}
