//! Directory watching on inotify (reference §5.8–5.10): one inotify instance per watch, a
//! task turning kernel events into [`FsEvent`]s, recursive watches that follow new and
//! moved subdirectories. The consumer (a stream, or a polling watcher's queue) reads a
//! bounded channel; when it falls behind, the task waits, the kernel queues, and a kernel
//! overflow ends the watch with an error the client sees.

pub mod polling;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::fs::entry::{self, EntryInfo};
use crate::fs::unnamed;
use crate::fs::user::NameCache;

/// Notices buffered between a watch's task and its consumer.
const NOTICE_QUEUE: usize = 1024;
/// Bytes of kernel events read at once.
const EVENT_BUFFER: usize = 64 * 1024;

/// Filesystem magic numbers of network and FUSE filesystems, refused unless allowed.
const NETWORK_FS_MAGICS: &[(i64, &str)] = &[
    (0x6969, "nfs"),
    (0xFF53_4D42, "cifs"),
    (0x517B, "smb"),
    (0xFE53_4D42, "smb2"),
    (0x6573_5546, "fuse"),
];

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created, or moved into the tree.
    Create,
    /// Content modified.
    Write,
    /// Deleted.
    Remove,
    /// Moved away (or within the tree: a `Create` of the new name follows).
    Rename,
    /// Attributes (mode, owner, xattrs, times) changed.
    Chmod,
}

/// One change, named relative to the watched directory (`.` for the directory itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEvent {
    /// Relative path of the entry.
    pub name: String,
    /// What happened.
    pub kind: EventKind,
    /// The entry as it is now, when asked for and it can be described.
    pub entry: Option<EntryInfo>,
}

/// What a watch delivers.
#[derive(Debug)]
pub enum Notice {
    /// A change.
    Event(FsEvent),
    /// The watch ended and why (the directory went away, the kernel queue overflowed).
    Ended(Error),
}

/// What to watch and how.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// The resolved directory.
    pub path: PathBuf,
    /// Also watch every subdirectory, present and future.
    pub recursive: bool,
    /// Attach an `EntryInfo` to create, write and chmod events.
    pub include_entry: bool,
    /// Allow NFS, SMB and FUSE filesystems.
    pub allow_network_mounts: bool,
}

/// Daemon-wide bookkeeping: how many watches exist, against a limit.
#[derive(Debug)]
pub struct WatchLimits {
    max: usize,
    active: AtomicUsize,
}

/// A slot counted against [`WatchLimits`]; released on drop.
#[derive(Debug)]
pub struct Slot(Arc<WatchLimits>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl WatchLimits {
    /// At most `max` watches at once.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(WatchLimits {
            max,
            active: AtomicUsize::new(0),
        })
    }

    /// Watches open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    fn reserve(self: &Arc<Self>) -> Result<Slot> {
        let previous = self.active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.clone());
        if previous >= self.max {
            return Err(Error::ResourceExhausted(format!(
                "too many directory watchers: the limit is {} (--max-watchers)",
                self.max
            )));
        }
        Ok(slot)
    }
}

/// A running watch. Dropping it stops the task and frees the kernel watches.
pub struct Watch {
    rx: mpsc::Receiver<Notice>,
    task: tokio::task::JoinHandle<()>,
    _slot: Slot,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// Validates `spec` and starts watching. Blocking: call off the runtime's workers
    /// (it needs a runtime context for the reactor).
    ///
    /// # Errors
    /// [`Error::NotFound`] for a missing path, [`Error::InvalidArgument`] for a file or a
    /// refused network filesystem, [`Error::ResourceExhausted`] when a watcher or kernel
    /// limit is reached.
    pub fn open(spec: WatchSpec, limits: &Arc<WatchLimits>) -> Result<Watch> {
        let shown = spec.path.display().to_string();
        match std::fs::metadata(&spec.path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "path {shown} is not a directory"
                )));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("path {shown} not found")));
            }
            Err(err) => return Err(Error::io(format!("error checking path {shown}"), err)),
        }
        if !spec.allow_network_mounts {
            let fs = nix::sys::statfs::statfs(&spec.path).map_err(|err| {
                Error::io(
                    format!("error checking the filesystem of {shown}"),
                    err.into(),
                )
            })?;
            let magic = fs.filesystem_type().0;
            if let Some((_, name)) = NETWORK_FS_MAGICS.iter().find(|(m, _)| *m == magic) {
                return Err(Error::InvalidArgument(format!(
                    "cannot watch path on network filesystem ({name}): {shown}; set allow_network_mounts to watch it anyway"
                )));
            }
        }
        let slot = limits.reserve()?;
        let inotify =
            Inotify::init().map_err(|err| limit_error(err, "creating an inotify instance"))?;
        let mut tree = Tree {
            wds: HashMap::new(),
            root: spec.path.clone(),
        };
        tree.add(&inotify.watches(), Path::new(""), spec.recursive, None)
            .map_err(|err| limit_error(err, &format!("adding {shown} to the watcher")))?;
        let stream = inotify
            .into_event_stream(vec![0u8; EVENT_BUFFER])
            .map_err(|err| Error::io("registering the watcher", err))?;
        let (tx, rx) = mpsc::channel(NOTICE_QUEUE);
        let task = tokio::spawn(run(stream, tree, spec, tx));
        Ok(Watch {
            rx,
            task,
            _slot: slot,
        })
    }

    /// The next notice; `None` once the watch has ended and everything was read.
    pub async fn next(&mut self) -> Option<Notice> {
        self.rx.recv().await
    }

    /// A notice if one is ready now.
    pub fn try_next(&mut self) -> Option<Notice> {
        self.rx.try_recv().ok()
    }
}

/// Maps the errors of inotify limits to clear messages.
fn limit_error(err: io::Error, doing: &str) -> Error {
    match err.raw_os_error() {
        Some(libc::EMFILE) => Error::ResourceExhausted(format!(
            "{doing}: the inotify instance limit is reached (fs.inotify.max_user_instances)"
        )),
        Some(libc::ENOSPC) => Error::ResourceExhausted(format!(
            "{doing}: the inotify watch limit is reached (fs.inotify.max_user_watches)"
        )),
        _ => Error::io(doing.to_owned(), err),
    }
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ATTRIB);

/// The watched directories, by descriptor, as paths relative to the root.
struct Tree {
    wds: HashMap<WatchDescriptor, PathBuf>,
    root: PathBuf,
}

impl Tree {
    /// Watches `rel` (and, recursively, its subdirectories). With `found`, every entry met
    /// below `rel` is reported, for directories that appeared after the watch began.
    fn add(
        &mut self,
        watches: &Watches,
        rel: &Path,
        recursive: bool,
        mut found: Option<&mut Vec<PathBuf>>,
    ) -> io::Result<()> {
        let mut watches = watches.clone();
        let wd = watches.add(self.root.join(rel), MASK)?;
        self.wds.insert(wd, rel.to_path_buf());
        if !recursive && found.is_none() {
            return Ok(());
        }
        let entries = match std::fs::read_dir(self.root.join(rel)) {
            Ok(entries) => entries,
            // Unreadable subdirectories are skipped; an unreadable root is an error.
            Err(err) if !rel.as_os_str().is_empty() => {
                tracing::debug!(%err, dir = %rel.display(), "not watching an unreadable directory");
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        let mut children: Vec<_> = entries.filter_map(|e| e.ok()).collect();
        children.sort_by_key(std::fs::DirEntry::file_name);
        for child in children {
            let child_rel = rel.join(child.file_name());
            if let Some(found) = found.as_deref_mut() {
                found.push(child_rel.clone());
            }
            let is_dir = child.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && recursive {
                match self.add(&watches, &child_rel, recursive, found.as_deref_mut()) {
                    Ok(()) => {}
                    Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => return Err(err),
                    Err(err) => {
                        tracing::debug!(%err, dir = %child_rel.display(), "not watching a directory")
                    }
                }
            }
        }
        Ok(())
    }

    fn forget_below(&mut self, watches: &Watches, rel: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .wds
            .iter()
            .filter(|(_, path)| path.starts_with(rel))
            .map(|(wd, _)| wd.clone())
            .collect();
        let mut watches = watches.clone();
        for wd in gone {
            self.wds.remove(&wd);
            let _ = watches.remove(wd);
        }
    }

    fn rename_below(&mut self, from: &Path, to: &Path) {
        for path in self.wds.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = to.join(rest);
            }
        }
    }
}

/// Whether a file name is one of our in-progress upload files.
fn is_upload_temp(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with('.') && name.ends_with(crate::fs::write::TEMP_SUFFIX)
}

fn display_name(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        rel.to_string_lossy().into_owned()
    }
}

/// Event kinds of one inotify mask, in envd's fixed order.
fn kinds(mask: EventMask) -> Vec<EventKind> {
    let mut out = Vec::new();
    if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
        out.push(EventKind::Create);
    }
    if mask.intersects(EventMask::MOVED_FROM | EventMask::MOVE_SELF) {
        out.push(EventKind::Rename);
    }
    if mask.contains(EventMask::ATTRIB) {
        out.push(EventKind::Chmod);
    }
    if mask.contains(EventMask::MODIFY) {
        out.push(EventKind::Write);
    }
    if mask.intersects(EventMask::DELETE | EventMask::DELETE_SELF) {
        out.push(EventKind::Remove);
    }
    out
}

/// Cookies of directories moved away, kept until their `MOVED_TO` (or `MOVE_SELF`) shows
/// where they went; bounded in case neither comes.
const MAX_PENDING_MOVES: usize = 1024;

async fn run(
    mut stream: inotify::EventStream<Vec<u8>>,
    mut tree: Tree,
    spec: WatchSpec,
    tx: mpsc::Sender<Notice>,
) {
    let watches = stream.watches();
    let mut moved_from: HashMap<u32, PathBuf> = HashMap::new();
    // Uploads write a hidden temp file and rename it over the target. Clients must see
    // what a write looks like (the target created and written), not the temp file.
    let mut upload_moves: HashSet<u32> = HashSet::new();
    // Entries reported by walking a new directory; the kernel may report some of them
    // again, and each is reported once.
    let mut synthesized: HashSet<PathBuf> = HashSet::new();
    let end = loop {
        let event = tokio::select! {
            event = stream.next() => event,
            () = tx.closed() => return,
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(err)) => break Error::io("reading watcher events", err),
            None => break Error::Internal("the watcher's event stream ended".into()),
        };
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            break Error::ResourceExhausted(
                "too many filesystem events: the kernel queue overflowed and events were lost; watch again".into(),
            );
        }
        let Some(dir) = tree.wds.get(&event.wd).cloned() else {
            continue;
        };
        let rel = match &event.name {
            Some(name) => dir.join(name),
            None => dir.clone(),
        };
        let is_root = rel.as_os_str().is_empty();
        if event.mask.contains(EventMask::IGNORED) && !is_root {
            // The kernel dropped a subdirectory's watch (it was deleted or unmounted).
            tree.wds.remove(&event.wd);
            continue;
        }
        let is_dir = event.mask.contains(EventMask::ISDIR);
        if !is_dir && event.name.as_deref().is_some_and(is_upload_temp) {
            if event.mask.contains(EventMask::MOVED_FROM) {
                if upload_moves.len() >= MAX_PENDING_MOVES {
                    upload_moves.clear();
                }
                upload_moves.insert(event.cookie);
            }
            continue;
        }
        // A new file being uploaded has no name yet (see `unnamed`): its events are not
        // entries' events, and its link is the upload's create and write.
        if !is_dir
            && event
                .name
                .as_deref()
                .is_some_and(|name| unnamed::is_unnamed_event(&spec.path.join(&dir), name))
        {
            continue;
        }
        let kinds = if event.mask.contains(EventMask::MOVED_TO)
            && upload_moves.remove(&event.cookie)
            || !is_dir
                && event.mask.contains(EventMask::CREATE)
                && unnamed::was_linked(&spec.path.join(&rel))
        {
            vec![EventKind::Create, EventKind::Write]
        } else {
            kinds(event.mask)
        };
        if event
            .mask
            .intersects(EventMask::CREATE | EventMask::MOVED_TO)
            && synthesized.remove(&rel)
        {
            continue;
        }
        if event
            .mask
            .intersects(EventMask::DELETE | EventMask::MOVED_FROM)
        {
            synthesized.remove(&rel);
        }
        let mut found = Vec::new();
        if spec.recursive && is_dir {
            if event.mask.contains(EventMask::MOVED_FROM) {
                if moved_from.len() >= MAX_PENDING_MOVES {
                    moved_from.clear();
                }
                moved_from.insert(event.cookie, rel.clone());
            }
            if event.mask.contains(EventMask::MOVED_TO) {
                if let Some(from) = moved_from.remove(&event.cookie) {
                    tree.rename_below(&from, &rel);
                } else if let Err(err) = tree.add(&watches, &rel, true, Some(&mut found)) {
                    if err.raw_os_error() == Some(libc::ENOSPC) {
                        break limit_error(err, "watching a moved-in directory");
                    }
                }
            } else if event.mask.contains(EventMask::CREATE) {
                if let Err(err) = tree.add(&watches, &rel, true, Some(&mut found)) {
                    if err.raw_os_error() == Some(libc::ENOSPC) {
                        break limit_error(err, "watching a new directory");
                    }
                }
            }
        }
        // A subdirectory's own events (DELETE_SELF, MOVE_SELF, ATTRIB) repeat what its
        // parent reported under its name (DELETE, MOVED_FROM, ATTRIB): report those once.
        // A subdirectory still named as moved away by the time of its MOVE_SELF left the
        // tree: stop watching it.
        if !is_root && event.name.is_none() {
            if event.mask.contains(EventMask::MOVE_SELF) {
                let left: Vec<u32> = moved_from
                    .iter()
                    .filter(|(_, from)| **from == rel)
                    .map(|(c, _)| *c)
                    .collect();
                if !left.is_empty() {
                    moved_from.retain(|cookie, _| !left.contains(cookie));
                    tree.forget_below(&watches, &rel);
                }
            }
            continue;
        }
        let mut batch: Vec<(PathBuf, EventKind)> =
            kinds.into_iter().map(|kind| (rel.clone(), kind)).collect();
        if synthesized.len() + found.len() > MAX_PENDING_MOVES * 4 {
            synthesized.clear();
        }
        // Uploads in progress inside a directory just walked are not entries yet.
        found.retain(|path| !path.file_name().is_some_and(is_upload_temp));
        synthesized.extend(found.iter().cloned());
        batch.extend(found.into_iter().map(|path| (path, EventKind::Create)));
        for (path, kind) in batch {
            let entry = if spec.include_entry
                && matches!(
                    kind,
                    EventKind::Create | EventKind::Write | EventKind::Chmod
                ) {
                describe(&spec.path, &path).await
            } else {
                None
            };
            let notice = Notice::Event(FsEvent {
                name: display_name(&path),
                kind,
                entry,
            });
            if tx.send(notice).await.is_err() {
                return;
            }
        }
        if is_root
            && event
                .mask
                .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED)
        {
            break Error::NotFound(format!(
                "watched directory {} was removed or moved away",
                spec.path.display()
            ));
        }
    };
    let _ = tx.send(Notice::Ended(end)).await;
}

async fn describe(root: &Path, rel: &Path) -> Option<EntryInfo> {
    let path = root.join(rel);
    tokio::task::spawn_blocking(move || {
        entry::describe(&path, &path, &mut NameCache::default()).ok()
    })
    .await
    .ok()
    .flatten()
}

/// A fresh watcher id: `w` and 20 random characters from `[a-z0-9]`.
pub fn new_watcher_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 20];
    if getrandom::fill(&mut bytes).is_err() {
        // Never expected on Linux; fall back to time-derived bytes rather than failing.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (nanos >> (i % 16 * 8)) as u8 ^ (i as u8);
        }
    }
    std::iter::once('w')
        .chain(
            bytes
                .iter()
                .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char),
        )
        .collect()
}

/// Whether a name is one of ours (not something a client made up).
pub fn is_watcher_id(id: &str) -> bool {
    id.len() == 21
        && id.starts_with('w')
        && id[1..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}
