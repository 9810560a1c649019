//! Running one patch: its script written to a private temp file and started through
//! [`process::spawn`](crate::process::spawn::spawn_direct) (as its user, in its own session and process
//! group, stdin `/dev/null`), the last bytes of its output kept, its timeout enforced on
//! its own group only. Knows nothing of sequences or the record.
//!
//! How a script runs: a script starting with `#!` runs with that interpreter and its one
//! optional argument, split as the kernel splits it (`#!/usr/bin/env python3` →
//! `/usr/bin/env python3 <file>`); any other script runs as `/bin/bash <file>`. The daemon
//! runs the interpreter itself rather than executing the file, so a `noexec` temp
//! directory does not matter.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::fs::owner;
use crate::fs::user::User;
use crate::process::exit::Exit;
use crate::process::spawn::{self, Spec};

/// Bytes of each output stream kept for the result: enough for the error a script ends
/// with, small enough that a chatty script cannot bloat answers or memory.
pub const OUTPUT_TAIL_BYTES: usize = 4096;
/// How long output is still read after the script exits, when a background process it
/// started keeps the pipes open (a script's own output is read to the end at once).
pub const OUTPUT_DRAIN: Duration = Duration::from_millis(500);
/// Interpreter of scripts without a `#!` line.
pub const DEFAULT_INTERPRETER: &str = "/bin/bash";
/// Variable telling a patch its own sequence.
pub const SEQUENCE_VAR: &str = "ENVD_PATCH_SEQUENCE";
/// Read size for the output pipes.
const READ_CHUNK: usize = 8192;

/// Everything needed to run one patch.
#[derive(Debug, Clone)]
pub struct Job {
    /// The patch's sequence (for its environment and temp file name).
    pub sequence: u64,
    /// The script.
    pub script: String,
    /// Who runs it.
    pub user: String,
    /// When its group is terminated.
    pub timeout: Duration,
    /// Time between the timeout's SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// The environment every process gets (internal and `/init` variables).
    pub base_env: BTreeMap<String, String>,
}

/// How a patch that ran ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// How its process ended.
    pub exit: Exit,
    /// Whether its timeout passed (its group was killed).
    pub timed_out: bool,
    /// The end of its standard output.
    pub stdout: Tail,
    /// The end of its standard error.
    pub stderr: Tail,
    /// From start to the end of its process.
    pub duration: Duration,
}

impl Finished {
    /// True for exit status 0 within the timeout.
    pub fn succeeded(&self) -> bool {
        !self.timed_out && self.exit.exited && self.exit.exit_code == 0
    }
}

/// The last [`OUTPUT_TAIL_BYTES`] of a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tail {
    bytes: VecDeque<u8>,
    /// Bytes written before the kept ones.
    pub dropped: u64,
}

impl Tail {
    /// Appends `data`, forgetting the oldest bytes beyond [`OUTPUT_TAIL_BYTES`].
    pub fn push(&mut self, data: &[u8]) {
        let start = data.len().saturating_sub(OUTPUT_TAIL_BYTES);
        self.dropped += start as u64;
        self.bytes.extend(&data[start..]);
        let excess = self.bytes.len().saturating_sub(OUTPUT_TAIL_BYTES);
        self.bytes.drain(..excess);
        self.dropped += excess as u64;
    }

    /// The kept bytes as text (invalid UTF-8, such as a character cut in half at the
    /// start, becomes U+FFFD).
    pub fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }
}

/// Runs `job` to its end. A patch that cannot start (no such user, no interpreter
/// permission) is an `Err` whose message says why; the caller reports it as a failure.
///
/// # Errors
/// [`Error::NotFound`] for an unknown user; what [`spawn::spawn_direct`] or writing the script
/// file fails with.
pub async fn run(job: &Job) -> Result<Finished> {
    let user = User::lookup(&job.user)?
        .ok_or_else(|| Error::NotFound(format!("user '{}' does not exist", job.user)))?;
    let script = ScriptFile::write(job.sequence, &job.script, &user).await?;
    let (cmd, args) = command(&job.script, script.path());
    // The home directory, or `/` for users without one (`nobody` has `/nonexistent`).
    let cwd = if user.home.is_dir() {
        user.home.clone()
    } else {
        PathBuf::from("/")
    };
    let spec = Spec {
        cmd,
        args,
        envs: [(SEQUENCE_VAR.to_owned(), job.sequence.to_string())].into(),
        base_env: job.base_env.clone(),
        cwd,
        user,
        pty: None,
        stdin: false,
    };
    let started = Instant::now();
    let spawned = spawn::spawn_direct(&spec)?;
    let mut finished = supervise(
        spawned.child,
        spawned.pid,
        spawned.stdout,
        spawned.stderr,
        started + job.timeout,
        job.kill_grace,
    )
    .await;
    finished.duration = started.elapsed();
    // The script file lives until the process ends (bash reads scripts as it runs them),
    // and is unlinked off the runtime's workers.
    if let Err(err) = tokio::task::spawn_blocking(move || drop(script)).await {
        tracing::warn!(%err, "removing a patch script");
    }
    Ok(finished)
}

/// The command line for `script` stored in `file`: its `#!` interpreter with the rest of
/// that line as one argument (as the kernel does), else [`DEFAULT_INTERPRETER`].
pub fn command(script: &str, file: &Path) -> (String, Vec<String>) {
    let file = file.to_string_lossy().into_owned();
    let shebang = script
        .strip_prefix("#!")
        .map(|rest| rest.split('\n').next().unwrap_or(""))
        .map(|line| line.trim_matches([' ', '\t']))
        .filter(|line| !line.is_empty());
    match shebang {
        Some(line) => {
            let (interpreter, arg) = match line.split_once([' ', '\t']) {
                Some((interpreter, arg)) => (interpreter, arg.trim_matches([' ', '\t'])),
                None => (line, ""),
            };
            let mut args = Vec::new();
            if !arg.is_empty() {
                args.push(arg.to_owned());
            }
            args.push(file);
            (interpreter.to_owned(), args)
        }
        None => (DEFAULT_INTERPRETER.to_owned(), vec![file]),
    }
}

/// Waits for the process while reading its output; at `deadline` terminates its group
/// (SIGTERM, then SIGKILL after `grace`). Once it has ended, output is read to the end of
/// the pipes or for [`OUTPUT_DRAIN`] more, whichever comes first.
async fn supervise(
    mut child: tokio::process::Child,
    pid: u32,
    mut stdout: tokio::process::ChildStdout,
    mut stderr: tokio::process::ChildStderr,
    deadline: Instant,
    grace: Duration,
) -> Finished {
    let group = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    let (mut out, mut err) = (Tail::default(), Tail::default());
    let (mut out_open, mut err_open) = (true, true);
    let (mut out_buf, mut err_buf) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);
    let mut exit = None;
    let mut timed_out = false;
    // The next kill step: SIGTERM at the deadline, SIGKILL a grace later.
    let mut next_kill = Some((deadline, Signal::SIGTERM));
    let mut drain_until = None;
    loop {
        if exit.is_some() && !out_open && !err_open {
            break;
        }
        tokio::select! {
            read = stdout.read(&mut out_buf), if out_open => match read {
                Ok(n) if n > 0 => out.push(&out_buf[..n]),
                _ => out_open = false,
            },
            read = stderr.read(&mut err_buf), if err_open => match read {
                Ok(n) if n > 0 => err.push(&err_buf[..n]),
                _ => err_open = false,
            },
            waited = child.wait(), if exit.is_none() => {
                exit = Some(match waited {
                    Ok(status) => Exit::from_status(status),
                    Err(error) => Exit::wait_failed(&error),
                });
                if timed_out {
                    // Whatever of the group outlived its leader goes too.
                    let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
                }
                drain_until = Some(Instant::now() + OUTPUT_DRAIN);
            },
            () = sleep_until(next_kill.map(|(at, _)| at)), if exit.is_none() => {
                if let Some((_, signal)) = next_kill {
                    timed_out = true;
                    tracing::info!(pid, ?signal, "patch timed out: signalling its process group");
                    if nix::sys::signal::killpg(group, signal).is_err() {
                        let _ = nix::sys::signal::kill(group, signal);
                    }
                    next_kill = (signal == Signal::SIGTERM)
                        .then(|| (Instant::now() + grace, Signal::SIGKILL));
                }
            },
            () = sleep_until(drain_until), if drain_until.is_some() => break,
        }
    }
    Finished {
        exit: exit.unwrap_or_else(|| Exit::wait_failed(&std::io::Error::other("no exit"))),
        timed_out,
        stdout: out,
        stderr: err,
        duration: Duration::ZERO,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A script in the temp directory, readable only by the user it runs as; removed on drop.
struct ScriptFile {
    path: PathBuf,
}

impl ScriptFile {
    /// Writes `script` to a new, uniquely named file (never an existing file or symlink)
    /// owned by `user`, mode 0600.
    async fn write(sequence: u64, script: &str, user: &User) -> Result<ScriptFile> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random)
            .map_err(|err| Error::Internal(format!("no randomness for a temp name: {err}")))?;
        let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!(".envd-patch-{sequence}-{suffix}"));
        let (script, user, target) = (script.to_owned(), user.clone(), path.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let failure = |err| {
                Error::io(
                    format!("writing the patch script {}", target.display()),
                    err,
                )
            };
            owner::ensure_can_own(&user, &target)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)
                .map_err(failure)?;
            let written = file
                .write_all(script.as_bytes())
                .map_err(failure)
                .and_then(|()| owner::give_file(&file, &target, &user));
            if written.is_err() {
                let _ = std::fs::remove_file(&target);
            }
            written
        })
        .await??;
        Ok(ScriptFile { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScriptFile {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.path) {
            tracing::warn!(%err, path = %self.path.display(), "removing a patch script");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_run_with_their_shebang_interpreter_or_bash() {
        let file = Path::new("/tmp/p");
        let cases: &[(&str, &str, &[&str])] = &[
            ("echo hi", "/bin/bash", &["/tmp/p"]),
            ("", "/bin/bash", &["/tmp/p"]),
            ("#!/bin/sh\necho hi", "/bin/sh", &["/tmp/p"]),
            ("#! /bin/sh \necho", "/bin/sh", &["/tmp/p"]),
            (
                "#!/usr/bin/env python3\n",
                "/usr/bin/env",
                &["python3", "/tmp/p"],
            ),
            // The kernel passes everything after the interpreter as one argument.
            (
                "#!/usr/bin/env -S python3 -u\n",
                "/usr/bin/env",
                &["-S python3 -u", "/tmp/p"],
            ),
            (
                "#!\t/bin/awk\t-f\t\nBEGIN {}",
                "/bin/awk",
                &["-f", "/tmp/p"],
            ),
            ("#!/bin/sh", "/bin/sh", &["/tmp/p"]),
            ("#!\n", "/bin/bash", &["/tmp/p"]),
            (" #!/bin/sh\n", "/bin/bash", &["/tmp/p"]),
            ("# comment\n#!/bin/sh\n", "/bin/bash", &["/tmp/p"]),
        ];
        for (script, cmd, args) in cases {
            let (got_cmd, got_args) = command(script, file);
            assert_eq!(got_cmd, *cmd, "{script:?}");
            assert_eq!(got_args, *args, "{script:?}");
        }
    }

    #[test]
    fn tails_keep_the_last_bytes() {
        let mut tail = Tail::default();
        tail.push(b"hello ");
        tail.push(b"world");
        assert_eq!((tail.text().as_str(), tail.dropped), ("hello world", 0));
        let mut tail = Tail::default();
        tail.push(&vec![b'a'; OUTPUT_TAIL_BYTES]);
        tail.push(b"xyz");
        assert_eq!(tail.dropped, 3);
        assert!(tail.text().ends_with("aaxyz"));
        assert_eq!(tail.text().len(), OUTPUT_TAIL_BYTES);
        let mut tail = Tail::default();
        tail.push(&vec![b'b'; 3 * OUTPUT_TAIL_BYTES]);
        assert_eq!(tail.dropped, 2 * OUTPUT_TAIL_BYTES as u64);
        assert_eq!(tail.text().len(), OUTPUT_TAIL_BYTES);
        // A character cut at the start becomes U+FFFD, never an error.
        let mut tail = Tail::default();
        let mut data = "é".as_bytes().to_vec();
        data.extend(vec![b'c'; OUTPUT_TAIL_BYTES - 1]);
        tail.push(&data);
        assert!(tail.text().starts_with('\u{fffd}'));
    }

    fn job(script: &str, timeout: Duration) -> Job {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .expect("the test user has a passwd entry");
        Job {
            sequence: 7,
            script: script.into(),
            user: me.name,
            timeout,
            kill_grace: Duration::from_millis(200),
            base_env: [("FROM_INIT".to_owned(), "yes".to_owned())].into(),
        }
    }

    #[tokio::test]
    async fn runs_a_script_and_keeps_its_output() {
        let finished = run(&job(
            "echo \"$ENVD_PATCH_SEQUENCE $FROM_INIT\"; echo oops >&2; exit 3",
            Duration::from_secs(30),
        ))
        .await
        .expect("run");
        assert!(!finished.succeeded());
        assert_eq!(finished.exit.exit_code, 3);
        assert_eq!(finished.stdout.text(), "7 yes\n");
        assert_eq!(finished.stderr.text(), "oops\n");
        assert!(!finished.timed_out);
        let ok = run(&job("#!/bin/sh\ntrue", Duration::from_secs(30)))
            .await
            .expect("run");
        assert!(ok.succeeded());
    }

    #[tokio::test]
    async fn a_timeout_kills_the_group_even_when_sigterm_is_ignored() {
        let finished = run(&job(
            "trap '' TERM; sleep 1000 & wait",
            Duration::from_millis(100),
        ))
        .await
        .expect("run");
        assert!(finished.timed_out);
        assert!(!finished.succeeded());
        assert_eq!(finished.exit.status, "signal: killed");
    }

    #[tokio::test]
    async fn unknown_users_are_named() {
        let mut job = job("true", Duration::from_secs(1));
        job.user = "no-such-user-envd".into();
        let err = run(&job).await.expect_err("no such user");
        assert_eq!(err.to_string(), "user 'no-such-user-envd' does not exist");
    }
}
