//! The upload journal: where uploads in progress record their temp files, so that the next
//! start removes what a crash (`kill -9`, the OOM killer, a panic that aborts) left behind,
//! without scanning the filesystem for `.*.envd-upload` files.
//!
//! Each upload writes one small entry file (`<pid>.<n>`, holding the temp file's absolute
//! path) before it creates its temp file, and removes it after the temp file has been
//! renamed into place or removed. So every temp file that can exist has an entry; an entry
//! whose temp file is gone (the crash came between the rename and the removal) is harmless.
//! [`Journal::open`] runs before the daemon accepts connections: it removes each named temp
//! file, then the entry. It removes only what looks like an upload temp file (a regular
//! file whose name starts with `.` and ends with [`TEMP_SUFFIX`]), so a damaged or foreign
//! entry cannot make it delete anything else.
//!
//! One daemon owns a journal at a time (an exclusive `flock` on `<dir>/.lock`). A second
//! daemon pointed at the same directory runs without a journal rather than delete the
//! first one's uploads in progress. Entries are not fsynced: the journal is for crashes of
//! the daemon, after which the kernel still writes what it was given; after a power cut a
//! temp file may outlive its entry (it is hidden, and named as ours).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};

use crate::fs::write::TEMP_SUFFIX;

/// The lock file inside the journal directory.
const LOCK_FILE: &str = ".lock";

/// An open journal, owned by this daemon until it exits.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    /// Held for the daemon's lifetime; released by the kernel however the daemon ends.
    _lock: Flock<File>,
    next: AtomicU64,
    /// Set after a failed entry is logged, so a broken journal warns once, not per upload.
    failing: AtomicBool,
}

/// What [`Journal::open`] cleaned up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Entries found (uploads that were in progress when the previous daemon stopped).
    pub entries: usize,
    /// Temp files removed.
    pub removed: usize,
}

impl Journal {
    /// Opens (creating, mode 0700) the journal in `dir`, takes its lock, and removes the
    /// temp files a previous daemon left behind.
    ///
    /// # Errors
    /// When the directory cannot be created or read, or another daemon holds the lock.
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
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another envd holds the upload journal {}: {errno}",
                    dir.display()
                ),
            )
        })?;
        let sweep = sweep(dir)?;
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                _lock: lock,
                next: AtomicU64::new(0),
                failing: AtomicBool::new(false),
            },
            sweep,
        ))
    }

    /// Records that `temp` (an absolute path) is about to be created. Drop the entry once
    /// the temp file has been renamed or removed. `None` when the entry cannot be written
    /// (the journal's disk is full, say): the upload goes on without one, since the journal
    /// only helps clean up after a crash, and the failure is logged once until it recovers.
    pub fn record(&self, temp: &Path) -> Option<Entry> {
        match self.write_entry(temp) {
            Ok(entry) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(dir = %self.dir.display(), "upload journal writable again");
                }
                Some(entry)
            }
            Err(err) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), %err, "cannot write upload journal entries; uploads go on without them");
                }
                None
            }
        }
    }

    fn write_entry(&self, temp: &Path) -> io::Result<Entry> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}.{n}", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let entry = Entry { path };
        file.write_all(temp.as_os_str().as_bytes())?;
        Ok(entry)
    }
}

/// One upload's entry; removed when dropped.
#[derive(Debug)]
pub struct Entry {
    path: PathBuf,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.path) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::warn!(entry = %self.path.display(), %err, "removing an upload journal entry");
            }
        }
    }
}

/// Removes every entry in `dir` and the temp file it names.
fn sweep(dir: &Path) -> io::Result<Sweep> {
    let mut sweep = Sweep::default();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        if item.file_name() == LOCK_FILE {
            continue;
        }
        let entry = item.path();
        sweep.entries += 1;
        match std::fs::read(&entry) {
            Ok(named) => {
                let temp = PathBuf::from(std::ffi::OsStr::from_bytes(&named));
                if remove_temp(&temp) {
                    sweep.removed += 1;
                }
            }
            Err(err) => {
                tracing::warn!(entry = %entry.display(), %err, "reading an upload journal entry");
            }
        }
        if let Err(err) = std::fs::remove_file(&entry) {
            tracing::warn!(entry = %entry.display(), %err, "removing an upload journal entry");
        }
    }
    Ok(sweep)
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
            assert_eq!(sweep, Sweep::default());
            let entry = journal.record(&temp).expect("entry");
            std::fs::write(&temp, b"partial").expect("temp");
            let done = journal.record(&kept).expect("entry");
            drop(done);
            std::fs::write(&kept, b"published elsewhere").expect("kept");
            // A crash: the entry is never dropped.
            std::mem::forget(entry);
        }
        let (_journal, sweep) = Journal::open(&journal_dir).expect("reopen");
        assert_eq!(
            sweep,
            Sweep {
                entries: 1,
                removed: 1
            }
        );
        assert!(!temp.exists(), "the crashed upload's temp file is gone");
        assert!(kept.exists(), "a file without an entry is left alone");
        let left: Vec<_> = std::fs::read_dir(&journal_dir)
            .expect("read_dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|name| name != LOCK_FILE)
            .collect();
        assert!(left.is_empty(), "{left:?}");
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
}
