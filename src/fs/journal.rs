//! The upload journal: where uploads in progress record their temp files, so that the next
//! start removes what a crash (`kill -9`, the OOM killer, a panic that aborts) left behind,
//! without scanning the filesystem for `.*.envd-upload` files.
//!
//! The journal is one append-only log, [`LOG_FILE`]: an upload appends `+<temp path>\0`
//! before it creates its temp file, and `-<temp path>\0` after the temp file has been
//! renamed into place or removed. So every temp file that can exist has an unmatched `+`;
//! one whose temp file is gone (the crash came between the rename and the `-`) is harmless.
//! Whenever no upload is in progress the log is emptied, and a log that grows past
//! [`COMPACT_AT`] under unbroken load is rewritten with just the open records. An append
//! is one `write` to a file already open: no file is created or removed per upload (an
//! entry file per upload made ext4 allocate and free an inode for each, which dominated
//! the cost of small uploads, and serialized them on the journal directory's lock).
//!
//! [`Journal::open`] runs before the daemon accepts connections: it removes each temp file
//! with an unmatched `+`, then empties the log. It removes only what looks like an upload
//! temp file (a regular file whose name starts with `.` and ends with [`TEMP_SUFFIX`]), so
//! a damaged or foreign record cannot make it delete anything else. Entry files of the
//! earlier journal format (one file per upload, holding the path) are swept the same way.
//!
//! One daemon owns a journal at a time (an exclusive `flock` on `<dir>/.lock`). A second
//! daemon pointed at the same directory runs without a journal rather than delete the
//! first one's uploads in progress. Records are not fsynced: the journal is for crashes of
//! the daemon, after which the kernel still writes what it was given; after a power cut a
//! temp file may outlive its record (it is hidden, and named as ours).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::Flock;

use crate::fs::write::TEMP_SUFFIX;

/// The lock file inside the journal directory.
const LOCK_FILE: &str = ".lock";
/// The log inside the journal directory.
pub const LOG_FILE: &str = "uploads.log";
/// Size past which a log that never empties (uploads overlapping without pause) is
/// rewritten with only its open records.
pub const COMPACT_AT: u64 = 1024 * 1024;
/// Record kinds.
const OPENED: u8 = b'+';
const CLOSED: u8 = b'-';

/// An open journal, owned by this daemon until it exits.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Held for the daemon's lifetime; released by the kernel however the daemon ends.
    _lock: Flock<File>,
    log: Mutex<Log>,
    /// Set after a failed append is logged, so a broken journal warns once, not per upload.
    failing: AtomicBool,
}

#[derive(Debug)]
struct Log {
    /// Opened with `O_APPEND`: after emptying it, appends start again at the beginning.
    file: File,
    len: u64,
    next: u64,
    /// The uploads in progress: entry id → temp path.
    open: HashMap<u64, PathBuf>,
}

/// What [`Journal::open`] cleaned up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Records found open (uploads that were in progress when the previous daemon stopped).
    pub entries: usize,
    /// Temp files removed.
    pub removed: usize,
}

impl Journal {
    /// Opens (creating, mode 0700) the journal in `dir`, takes its lock, and removes the
    /// temp files a previous daemon left behind.
    ///
    /// # Errors
    /// When the directory or the log cannot be created or read, or another daemon holds
    /// the lock.
    pub fn open(dir: &Path) -> io::Result<(Journal, Sweep)> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))?;
        let lock = crate::persist::lock_waiting(lock).map_err(|errno| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another envd holds the upload journal {}: {errno}",
                    dir.display()
                ),
            )
        })?;
        let sweep = sweep(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(dir.join(LOG_FILE))?;
        file.set_len(0)?;
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                _lock: lock,
                log: Mutex::new(Log {
                    file,
                    len: 0,
                    next: 0,
                    open: HashMap::new(),
                }),
                failing: AtomicBool::new(false),
            },
            sweep,
        ))
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `temp` (an absolute path) is about to be created. Drop the entry once
    /// the temp file has been renamed or removed. `None` when the record cannot be written
    /// (the journal's disk is full, say): the upload goes on without one, since the journal
    /// only helps clean up after a crash, and the failure is logged once until it recovers.
    pub fn record(self: &Arc<Self>, temp: &Path) -> Option<Entry> {
        let mut log = self.log();
        let result = log.append(OPENED, temp);
        let entry = self.outcome(result).then(|| {
            let id = log.next;
            log.next += 1;
            log.open.insert(id, temp.to_path_buf());
            Entry {
                journal: Arc::clone(self),
                id,
            }
        });
        drop(log);
        entry
    }

    /// Logs the first failure and the recovery after it; true on success.
    fn outcome(&self, result: io::Result<()>) -> bool {
        match result {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(dir = %self.dir.display(), "upload journal writable again");
                }
                true
            }
            Err(err) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), %err, "cannot write the upload journal; uploads go on without records");
                }
                false
            }
        }
    }

    fn close(&self, id: u64) {
        let mut log = self.log();
        let Some(temp) = log.open.remove(&id) else {
            return;
        };
        let result = if log.open.is_empty() {
            log.truncate()
        } else if log.len >= COMPACT_AT {
            log.compact()
        } else {
            log.append(CLOSED, &temp)
        };
        drop(log);
        self.outcome(result);
    }
}

impl Log {
    /// One record, in one `write`.
    fn append(&mut self, kind: u8, temp: &Path) -> io::Result<()> {
        let path = temp.as_os_str().as_bytes();
        let mut record = Vec::with_capacity(path.len() + 2);
        record.push(kind);
        record.extend_from_slice(path);
        record.push(0);
        let written = self.file.write(&record)?;
        self.len += written as u64;
        if written < record.len() {
            // Torn (the disk filled up): the sweep ignores a record without its NUL, and
            // the next emptying or compaction drops it.
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short journal write",
            ));
        }
        Ok(())
    }

    fn truncate(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.len = 0;
        Ok(())
    }

    /// Rewrites the log with only the open records.
    fn compact(&mut self) -> io::Result<()> {
        self.truncate()?;
        let open: Vec<PathBuf> = self.open.values().cloned().collect();
        for temp in open {
            self.append(OPENED, &temp)?;
        }
        Ok(())
    }
}

/// One upload's record; closed when dropped.
#[derive(Debug)]
pub struct Entry {
    journal: Arc<Journal>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.journal.close(self.id);
    }
}

/// Removes the temp file of every open record in `dir` (and of every entry file of the
/// earlier format), then those entry files; the caller empties the log.
fn sweep(dir: &Path) -> io::Result<Sweep> {
    let mut sweep = Sweep::default();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let name = item.file_name();
        if name == LOCK_FILE {
            continue;
        }
        let path = item.path();
        let content = match std::fs::read(&path) {
            Ok(content) => content,
            Err(err) => {
                tracing::warn!(entry = %path.display(), %err, "reading the upload journal");
                continue;
            }
        };
        let temps = if name == LOG_FILE {
            open_records(&content)
        } else {
            // An entry file of the earlier format: the path, nothing else.
            vec![PathBuf::from(std::ffi::OsStr::from_bytes(&content))]
        };
        for temp in temps {
            sweep.entries += 1;
            if remove_temp(&temp) {
                sweep.removed += 1;
            }
        }
        if name != LOG_FILE {
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(entry = %path.display(), %err, "removing an upload journal entry");
            }
        }
    }
    Ok(sweep)
}

/// The paths of a log's `+` records without a later `-`. A record cut short (no NUL) is
/// ignored.
fn open_records(log: &[u8]) -> Vec<PathBuf> {
    let mut open: HashMap<&[u8], usize> = HashMap::new();
    let mut records: Vec<&[u8]> = log.split(|b| *b == 0).collect();
    // After the last NUL: nothing, or a torn record.
    records.pop();
    for record in records {
        match record.split_first() {
            Some((&OPENED, path)) => *open.entry(path).or_default() += 1,
            Some((&CLOSED, path)) => {
                if let Some(count) = open.get_mut(path) {
                    *count = count.saturating_sub(1);
                }
            }
            _ => {}
        }
    }
    open.into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|(p, _)| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        .collect()
}

/// Removes `temp` if it is an upload temp file; true when it removed it.
fn remove_temp(temp: &Path) -> bool {
    if temp.as_os_str().is_empty() {
        // The crash came between creating the entry and writing it: no temp file yet.
        return false;
    }
    let looks_like_ours = temp.is_absolute()
        && temp.file_name().is_some_and(|name| {
            let name = name.as_bytes();
            name.first() == Some(&b'.') && name.ends_with(TEMP_SUFFIX.as_bytes())
        });
    if !looks_like_ours {
        tracing::warn!(path = %temp.display(), "upload journal names something that is not an upload temp file; left alone");
        return false;
    }
    match std::fs::symlink_metadata(temp) {
        Ok(meta) if meta.file_type().is_file() => match std::fs::remove_file(temp) {
            Ok(()) => {
                tracing::info!(path = %temp.display(), "removed an upload's temp file left by a previous run");
                true
            }
            Err(err) => {
                tracing::warn!(path = %temp.display(), %err, "removing a stale upload temp file");
                false
            }
        },
        Ok(_) => {
            tracing::warn!(path = %temp.display(), "upload journal names something that is not a regular file; left alone");
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the journal again, as the next daemon: it finds one upload open and removes
    /// its temp file.
    fn reopen_sweeps_one(dir: &Path) {
        let (_journal, sweep) = Journal::open(dir).expect("reopen");
        assert_eq!(
            sweep,
            Sweep {
                entries: 1,
                removed: 1
            }
        );
    }

    /// What a crash with `open` in progress leaves: the log as it is now, though this
    /// process goes on (and lets go of the journal's lock).
    fn crash_with(dir: &Path, open: Entry, journal: Arc<Journal>) {
        let at_crash = std::fs::read(dir.join(LOG_FILE)).expect("log");
        drop(open);
        drop(journal);
        std::fs::write(dir.join(LOG_FILE), at_crash).expect("restore the log");
    }

    #[test]
    fn entries_live_until_dropped_and_the_next_open_removes_what_they_name() {
        let root = tempfile::tempdir().expect("tempdir");
        let journal_dir = root.path().join("journal");
        let data = root.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let temp = data.join(format!(".f.1.0{TEMP_SUFFIX}"));
        let kept = data.join(format!(".g.1.1{TEMP_SUFFIX}"));
        {
            let (journal, sweep) = Journal::open(&journal_dir).expect("open");
            let journal = Arc::new(journal);
            assert_eq!(sweep, Sweep::default());
            let entry = journal.record(&temp).expect("entry");
            std::fs::write(&temp, b"partial").expect("temp");
            let done = journal.record(&kept).expect("entry");
            drop(done);
            std::fs::write(&kept, b"published elsewhere").expect("kept");
            crash_with(&journal_dir, entry, journal);
        }
        reopen_sweeps_one(&journal_dir);
        assert!(!temp.exists(), "the crashed upload's temp file is gone");
        assert!(kept.exists(), "a file without an entry is left alone");
        let left: Vec<_> = std::fs::read_dir(&journal_dir)
            .expect("read_dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|name| name != LOCK_FILE && name != LOG_FILE)
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(
            std::fs::metadata(journal_dir.join(LOG_FILE))
                .expect("log")
                .len(),
            0,
            "the swept log is emptied"
        );
    }

    #[test]
    fn only_upload_temp_files_are_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let journal_dir = root.path().join("journal");
        let precious = root.path().join("precious.txt");
        std::fs::write(&precious, b"keep").expect("write");
        let dir_named_like_temp = root.path().join(format!(".d{TEMP_SUFFIX}"));
        std::fs::create_dir(&dir_named_like_temp).expect("mkdir");
        let link = root.path().join(format!(".l{TEMP_SUFFIX}"));
        std::os::unix::fs::symlink(&precious, &link).expect("symlink");
        std::fs::create_dir(&journal_dir).expect("mkdir");
        for (i, named) in [
            precious.as_os_str().as_bytes(),
            dir_named_like_temp.as_os_str().as_bytes(),
            link.as_os_str().as_bytes(),
            format!(".relative{TEMP_SUFFIX}").as_bytes(),
            b"",
        ]
        .iter()
        .enumerate()
        {
            std::fs::write(journal_dir.join(format!("9.{i}")), named).expect("entry");
        }
        let (_journal, sweep) = Journal::open(&journal_dir).expect("open");
        assert_eq!(
            sweep,
            Sweep {
                entries: 5,
                removed: 0
            }
        );
        assert_eq!(std::fs::read(&precious).expect("read"), b"keep");
        assert!(dir_named_like_temp.is_dir());
        assert!(std::fs::symlink_metadata(&link).is_ok());
    }

    #[test]
    fn a_second_daemon_cannot_take_the_journal() {
        let root = tempfile::tempdir().expect("tempdir");
        let (_first, _) = Journal::open(root.path()).expect("first");
        let err = Journal::open(root.path()).expect_err("second");
        assert!(err.to_string().contains("another envd"), "{err}");
    }

    fn log_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(LOG_FILE)).expect("log").len()
    }

    #[test]
    fn the_log_empties_when_no_upload_is_open_and_compacts_under_unbroken_load() {
        let root = tempfile::tempdir().expect("tempdir");
        let journal_dir = root.path().join("journal");
        let data = root.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let temp = |n: usize| data.join(format!(".f.1.{n}{TEMP_SUFFIX}"));
        let (journal, _) = Journal::open(&journal_dir).expect("open");
        let journal = Arc::new(journal);

        let one = journal.record(&temp(0)).expect("entry");
        assert!(log_len(&journal_dir) > 0);
        drop(one);
        assert_eq!(log_len(&journal_dir), 0, "no upload open: empty");

        // One upload stays open while many others come and go: the log never empties, but
        // stays bounded, and still names the open one.
        let long = journal.record(&temp(0)).expect("entry");
        std::fs::write(temp(0), b"partial").expect("temp");
        let record_len = temp(1).as_os_str().len() as u64 + 2;
        let rounds = usize::try_from(2 * COMPACT_AT / record_len).expect("fits");
        for n in 1..=rounds {
            drop(journal.record(&temp(n)).expect("entry"));
        }
        assert!(
            log_len(&journal_dir) <= COMPACT_AT + 2 * record_len,
            "bounded: {}",
            log_len(&journal_dir)
        );
        // A crash now: the next open finds exactly the long upload open.
        crash_with(&journal_dir, long, journal);
        reopen_sweeps_one(&journal_dir);
        assert!(!temp(0).exists());
    }

    #[test]
    fn a_torn_last_record_is_ignored() {
        let opened = |p: &str| [&[OPENED][..], p.as_bytes(), &[0]].concat();
        let closed = |p: &str| [&[CLOSED][..], p.as_bytes(), &[0]].concat();
        let log = [
            opened("/a"),
            opened("/b"),
            closed("/a"),
            b"+/torn-with-no-nul".to_vec(),
        ]
        .concat();
        assert_eq!(open_records(&log), vec![PathBuf::from("/b")]);
        assert!(open_records(b"").is_empty());
    }
}
