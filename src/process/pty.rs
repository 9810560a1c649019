//! Pseudo-terminals for PTY processes: allocation with a size. The keeper holds the
//! master side; resizes go through `sys::set_window_size`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// Allocates a terminal of `cols` × `rows` and returns `(master, slave)`, both
/// close-on-exec, for callers without an async runtime (the keeper).
///
/// # Errors
/// The OS error of `openpty`.
pub fn open_raw(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let size = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).map_err(io::Error::from)?;
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    }
    Ok((pty.master, pty.slave))
}
