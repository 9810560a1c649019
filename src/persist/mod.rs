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
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| {
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

    /// Writes `data` to `name` atomically: a temp file (0600) in the directory, fsync,
    /// rename over the old file, fsync the directory.
    ///
    /// # Errors
    /// The OS error of any step (the old file is then intact).
    pub fn save<T: Serialize>(&self, name: &str, data: &T) -> io::Result<()> {
        let bytes = serde_json::to_vec(&Envelope {
            version: FORMAT_VERSION,
            data,
        })
        .map_err(io::Error::other)?;
        let target = self.root.join(name);
        let temp = self.root.join(format!(".{name}.tmp"));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, &target)?;
            File::open(&self.root)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    /// Reads `name`. `None` when it does not exist or could not be used; an unreadable,
    /// corrupt or other-version file is renamed to `<name>.bad` and the reason logged.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
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
}
