//! The table of managed processes: live ones by pid (and tag), and the exits of ended ones
//! retained for late `Connect` calls. Each process has one lifecycle task that reaps it,
//! enforces its deadline and publishes its end.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::process::deadline::{Deadline, Deadlines, Expire};
use crate::process::exit::Exit;
use crate::process::output::{Chunk, Ended, Hub, SOURCE_QUEUE, Stream, Subscription};
use crate::process::pty::Master;
use crate::process::spawn::{self, Io, Spec};

/// How long an ended process's exit stays available to `Connect` (envd's value).
pub const EXIT_RETENTION: Duration = Duration::from_secs(30);
/// Largest chunk read from a pipe at once (envd's stdout/stderr event size).
pub const PIPE_CHUNK: usize = 32 * 1024;

/// A process as it was asked for, reported back by `List`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Program.
    pub cmd: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Variables from the request.
    pub envs: BTreeMap<String, String>,
    /// Working directory as sent (unresolved).
    pub cwd: Option<String>,
}

/// Why a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// It exited by itself (also when a kill raced its exit).
    Exit,
    /// Its deadline passed and the daemon killed it.
    Deadline,
    /// A signal ended it (`SendSignal`, or one sent from inside the sandbox).
    Signal,
}

impl EndReason {
    /// The name clients read (`envd-end-reason` trailer).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Exit => "exit",
            EndReason::Deadline => "deadline",
            EndReason::Signal => "signal",
        }
    }
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running, no kill under way.
    Running,
    /// Being killed, not yet reaped.
    Ending,
    /// Reaped; its exit is retained.
    Exited,
}

/// What the extension listing shows of one process.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Pid.
    pub pid: u32,
    /// Tag.
    pub tag: Option<String>,
    /// What was asked for.
    pub config: Config,
    /// Where it is in its life.
    pub phase: Phase,
    /// Its deadline, if any.
    pub deadline: Option<Deadline>,
    /// How it ended, once it has.
    pub end: Option<(Exit, EndReason)>,
}

/// How a request names a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// By pid.
    Pid(u32),
    /// By tag (the most recently started process with it).
    Tag(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Pid(pid) => write!(f, "process with pid {pid}"),
            Selector::Tag(tag) => write!(f, "process with tag {tag}"),
        }
    }
}

enum Input {
    /// Stdin pipe; `None` once closed (or when started without stdin).
    Pipe(tokio::sync::Mutex<Option<ChildStdin>>),
    Pty(Arc<Master>),
}

/// One managed process.
pub struct Process {
    /// Its pid (also its process group and session id).
    pub pid: u32,
    /// Its tag, if started with one.
    pub tag: Option<String>,
    /// What was asked for.
    pub config: Config,
    /// Start order, to pick the newest of several processes with one tag.
    seq: u64,
    input: Input,
    hub: Arc<Hub>,
    /// Set by an explicit kill: the end no longer waits for output to drain.
    killed: AtomicBool,
    kill_notify: Notify,
    /// The deadline kill has begun (it begins at most once).
    deadline_kill: AtomicBool,
    /// SIGTERM or SIGKILL was sent through `SendSignal`.
    signalled: AtomicBool,
    /// Time between the deadline's SIGTERM and SIGKILL.
    kill_grace: Duration,
}

struct Retained {
    seq: u64,
    tag: Option<String>,
    config: Config,
    exit: Exit,
    reason: EndReason,
}

#[derive(Default)]
struct Tables {
    live: HashMap<u32, Arc<Process>>,
    retained: HashMap<u32, Retained>,
}

/// All managed processes.
pub struct ProcessTable {
    tables: Mutex<Tables>,
    seq: AtomicU64,
    deadlines: Arc<Deadlines<Process>>,
    kill_grace: Duration,
}

/// What `Connect` finds.
pub enum Found {
    /// A live process.
    Live(Arc<Process>),
    /// An ended one whose exit is still retained.
    Ended(u32, Ended),
}

impl ProcessTable {
    /// An empty table whose deadline kills send SIGTERM, then SIGKILL after `kill_grace`.
    /// Starts the deadline reaper (needs a runtime).
    pub fn new(kill_grace: Duration) -> Arc<Self> {
        Arc::new(ProcessTable {
            tables: Mutex::new(Tables::default()),
            seq: AtomicU64::new(0),
            deadlines: Deadlines::start(),
            kill_grace,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a process and subscribes the caller to its output before any is read, so
    /// nothing it writes is lost. `deadline` bounds its life (it is killed when it passes).
    ///
    /// # Errors
    /// As [`spawn::spawn`].
    pub fn start(
        self: &Arc<Self>,
        spec: &Spec,
        config: Config,
        tag: Option<String>,
        deadline: Option<Duration>,
    ) -> Result<(Arc<Process>, Subscription)> {
        let spawned = spawn::spawn(spec)?;
        let pid = spawned.pid;
        let hub = Hub::new();
        let subscription = hub
            .subscribe()
            .map_err(|_| Error::Internal("a new process hub is closed".into()))?;
        let (source, source_rx) = mpsc::channel(SOURCE_QUEUE);
        let mut readers = JoinSet::new();
        let input = match spawned.io {
            Io::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                readers.spawn(read_pipe(stdout, Stream::Stdout, source.clone()));
                readers.spawn(read_pipe(stderr, Stream::Stderr, source.clone()));
                Input::Pipe(tokio::sync::Mutex::new(stdin))
            }
            Io::Pty(master) => {
                let master = Arc::new(master);
                readers.spawn(read_pty(master.clone(), source.clone()));
                Input::Pty(master)
            }
        };
        drop(source);
        let process = Arc::new(Process {
            pid,
            tag: tag.clone(),
            config,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            input,
            hub: hub.clone(),
            killed: AtomicBool::new(false),
            kill_notify: Notify::new(),
            deadline_kill: AtomicBool::new(false),
            signalled: AtomicBool::new(false),
            kill_grace: self.kill_grace,
        });
        {
            let mut tables = self.lock();
            // A new process evicts retained exits with its pid or its tag.
            tables.retained.remove(&pid);
            if let Some(tag) = &tag {
                tables.retained.retain(|_, r| r.tag.as_ref() != Some(tag));
            }
            tables.live.insert(pid, process.clone());
        }
        if let Some(limit) = deadline {
            // Computed once, here: the deadline a client sees never drifts.
            let _ = self
                .deadlines
                .set(process.seq, &process, Some(Deadline::after(limit)), || true);
        }
        let fan_out = tokio::spawn(hub.run(source_rx));
        tokio::spawn(
            self.clone()
                .lifecycle(process.clone(), spawned.child, readers, fan_out),
        );
        Ok((process, subscription))
    }

    async fn lifecycle(
        self: Arc<Self>,
        process: Arc<Process>,
        mut child: tokio::process::Child,
        mut readers: JoinSet<()>,
        fan_out: tokio::task::JoinHandle<()>,
    ) {
        let waited = child.wait().await;
        self.deadlines.clear(process.seq);
        let exit = match waited {
            Ok(status) => Exit::from_status(status),
            Err(err) => Exit::wait_failed(&err),
        };
        // Output normally drains to EOF (a descendant holding the pipe delays the end, as
        // with envd); after an explicit kill the end does not wait for it.
        loop {
            if process.killed.load(Ordering::Acquire) {
                readers.abort_all();
                break;
            }
            tokio::select! {
                next = readers.join_next() => if next.is_none() { break },
                () = process.kill_notify.notified() => {}
            }
        }
        while readers.join_next().await.is_some() {}
        if let Err(err) = fan_out.await {
            tracing::warn!(%err, "output fan-out task failed");
        }
        let reason = process.reason(&exit);
        // Recorded as exited before the end is sent: a client that sees the end and then
        // lists or re-attaches finds the exit, never a process still "ending".
        let mut tables = self.lock();
        if tables
            .live
            .get(&process.pid)
            .is_some_and(|p| p.seq == process.seq)
        {
            tables.live.remove(&process.pid);
        }
        tables.retained.insert(
            process.pid,
            Retained {
                seq: process.seq,
                tag: process.tag.clone(),
                config: process.config.clone(),
                exit: exit.clone(),
                reason,
            },
        );
        drop(tables);
        process.hub.finish(exit, reason);
        let table = self.clone();
        // Only the key is kept for the retention: the process itself (its stdin pipe or
        // terminal, its output hub) is released now, not 30 s from now.
        let (pid, seq) = (process.pid, process.seq);
        drop(process);
        tokio::spawn(async move {
            tokio::time::sleep(EXIT_RETENTION).await;
            let mut tables = table.lock();
            if tables.retained.get(&pid).is_some_and(|r| r.seq == seq) {
                tables.retained.remove(&pid);
            }
        });
    }

    /// The live process a selector names.
    ///
    /// # Errors
    /// [`Error::NotFound`] when none is running.
    pub fn live(&self, selector: &Selector) -> Result<Arc<Process>> {
        let tables = self.lock();
        let found = match selector {
            Selector::Pid(pid) => tables.live.get(pid).cloned(),
            Selector::Tag(tag) => tables
                .live
                .values()
                .filter(|p| p.tag.as_ref() == Some(tag))
                .max_by_key(|p| p.seq)
                .cloned(),
        };
        found.ok_or_else(|| Error::NotFound(format!("{selector} not found")))
    }

    /// A live process, or the retained exit of an ended one.
    ///
    /// # Errors
    /// [`Error::NotFound`] when neither exists.
    pub fn find(&self, selector: &Selector) -> Result<Found> {
        if let Ok(process) = self.live(selector) {
            return Ok(Found::Live(process));
        }
        let tables = self.lock();
        let retained = match selector {
            Selector::Pid(pid) => tables.retained.get_key_value(pid),
            Selector::Tag(tag) => tables
                .retained
                .iter()
                .filter(|(_, r)| r.tag.as_ref() == Some(tag))
                .max_by_key(|(_, r)| r.seq),
        };
        retained
            .map(|(pid, r)| {
                let ended = Ended {
                    exit: r.exit.clone(),
                    reason: r.reason,
                };
                Found::Ended(*pid, ended)
            })
            .ok_or_else(|| Error::NotFound(format!("{selector} not found")))
    }

    /// Sets the deadline of a running process to `timeout` from now (`None` removes it) and
    /// returns the deadline in force once it is.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown process, [`Error::FailedPrecondition`] for one
    /// that has ended or is being killed by its deadline.
    pub fn set_timeout(
        &self,
        selector: &Selector,
        timeout: Option<Duration>,
    ) -> Result<Option<Deadline>> {
        let process = match self.find(selector)? {
            Found::Live(process) => process,
            Found::Ended(pid, ..) => {
                return Err(Error::FailedPrecondition(format!(
                    "process with pid {pid} has already exited"
                )));
            }
        };
        let deadline = timeout.map(Deadline::after);
        self.deadlines
            .set(process.seq, &process, deadline, || {
                process.hub.exit().is_none() && !process.deadline_kill.load(Ordering::Acquire)
            })
            .map_err(|_refused| {
                Error::FailedPrecondition(format!(
                    "process with pid {} is ending; its deadline can no longer change",
                    process.pid
                ))
            })
    }

    /// Every managed process: live ones, then retained exits.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let tables = self.lock();
        let mut live: Vec<&Arc<Process>> = tables.live.values().collect();
        live.sort_by_key(|p| p.seq);
        let mut out: Vec<Snapshot> = live
            .into_iter()
            .map(|p| Snapshot {
                pid: p.pid,
                tag: p.tag.clone(),
                config: p.config.clone(),
                phase: if p.killed.load(Ordering::Acquire)
                    || p.deadline_kill.load(Ordering::Acquire)
                {
                    Phase::Ending
                } else {
                    Phase::Running
                },
                deadline: self.deadlines.get(p.seq),
                end: None,
            })
            .collect();
        let mut retained: Vec<(&u32, &Retained)> = tables.retained.iter().collect();
        retained.sort_by_key(|(_, r)| r.seq);
        out.extend(retained.into_iter().map(|(pid, r)| Snapshot {
            pid: *pid,
            tag: r.tag.clone(),
            config: r.config.clone(),
            phase: Phase::Exited,
            deadline: None,
            end: Some((r.exit.clone(), r.reason)),
        }));
        out
    }

    /// Every live process, oldest first.
    pub fn list(&self) -> Vec<Arc<Process>> {
        let mut all: Vec<_> = self.lock().live.values().cloned().collect();
        all.sort_by_key(|p| p.seq);
        all
    }
}

impl Process {
    /// Subscribes to output from now on; `Err` carries the end if it already happened.
    ///
    /// # Errors
    /// How the process ended, when it has.
    pub fn subscribe(&self) -> Result<Subscription, Ended> {
        self.hub.subscribe()
    }

    /// Whether the process has a terminal.
    pub fn is_pty(&self) -> bool {
        matches!(self.input, Input::Pty(_))
    }

    /// Sends `signal` to the process's whole group on a client's request.
    pub fn signal(&self, signal: Signal) {
        if matches!(signal, Signal::SIGKILL | Signal::SIGTERM) {
            self.signalled.store(true, Ordering::Release);
        }
        self.kill(signal);
    }

    /// Why the process ended, given how: a normal exit is an exit even if a kill raced it.
    fn reason(&self, exit: &Exit) -> EndReason {
        if exit.exited {
            EndReason::Exit
        } else if self.deadline_kill.load(Ordering::Acquire) {
            EndReason::Deadline
        } else {
            EndReason::Signal
        }
    }

    /// Sends `signal` to the process's whole group (falling back to the process alone).
    /// A kill also stops the end from waiting for output to drain.
    fn kill(&self, signal: Signal) {
        if matches!(signal, Signal::SIGKILL | Signal::SIGTERM) {
            self.killed.store(true, Ordering::Release);
            self.kill_notify.notify_one();
        }
        let pid = Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
        if nix::sys::signal::killpg(pid, signal).is_err() {
            // The group is gone (or was never ours): at least reach the process.
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// Writes to stdin.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] for a PTY process or a closed or absent stdin;
    /// [`Error::Io`] for a failed write.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        let Input::Pipe(stdin) = &self.input else {
            return Err(input_error(
                "error writing to stdin: tty assigned to process — input should be written to the pty, not the stdin",
            ));
        };
        let mut stdin = stdin.lock().await;
        let Some(pipe) = stdin.as_mut() else {
            return Err(input_error(
                "error writing to stdin: stdin not enabled or closed",
            ));
        };
        pipe.write_all(data)
            .await
            .map_err(|err| Error::io("error writing to stdin", err))?;
        pipe.flush()
            .await
            .map_err(|err| Error::io("error writing to stdin", err))
    }

    /// Writes to the terminal.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] for a non-PTY process; [`Error::Io`] for a failed write.
    pub async fn write_pty(&self, data: &[u8]) -> Result<()> {
        let Input::Pty(master) = &self.input else {
            return Err(input_error(
                "error writing to tty: tty not assigned to process — input should be written to the stdin, not the tty",
            ));
        };
        master
            .write_all(data)
            .await
            .map_err(|err| Error::io("error writing to tty", err))
    }

    /// Closes stdin so the process reads end of file. Idempotent.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] for a PTY process.
    pub async fn close_stdin(&self) -> Result<()> {
        match &self.input {
            Input::Pipe(stdin) => {
                stdin.lock().await.take();
                Ok(())
            }
            Input::Pty(_) => Err(Error::FailedPrecondition(
                "error closing stdin: cannot close stdin for PTY process — send Ctrl+D (0x04) instead".into(),
            )),
        }
    }

    /// Resizes the terminal.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] for a non-PTY process; [`Error::Io`] for a failed ioctl.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        match &self.input {
            Input::Pty(master) => master
                .resize(cols, rows)
                .map_err(|err| Error::io("error resizing tty", err)),
            Input::Pipe(_) => Err(input_error(
                "error resizing tty: tty not assigned to process",
            )),
        }
    }
}

/// Input sent the wrong way (stdin to a terminal, to a closed pipe, ...): the client can
/// fix it, so it is a failed precondition rather than an internal error.
impl Expire for Process {
    /// The deadline passed: SIGTERM to the group, SIGKILL after the grace unless it ended.
    fn expire(self: Arc<Self>) {
        if self.deadline_kill.swap(true, Ordering::AcqRel) || self.hub.exit().is_some() {
            return;
        }
        tracing::info!(pid = self.pid, grace = ?self.kill_grace, "deadline passed: terminating the process group");
        self.kill(Signal::SIGTERM);
        tokio::spawn(async move {
            tokio::select! {
                () = self.hub.ended() => {}
                () = tokio::time::sleep(self.kill_grace) => {
                    tracing::info!(pid = self.pid, "still running after the grace: killing the process group");
                    self.kill(Signal::SIGKILL);
                }
            }
        });
    }
}

fn input_error(message: &str) -> Error {
    Error::FailedPrecondition(message.to_owned())
}

async fn read_pipe(mut pipe: impl AsyncRead + Unpin, stream: Stream, source: mpsc::Sender<Chunk>) {
    loop {
        let mut buf = BytesMut::with_capacity(PIPE_CHUNK);
        match pipe.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {
                if source
                    .send(Chunk {
                        stream,
                        data: buf.freeze(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(err) => {
                tracing::debug!(%err, ?stream, "reading process output");
                return;
            }
        }
    }
}

async fn read_pty(master: Arc<Master>, source: mpsc::Sender<Chunk>) {
    loop {
        match master.read().await {
            Ok(Some(data)) => {
                if source
                    .send(Chunk {
                        stream: Stream::Pty,
                        data,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(%err, "reading terminal output");
                return;
            }
        }
    }
}
