//! The table of managed processes: live ones by pid (and tag), and the exits of ended ones
//! retained for late `Connect` calls. Each process has one lifecycle task that reaps it,
//! enforces its deadline and publishes its end.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::persist::StateDir;
use crate::persist::processes::{self as saved_file, SavedProcess};
use crate::process::deadline::{Deadline, Deadlines, Expire};
use crate::process::exit::Exit;
use crate::process::keeper::KeeperSpec;
use crate::process::keeper::client::{self, Link, Spare, StartError};
use crate::process::keeper::nursery::Nursery;
use crate::process::output::{Ended, Hub, Subscription};
use crate::process::spawn::{self, Spec};

/// How long an ended process's exit stays available to `Connect` (envd's value).
pub const EXIT_RETENTION: Duration = Duration::from_secs(30);
/// Largest chunk read from a pipe at once (envd's stdout/stderr event size).
pub const PIPE_CHUNK: usize = 32 * 1024;

/// A process as it was asked for, reported back by `List`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Its start time, to tell it from a later process with the same pid.
    start_time: u64,
    /// The keeper holding its stdio.
    link: Arc<Link>,
    /// Where the keeper listens.
    socket: PathBuf,
    /// Whether it has a terminal.
    pty: bool,
    /// Whether its stdin pipe is open (started with one, not closed yet).
    stdin_open: AtomicBool,
    hub: Arc<Hub>,
    /// Set by an explicit kill.
    killed: AtomicBool,
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
    /// Records of processes whose keepers are starting them, by slot (see `launch`).
    starting: BTreeMap<u64, SavedProcess>,
}

/// All managed processes.
pub struct ProcessTable {
    tables: Mutex<Tables>,
    seq: AtomicU64,
    deadlines: Arc<Deadlines<Process>>,
    kill_grace: Duration,
    /// Where keepers' sockets live.
    keeper_dir: PathBuf,
    /// Where the table is saved for the next daemon; `None` saves nothing.
    state_dir: Option<Arc<StateDir>>,
    /// Bumped on every change worth saving; the saver task writes the latest table.
    changed: watch::Sender<u64>,
    /// Serializes saves, so an older snapshot never overwrites a newer one; holds the
    /// `changed` version the file on disk is known to reflect.
    saving: tokio::sync::Mutex<u64>,
    /// Names keeper sockets (with the daemon's pid, unique across restarts too).
    sockets: AtomicU64,
    /// One keeper started ahead of the next process start (see [`Spare`]).
    spare: Mutex<Option<Spare>>,
    /// A spare is being started.
    refilling: AtomicBool,
    /// Signalled when a refill ends (with a spare or without).
    refilled: tokio::sync::Notify,
    /// The process that forks spare keepers, once started (see [`Nursery`]).
    nursery: Mutex<Option<Arc<Nursery>>>,
}

/// What `Connect` finds.
pub enum Found {
    /// A live process.
    Live(Arc<Process>),
    /// An ended one whose exit is still retained.
    Ended(u32, Ended),
}

impl ProcessTable {
    /// An empty table whose deadline kills send SIGTERM, then SIGKILL after `kill_grace`,
    /// with keeper sockets in `keeper_dir` and the table saved in `state_dir`. Starts the
    /// deadline reaper and the saver (needs a runtime).
    pub fn new(
        kill_grace: Duration,
        keeper_dir: PathBuf,
        state_dir: Option<Arc<StateDir>>,
    ) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        let table = Arc::new(ProcessTable {
            tables: Mutex::new(Tables::default()),
            seq: AtomicU64::new(0),
            deadlines: Deadlines::start(),
            kill_grace,
            keeper_dir,
            state_dir,
            changed,
            saving: tokio::sync::Mutex::new(0),
            sockets: AtomicU64::new(0),
            spare: Mutex::new(None),
            refilling: AtomicBool::new(false),
            refilled: tokio::sync::Notify::new(),
            nursery: Mutex::new(None),
        });
        table.refill_spare();
        if table.state_dir.is_some() {
            tokio::spawn(save_on_change(
                Arc::downgrade(&table),
                table.changed.subscribe(),
            ));
        }
        table
    }

    /// Re-adopts the processes a previous daemon saved: each whose keeper still answers
    /// for the same process (same pid and start time) is managed again, with its tag,
    /// config and deadline; the rest are dropped and logged. Run before serving.
    pub async fn rehydrate(self: &Arc<Self>) -> usize {
        let Some(dir) = self.state_dir.clone() else {
            return 0;
        };
        let saved = dir
            .load::<Vec<SavedProcess>>(saved_file::FILE)
            .unwrap_or_default();
        let mut adopted = 0;
        for record in saved {
            match client::connect(&record.socket).await {
                Ok(link)
                    if record.pid == saved_file::PID_PENDING
                        || (link.hello.pid == record.pid
                            && link.hello.start_time == record.start_time) =>
                {
                    let deadline = record.end_at.map(|end_at| {
                        let left = end_at.duration_since(SystemTime::now()).unwrap_or_default();
                        Deadline {
                            due: tokio::time::Instant::now() + left,
                            end_at,
                        }
                    });
                    tracing::info!(pid = record.pid, tag = ?record.tag, "re-adopted a process after a restart");
                    self.register(
                        link,
                        record.socket,
                        record.config,
                        record.tag,
                        record.stdin,
                        deadline,
                        false,
                        None,
                    );
                    adopted += 1;
                }
                Ok(link) => tracing::warn!(
                    pid = record.pid,
                    keeper_pid = link.hello.pid,
                    "not adopting a saved process: its keeper keeps another process (pid reused?)"
                ),
                Err(err) => {
                    tracing::info!(pid = record.pid, %err, "a saved process is gone; dropping it")
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
        adopted
    }

    /// A socket path no other keeper of this or an earlier daemon uses.
    fn socket_path(&self) -> PathBuf {
        let n = self.sockets.fetch_add(1, Ordering::Relaxed);
        self.keeper_dir
            .join(format!("k{}-{n}.sock", std::process::id()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a process (through its keeper) and subscribes the caller to its output
    /// before any is read, so nothing it writes is lost. `deadline` bounds its life.
    ///
    /// # Errors
    /// As [`spawn::keeper_spec`] and [`Spare::start`].
    pub async fn start(
        self: &Arc<Self>,
        spec: &Spec,
        config: Config,
        tag: Option<String>,
        deadline: Option<Duration>,
    ) -> Result<(Arc<Process>, Subscription)> {
        let keeper_spec = spawn::keeper_spec(spec)?;
        let stdin = spec.stdin && spec.pty.is_none();
        // Computed once, here: the deadline a client sees never drifts.
        let deadline = deadline.map(Deadline::after);
        let pending = SavedProcess {
            pid: saved_file::PID_PENDING,
            start_time: 0,
            tag,
            config,
            socket: PathBuf::new(),
            stdin,
            end_at: deadline.map(|d| d.end_at),
        };
        let (link, pending, slot) = match self.launch(&keeper_spec, pending).await {
            Ok(launched) => launched,
            Err(err) => {
                // The spare went to a start that failed: the next one is needed now.
                self.refill_spare();
                return Err(err);
            }
        };
        let (process, subscription) = self.register(
            link,
            pending.socket,
            pending.config,
            pending.tag,
            stdin,
            deadline,
            true,
            Some(slot),
        );
        self.refill_after(process.hub.clone());
        let subscription =
            subscription.ok_or_else(|| Error::Internal("a new process hub is closed".into()))?;
        Ok((process, subscription))
    }

    /// Has the next spare started once `hub`'s process has ended and its end has gone out
    /// ([`REFILL_AFTER_END`]), or [`REFILL_AFTER_START`] into its life, whichever is first.
    ///
    /// Not at once: a keeper's exec and start-up take a core for about a millisecond, and
    /// on a small machine that core is the one the start's own work needs (the process's
    /// exec, its keeper, the daemon relaying its start and end, the client reading them).
    /// Measured side by side (README, "Benchmark"), a refill at once cost a short
    /// command's start about 0.1–0.15 ms here, and 0.3–0.4 ms in the benchmark's bare
    /// server through a keeper.
    fn refill_after(self: &Arc<Self>, hub: Arc<Hub>) {
        let table = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::select! {
                () = hub.ended() => tokio::time::sleep(REFILL_AFTER_END).await,
                () = tokio::time::sleep(REFILL_AFTER_START) => {}
            }
            if let Some(table) = table.upgrade() {
                table.refill_spare();
            }
        });
    }

    /// Starts `spec` through the spare keeper (waiting for one being started), or a new one
    /// when there is none (or the spare turns out dead). The next spare is the caller's
    /// business (see [`ProcessTable::refill_after`]).
    ///
    /// Recorded before the client hears of it, so that a crash right after still finds the
    /// process: `pending` (with the keeper's socket) is saved while the keeper starts it,
    /// and a restarted daemon adopts whatever process that keeper answers for.
    async fn launch(
        self: &Arc<Self>,
        spec: &KeeperSpec,
        mut pending: SavedProcess,
    ) -> Result<(Link, SavedProcess, u64)> {
        let mut spare = self.take_spare().await;
        let mut lost_one = false;
        let result = loop {
            let keeper = match spare.take() {
                Some(keeper) => keeper,
                None => match self.new_spare().await {
                    Ok(keeper) => keeper,
                    Err(err) => break Err(err),
                },
            };
            pending.socket = keeper.socket().to_path_buf();
            let slot = self.add_pending(pending.clone());
            let (started, ()) = tokio::join!(keeper.start(spec), self.save());
            match started {
                Ok(link) => break Ok((link, slot)),
                Err(err) => {
                    self.remove_pending(slot);
                    match err {
                        StartError::KeeperLost(err) if !lost_one => {
                            tracing::warn!(%err, "a process keeper was gone before it started anything; starting another");
                            lost_one = true;
                        }
                        err => break Err(err.into()),
                    }
                }
            }
        };
        result.map(|(link, slot)| (link, pending, slot))
    }

    /// Adds a record saved for a process whose keeper is starting it; the slot to remove it.
    fn add_pending(&self, record: SavedProcess) -> u64 {
        let slot = self.seq.fetch_add(1, Ordering::Relaxed);
        self.lock().starting.insert(slot, record);
        self.changed.send_modify(|n| *n += 1);
        slot
    }

    /// Drops a pending record whose process never started.
    fn remove_pending(&self, slot: u64) {
        self.lock().starting.remove(&slot);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The spare keeper; while one is being started, it once it is (a fresh spawn would
    /// only start a second keeper beside it, and later).
    async fn take_spare(&self) -> Option<Spare> {
        loop {
            let refilled = self.refilled.notified();
            tokio::pin!(refilled);
            // Registered before the checks: a refill that ends between them still wakes us.
            refilled.as_mut().enable();
            if let Some(spare) = self.spare_slot().take() {
                return Some(spare);
            }
            if !self.refilling.load(Ordering::Acquire) {
                return None;
            }
            refilled.await;
        }
    }

    fn spare_slot(&self) -> std::sync::MutexGuard<'_, Option<Spare>> {
        self.spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn nursery_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Nursery>>> {
        self.nursery
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a spare keeper in the background unless there is one. A keeper that cannot
    /// be started now is logged; the next process start then starts its own.
    fn refill_spare(self: &Arc<Self>) {
        // One refill at a time: a start that found no spare (the first one's still being
        // spawned) would otherwise start a second, and one of the two would be wasted.
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let table = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(table) = table.upgrade() else { return };
            let _refilled = Refilled(&table.refilling, &table.refilled);
            if table.spare_slot().is_some() {
                return;
            }
            match table.new_spare().await {
                Ok(spare) => {
                    let mut slot = table.spare_slot();
                    match slot.as_ref() {
                        // Not expected with one refill at a time; let it go, reaped.
                        Some(_) => spare.discard(),
                        None => *slot = Some(spare),
                    }
                }
                Err(err) => tracing::warn!(%err, "could not start a spare process keeper"),
            }
        });
    }

    /// A new spare keeper: forked by the nursery (started first if there is none, or the
    /// last one is gone), or exec'd when the nursery cannot make one.
    ///
    /// On the blocking pool: a nursery's answer, and a spawn, hold their thread until the
    /// keeper exists, which would delay whatever this worker runs next (often the reply to
    /// the start that asked for a spare).
    async fn new_spare(self: &Arc<Self>) -> Result<Spare> {
        let table = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let binary = Path::new(client::OWN_BINARY);
            let nursery = {
                let mut slot = table.nursery_slot();
                if slot.is_none() {
                    match Nursery::start(binary, &table.keeper_dir) {
                        Ok(nursery) => *slot = Some(Arc::new(nursery)),
                        Err(err) => tracing::warn!(%err, "could not start the keeper nursery"),
                    }
                }
                slot.clone()
            };
            if let Some(nursery) = nursery {
                match nursery.spare(table.socket_path()) {
                    Ok(spare) => return Ok(spare),
                    Err(err) => {
                        tracing::warn!(%err, "the keeper nursery failed; starting another next time");
                        let mut slot = table.nursery_slot();
                        if slot.as_ref().is_some_and(|n| Arc::ptr_eq(n, &nursery)) {
                            *slot = None;
                        }
                    }
                }
            }
            // A socket of its own: a nursery that failed after its fork may have left a
            // keeper on the last one, which removes it when it finds no daemon.
            Spare::spawn(binary, table.socket_path())
        })
        .await
        .unwrap_or_else(|err| Err(Error::Internal(format!("starting a keeper: {err}"))))
    }

    /// Manages the process behind `link`; with `subscribe`, returns a subscription taken
    /// before any output is forwarded. The pending record in `pending` (see `launch`) gives
    /// way to the live process in the same critical section, so a save sees one or the
    /// other, never both (adopted twice) nor neither (lost).
    #[allow(clippy::too_many_arguments)]
    fn register(
        self: &Arc<Self>,
        link: Link,
        socket: PathBuf,
        config: Config,
        tag: Option<String>,
        stdin: bool,
        deadline: Option<Deadline>,
        subscribe: bool,
        pending: Option<u64>,
    ) -> (Arc<Process>, Option<Subscription>) {
        let pid = link.hello.pid;
        let hub = Hub::new();
        let subscription = subscribe.then(|| hub.subscribe().ok()).flatten();
        let process = Arc::new(Process {
            pid,
            tag: tag.clone(),
            config,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            start_time: link.hello.start_time,
            pty: link.hello.pty,
            link: Arc::new(link),
            socket,
            stdin_open: AtomicBool::new(stdin),
            hub: hub.clone(),
            killed: AtomicBool::new(false),
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
            if let Some(slot) = pending {
                tables.starting.remove(&slot);
            }
        }
        if deadline.is_some() {
            let _ = self.deadlines.set(process.seq, &process, deadline, || true);
        }
        tokio::spawn(self.clone().lifecycle(process.clone()));
        self.changed.send_modify(|n| *n += 1);
        (process, subscription)
    }

    /// A process's one task: its output to the subscribers, then its end recorded and
    /// handed to them, then its keeper released. One task rather than a reader, a fan-out
    /// and a waiter: the end of a short command reaches its clients one wake-up after the
    /// keeper reports it.
    async fn lifecycle(self: Arc<Self>, process: Arc<Process>) {
        // The keeper reports the exit after the output (or at once after a kill).
        let status = process.link.forward_output(&process.hub).await;
        self.deadlines.clear(process.seq);
        let exit = Exit::from_status(status);
        let reason = process.reason(&exit);
        // Recorded as exited before the end is sent: a client that sees the end and then
        // lists or re-attaches finds the exit, never a process still "ending".
        {
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
        }
        process.hub.finish(exit, reason);
        process.link.release().await;
        self.changed.send_modify(|n| *n += 1);
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
        let applied = self
            .deadlines
            .set(process.seq, &process, deadline, || {
                process.hub.exit().is_none() && !process.deadline_kill.load(Ordering::Acquire)
            })
            .map_err(|_refused| {
                Error::FailedPrecondition(format!(
                    "process with pid {} is ending; its deadline can no longer change",
                    process.pid
                ))
            });
        self.changed.send_modify(|n| *n += 1);
        applied
    }

    /// Writes the table to the state directory now: on this thread when it is small
    /// ([`INLINE_SAVE`]), else on the blocking pool.
    ///
    /// A start waits for this save (its pending record) while its keeper starts the
    /// process. Writing a small file into the daemon's own state directory (a tmpfs under
    /// systemd) costs less than the trip to the blocking pool and back, whose two thread
    /// wake-ups land on the core the keeper and the new process need: written here, a
    /// start of `/bin/true` measured 0.08 ms faster at the paired median (README,
    /// "Benchmark").
    pub async fn save(&self) {
        let Some(dir) = self.state_dir.clone() else {
            return;
        };
        let mut persisted = self.saving.lock().await;
        // Every change up to here is in the snapshot taken below; if a save that began after
        // them has finished meanwhile, this one has nothing to add.
        let version = *self.changed.borrow();
        if *persisted >= version {
            return;
        }
        let saved = self.saved();
        let result = match crate::persist::encode(&saved) {
            Ok(bytes) if bytes.len() <= INLINE_SAVE => dir.write(saved_file::FILE, &bytes),
            Ok(bytes) => tokio::task::spawn_blocking(move || dir.write(saved_file::FILE, &bytes))
                .await
                .unwrap_or_else(|err| Err(std::io::Error::other(err))),
            Err(err) => Err(err),
        };
        if result.is_ok() {
            *persisted = version;
        } else {
            tracing::error!(
                "saving the process table failed; a restart may lose track of processes"
            );
        }
    }

    /// What a next daemon needs to re-adopt the live processes.
    fn saved(&self) -> Vec<SavedProcess> {
        let tables = self.lock();
        let mut live: Vec<&Arc<Process>> = tables.live.values().collect();
        live.sort_by_key(|p| p.seq);
        live.into_iter()
            .map(|p| SavedProcess {
                pid: p.pid,
                start_time: p.start_time,
                tag: p.tag.clone(),
                config: p.config.clone(),
                socket: p.socket.clone(),
                stdin: p.stdin_open.load(Ordering::Acquire),
                end_at: self.deadlines.get(p.seq).map(|d| d.end_at),
            })
            .chain(tables.starting.values().cloned())
            .collect()
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
        self.pty
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
        if matches!(signal, Signal::SIGKILL | Signal::SIGTERM)
            && !self.killed.swap(true, Ordering::AcqRel)
        {
            let link = self.link.clone();
            tokio::spawn(async move { link.killed().await });
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
    /// [`Error::Io`] when the keeper is gone.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        if self.pty {
            return Err(input_error(
                "error writing to stdin: tty assigned to process — input should be written to the pty, not the stdin",
            ));
        }
        if !self.stdin_open.load(Ordering::Acquire) {
            return Err(input_error(
                "error writing to stdin: stdin not enabled or closed",
            ));
        }
        self.link.stdin(data).await
    }

    /// Writes to the terminal.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] for a non-PTY process; [`Error::Io`] when the keeper
    /// is gone.
    pub async fn write_pty(&self, data: &[u8]) -> Result<()> {
        if !self.pty {
            return Err(input_error(
                "error writing to tty: tty not assigned to process — input should be written to the stdin, not the tty",
            ));
        }
        self.link.pty(data).await
    }

    /// Closes stdin so the process reads end of file. Idempotent.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] for a PTY process.
    pub async fn close_stdin(&self) -> Result<()> {
        if self.pty {
            return Err(Error::FailedPrecondition(
                "error closing stdin: cannot close stdin for PTY process — send Ctrl+D (0x04) instead".into(),
            ));
        }
        if self.stdin_open.swap(false, Ordering::AcqRel) {
            self.link.close_stdin().await?;
        }
        Ok(())
    }

    /// Resizes the terminal.
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] for a non-PTY process; [`Error::Io`] when the keeper
    /// is gone.
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        if !self.pty {
            return Err(input_error(
                "error resizing tty: tty not assigned to process",
            ));
        }
        self.link.resize(cols, rows).await
    }
}

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

/// Clears the refill flag when a refill ends, however it ends.
struct Refilled<'a>(&'a AtomicBool, &'a tokio::sync::Notify);

impl Drop for Refilled<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
        self.1.notify_waiters();
    }
}

/// Input sent the wrong way (stdin to a terminal, to a closed pipe, ...): the client can
/// fix it, so it is a failed precondition rather than an internal error.
fn input_error(message: &str) -> Error {
    Error::FailedPrecondition(message.to_owned())
}

/// How long the saver lets changes gather before it writes them. What must be on disk
/// before a client hears of it is saved at once instead (a start's pending record, a new
/// deadline); the rest (a process's pid replacing its pending record, an exit removing it)
/// can wait this long, so that a short command's start, pid and exit are one write, made
/// after its end event, rather than three made while it runs.
const SAVE_GATHER: Duration = Duration::from_millis(20);

/// Largest encoded process table written on the runtime's own thread (see
/// [`ProcessTable::save`]); a larger one (thousands of processes, or very large
/// environments) is written on the blocking pool.
const INLINE_SAVE: usize = 64 * 1024;

/// How long after a process's end the next spare keeper is started (see
/// `ProcessTable::refill_after`): long enough for the end to have reached the client.
const REFILL_AFTER_END: Duration = Duration::from_millis(1);
/// How far into a process's life the next spare keeper is started, when it is still
/// running: a start that follows it sooner waits for that spare rather than spawning one.
const REFILL_AFTER_START: Duration = Duration::from_millis(5);

/// Saves the table whenever it changes (coalescing bursts).
async fn save_on_change(table: std::sync::Weak<ProcessTable>, mut changed: watch::Receiver<u64>) {
    while changed.changed().await.is_ok() {
        tokio::time::sleep(SAVE_GATHER).await;
        let Some(table) = table.upgrade() else { return };
        table.save().await;
    }
}
