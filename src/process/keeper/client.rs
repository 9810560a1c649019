//! The daemon's side of a keeper: launching one for a new process, connecting to one that
//! survived a daemon restart, and the link that carries output in and input out.

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::process::keeper::{Hello, KEEPER_ARG, KeeperSpec, to_daemon, to_keeper};
use crate::process::output::{Chunk, Hub, Stream};
use crate::rpc::envelope::{Decoder, encode};
use crate::sys;

/// The daemon's own binary, whose keepers it starts.
pub const OWN_BINARY: &str = "/proc/self/exe";
/// How long connecting to a keeper's socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest frame a keeper may send.
const MAX_FRAME: usize = 1024 * 1024;

/// The daemon's end of one keeper connection: send input; output and the exit arrive
/// through [`Link::forward_output`].
pub struct Link {
    /// What the keeper said on connecting.
    pub hello: Hello,
    writer: Mutex<OwnedWriteHalf>,
    /// The read half and its decoder (which may already hold bytes read after the hello).
    reader: std::sync::Mutex<Option<(OwnedReadHalf, Decoder)>>,
}

/// A keeper started ahead of need: exec'd, its socket bound, waiting for its spec. Starting
/// a process through a spare skips the keeper's exec (most of what a keeper adds to a
/// start). The daemon talks to it over a socket pair that is the keeper's stdin, so a start
/// is one round trip: the spec goes out, the hello (or why the process cannot start) comes
/// back on what is then the process's link. A spare whose daemon goes away reads end of
/// file and exits.
///
/// A spare waits at a lower priority ([`SPARE_NICE`]): its exec and start-up then yield the
/// CPU to the process just started and to the daemon relaying it (a short command's whole
/// life is about the length of a keeper's start-up, and on a small machine they share a
/// core). It gets the daemon's priority back just before its spec is sent.
pub struct Spare {
    pid: u32,
    /// An exec'd keeper, the daemon's child, to be reaped; `None` for one the nursery
    /// forked (the kernel reaps those, see [`super::nursery`]).
    child: Option<tokio::process::Child>,
    stream: UnixStream,
    socket: PathBuf,
    /// The nice value to give the keeper back before it starts a process; `None` when it
    /// was never lowered (without root it could not be raised again).
    restore_nice: Option<i32>,
}

/// How much nicer than the daemon a spare keeper runs.
const SPARE_NICE: i32 = 10;

/// Starts `binary` (a daemon binary) in a helper's role given by `args` (a keeper, the
/// nursery): in its own process group, so that signals meant for the daemon's group do
/// not reach it, with `stdin` as its stdin, no stdout, the daemon's stderr, and left
/// running when the handle is dropped. The handle, and the pid.
pub(crate) fn spawn_helper(
    binary: &Path,
    args: &[&OsStr],
    stdin: std::os::fd::OwnedFd,
) -> std::io::Result<(tokio::process::Child, u32)> {
    let child = tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()?;
    let pid = child.id().ok_or(std::io::ErrorKind::NotFound)?;
    Ok((child, pid))
}

/// Reaps an exec'd keeper (the daemon's child) once it exits, so it is not left a zombie
/// of the daemon's; a forked one (`None`) the kernel reaps.
fn reap_when_it_exits(child: Option<tokio::process::Child>) {
    if let Some(mut child) = child {
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
    }
}

/// Lowers the priority of `pid` (a spare keeper, or the nursery) by [`SPARE_NICE`] from
/// the daemon's; the daemon's, to give back, when it could (without root it could not be
/// raised again, so it is left alone).
pub(crate) fn lower_nice(pid: u32) -> Option<i32> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let nice = sys::nice_of(std::process::id()).ok()?;
    sys::set_nice(pid, (nice + SPARE_NICE).min(19)).ok()?;
    Some(nice)
}

/// Why [`Spare::start`] failed.
pub enum StartError {
    /// The keeper could not be given its spec or did not answer (it died, or was killed,
    /// before it started anything): another keeper may well succeed.
    KeeperLost(Error),
    /// The keeper answered: the process cannot be started.
    Failed(Error),
}

impl From<StartError> for Error {
    fn from(err: StartError) -> Self {
        match err {
            StartError::KeeperLost(err) | StartError::Failed(err) => err,
        }
    }
}

impl Spare {
    /// Starts a keeper of `binary` (a daemon binary, run as `<binary> __keeper <socket>`:
    /// [`OWN_BINARY`] for the daemon's own) that will serve on `socket` once given a spec.
    ///
    /// # Errors
    /// [`Error::Io`] when the binary cannot be run.
    pub fn spawn(binary: &Path, socket: PathBuf) -> Result<Spare> {
        let failed = |err| Error::io("error starting a process keeper", err);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(failed)?;
        let (child, pid) = spawn_helper(
            binary,
            &[OsStr::new(KEEPER_ARG), socket.as_os_str()],
            theirs.into(),
        )
        .map_err(failed)?;
        let restore_nice = lower_nice(pid);
        Spare::with(pid, Some(child), ours, socket, restore_nice)
    }

    /// A spare the nursery forked (see [`super::nursery`]): `pid`, waiting for its spec on
    /// the other end of `stream`; its priority was lowered from `restore_nice`.
    ///
    /// # Errors
    /// [`Error::Io`] when the stream cannot be registered with the runtime.
    pub fn forked(
        pid: u32,
        stream: std::os::unix::net::UnixStream,
        socket: PathBuf,
        restore_nice: Option<i32>,
    ) -> Result<Spare> {
        Spare::with(pid, None, stream, socket, restore_nice)
    }

    fn with(
        pid: u32,
        child: Option<tokio::process::Child>,
        stream: std::os::unix::net::UnixStream,
        socket: PathBuf,
        restore_nice: Option<i32>,
    ) -> Result<Spare> {
        let failed = |err| Error::io("error starting a process keeper", err);
        stream.set_nonblocking(true).map_err(failed)?;
        Ok(Spare {
            pid,
            child,
            stream: UnixStream::from_std(stream).map_err(failed)?,
            socket,
            restore_nice,
        })
    }

    /// Lets an unused spare go: it reads end of file on its stdin and exits, and is reaped
    /// (not left a zombie of the daemon's).
    pub fn discard(self) {
        reap_when_it_exits(self.child);
    }

    /// Where the keeper serves daemons that connect later.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Has the keeper start `spec`; the link to it once it has.
    ///
    /// # Errors
    /// [`StartError::KeeperLost`] when the keeper is gone before answering;
    /// [`StartError::Failed`] with [`Error::InvalidArgument`] when the process cannot be
    /// started (the keeper says why).
    pub async fn start(self, spec: &KeeperSpec) -> std::result::Result<Link, StartError> {
        let Spare {
            pid,
            child,
            stream,
            socket: _,
            restore_nice,
        } = self;
        // The process inherits the keeper's priority. A keeper already gone fails below.
        if let Some(nice) = restore_nice {
            let _ = sys::set_nice(pid, nice);
        }
        // An exec'd keeper is the daemon's child until the daemon goes.
        reap_when_it_exits(child);
        let json = serde_json::to_vec(spec).map_err(|err| {
            StartError::Failed(Error::Internal(format!("encoding a keeper spec: {err}")))
        })?;
        let lost =
            |err| StartError::KeeperLost(Error::io("error talking to a process keeper", err));
        let (mut reader, mut writer) = stream.into_split();
        writer
            .write_all(&encode(to_keeper::SPEC, &json))
            .await
            .map_err(lost)?;
        let mut decoder = Decoder::new(MAX_FRAME);
        match greeting(&mut reader, &mut decoder).await.map_err(lost)? {
            Greeting::Hello(hello) => Ok(Link::new(hello, reader, writer, decoder)),
            Greeting::StartFailed(why) => Err(StartError::Failed(Error::InvalidArgument(why))),
        }
    }
}

/// Connects to a running keeper and reads its hello.
///
/// # Errors
/// [`Error::Io`] when the socket does not answer like a keeper.
pub async fn connect(socket: &Path) -> Result<Link> {
    let fail = |err: std::io::Error| {
        Error::io(
            format!("error reaching the keeper at {}", socket.display()),
            err,
        )
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| fail(std::io::ErrorKind::TimedOut.into()))?
        .map_err(fail)?;
    let (mut reader, writer) = stream.into_split();
    let mut decoder = Decoder::new(MAX_FRAME);
    match tokio::time::timeout(CONNECT_TIMEOUT, greeting(&mut reader, &mut decoder))
        .await
        .map_err(|_| fail(std::io::ErrorKind::TimedOut.into()))?
        .map_err(fail)?
    {
        Greeting::Hello(hello) => Ok(Link::new(hello, reader, writer, decoder)),
        Greeting::StartFailed(_) => Err(fail(std::io::Error::other("no hello"))),
    }
}

/// What a keeper says first.
enum Greeting {
    /// Its hello: the process it keeps.
    Hello(Hello),
    /// (A keeper just given its spec.) Why the process could not start, for the client.
    StartFailed(String),
}

/// Reads a keeper's first frame.
async fn greeting(reader: &mut OwnedReadHalf, decoder: &mut Decoder) -> std::io::Result<Greeting> {
    let (kind, payload) = read_frame(reader, decoder, &mut [0u8; 4096])
        .await?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
    match kind {
        to_daemon::HELLO => serde_json::from_slice(&payload)
            .map(Greeting::Hello)
            .map_err(std::io::Error::other),
        to_daemon::START_FAILED => Ok(Greeting::StartFailed(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        _ => Err(std::io::Error::other(
            "a process keeper answered out of turn",
        )),
    }
}

/// Reads one whole frame (`None` at end of stream), reading through `buf`.
async fn read_frame(
    reader: &mut OwnedReadHalf,
    decoder: &mut Decoder,
    buf: &mut [u8],
) -> std::io::Result<Option<(u8, Bytes)>> {
    loop {
        if let Some(frame) = decoder.next_frame().map_err(std::io::Error::other)? {
            return Ok(Some(frame));
        }
        let n = reader.read(buf).await?;
        if n == 0 {
            return Ok(None);
        }
        decoder.push(&buf[..n]);
    }
}

impl Link {
    fn new(hello: Hello, reader: OwnedReadHalf, writer: OwnedWriteHalf, decoder: Decoder) -> Link {
        Link {
            hello,
            writer: Mutex::new(writer),
            reader: std::sync::Mutex::new(Some((reader, decoder))),
        }
    }

    /// Hands the keeper's output to `hub` until the keeper reports the exit, and returns
    /// it; a keeper that vanishes first reports a lost process (SIGKILL). Delivery waits
    /// when every subscriber is behind, and so does the reading: back-pressure reaches the
    /// keeper, and through its pipes the process. Runs once per link: the reader is taken.
    pub async fn forward_output(&self, hub: &Hub) -> ExitStatus {
        let lost = ExitStatus::from_raw(libc::SIGKILL);
        let Some((mut reader, mut decoder)) = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return lost;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let frame = match read_frame(&mut reader, &mut decoder, &mut buf).await {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => {
                    tracing::warn!("a process keeper went away before reporting its exit");
                    return lost;
                }
            };
            let stream = match frame.0 {
                to_daemon::STDOUT => Stream::Stdout,
                to_daemon::STDERR => Stream::Stderr,
                to_daemon::PTY => Stream::Pty,
                to_daemon::EXIT if frame.1.len() == 4 => {
                    let raw = i32::from_be_bytes([frame.1[0], frame.1[1], frame.1[2], frame.1[3]]);
                    return ExitStatus::from_raw(raw);
                }
                _ => continue,
            };
            hub.deliver(Chunk {
                stream,
                data: frame.1,
            })
            .await;
        }
    }

    async fn send(&self, kind: u8, data: &[u8]) -> Result<()> {
        self.writer
            .lock()
            .await
            .write_all(&encode(kind, data))
            .await
            .map_err(|err| Error::io("error talking to the process keeper", err))
    }

    /// Input for stdin.
    ///
    /// # Errors
    /// [`Error::Io`] when the keeper is gone.
    pub async fn stdin(&self, data: &[u8]) -> Result<()> {
        self.send(to_keeper::STDIN, data).await
    }

    /// Input for the terminal.
    ///
    /// # Errors
    /// [`Error::Io`] when the keeper is gone.
    pub async fn pty(&self, data: &[u8]) -> Result<()> {
        self.send(to_keeper::PTY_IN, data).await
    }

    /// Closes stdin.
    ///
    /// # Errors
    /// [`Error::Io`] when the keeper is gone.
    pub async fn close_stdin(&self) -> Result<()> {
        self.send(to_keeper::CLOSE_STDIN, &[]).await
    }

    /// Resizes the terminal.
    ///
    /// # Errors
    /// [`Error::Io`] when the keeper is gone.
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        let mut size = [0u8; 4];
        size[..2].copy_from_slice(&cols.to_be_bytes());
        size[2..].copy_from_slice(&rows.to_be_bytes());
        self.send(to_keeper::RESIZE, &size).await
    }

    /// Tells the keeper the process was killed (its end does not wait for output).
    pub async fn killed(&self) {
        let _ = self.send(to_keeper::KILLED, &[]).await;
    }

    /// Lets the keeper go: the daemon has the exit.
    pub async fn release(&self) {
        let _ = self.send(to_keeper::RELEASE, &[]).await;
    }
}
