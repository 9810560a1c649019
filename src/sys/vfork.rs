//! Starting a process the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)`, so the
//! child runs on the parent's memory until its `exec` and nothing is copied. A keeper
//! starts every process this way. With `fork` (what the standard library does as soon as
//! a pre-exec step is needed) the keeper's page tables were copied for each start, then
//! torn down again by the `exec`, and both sides took copy-on-write faults in between:
//! about a tenth of a millisecond of every start on the machines here.
//!
//! Everything the child needs is prepared in the parent ([`Plan`]); the child only makes
//! system calls, on a stack of its own, with every signal blocked until just before the
//! `exec`. It shares the parent's memory, so it calls no code that takes a lock or keeps
//! state there (no allocation, no glibc wrapper that coordinates threads: the credential
//! changes are raw system calls, which change this one task).

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use super::ChildSetup;

/// The child's stack: it makes a few system calls and nothing else.
const CHILD_STACK: usize = 64 * 1024;

/// Where the program is looked for when the environment has no `PATH` (glibc's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// What to start.
pub struct Command<'a> {
    /// The program: a path, or a name looked up in the environment's `PATH`.
    pub program: &'a str,
    /// Its arguments (after the program name, which is `argv[0]`).
    pub args: &'a [String],
    /// Its whole environment.
    pub env: &'a BTreeMap<String, String>,
    /// Its working directory.
    pub cwd: &'a Path,
    /// Its standard input, output and error.
    pub stdio: [BorrowedFd<'a>; 3],
    /// Session, terminal, priority, OOM score and credentials.
    pub setup: &'a ChildSetup,
}

/// Everything the child uses, built in the parent.
struct Plan {
    /// The paths to try, in order (`execvp`'s search, done here).
    paths: Vec<CString>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    cwd: CString,
    stdio: [RawFd; 3],
    controlling_tty: bool,
    oom: Option<Vec<u8>>,
    credentials: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    die_with_parent: bool,
    parent: libc::pid_t,
    /// The errno of the step that failed, written by the child before it exits.
    error: AtomicI32,
}

/// Starts `command`; its pid once it has called `exec`.
///
/// # Errors
/// The errno of the step that failed in the child (for the `exec`: `ENOENT` when no
/// candidate exists, `EACCES` when one exists but may not be run, as `execvp`), or
/// `InvalidInput` for a NUL byte in a string.
pub fn spawn(command: &Command<'_>) -> io::Result<u32> {
    let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in a command string");
    let argv_owned: Vec<CString> = std::iter::once(command.program)
        .chain(command.args.iter().map(String::as_str))
        .map(|s| CString::new(s).map_err(nul))
        .collect::<io::Result<_>>()?;
    let env_owned: Vec<CString> = command
        .env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")).map_err(nul))
        .collect::<io::Result<_>>()?;
    let search = command.env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    let paths = candidates(command.program, search)
        .into_iter()
        .map(|p| CString::new(p).map_err(nul))
        .collect::<io::Result<_>>()?;
    let null_terminated = |v: &[CString]| {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let plan = Plan {
        paths,
        argv: null_terminated(&argv_owned),
        envp: null_terminated(&env_owned),
        cwd: CString::new(command.cwd.as_os_str().as_bytes()).map_err(nul)?,
        stdio: command.stdio.map(|fd| fd.as_raw_fd()),
        controlling_tty: command.setup.controlling_tty,
        oom: command
            .setup
            .oom_score_adj
            .map(|score| format!("{score}\n").into_bytes()),
        credentials: command.setup.credentials.clone(),
        die_with_parent: command.setup.die_with_parent,
        parent: nix::unistd::getpid().as_raw(),
        error: AtomicI32::new(0),
    };
    // Not zeroed: the child writes what it uses, a page or two at the top, and zeroing
    // all of it would fault in every page of it on the start's path.
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    // The stack grows down from its end, which the ABI wants 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
    let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initializes `all`; pthread_sigmask reads it and stores the old
    // mask in `old`. Blocking every signal means no handler can run in the child on the
    // parent's memory (the child unblocks them itself, just before its exec).
    let pid = unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
        // SAFETY: `child` runs on `stack`, a live allocation of CHILD_STACK bytes that
        // outlives the call: with CLONE_VFORK, clone returns only once the child has
        // exec'd or exited, so `plan` and `stack` (and the CStrings behind `plan`'s
        // pointers) stay valid and untouched by the parent for the child's whole use.
        let pid = libc::clone(
            child,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(&plan).cast_mut().cast(),
        );
        libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
        pid
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stack);
    let error = plan.error.load(Ordering::Acquire);
    if error != 0 {
        // The child exited without exec: reap it.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        return Err(io::Error::from_raw_os_error(error));
    }
    u32::try_from(pid).map_err(|_| io::Error::other("clone returned a negative pid"))
}

/// The paths `execvp` would try for `program` with `search` as `PATH`.
fn candidates(program: &str, search: &str) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_owned()];
    }
    if program.is_empty() {
        return vec![String::new()];
    }
    search
        .split(':')
        .map(|dir| match dir {
            // An empty entry is the working directory.
            "" => format!("./{program}"),
            dir => format!("{}/{program}", dir.trim_end_matches('/')),
        })
        .collect()
}

/// The child: set up, then exec. Returns (and so exits) only on failure, after recording
/// the errno in the plan.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `Plan`, alive and not touched by the parent until
    // this child has exec'd or exited (CLONE_VFORK).
    let plan = unsafe { &*arg.cast::<Plan>() };
    // SAFETY: only system calls on data prepared by the parent.
    let errno = unsafe { set_up_and_exec(plan) };
    plan.error.store(errno.max(1), Ordering::Release);
    // SAFETY: _exit ends the child at once, running nothing of the parent's.
    unsafe { libc::_exit(127) }
}

/// Returns the errno of the step that failed (exec itself only returns on failure).
unsafe fn set_up_and_exec(plan: &Plan) -> c_int {
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY (the whole function): system calls with pointers into `plan`, whose strings
    // and arrays the parent built and keeps alive; see `child`.
    unsafe {
        // The keeper ignores SIGPIPE; a program expects the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        for (target, &fd) in plan.stdio.iter().enumerate() {
            if libc::dup2(fd, target as c_int) < 0 {
                return errno();
            }
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            return errno();
        }
        if super::new_session(plan.controlling_tty, plan.oom.as_deref()).is_err() {
            return errno();
        }
        if let Some((uid, gid, groups)) = &plan.credentials {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setgid, *gid) < 0
                || libc::syscall(libc::SYS_setuid, *uid) < 0
            {
                return errno();
            }
        }
        // After the credential change, which would clear it.
        if plan.die_with_parent {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return errno();
            }
            if libc::getppid() != plan.parent {
                // The parent died before the setting took effect.
                return libc::ESRCH;
            }
        }
        let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(none.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut());
        // execvp's search: a candidate that is not there is passed over; one that may not
        // be run is remembered (EACCES wins over a later ENOENT); anything else stops.
        let mut denied = false;
        let mut last = libc::ENOENT;
        for path in &plan.paths {
            libc::execve(path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
            last = errno();
            match last {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return last,
            }
        }
        if denied { libc::EACCES } else { last }
    }
}

#[cfg(test)]
mod tests {
    use super::candidates;

    #[test]
    fn looks_programs_up_as_execvp_does() {
        assert_eq!(candidates("/bin/true", "/x"), ["/bin/true"]);
        assert_eq!(candidates("./run", "/x"), ["./run"]);
        assert_eq!(
            candidates("ls", "/usr/local/bin:/bin/::/usr/bin"),
            ["/usr/local/bin/ls", "/bin/ls", "./ls", "/usr/bin/ls"]
        );
    }
}
