//! What the nursery (`process::keeper::nursery`) needs of the OS to fork spare keepers:
//! children reaped by the kernel, the fork itself, and a child's own command line.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// Has the kernel reap this process's children as they exit (SIGCHLD ignored), so a
/// parent that never waits leaves no zombies.
pub fn reap_children_automatically() {
    // SAFETY: installing SIG_IGN touches no handler code and is valid at any time.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
}

/// The number of threads of this process (`/proc/<pid>/stat` field 20).
fn threads() -> Option<u64> {
    super::with_stat_fields(std::process::id(), |mut fields| {
        fields.nth(17)?.parse().ok()
    })
}

/// Forks this process, which must be single-threaded. The child (`Ok(None)`) gets
/// SIGCHLD's default back (it waits for children of its own) and leads a process group of
/// its own; the parent gets the child's pid.
///
/// # Errors
/// The OS error of `fork`, or `Unsupported` when the process has other threads (a lock
/// one of them held would stay held in the child forever).
pub fn fork_single_threaded() -> io::Result<Option<u32>> {
    if threads() != Some(1) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "fork of a process with several threads",
        ));
    }
    // SAFETY: the process has this one thread, so the child starts with every lock free
    // and every data structure consistent, as the parent's own thread left it.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: installing SIG_DFL touches no handler code; setpgid(0, 0) only
            // changes this process's own group.
            unsafe {
                libc::signal(libc::SIGCHLD, libc::SIG_DFL);
                libc::setpgid(0, 0);
            }
            Ok(None)
        }
        pid => Ok(Some(pid.unsigned_abs())),
    }
}

/// Where this process's command line lies in its memory: `/proc/<pid>/stat` fields 48 and
/// 49 (`arg_start`, `arg_end`).
fn arg_area() -> Option<(usize, usize)> {
    let (start, end) = super::with_stat_fields(std::process::id(), |fields| {
        let mut fields = fields.skip(45);
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })?;
    (start < end).then_some((start, end))
}

/// Rewrites this process's command line, as `ps` and `/proc/<pid>/cmdline` show it, to
/// `args`, in the space the one it was started with takes (what is left is NUL-filled, so
/// it shows as trailing empty arguments). Nothing is written when `args` do not fit.
///
/// Returns whether it was rewritten.
pub fn set_command_line(args: &[&[u8]]) -> bool {
    let Some((start, end)) = arg_area() else {
        return false;
    };
    let mut line = Vec::with_capacity(end - start);
    for arg in args {
        line.extend_from_slice(arg);
        line.push(0);
    }
    if line.len() > end - start {
        return false;
    }
    line.resize(end - start, 0);
    // SAFETY: [start, end) is the argument area the kernel set up at exec, at the top of
    // the main thread's stack: mapped, writable, and this process's own. Nothing holds a
    // Rust reference into it (std copies the arguments out when asked for them), and it
    // is written whole, with a NUL at its end as the kernel expects.
    unsafe {
        std::ptr::copy_nonoverlapping(line.as_ptr(), start as *mut u8, line.len());
    }
    true
}

/// Receives one message on `socket` into `buf`, and the descriptor passed with it
/// (`SCM_RIGHTS`, made close-on-exec), if any: the message's length (0 at end of file).
///
/// # Errors
/// The OS error of `recvmsg` (`Interrupted` for EINTR).
pub fn recv_with_fd(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(buf)];
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut passed = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: each descriptor was installed in this process by the recvmsg above,
            // and nothing else knows of it: it is owned here.
            passed.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    // Any beyond the first are closed here.
    Ok((message.bytes, passed.into_iter().next()))
}
