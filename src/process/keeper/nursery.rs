//! The nursery: one process, `envd __spares <keeper dir>`, that makes spare keepers by
//! forking itself, so that a spare costs a fork instead of an exec of the daemon's binary.
//!
//! An exec'd keeper pays, before it can wait for a spec, for the dynamic loader (whose
//! CPU-feature probing traps to the hypervisor on a VM), the binary's relocations and its
//! first page faults: 0.9 ms of CPU per spare here, against 0.5 ms for the whole of
//! `/bin/true`. A fork of the small, single-threaded nursery costs a fraction of that,
//! and on a 2-core machine that CPU is taken from the processes being run.
//!
//! The daemon asks over a `SOCK_SEQPACKET` pair (the nursery's stdin): each request is the
//! new keeper's socket path, with the keeper's end of a fresh socket pair (its link, as an
//! exec'd spare's stdin is) passed along (`SCM_RIGHTS`); the answer is the keeper's pid,
//! or why it could not be made. The forked keeper takes the command line an exec'd one
//! would have (`envd __keeper <socket>`), leads its own process group, and from there is a
//! spare like any other. The kernel reaps the nursery's children (it ignores SIGCHLD);
//! it ends when the daemon does (end of file on its stdin), and the keepers it made live
//! on, as exec'd ones do.

use std::ffi::OsStr;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};

use crate::error::{Error, Result};
use crate::process::keeper::client::{self, Spare};
use crate::process::keeper::{KEEPER_ARG, server};
use crate::sys;

/// The hidden first argument that makes the binary a nursery.
pub const NURSERY_ARG: &str = "__spares";
/// The nursery's last argument: blank room in its command line, which a forked keeper
/// rewrites to its own (`<socket dir>/k<pid>-<n>.sock` is longer than the directory).
const TITLE_ROOM: &str = "                                                ";
/// Largest request: a socket path (the kernel's limit is 108 bytes).
const MAX_REQUEST: usize = 4096;
/// How long the daemon waits for the nursery's answer before giving up on it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a nursery: `<argv0> __spares <dir> <room>`, its stdin the daemon's request socket.
/// Returns the exit code: 0 when the daemon goes, 1 when the socket fails.
pub fn main(argv0: &OsStr) -> u8 {
    let Ok(requests) = io::stdin().as_fd().try_clone_to_owned() else {
        return 1;
    };
    if server::detach_stdio().is_err() {
        return 1;
    }
    sys::fork::reap_children_automatically();
    let mut path = [0u8; MAX_REQUEST];
    loop {
        let (len, link) = match sys::fork::recv_with_fd(requests.as_fd(), &mut path) {
            Ok(received) => received,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return 1,
        };
        if len == 0 {
            // The daemon is gone.
            return 0;
        }
        let socket = Path::new(OsStr::from_bytes(&path[..len]));
        let answer = match link.map(|link| (link, sys::fork::fork_single_threaded())) {
            None => Err("no link came with the request".to_owned()),
            Some((link, Ok(None))) => {
                // The keeper. The request socket is the nursery's: held here, it would
                // keep the daemon from seeing the nursery go.
                drop(requests);
                become_keeper(argv0, socket, link)
            }
            Some((_, Ok(Some(pid)))) => Ok(pid),
            Some((_, Err(err))) => Err(format!("fork: {err}")),
        };
        let answer = match answer {
            Ok(pid) => pid.to_be_bytes().to_vec(),
            Err(why) => [&[0u8; 4][..], why.as_bytes()].concat(),
        };
        if nix::sys::socket::send(requests.as_raw_fd(), &answer, MsgFlags::MSG_NOSIGNAL).is_err() {
            return 1;
        }
    }
}

/// The forked child's life: the command line of an exec'd keeper for `socket`, then a
/// keeper's, whose first daemon is at the other end of `link`.
fn become_keeper(argv0: &OsStr, socket: &Path, link: OwnedFd) -> ! {
    sys::fork::set_command_line(&[
        argv0.as_bytes(),
        KEEPER_ARG.as_bytes(),
        socket.as_os_str().as_bytes(),
    ]);
    let code = server::serve(socket, UnixStream::from(link));
    std::process::exit(i32::from(code))
}

/// The daemon's handle on its nursery.
pub struct Nursery {
    /// Kept to be reaped: the nursery is the daemon's child.
    _child: tokio::process::Child,
    /// The daemon's end of the request socket; one request at a time.
    requests: Mutex<OwnedFd>,
    /// The nice value keepers are given back before they start a process (see [`Spare`]).
    restore_nice: Option<i32>,
}

impl Nursery {
    /// Starts the nursery of `binary` (a daemon binary), for keepers with sockets in
    /// `dir`. It waits at a lower priority, as spares do, and so do the keepers it makes.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be started.
    pub fn start(binary: &Path, dir: &Path) -> Result<Nursery> {
        let failed = |err| Error::io("error starting the keeper nursery", err);
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|errno| failed(errno.into()))?;
        let (child, pid) = client::spawn_helper(
            binary,
            &[
                OsStr::new(NURSERY_ARG),
                dir.as_os_str(),
                OsStr::new(TITLE_ROOM),
            ],
            theirs,
        )
        .map_err(failed)?;
        let timeout =
            nix::sys::time::TimeVal::new(i64::try_from(ANSWER_TIMEOUT.as_secs()).unwrap_or(2), 0);
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|errno| failed(errno.into()))?;
        Ok(Nursery {
            _child: child,
            requests: Mutex::new(ours),
            restore_nice: client::lower_nice(pid),
        })
    }

    /// A new spare keeper for `socket`, forked by the nursery. Blocks for the round trip.
    ///
    /// # Errors
    /// [`Error::Io`] when the nursery does not answer (it is gone: start another), or
    /// could not fork.
    pub fn spare(&self, socket: PathBuf) -> Result<Spare> {
        let failed = |err| Error::io("error asking the keeper nursery for a keeper", err);
        let (ours, theirs) = UnixStream::pair().map_err(failed)?;
        let pid = {
            let requests = self
                .requests
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let fds = [theirs.as_raw_fd()];
            sendmsg::<()>(
                requests.as_raw_fd(),
                &[IoSlice::new(socket.as_os_str().as_bytes())],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(|errno| failed(errno.into()))?;
            drop(theirs);
            let mut answer = [0u8; 512];
            let len = nix::sys::socket::recv(requests.as_raw_fd(), &mut answer, MsgFlags::empty())
                .map_err(|errno| failed(errno.into()))?;
            match answer
                .get(..4)
                .map(|pid| u32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]))
            {
                Some(pid) if pid != 0 && len >= 4 => pid,
                _ if len == 0 => return Err(failed(io::ErrorKind::UnexpectedEof.into())),
                _ => {
                    let why = String::from_utf8_lossy(&answer[4.min(len)..len]).into_owned();
                    return Err(failed(io::Error::other(why)));
                }
            }
        };
        Spare::forked(pid, ours, socket, self.restore_nice)
    }
}
