//! `EntryInfo`: what the daemon reports about a file, directory or symlink (reference §5.2).
//!
//! Built from `lstat` of the entry itself, plus the target's type, mode and metadata for a
//! symlink. This module never sees protobuf types; `rpc::convert` maps them.

use std::fs::Metadata as FsMetadata;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::fs::metadata::{self, Metadata};

use crate::fs::user::NameCache;

/// What kind of thing an entry is; for a symlink, what its final target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A fifo, socket, device, or a broken or cyclic symlink.
    Unspecified,
    /// A regular file.
    File,
    /// A directory.
    Directory,
}

/// Everything a client is told about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// Base name (`/` for the root).
    pub name: String,
    /// The entry's kind; a symlink reports its target's.
    pub kind: FileKind,
    /// The path as the caller should see it.
    pub path: PathBuf,
    /// `lstat` size (a symlink's is the length of its text).
    pub size: i64,
    /// Permission bits (`& 0o777`) of the entry, or of a symlink's target (0 when broken).
    pub mode: u32,
    /// Go `FileMode.String()` of the `lstat` mode, e.g. `-rw-r--r--`, `Lrwxrwxrwx`.
    pub permissions: String,
    /// Owner name, or the decimal uid.
    pub owner: String,
    /// Group name, or the decimal gid.
    pub group: String,
    /// Modification time, `None` only when exactly the epoch.
    pub modified: Option<SystemTime>,
    /// For a symlink: the fully resolved target, or the link's own path when unresolvable.
    pub symlink_target: Option<PathBuf>,
    /// True when the entry itself is a symlink.
    pub is_symlink: bool,
    /// The `user.e2b.*` attributes (of the target, for a symlink).
    pub metadata: Metadata,
}

/// Describes the entry at `path` (not following a final symlink, except for its target's
/// kind, mode and metadata). `shown_as` is the path reported to the client.
///
/// # Errors
/// [`Error::NotFound`] when nothing is there; [`Error::Io`] for other `lstat` failures.
pub fn describe(path: &Path, shown_as: &Path, names: &mut NameCache) -> Result<EntryInfo> {
    let lstat = std::fs::symlink_metadata(path).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => Error::NotFound(format!("file not found: {}", path.display())),
        _ => Error::io(format!("error getting file info {}", path.display()), err),
    })?;
    describe_with(path, shown_as, &lstat, names)
}

/// [`describe`] for an entry whose `lstat` the caller already holds (a directory walk).
///
/// # Errors
/// None today; kept fallible so callers do not change when a lookup starts failing.
pub fn describe_with(
    path: &Path,
    shown_as: &Path,
    lstat: &FsMetadata,
    names: &mut NameCache,
) -> Result<EntryInfo> {
    let is_symlink = lstat.file_type().is_symlink();
    // `target`: the inode whose metadata is reported, when the caller's stat already names
    // it (the entry itself, or a symlink's resolved target).
    let (kind, mode, symlink_target, target) = if is_symlink {
        match std::fs::metadata(path) {
            Ok(target) => (
                kind_of(&target),
                target.permissions().mode() & 0o777,
                Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())),
                Some((target.dev(), target.ino())),
            ),
            Err(_) => (FileKind::Unspecified, 0, Some(path.to_path_buf()), None),
        }
    } else {
        (
            kind_of(lstat),
            lstat.permissions().mode() & 0o777,
            None,
            Some((lstat.dev(), lstat.ino())),
        )
    };
    let modified = lstat
        .modified()
        .ok()
        .filter(|time| *time != SystemTime::UNIX_EPOCH);
    Ok(EntryInfo {
        name: base_name(path),
        kind,
        path: shown_as.to_path_buf(),
        size: i64::try_from(lstat.len()).unwrap_or(i64::MAX),
        mode,
        permissions: go_mode_string(lstat.mode()),
        owner: names.user(lstat.uid()),
        group: names.group(lstat.gid()),
        modified,
        symlink_target,
        is_symlink,
        metadata: match target {
            Some(identity) => metadata::read_or_empty_of(path, identity),
            None => metadata::read_or_empty(path),
        },
    })
}

fn kind_of(meta: &FsMetadata) -> FileKind {
    let kind = meta.file_type();
    if kind.is_file() {
        FileKind::File
    } else if kind.is_dir() {
        FileKind::Directory
    } else {
        FileKind::Unspecified
    }
}

/// The last path element with trailing slashes stripped; `/` for the root.
pub fn base_name(path: &Path) -> String {
    match path.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None if path.as_os_str().as_encoded_bytes().starts_with(b"/") => "/".into(),
        None => path.to_string_lossy().into_owned(),
    }
}

/// Go's `FileMode.String()` for a Linux `st_mode`: type letters in Go's order, then the
/// nine `rwx` characters; a single `-` when no letter applies.
pub fn go_mode_string(st_mode: u32) -> String {
    const S_IFMT: u32 = 0o170_000;
    let format = st_mode & S_IFMT;
    let mut out = String::with_capacity(12);
    if format == 0o040_000 {
        out.push('d');
    }
    if format == 0o120_000 {
        out.push('L');
    }
    if format == 0o060_000 || format == 0o020_000 {
        out.push('D');
    }
    if format == 0o010_000 {
        out.push('p');
    }
    if format == 0o140_000 {
        out.push('S');
    }
    if st_mode & 0o4000 != 0 {
        out.push('u');
    }
    if st_mode & 0o2000 != 0 {
        out.push('g');
    }
    if format == 0o020_000 {
        out.push('c');
    }
    if st_mode & 0o1000 != 0 {
        out.push('t');
    }
    if out.is_empty() {
        out.push('-');
    }
    const RWX: &[u8; 9] = b"rwxrwxrwx";
    for (i, letter) in RWX.iter().enumerate() {
        let bit = 1 << (8 - i);
        out.push(if st_mode & bit != 0 {
            *letter as char
        } else {
            '-'
        });
    }
    out
}

/// True when the file type is one a client can read or write as a stream of bytes.
pub fn is_special(meta: &FsMetadata) -> bool {
    let kind = meta.file_type();
    kind.is_fifo() || kind.is_socket() || kind.is_block_device() || kind.is_char_device()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn mode_strings_match_go() {
        for (mode, want) in [
            (0o100_644, "-rw-r--r--"),
            (0o100_755, "-rwxr-xr-x"),
            (0o100_444, "-r--r--r--"),
            (0o100_200, "--w-------"),
            (0o100_000, "----------"),
            (0o040_755, "drwxr-xr-x"),
            (0o041_777, "dtrwxrwxrwx"),
            (0o120_777, "Lrwxrwxrwx"),
            (0o104_755, "urwxr-xr-x"),
            (0o020_666, "Dcrw-rw-rw-"),
            (0o060_660, "Drw-rw----"),
            (0o010_644, "prw-r--r--"),
            (0o140_755, "Srwxr-xr-x"),
        ] {
            assert_eq!(go_mode_string(mode), want, "{mode:o}");
        }
    }

    #[test]
    fn describes_files_dirs_and_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let file = root.join("f.txt");
        std::fs::write(&file, b"hello").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let sub = root.join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        symlink(&file, root.join("to-file")).expect("symlink");
        symlink(root.join("to-file"), root.join("chain")).expect("symlink");
        symlink(root.join("missing"), root.join("broken")).expect("symlink");
        symlink(root.join("loop-b"), root.join("loop-a")).expect("symlink");
        symlink(root.join("loop-a"), root.join("loop-b")).expect("symlink");
        let mut names = NameCache::default();

        let info = describe(&file, &file, &mut names).expect("file");
        assert_eq!(info.kind, FileKind::File);
        assert_eq!(info.name, "f.txt");
        assert_eq!(info.size, 5);
        assert_eq!(info.mode, 0o644);
        assert_eq!(info.permissions, "-rw-r--r--");
        assert!(!info.is_symlink);
        assert!(info.symlink_target.is_none());
        assert!(info.modified.is_some());

        let info = describe(&sub, &sub, &mut names).expect("dir");
        assert_eq!(info.kind, FileKind::Directory);
        assert!(info.permissions.starts_with('d'));

        let canonical_file = std::fs::canonicalize(&file).expect("canonical");
        let chain = root.join("chain");
        let info = describe(&chain, &chain, &mut names).expect("chain");
        assert_eq!(info.kind, FileKind::File);
        assert!(info.is_symlink);
        assert_eq!(info.mode, 0o644);
        assert!(info.permissions.starts_with('L'));
        assert_eq!(
            info.symlink_target.as_deref(),
            Some(canonical_file.as_path())
        );

        for name in ["broken", "loop-a"] {
            let link = root.join(name);
            let info = describe(&link, &link, &mut names).expect(name);
            assert_eq!(info.kind, FileKind::Unspecified, "{name}");
            assert_eq!(info.mode, 0, "{name}");
            assert_eq!(
                info.symlink_target.as_deref(),
                Some(link.as_path()),
                "{name}"
            );
        }

        let missing = root.join("nope");
        assert!(matches!(
            describe(&missing, &missing, &mut names),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name(Path::new("/")), "/");
        assert_eq!(base_name(Path::new("/a/b/")), "b");
        assert_eq!(base_name(Path::new("/a/b c")), "b c");
    }
}
