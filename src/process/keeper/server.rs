//! The keeper process: starts one process, holds its stdio, reaps it, and serves the
//! daemon over a unix socket (see the module above). Single-threaded, a `poll` loop; it
//! must be small and boring, since the processes it keeps die with it.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::process::keeper::{
    DETACHED_BUFFER, Hello, KeeperSpec, ORPHAN_EXIT_WAIT, start_time, to_daemon, to_keeper,
};
use crate::rpc::envelope::{Decoder, encode};
use crate::sys::{ChildSetup, boot_ticks, vfork};

/// Largest read from a pipe at once (envd's stdout/stderr event size).
const READ_CHUNK: usize = 32 * 1024;
/// Largest read from a terminal at once (envd's PTY event size).
const PTY_CHUNK: usize = 16 * 1024;
/// The keeper's read buffer: the spec and the daemon's later frames come through it in
/// pieces this large, and output in pieces of at most [`READ_CHUNK`] (or [`PTY_CHUNK`]).
const READ_BUF: usize = 64 * 1024;
/// Largest frame the daemon may send.
const MAX_FRAME: usize = 1024 * 1024;

/// Runs a keeper: `envd __keeper <socket>`, its stdin one end of a socket pair whose other
/// end the daemon holds. SIGPIPE is already ignored (`sys::start_like_std`, at the entry
/// point). Returns the exit code: 0, or 1 when the daemon could not be served.
pub fn main(socket: &Path) -> u8 {
    match io::stdin().as_fd().try_clone_to_owned() {
        Ok(first) => serve(socket, UnixStream::from(first)),
        Err(_) => 1,
    }
}

/// Runs a keeper whose first daemon is at the other end of `first` (a spare's: it sends
/// the spec there). Returns the exit code, as [`main`].
pub fn serve(socket: &Path, first: UnixStream) -> u8 {
    match run(socket, first) {
        Ok(()) => 0,
        Err(_) => {
            let _ = std::fs::remove_file(socket);
            1
        }
    }
}

struct Output {
    fd: OwnedFd,
    kind: u8,
    open: bool,
}

struct Keeper {
    hello: Hello,
    outputs: Vec<Output>,
    stdin: Option<OwnedFd>,
    pty: Option<OwnedFd>,
    conn: Option<(UnixStream, Decoder)>,
    buffered: VecDeque<(u8, Bytes)>,
    buffered_bytes: usize,
    status: Option<i32>,
    killed: bool,
    released: bool,
    /// The exit was sent on the current connection.
    exit_sent: bool,
    /// Input waiting for the process to read it: (stdin, terminal).
    pending_stdin: Vec<u8>,
    pending_pty: Vec<u8>,
    /// Close stdin once `pending_stdin` is written.
    close_stdin_after: bool,
    /// Where output and the daemon's frames are read into: one buffer for the keeper's
    /// life, its pages touched before the spec came (see `run`), so a read costs no
    /// allocation, no zeroing and no page faults.
    read_buf: Vec<u8>,
}

/// Input the keeper holds for a process that is not reading it; past this the keeper stops
/// reading the daemon's frames (the daemon's writes then wait: back-pressure).
const PENDING_INPUT: usize = 1024 * 1024;

/// Largest spec: the command line and environment, bounded by the kernel's own limit.
const MAX_SPEC: usize = 8 * 1024 * 1024;

fn run(socket: &Path, first: UnixStream) -> io::Result<()> {
    // Ready before the spec comes: a spare keeper waits here, and a start through it then
    // begins with the spec.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    // Fds 0 and 1 (a copy of `first`, or the nursery's) are freed from the daemon.
    detach_stdio()?;
    let mut decoder = Decoder::new(MAX_SPEC);
    // Zeroed here, while a spare waits, rather than on a start's path.
    let mut read_buf = vec![0u8; READ_BUF];
    // End of file without a spec: the daemon that started this spare is gone.
    let spec: KeeperSpec = serde_json::from_slice(&read_spec(&first, &mut decoder, &mut read_buf)?)
        .map_err(io::Error::other)?;
    let Started {
        pid,
        stamped,
        outputs,
        stdin,
        pty,
    } = match launch(&spec) {
        Ok(started) => started,
        Err(message) => {
            let _ = (&first).write_all(&encode(to_daemon::START_FAILED, message.as_bytes()));
            return Err(io::Error::other(message));
        }
    };
    let hello = Hello {
        pid,
        // Read from /proc only when the spawn straddled a tick: that read waits while the
        // new process finishes its exec, and the hello (the client's start event) with it.
        start_time: stamped.or_else(|| start_time(pid)).unwrap_or(0),
        pty: pty.is_some(),
    };
    let pidfd = crate::sys::pidfd_open(pid)?;
    let mut keeper = Keeper {
        hello,
        outputs,
        stdin,
        pty,
        conn: None,
        buffered: VecDeque::new(),
        buffered_bytes: 0,
        status: None,
        killed: false,
        released: false,
        exit_sent: false,
        pending_stdin: Vec::new(),
        pending_pty: Vec::new(),
        close_stdin_after: false,
        read_buf,
    };
    decoder.set_max_len(MAX_FRAME);
    keeper.attach(first, decoder);
    let mut ended_at: Option<Instant> = None;
    loop {
        if keeper.released {
            break;
        }
        if let Some(ended) = ended_at {
            if keeper.conn.is_none() && ended.elapsed() > ORPHAN_EXIT_WAIT {
                break;
            }
        }
        let reading = keeper.conn.is_some() || keeper.buffered_bytes < DETACHED_BUFFER;
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let input_full = keeper.pending_stdin.len() + keeper.pending_pty.len() >= PENDING_INPUT;
        let conn_index = keeper
            .conn
            .as_ref()
            .filter(|_| !input_full)
            .map(|(stream, _)| {
                fds.push(PollFd::new(stream.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
        let stdin_index = keeper
            .stdin
            .as_ref()
            .filter(|_| !keeper.pending_stdin.is_empty())
            .map(|fd| {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                fds.len() - 1
            });
        let pty_index = keeper
            .pty
            .as_ref()
            .filter(|_| !keeper.pending_pty.is_empty())
            .map(|fd| {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                fds.len() - 1
            });
        let pid_index = keeper.status.is_none().then(|| {
            fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
            fds.len() - 1
        });
        let mut output_indexes = Vec::new();
        if reading {
            for (i, output) in keeper.outputs.iter().enumerate().filter(|(_, o)| o.open) {
                fds.push(PollFd::new(output.fd.as_fd(), PollFlags::POLLIN));
                output_indexes.push((i, fds.len() - 1));
            }
        }
        poll(&mut fds, PollTimeout::from(1000u16)).or_else(|err| {
            if err == nix::errno::Errno::EINTR {
                Ok(0)
            } else {
                Err(io::Error::from(err))
            }
        })?;
        let ready = |index: usize| fds[index].revents().is_some_and(|r| !r.is_empty());
        let accept = ready(0);
        let conn_ready = conn_index.is_some_and(ready);
        let exited = pid_index.is_some_and(ready);
        let stdin_ready = stdin_index.is_some_and(ready);
        let pty_ready = pty_index.is_some_and(ready);
        let outputs_ready: Vec<usize> = output_indexes
            .iter()
            .filter(|(_, p)| ready(*p))
            .map(|(i, _)| *i)
            .collect();
        drop(fds);
        if accept {
            keeper.accept(&listener);
        }
        if conn_ready {
            keeper.read_daemon();
        }
        for i in outputs_ready {
            keeper.read_output(i);
        }
        if stdin_ready {
            keeper.flush_stdin();
        }
        if pty_ready {
            if let Some(pty) = &keeper.pty {
                if write_some(pty, &mut keeper.pending_pty).is_err() {
                    keeper.pending_pty.clear();
                }
            }
        }
        if exited {
            let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            keeper.status = Some(raw_status(status));
            ended_at = Some(Instant::now());
        }
        keeper.maybe_send_exit();
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

impl Keeper {
    fn accept(&mut self, listener: &UnixListener) {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        self.attach(stream, Decoder::new(MAX_FRAME));
    }

    /// Serves a daemon on `stream` (blocking): the hello, then what was buffered for it. A
    /// newer daemon replaces an older connection.
    fn attach(&mut self, stream: UnixStream, decoder: Decoder) {
        self.conn = Some((stream, decoder));
        self.exit_sent = false;
        let hello = serde_json::to_vec(&self.hello).unwrap_or_default();
        self.send(to_daemon::HELLO, &hello);
        while let Some((kind, data)) = self.buffered.pop_front() {
            self.buffered_bytes -= data.len();
            if !self.send(kind, &data) {
                self.buffered.push_front((kind, data));
                break;
            }
        }
    }

    /// Sends a frame; on failure drops the connection and returns false.
    fn send(&mut self, kind: u8, data: &[u8]) -> bool {
        let Some((stream, _)) = self.conn.as_mut() else {
            return false;
        };
        if stream.write_all(&encode(kind, data)).is_ok() {
            return true;
        }
        self.conn = None;
        false
    }

    fn read_output(&mut self, index: usize) {
        let size = if self.outputs[index].kind == to_daemon::PTY {
            PTY_CHUNK
        } else {
            READ_CHUNK
        };
        let output = &mut self.outputs[index];
        let kind = output.kind;
        match nix::unistd::read(&output.fd, &mut self.read_buf[..size]) {
            // EIO is a terminal's end of file.
            Ok(0) | Err(nix::errno::Errno::EIO) => output.open = false,
            Ok(n) => {
                let data = Bytes::copy_from_slice(&self.read_buf[..n]);
                if !self.send(kind, &data) {
                    self.buffered_bytes += data.len();
                    self.buffered.push_back((kind, data));
                }
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(_) => output.open = false,
        }
    }

    fn read_daemon(&mut self) {
        let Some((stream, decoder)) = self.conn.as_mut() else {
            return;
        };
        match stream.read(&mut self.read_buf) {
            Ok(0) | Err(_) => {
                self.conn = None;
                return;
            }
            Ok(n) => decoder.push(&self.read_buf[..n]),
        }
        let mut frames = Vec::new();
        while let Ok(Some(frame)) = decoder.next_frame() {
            frames.push(frame);
        }
        for (kind, data) in frames {
            self.handle(kind, &data);
        }
    }

    fn handle(&mut self, kind: u8, data: &[u8]) {
        match kind {
            to_keeper::STDIN if self.stdin.is_some() && !self.close_stdin_after => {
                self.pending_stdin.extend_from_slice(data);
            }
            to_keeper::PTY_IN if self.pty.is_some() => self.pending_pty.extend_from_slice(data),
            to_keeper::CLOSE_STDIN => {
                if self.pending_stdin.is_empty() {
                    self.stdin = None;
                } else {
                    self.close_stdin_after = true;
                }
            }
            to_keeper::RESIZE if data.len() == 4 => {
                if let Some(pty) = &self.pty {
                    let cols = u16::from_be_bytes([data[0], data[1]]);
                    let rows = u16::from_be_bytes([data[2], data[3]]);
                    let _ = crate::sys::set_window_size(pty.as_fd(), cols, rows);
                }
            }
            to_keeper::KILLED => self.killed = true,
            to_keeper::RELEASE => self.released = true,
            _ => {}
        }
    }

    /// Once the process has exited and its output drained (or it was killed), tells the
    /// connected daemon.
    fn maybe_send_exit(&mut self) {
        let Some(status) = self.status else { return };
        let drained = self.outputs.iter().all(|o| !o.open) || self.killed;
        if !drained || self.exit_sent || self.conn.is_none() || !self.buffered.is_empty() {
            return;
        }
        // Then wait for the daemon's release (or for another daemon, if this one leaves).
        self.exit_sent = self.send(to_daemon::EXIT, &status.to_be_bytes());
    }
}

impl Keeper {
    fn flush_stdin(&mut self) {
        let Some(stdin) = &self.stdin else { return };
        if write_some(stdin, &mut self.pending_stdin).is_err() {
            // The process closed its stdin: nothing more will be read.
            self.pending_stdin.clear();
            self.stdin = None;
            return;
        }
        if self.pending_stdin.is_empty() && self.close_stdin_after {
            self.stdin = None;
            self.close_stdin_after = false;
        }
    }
}

/// Writes what a non-blocking descriptor takes now and drops it from `pending`.
fn write_some(fd: &OwnedFd, pending: &mut Vec<u8>) -> io::Result<()> {
    while !pending.is_empty() {
        match nix::unistd::write(fd, pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(nix::errno::Errno::EAGAIN) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

fn raw_status(status: nix::Result<nix::sys::wait::WaitStatus>) -> i32 {
    use nix::sys::wait::WaitStatus;
    match status {
        Ok(WaitStatus::Exited(_, code)) => (code & 0xff) << 8,
        Ok(WaitStatus::Signaled(_, signal, core)) => (signal as i32) | if core { 0x80 } else { 0 },
        // Not expected for a child we wait for without WUNTRACED; report "killed".
        _ => libc::SIGKILL,
    }
}

fn is_exec_failure(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR)
    )
}

/// A process just started, and what the keeper holds of it.
struct Started {
    pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22) when known without reading it there.
    stamped: Option<u64>,
    outputs: Vec<Output>,
    stdin: Option<OwnedFd>,
    pty: Option<OwnedFd>,
}

/// Starts the process of `spec`; on failure, what the client is told.
fn launch(spec: &KeeperSpec) -> Result<Started, String> {
    if !spec.cwd.exists() {
        return Err(format!("cwd '{}' does not exist", spec.cwd.display()));
    }
    match start(spec, &spec.program, &spec.args) {
        Err(err) if is_exec_failure(&err) => {
            // As envd: a program that cannot run goes through the shell, which says why on
            // stderr and exits 127 or 126.
            let mut args = vec![
                "-c".to_owned(),
                "exec \"$0\" \"$@\"".to_owned(),
                spec.program.clone(),
            ];
            args.extend(spec.args.iter().cloned());
            start(spec, "/bin/sh", &args)
        }
        other => other,
    }
    .map_err(|err| format!("error starting process: {err}"))
}

fn start(spec: &KeeperSpec, program: &str, args: &[String]) -> io::Result<Started> {
    let setup = ChildSetup {
        credentials: spec.credentials.clone(),
        controlling_tty: spec.pty.is_some(),
        oom_score_adj: spec.oom_score_adj,
        die_with_parent: true,
    };
    let run = |stdio: [BorrowedFd<'_>; 3]| {
        let before = boot_ticks();
        let pid = vfork::spawn(&vfork::Command {
            program,
            args,
            env: &spec.env,
            cwd: &spec.cwd,
            stdio,
            setup: &setup,
        })?;
        // The kernel stamps the child with the boot clock during the spawn, in the unit
        // `boot_ticks` reads: a spawn begun and ended within one tick began in that tick.
        let stamped = before.filter(|&tick| boot_ticks() == Some(tick));
        io::Result::Ok((pid, stamped))
    };
    if let Some((cols, rows)) = spec.pty {
        let (master, slave) = crate::process::pty::open_raw(cols, rows)?;
        let (pid, stamped) = run([slave.as_fd(); 3])?;
        drop(slave);
        set_nonblocking(&master)?;
        let reader = master.try_clone()?;
        let outputs = vec![Output {
            fd: reader,
            kind: to_daemon::PTY,
            open: true,
        }];
        return Ok(Started {
            pid,
            stamped,
            outputs,
            stdin: None,
            pty: Some(master),
        });
    }
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from);
    let (stdout, stdout_child) = pipe()?;
    let (stderr, stderr_child) = pipe()?;
    let (stdin, stdin_child) = if spec.stdin {
        let (read, write) = pipe()?;
        (Some(write), read)
    } else {
        (None, OwnedFd::from(std::fs::File::open("/dev/null")?))
    };
    let (pid, stamped) = run([
        stdin_child.as_fd(),
        stdout_child.as_fd(),
        stderr_child.as_fd(),
    ])?;
    drop((stdin_child, stdout_child, stderr_child));
    set_nonblocking(&stdout)?;
    set_nonblocking(&stderr)?;
    if let Some(stdin) = &stdin {
        set_nonblocking(stdin)?;
    }
    let outputs = vec![
        Output {
            fd: stdout,
            kind: to_daemon::STDOUT,
            open: true,
        },
        Output {
            fd: stderr,
            kind: to_daemon::STDERR,
            open: true,
        },
    ];
    Ok(Started {
        pid,
        stamped,
        outputs,
        stdin,
        pty: None,
    })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags =
        OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

/// Reads frames from the daemon's end of the pair until the spec.
fn read_spec(mut stream: &UnixStream, decoder: &mut Decoder, buf: &mut [u8]) -> io::Result<Bytes> {
    loop {
        while let Some((kind, payload)) = decoder.next_frame().map_err(io::Error::other)? {
            if kind == to_keeper::SPEC {
                return Ok(payload);
            }
        }
        let n = stream.read(buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        decoder.push(&buf[..n]);
    }
}

/// Points the keeper's own stdin and stdout at `/dev/null`: the daemon that started it may
/// be gone at any moment, and the keeper must not depend on it.
pub(crate) fn detach_stdio() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null).map_err(io::Error::from)?;
    nix::unistd::dup2_stdout(&null).map_err(io::Error::from)?;
    Ok(())
}
