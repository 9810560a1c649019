//! The state directory: what the daemon must remember across its own restarts (the
//! `/init` state and the managed processes), written atomically, readable by root only,
//! never logged. A missing file is a clean start; a corrupt or unknown-version file is
//! set aside (renamed `*.bad`), logged, and the daemon starts clean.

pub mod init_state;
pub mod processes;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Format version of every state file; bumped when a file's meaning changes.
pub const FORMAT_VERSION: u32 = 1;

/// A state file on disk: `{"version": N, "data": ...}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope<T> {
    version: u32,
    data: T,
}

/// How long [`lock_waiting`] waits for a lock to come free.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What [`StateDir::save`] writes for `data`: its JSON in the versioned envelope.
///
/// # Errors
/// When `data` cannot be serialized.
pub fn encode<T: Serialize>(data: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(&Envelope {
        version: FORMAT_VERSION,
        data,
    })
    .map_err(io::Error::other)
}

/// Takes an exclusive `flock` on `file`, waiting up to [`LOCK_WAIT`] for it. A daemon that
/// was just killed can leave its lock held for a moment: a child it was starting holds a
/// copy of its descriptors until that child's `exec` closes them.
///
/// # Errors
/// The errno of the last attempt (`EWOULDBLOCK` when another holder kept it).
pub fn lock_waiting(file: File) -> Result<nix::fcntl::Flock<File>, nix::errno::Errno> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = back;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err((_, errno)) => return Err(errno),
        }
    }
}

/// The daemon's state directory, locked for this daemon while it runs.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    /// An exclusive `flock` on `<dir>/lock`: two daemons sharing a state directory would
    /// adopt each other's processes.
    _lock: nix::fcntl::Flock<File>,
}

impl StateDir {
    /// Opens (creating, mode 0700) and locks the directory.
    ///
    /// # Errors
    /// The OS error when it cannot be created or is not a directory; `WouldBlock` when
    /// another daemon holds it.
    pub fn open(root: &Path) -> io::Result<StateDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        let lock_file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(root.join("lock"))?;
        let lock = lock_waiting(lock_file).map_err(|errno| {
            io::Error::new(
                io::Error::from(errno).kind(),
                format!("{} is in use by another envd ({errno})", root.display()),
            )
        })?;
        Ok(StateDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Writes `data` to `name` so that a reader finds the old contents or the new, whole:
    /// the new contents go to a temp file (0600) in the directory, which is then exchanged
    /// with the old file (`RENAME_EXCHANGE`). The temp name is left holding the previous
    /// contents, and the next save writes over that file: saves reuse two inodes rather
    /// than create one and free one each time. On ext4 the allocator skips past every
    /// inode freed in the last seconds, and at a few hundred process starts a second that
    /// scan was a tenth of the daemon's CPU.
    ///
    /// Where the filesystem cannot exchange, the old file is removed and the temp file
    /// renamed into its place; [`StateDir::load`] completes a save that a crash interrupted
    /// between those two steps. Never a rename over the old file: on ext4 that makes the
    /// kernel write the new file's data out at once (`auto_da_alloc`), which measured 0.2
    /// ms at the median and 1 ms at p90 here.
    ///
    /// Not fsynced, deliberately: what this directory remembers is for the daemon's own
    /// restarts within one boot (a crash, an upgrade), and the page cache outlives the
    /// process. Only a machine crash could lose a write, and that also ends every process
    /// and keeper the table describes (the default directory, `/run/envd`, is a tmpfs gone
    /// at boot). The process table is saved on every start, so either cost would be a
    /// large share of what a start costs.
    ///
    /// # Errors
    /// The OS error of any step (the old file is then intact, or the new one complete).
    pub fn save<T: Serialize>(&self, name: &str, data: &T) -> io::Result<()> {
        self.write(name, &encode(data)?)
    }

    /// [`StateDir::save`] of contents already encoded by [`encode`], for a caller that
    /// chooses where to write by their size.
    ///
    /// # Errors
    /// As [`StateDir::save`].
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let target = self.root.join(name);
        let temp = self.temp_path(name);
        let written = (|| {
            // Not truncated on opening: cut to length after the write instead. ext4 flushes
            // a file truncated to nothing when it is closed (`auto_da_alloc` again).
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(bytes)?;
            file.set_len(bytes.len() as u64)
        })();
        if let Err(err) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(err);
        }
        match crate::sys::exchange(&temp, &target) {
            Ok(()) => Ok(()),
            // No old file: the first save.
            Err(err) if err.kind() == io::ErrorKind::NotFound => std::fs::rename(&temp, &target),
            Err(_) => {
                match std::fs::remove_file(&target) {
                    Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                    _ => {}
                }
                std::fs::rename(&temp, &target)
            }
        }
    }

    fn temp_path(&self, name: &str) -> PathBuf {
        self.root.join(format!(".{name}.tmp"))
    }

    /// Settles the temp file of `name` before it is read. With the file itself there, the
    /// temp file is the copy a save swapped out (older), or one being written when a crash
    /// came, and goes; unless it is whole and newer than the file: then a save of the
    /// remove-and-rename kind (an older daemon's) wrote it and the crash came before the
    /// old file was removed, and it is the newest contents. Without the file, a whole temp
    /// file is the newest contents (the crash came between the removal and the rename).
    fn recover(&self, name: &str) {
        let temp = self.temp_path(name);
        let target = self.root.join(name);
        let Ok(bytes) = std::fs::read(&temp) else {
            return;
        };
        let whole = serde_json::from_slice::<Envelope<serde::de::IgnoredAny>>(&bytes).is_ok();
        let newer = match (std::fs::metadata(&temp), std::fs::metadata(&target)) {
            (Ok(temp), Ok(target)) => matches!(
                (temp.modified(), target.modified()),
                (Ok(temp), Ok(target)) if temp > target
            ),
            (Ok(_), Err(err)) => err.kind() == io::ErrorKind::NotFound,
            _ => false,
        };
        if whole && newer {
            let _ = std::fs::remove_file(&target);
            if std::fs::rename(&temp, &target).is_ok() {
                tracing::info!(
                    file = name,
                    "completed a state file save interrupted by a crash"
                );
                return;
            }
        }
        let _ = std::fs::remove_file(&temp);
    }

    /// Reads `name` (after completing an interrupted save of it). `None` when it does not
    /// exist or could not be used; an unreadable, corrupt or other-version file is renamed
    /// to `<name>.bad` and the reason logged.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        self.recover(name);
        let path = self.root.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return None,
            Err(err) => {
                self.set_aside(&path, &format!("unreadable: {err}"));
                return None;
            }
        };
        let version = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
        if version != Some(u64::from(FORMAT_VERSION)) {
            let why = match version {
                Some(v) => format!("format version {v}, this daemon reads {FORMAT_VERSION}"),
                None => "not a state file (corrupt?)".to_owned(),
            };
            self.set_aside(&path, &why);
            return None;
        }
        match serde_json::from_slice::<Envelope<T>>(&bytes) {
            Ok(envelope) => Some(envelope.data),
            Err(err) => {
                self.set_aside(&path, &format!("corrupt: {err}"));
                None
            }
        }
    }

    fn set_aside(&self, path: &Path, why: &str) {
        let aside = path.with_extension("bad");
        match std::fs::rename(path, &aside) {
            Ok(()) => {
                tracing::error!(file = %path.display(), kept_as = %aside.display(), why, "ignoring a state file; starting clean")
            }
            Err(err) => {
                tracing::error!(file = %path.display(), why, %err, "ignoring a state file that could not be set aside")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u32,
        b: String,
    }

    #[test]
    fn round_trips_atomically_with_private_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(&dir.path().join("state")).expect("open");
        assert_eq!(
            std::fs::metadata(state.path()).expect("stat").mode() & 0o777,
            0o700
        );
        assert_eq!(
            state.load::<Sample>("s.json"),
            None,
            "missing is a clean start"
        );
        let sample = Sample {
            a: 1,
            b: "x".into(),
        };
        state.save("s.json", &sample).expect("save");
        assert_eq!(
            std::fs::metadata(state.path().join("s.json"))
                .expect("stat")
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(state.load::<Sample>("s.json"), Some(sample));
        let leftovers: Vec<_> = std::fs::read_dir(state.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name() != "lock")
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp file left");
        let second = StateDir::open(state.path()).expect_err("locked by the first");
        assert!(
            second.to_string().contains("in use by another envd"),
            "{second}"
        );
    }

    #[test]
    fn corrupt_and_foreign_files_are_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("open");
        for (name, content) in [
            ("garbage.json", &b"{not json"[..]),
            ("future.json", br#"{"version":99,"data":{"a":1,"b":"x"}}"#),
            ("wrong.json", br#"{"version":1,"data":{"a":"nope"}}"#),
        ] {
            std::fs::write(state.path().join(name), content).expect("write");
            assert_eq!(state.load::<Sample>(name), None, "{name}");
            assert!(!state.path().join(name).exists(), "{name} moved away");
            assert!(
                state.path().join(name).with_extension("bad").exists(),
                "{name} kept aside"
            );
        }
    }

    #[test]
    fn a_save_cut_short_by_a_crash_is_completed_or_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("open");
        let old = Sample {
            a: 1,
            b: "old".into(),
        };
        let new = Sample {
            a: 2,
            b: "new".into(),
        };
        let temp = state.path().join(".s.json.tmp");
        let whole = serde_json::to_vec(&Envelope {
            version: FORMAT_VERSION,
            data: &new,
        })
        .expect("encode");

        // The crash came while the temp file was being written: the old file stands.
        state.save("s.json", &old).expect("save");
        std::fs::write(&temp, &whole[..whole.len() - 1]).expect("partial temp");
        assert_eq!(state.load::<Sample>("s.json"), Some(old));
        assert!(!temp.exists(), "the partial temp file is removed");

        // The crash came after the old file was removed: the whole temp file is the state.
        std::fs::remove_file(state.path().join("s.json")).expect("remove");
        std::fs::write(&temp, &whole).expect("whole temp");
        assert_eq!(state.load::<Sample>("s.json"), Some(new));
        assert!(!temp.exists(), "renamed into place");
        assert!(state.path().join("s.json").exists());
    }

    fn sample(a: u32) -> Sample {
        Sample {
            a,
            b: format!("save {a}"),
        }
    }

    #[test]
    fn saves_swap_two_files_and_the_older_copy_is_never_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("open");
        let target = state.path().join("s.json");
        let temp = state.path().join(".s.json.tmp");
        let mut inodes = std::collections::BTreeSet::new();
        for a in 1..=5 {
            state.save("s.json", &sample(a)).expect("save");
            inodes.insert(std::fs::metadata(&target).expect("stat").ino());
            assert_eq!(
                std::fs::metadata(&target).expect("stat").mode() & 0o777,
                0o600
            );
        }
        assert_eq!(inodes.len(), 2, "two files take turns: {inodes:?}");
        // The temp name holds the save before the last (whole, and longer: no tail of it is
        // left in the newest, which is shorter).
        let older: Envelope<Sample> =
            serde_json::from_slice(&std::fs::read(&temp).expect("the older copy")).expect("json");
        assert_eq!(older.data, sample(4));
        state
            .save(
                "s.json",
                &Sample {
                    a: 6,
                    b: String::new(),
                },
            )
            .expect("shorter");
        // A restart reads the newest, not the older copy beside it, and drops that copy.
        let path = state.path().to_path_buf();
        drop(state);
        let reopened = StateDir::open(&path).expect("reopen");
        assert_eq!(
            reopened.load::<Sample>("s.json"),
            Some(Sample {
                a: 6,
                b: String::new()
            })
        );
        assert!(!temp.exists(), "the older copy is removed");
    }

    #[test]
    fn an_older_daemons_save_cut_short_before_the_removal_is_completed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(dir.path()).expect("open");
        state.save("s.json", &sample(1)).expect("save");
        // Such a save wrote the whole temp file and then removed the old file: a crash
        // between the two leaves both, the temp file the newer.
        let temp = state.path().join(".s.json.tmp");
        let whole = encode(&sample(2)).expect("encode");
        std::fs::write(&temp, &whole).expect("temp");
        let later = std::fs::metadata(state.path().join("s.json"))
            .and_then(|m| m.modified())
            .expect("mtime")
            + std::time::Duration::from_secs(1);
        File::options()
            .write(true)
            .open(&temp)
            .and_then(|f| f.set_modified(later))
            .expect("newer");
        assert_eq!(state.load::<Sample>("s.json"), Some(sample(2)));
        assert!(!temp.exists(), "renamed into place");
    }
}
