//! Pseudo-terminals: allocation with a size, non-blocking async reads and writes on the
//! master side, resizing.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use bytes::{Bytes, BytesMut};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use tokio::io::unix::AsyncFd;

/// Largest chunk read from a terminal at once (envd's PTY event size).
pub const PTY_CHUNK: usize = 16 * 1024;

/// The master side of a terminal, shared by the output reader, input writers and resizes.
#[derive(Debug)]
pub struct Master {
    fd: AsyncFd<OwnedFd>,
}

/// A fresh terminal pair: the master for the daemon, the slave for the child's stdio.
pub struct Pair {
    /// Daemon side.
    pub master: Master,
    /// Child side; the daemon must drop its copy once the child has started.
    pub slave: OwnedFd,
}

/// Allocates a terminal of `cols` × `rows`.
///
/// # Errors
/// The OS error of `openpty` or of making the master non-blocking.
pub fn open(cols: u16, rows: u16) -> io::Result<Pair> {
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
    let flags = OFlag::from_bits_truncate(
        fcntl(pty.master.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?,
    );
    fcntl(
        pty.master.as_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )
    .map_err(io::Error::from)?;
    Ok(Pair {
        master: Master {
            fd: crate::sys::async_fd(pty.master)?,
        },
        slave: pty.slave,
    })
}

impl Master {
    /// Reads the next chunk; `None` at the end (the kernel reports EIO once the last slave
    /// descriptor is closed, which is the terminal's end of file).
    ///
    /// # Errors
    /// Any other read error.
    pub async fn read(&self) -> io::Result<Option<Bytes>> {
        let mut buf = BytesMut::zeroed(PTY_CHUNK);
        loop {
            let mut guard = self.fd.readable().await?;
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(io::Error::from))
            {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(Some(buf.freeze()));
                }
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Ok(None),
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
    }

    /// Writes all of `data` (waits while the terminal's input queue is full).
    ///
    /// # Errors
    /// The OS error of `write`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Sets the window size (the foreground process gets SIGWINCH).
    ///
    /// # Errors
    /// The OS error of the ioctl.
    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        crate::sys::set_window_size(self.fd.get_ref().as_fd(), cols, rows)
    }
}
