//! Uploads: content and metadata published together, or not at all.
//!
//! A regular file is written to a temp file in the target's directory, given its owner,
//! mode, the foreign `user.*` attributes of the file it replaces and the new `user.e2b.*`
//! set, and only then renamed over the target. A reader therefore sees the old file or the
//! new one, each with its own metadata, never a mix or a fragment. A failed or abandoned
//! upload removes its temp file and leaves the target untouched.
//!
//! A new file (no target yet) is written the same way as an unnamed file instead
//! ([`crate::fs::unnamed`]) and linked in under its name: no temp name, and nothing left
//! behind by a crash. Should the target appear meanwhile, the file is linked under a temp
//! name and renamed over it.
//!
//! Every temp file is recorded in the upload journal ([`crate::fs::journal`]) from before
//! it exists until after it is renamed or removed, so a crash of the daemon leaves nothing
//! that the next start does not remove.
//!
//! Targets that cannot be replaced by a rename (devices, fifos, files on proc/sysfs-like
//! pseudo filesystems) are written in place, as envd does.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result, is_no_space};
use crate::fs::dirs;
use crate::fs::entry::is_special;
use crate::fs::journal::{Entry, Journal};
use crate::fs::metadata::{self, Metadata, Source};
use crate::fs::owner;
use crate::fs::unnamed;
use crate::fs::user::User;

/// Mode of newly created files before the umask (0644 with the usual umask).
const NEW_FILE_MODE: u32 = 0o666;
/// Symlink hops followed to find the file an upload really writes (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// Magic numbers of pseudo filesystems whose files cannot be replaced by a rename.
const PSEUDO_FS_MAGICS: &[i64] = &[
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x6367_7270, // cgroup2
    0x0027_e0eb, // cgroup
    0x6462_6720, // debugfs
    0x7472_6163, // tracefs
    0x7363_6673, // securityfs
    0x6265_6570, // configfs
];

/// An upload in progress. Dropping it without [`Upload::commit`] discards it.
#[derive(Debug)]
pub struct Upload {
    file: File,
    /// The file really written: the request path with symlinks followed.
    target: PathBuf,
    /// The temp file, for a replace-by-rename upload.
    temp: Option<PathBuf>,
    /// The file is unnamed (a new file): it is linked in under the target's name.
    unnamed: bool,
    /// The journal a temp name is recorded in (an unnamed file that must take one).
    journal: Option<Arc<Journal>>,
    /// Mode bits to keep when replacing an existing file.
    keep_mode: Option<u32>,
    /// The target is a device, fifo or socket: no owner change, no metadata (Linux allows
    /// no `user.*` attributes on such files).
    special: bool,
    owner: User,
    written: u64,
    /// Declared body length, for the "attempted to write N bytes" message.
    declared_len: Option<u64>,
    /// The temp file's journal entry. Declared after everything that can hold the temp
    /// file, so that it is removed (on drop) only after the temp file is gone.
    _entry: Option<Entry>,
}

impl Upload {
    /// Starts an upload to `path` (already resolved), creating missing parent directories
    /// owned by `owner`, and recording its temp file in `journal`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the target is a directory,
    /// [`Error::PermissionDenied`] when the daemon (not root) cannot give the file to
    /// `owner`, 507 when no inode is left, [`Error::Io`] when the file cannot be created.
    pub fn begin(
        path: &Path,
        owner: &User,
        declared_len: Option<u64>,
        journal: Option<&Arc<Journal>>,
    ) -> Result<Upload> {
        owner::ensure_can_own(owner, path)?;
        dirs::ensure_parent(path, owner)?;
        let (target, found) = follow_symlinks(path)?;
        let existing = match found {
            Ok(meta) => Some(meta),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                return Err(Error::io(
                    format!("error checking path {}", target.display()),
                    err,
                ));
            }
        };
        if existing.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(Error::InvalidArgument(format!(
                "path is a directory: {}",
                path.display()
            )));
        }
        let special = existing.as_ref().is_some_and(is_special);
        let in_place = special || on_pseudo_fs(&target);
        let open_error = |err: io::Error| {
            if is_no_space(&err) {
                Error::InsufficientStorage(format!("not enough inodes available: {err}"))
            } else {
                Error::io(format!("error opening file {}", target.display()), err)
            }
        };
        let unnamed = if in_place || existing.is_some() {
            None
        } else {
            let dir = target.parent().unwrap_or(Path::new("/"));
            unnamed::open(dir, NEW_FILE_MODE).map_err(open_error)?
        };
        let (file, temp, entry) = if let Some(file) = unnamed {
            (file, None, None)
        } else if in_place {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(NEW_FILE_MODE)
                .open(&target)
                .map_err(open_error)?;
            (file, None, None)
        } else {
            let temp = temp_path(&target);
            let entry = journal.and_then(|journal| journal.record(&temp));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(NEW_FILE_MODE)
                .open(&temp)
                .map_err(open_error)?;
            (file, Some(temp), entry)
        };
        Ok(Upload {
            file,
            keep_mode: existing.map(|m| m.permissions().mode() & 0o7777),
            special,
            unnamed: temp.is_none() && !in_place,
            journal: journal.cloned(),
            target,
            temp,
            owner: owner.clone(),
            written: 0,
            declared_len,
            _entry: entry,
        })
    }

    /// Appends a chunk of content.
    ///
    /// # Errors
    /// 507 when the disk is full, [`Error::Io`] otherwise.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        self.write_chunks(&[data])
    }

    /// Appends chunks of content in order, as few `writev` calls as the kernel allows.
    ///
    /// # Errors
    /// As [`Upload::write_all`].
    pub fn write_chunks(&mut self, chunks: &[&[u8]]) -> Result<()> {
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        write_all_vectored(&mut self.file, chunks).map_err(|err| {
            if is_no_space(&err) {
                let message = match self.declared_len {
                    Some(len) if len > 0 => {
                        format!("attempted to write {len} bytes: not enough disk space available")
                    }
                    _ => "not enough disk space available".to_owned(),
                };
                Error::InsufficientStorage(message)
            } else {
                Error::io(format!("error writing file {}", self.target.display()), err)
            }
        })?;
        self.written += total as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Publishes the upload with exactly `metadata` as its `user.e2b.*` set, and returns the
    /// metadata as read back from the file.
    ///
    /// # Errors
    /// 507 when the metadata does not fit, [`Error::Io`] when ownership, mode or the final
    /// rename fail. On error the previous file is untouched (for rename uploads).
    pub fn commit(mut self, metadata: &Metadata) -> Result<Metadata> {
        let context = |what: &str| format!("{what} {}", self.target.display());
        if self.special {
            if !metadata.is_empty() {
                tracing::warn!(path = %self.target.display(), "special files carry no metadata; not stored");
            }
            return Ok(Metadata::new());
        }
        owner::give_file(&self.file, &self.target, &self.owner)?;
        if self.temp.is_some() {
            if let Some(mode) = self.keep_mode {
                self.file
                    .set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|err| Error::io(context("error setting mode of"), err))?;
                metadata::copy_foreign(&self.target, &self.file).map_err(|err| {
                    Error::io(context("error copying extended attributes of"), err)
                })?;
            }
        }
        let stored = if self.temp.is_some() || self.unnamed {
            // Our own new file: it carries exactly what was set (nothing, where the
            // filesystem has no xattrs), so there is nothing to remove or read back.
            if metadata::set_on_new(&self.file, &self.target, metadata)? {
                metadata.clone()
            } else {
                Metadata::new()
            }
        } else {
            metadata::replace(&self.file, &self.target, metadata)?;
            metadata::read(Source::File(&self.file)).unwrap_or_else(|err| {
                tracing::warn!(path = %self.target.display(), %err, "reading back metadata");
                Metadata::new()
            })
        };
        if self.unnamed {
            match unnamed::link(&self.file, &self.target) {
                Ok(()) => return Ok(stored),
                // The target appeared meanwhile: it is replaced, as any upload's.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    let temp = temp_path(&self.target);
                    self._entry = self.journal.as_ref().and_then(|j| j.record(&temp));
                    unnamed::link(&self.file, &temp)
                        .map_err(|err| Error::io(context("error replacing"), err))?;
                    self.temp = Some(temp);
                }
                Err(err) => return Err(Error::io(context("error creating"), err)),
            }
        }
        if let Some(temp) = self.temp.take() {
            if let Err(err) = std::fs::rename(&temp, &self.target) {
                self.temp = Some(temp);
                return Err(Error::io(context("error replacing"), err));
            }
        }
        Ok(stored)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            if let Err(err) = std::fs::remove_file(&temp) {
                tracing::warn!(path = %temp.display(), %err, "removing an abandoned upload");
            }
        }
    }
}

/// Writes every byte of `chunks`, in order, through `writev` (at most `IOV_MAX` slices a
/// call), resuming after short writes.
fn write_all_vectored(file: &mut File, chunks: &[&[u8]]) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut slices: Vec<io::IoSlice<'_>> = chunks
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| io::IoSlice::new(c))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let window = rest.len().min(IOV_MAX);
        match file.write_vectored(&rest[..window]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The file a write to `path` lands in: symlinks on the final component are followed
/// (dangling ones too, so the upload creates their target, as `open(O_CREAT)` would).
/// With it, what `lstat` said of it (not a symlink, so what `stat` would say).
fn follow_symlinks(path: &Path) -> Result<(PathBuf, io::Result<std::fs::Metadata>)> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = std::fs::read_link(&current).map_err(|err| {
                    Error::io(format!("error reading link {}", current.display()), err)
                })?;
                current = match current.parent() {
                    Some(parent) if link.is_relative() => parent.join(link),
                    _ => link,
                };
            }
            found => return Ok((current, found)),
        }
    }
    Err(Error::FailedPrecondition(format!(
        "too many levels of symbolic links: {}",
        path.display()
    )))
}

fn on_pseudo_fs(path: &Path) -> bool {
    let dir = path.parent().unwrap_or(path);
    nix::sys::statfs::statfs(dir)
        .map(|fs| PSEUDO_FS_MAGICS.contains(&{ fs.filesystem_type().0 }))
        .unwrap_or(false)
}

/// A hidden, unique sibling of `target`.
fn temp_path(target: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Keep the name within NAME_MAX whatever the target's length.
    let short: String = name.chars().take(64).collect();
    target.with_file_name(format!(".{short}.{}.{n}{TEMP_SUFFIX}", std::process::id()))
}

/// Suffix of in-progress upload files; lets operators (and tests) recognise leftovers.
pub const TEMP_SUFFIX: &str = ".envd-upload";

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn me() -> User {
        User {
            name: "me".into(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            home: PathBuf::from("/"),
            shell: PathBuf::from("/bin/sh"),
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("read_dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(TEMP_SUFFIX))
            .collect()
    }

    #[test]
    fn commit_replaces_content_and_keeps_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/f.txt");
        let mut up = Upload::begin(&path, &me(), None, None).expect("begin");
        up.write_all(b"one").expect("write");
        up.commit(&Metadata::new()).expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut up = Upload::begin(&path, &me(), None, None).expect("begin");
        up.write_all(b"two").expect("write");
        // Not yet published: readers still see the old content.
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
        up.commit(&Metadata::new()).expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").mode() & 0o777,
            0o600
        );
        assert!(leftovers(path.parent().expect("parent")).is_empty());
    }

    #[test]
    fn chunks_past_the_writev_limit_are_written_whole_and_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("many");
        // 3000 chunks (more than one writev takes), some empty, of differing lengths.
        let chunks: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 256) as u8; (i % 7) as usize * 3])
            .collect();
        let slices: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let mut up = Upload::begin(&path, &me(), None, None).expect("begin");
        up.write_chunks(&slices[..1500]).expect("write");
        up.write_all(b"|").expect("write");
        up.write_chunks(&slices[1500..]).expect("write");
        let expected: Vec<u8> =
            [&chunks[..1500].concat()[..], b"|", &chunks[1500..].concat()].concat();
        assert_eq!(up.written(), expected.len() as u64);
        up.commit(&Metadata::new()).expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), expected);
    }

    #[test]
    fn a_new_file_is_unnamed_until_published_and_replaces_one_made_meanwhile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("new");
        let mut up = Upload::begin(&path, &me(), None, None).expect("begin");
        up.write_all(b"uploaded").expect("write");
        assert!(up.unnamed, "a new file is written unnamed");
        let names = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .expect("read_dir")
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert!(
            names(dir.path()).is_empty(),
            "nothing is named before the commit"
        );
        // Someone creates the target meanwhile: the upload still wins, as a replace.
        std::fs::write(&path, b"raced").expect("write");
        up.commit(&Metadata::new()).expect("commit");
        assert_eq!(std::fs::read(&path).expect("read"), b"uploaded");
        assert_eq!(names(dir.path()), ["new"]);

        let dropped = dir.path().join("dropped");
        let mut up = Upload::begin(&dropped, &me(), None, None).expect("begin");
        up.write_all(b"partial").expect("write");
        drop(up);
        assert_eq!(
            names(dir.path()),
            ["new"],
            "an abandoned new file leaves nothing"
        );
    }

    #[test]
    fn abandoned_upload_leaves_old_file_and_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"old").expect("write");
        let mut up = Upload::begin(&path, &me(), None, None).expect("begin");
        up.write_all(b"partial").expect("write");
        assert_eq!(leftovers(dir.path()).len(), 1);
        drop(up);
        assert_eq!(std::fs::read(&path).expect("read"), b"old");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn writes_through_symlinks_and_refuses_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::write(&real, b"old").expect("write");
        let link = dir.path().join("link");
        symlink("real", &link).expect("symlink");
        let mut up = Upload::begin(&link, &me(), None, None).expect("begin");
        up.write_all(b"new").expect("write");
        up.commit(&Metadata::new()).expect("commit");
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("lstat")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&real).expect("read"), b"new");

        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("created-by-upload"), &dangling).expect("symlink");
        let up = Upload::begin(&dangling, &me(), None, None).expect("begin");
        up.commit(&Metadata::new()).expect("commit");
        assert!(dir.path().join("created-by-upload").is_file());

        let err = Upload::begin(dir.path(), &me(), None, None).expect_err("directory");
        assert!(matches!(err, Error::InvalidArgument(_)));
    }

    #[test]
    fn special_files_are_written_in_place() {
        let up = Upload::begin(Path::new("/dev/null"), &me(), None, None);
        if nix::unistd::getuid().is_root() {
            let mut up = up.expect("begin /dev/null");
            up.write_all(b"discarded").expect("write");
            assert!(up.temp.is_none());
            drop(up);
            assert!(Path::new("/dev/null").exists());
        }
    }
}
