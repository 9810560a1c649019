//! The filesystem operations behind the `Filesystem` RPCs: stat, list, make, move, remove.
//! Every function takes already-resolved paths and blocks: callers run them off the runtime.

use std::io;
use std::path::Path;

use nix::errno::Errno;

use crate::error::{Error, Result};
use crate::fs::dirs;
use crate::fs::entry::{self, EntryInfo};
use crate::fs::path::clean;
use crate::fs::user::{NameCache, User};

/// Describes `path` without following a final symlink.
///
/// # Errors
/// [`Error::NotFound`] when nothing is there.
pub fn stat(path: &Path) -> Result<EntryInfo> {
    entry::describe(path, path, &mut NameCache::default())
}

/// Lists the directory `requested` (symlinks in it resolved) down to `depth` levels
/// (0 counts as 1), depth-first, pre-order, names sorted bytewise within each directory,
/// without following symlinks inside the tree. Paths are reported under `requested`.
///
/// # Errors
/// [`Error::NotFound`] for a missing path, [`Error::FailedPrecondition`] for a symlink
/// cycle, [`Error::InvalidArgument`] when the target is not a directory, [`Error::Io`] when a
/// directory in the tree cannot be read.
pub fn list_dir(requested: &Path, depth: u32) -> Result<Vec<EntryInfo>> {
    let depth = depth.max(1);
    let resolved = std::fs::canonicalize(requested).map_err(|err| {
        match err.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ENOENT) => {
                Error::NotFound(format!("path not found: {}", requested.display()))
            }
            Some(Errno::ELOOP) => Error::FailedPrecondition(format!(
                "cyclic symlink or chain >255 links at {:?}",
                requested.display().to_string()
            )),
            Some(Errno::ENOTDIR) => {
                Error::InvalidArgument(format!("path is not a directory: {}", requested.display()))
            }
            _ => Error::io(format!("error resolving path {}", requested.display()), err),
        }
    })?;
    if !resolved.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "path is not a directory: {}",
            resolved.display()
        )));
    }
    let mut names = NameCache::default();
    let mut out = Vec::new();
    walk(&resolved, requested, 1, depth, &mut names, &mut out)?;
    Ok(out)
}

fn walk(
    dir: &Path,
    shown_dir: &Path,
    level: u32,
    max_depth: u32,
    names: &mut NameCache,
    out: &mut Vec<EntryInfo>,
) -> Result<()> {
    let mut children: Vec<_> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .collect::<io::Result<Vec<_>>>()
            .map_err(|err| read_error(dir, err))?,
        // The directory vanished between being listed and being opened.
        Err(err) if err.kind() == io::ErrorKind::NotFound && level > 1 => return Ok(()),
        Err(err) => return Err(read_error(dir, err)),
    };
    // Each name is read once (a plain sort would build two per comparison).
    children.sort_by_cached_key(std::fs::DirEntry::file_name);
    if level >= max_depth && children.len() >= PARALLEL_FROM {
        return describe_in_parallel(&children, dir, shown_dir, names, out);
    }
    for child in children {
        let Some((info, is_dir)) = describe_child(&child, dir, shown_dir, names)? else {
            continue;
        };
        let shown = info.path.clone();
        out.push(info);
        if is_dir && level < max_depth {
            walk(&child.path(), &shown, level + 1, max_depth, names, out)?;
        }
    }
    Ok(())
}

/// The entry for `child` of `dir` (shown under `shown_dir`) and whether it is a directory;
/// `None` when it vanished since the directory was read.
fn describe_child(
    child: &std::fs::DirEntry,
    dir: &Path,
    shown_dir: &Path,
    names: &mut NameCache,
) -> Result<Option<(EntryInfo, bool)>> {
    // `lstat` relative to the open directory: no walk of the whole path per entry.
    let lstat = match child.metadata() {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(read_error(dir, err)),
    };
    let shown = clean(&shown_dir.join(child.file_name()));
    let info = entry::describe_with(&child.path(), &shown, &lstat, names)?;
    Ok(Some((info, lstat.is_dir())))
}

fn read_error(dir: &Path, err: io::Error) -> Error {
    Error::io(format!("error reading directory {}", dir.display()), err)
}

/// A directory with at least this many entries, at the listing's last level, has its
/// entries described on several threads: each entry is four or more system calls (`lstat`,
/// `listxattr`, a `getxattr` per key), and 10,000 of them took ~90 ms on one core.
const PARALLEL_FROM: usize = 2048;

/// Describes `children` (sorted, none to descend into) on up to one thread per core, in
/// contiguous slices, and appends the entries to `out` in their order.
fn describe_in_parallel(
    children: &[std::fs::DirEntry],
    dir: &Path,
    shown_dir: &Path,
    names: &mut NameCache,
    out: &mut Vec<EntryInfo>,
) -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let slice = children.len().div_ceil(threads);
    let describe = |part: &[std::fs::DirEntry], names: &mut NameCache| -> Result<Vec<EntryInfo>> {
        let mut entries = Vec::with_capacity(part.len());
        for child in part {
            if let Some((info, _)) = describe_child(child, dir, shown_dir, names)? {
                entries.push(info);
            }
        }
        Ok(entries)
    };
    let mut parts = children.chunks(slice);
    let first = parts.next().unwrap_or_default();
    let results = std::thread::scope(|scope| {
        let others: Vec<_> = parts
            .map(|part| scope.spawn(move || describe(part, &mut NameCache::default())))
            .collect();
        let mut results = vec![describe(first, names)];
        for other in others {
            results.push(
                other
                    .join()
                    .unwrap_or_else(|_| Err(Error::Internal("a listing thread panicked".into()))),
            );
        }
        results
    });
    for result in results {
        out.extend(result?);
    }
    Ok(())
}

/// Creates the directory `path` and any missing parents, owned by `owner`.
///
/// # Errors
/// [`Error::AlreadyExists`] when a directory (or a symlink to one) is there already,
/// [`Error::InvalidArgument`] when something else is, [`Error::Io`] when creation fails.
pub fn make_dir(path: &Path, owner: &User) -> Result<EntryInfo> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(Error::AlreadyExists(format!(
                "directory already exists: {}",
                path.display()
            )));
        }
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "path already exists but it is not a directory: {}",
                path.display()
            )));
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(Error::io(
                format!("error getting file info {}", path.display()),
                err,
            ));
        }
    }
    dirs::ensure(path, owner).map_err(|err| match err {
        // A file in the way of a parent is a failed creation, reported as internal upstream.
        Error::InvalidArgument(message) => Error::io(
            format!("error creating directory {}", path.display()),
            io::Error::new(io::ErrorKind::NotADirectory, message),
        ),
        other => other,
    })?;
    stat(path)
}

/// Renames `source` to `destination`, creating the destination's parents (owned by
/// `owner`). Symlinks are moved as links; an existing destination file is replaced.
///
/// # Errors
/// [`Error::NotFound`] when the source is missing; [`Error::Io`] for anything `rename(2)`
/// refuses (EXDEV, a non-empty directory in the way, ...).
pub fn rename(source: &Path, destination: &Path, owner: &User) -> Result<EntryInfo> {
    dirs::ensure_parent(destination, owner)?;
    std::fs::rename(source, destination).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => {
            Error::NotFound(format!("source file not found: {}", source.display()))
        }
        _ => Error::io("error renaming", err),
    })?;
    stat(destination)
}

/// Removes `path` recursively (`rm -rf`: symlinks removed as links). A missing path is not
/// an error.
///
/// # Errors
/// [`Error::Io`] when removal fails.
pub fn remove(path: &Path) -> Result<()> {
    let fail = |err: io::Error| Error::io("error removing file or directory", err);
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(fail(err)),
    };
    let result = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(fail(err)),
        _ => Ok(()),
    }
}

/// Paths that `remove` refuses because losing them is never what a client meant: the
/// filesystem root.
pub fn is_protected(path: &Path) -> bool {
    clean(path) == Path::new("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::entry::FileKind;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    fn me() -> User {
        User {
            name: "me".into(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            home: PathBuf::from("/"),
            shell: PathBuf::from("/bin/sh"),
        }
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["a", "a/x", "b", "a/x/deep"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
        }
        for f in ["a/y", "a/x/f", "c.txt", "a/x/deep/g"] {
            std::fs::write(root.join(f), b"data").expect("write");
        }
        symlink(root.join("a"), root.join("link-to-a")).expect("symlink");
        dir
    }

    fn rel(root: &Path, entries: &[EntryInfo]) -> Vec<String> {
        entries
            .iter()
            .map(|e| {
                e.path
                    .strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn lists_by_depth_in_preorder() {
        let dir = tree();
        let root = dir.path();
        let one = list_dir(root, 0).expect("depth 0");
        assert_eq!(rel(root, &one), ["a", "b", "c.txt", "link-to-a"]);
        let two = list_dir(root, 2).expect("depth 2");
        assert_eq!(
            rel(root, &two),
            ["a", "a/x", "a/y", "b", "c.txt", "link-to-a"]
        );
        let all = list_dir(root, 10).expect("depth 10");
        assert_eq!(
            rel(root, &all),
            [
                "a",
                "a/x",
                "a/x/deep",
                "a/x/deep/g",
                "a/x/f",
                "a/y",
                "b",
                "c.txt",
                "link-to-a"
            ]
        );
        let link = all.last().expect("link");
        assert!(link.is_symlink);
        assert_eq!(link.kind, FileKind::Directory);
    }

    #[test]
    fn a_large_directory_listed_on_several_threads_keeps_order_and_detail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let big = root.join("big");
        std::fs::create_dir(&big).expect("mkdir");
        let count = PARALLEL_FROM + 501;
        for i in 0..count {
            std::fs::write(big.join(format!("f{i:05}")), b"data").expect("write");
        }
        std::fs::create_dir(big.join("sub")).expect("mkdir");
        symlink("f00000", big.join("z-link")).expect("symlink");
        std::fs::write(root.join("after"), b"x").expect("write");
        let mut expected: Vec<String> = (0..count).map(|i| format!("big/f{i:05}")).collect();
        expected.extend(["big/sub".to_owned(), "big/z-link".to_owned()]);

        // The last level of a two-level listing: in order, after its directory, before
        // what follows it.
        let listed = list_dir(root, 2).expect("list");
        let mut want = vec!["after".to_owned(), "big".to_owned()];
        want.extend(expected.iter().cloned());
        assert_eq!(rel(root, &listed), want);
        let link = listed.last().expect("link");
        assert!(link.is_symlink);
        assert_eq!(link.kind, FileKind::File);
        assert_eq!(listed[2].size, 4);

        // The directory itself, one level.
        let listed = list_dir(&big, 1).expect("list");
        assert_eq!(listed.len(), count + 2);
        assert_eq!(listed[count].kind, FileKind::Directory);
    }

    #[test]
    fn lists_through_a_symlinked_root_under_the_link_path() {
        let dir = tree();
        let link = dir.path().join("link-to-a");
        let entries = list_dir(&link, 1).expect("list");
        let paths: Vec<_> = entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths, [link.join("x"), link.join("y")]);
    }

    #[test]
    fn list_errors() {
        let dir = tree();
        let root = dir.path();
        assert!(matches!(
            list_dir(&root.join("missing"), 1),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            list_dir(&root.join("c.txt"), 1),
            Err(Error::InvalidArgument(_))
        ));
        symlink(root.join("l2"), root.join("l1")).expect("symlink");
        symlink(root.join("l1"), root.join("l2")).expect("symlink");
        assert!(matches!(
            list_dir(&root.join("l1"), 1),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn make_dir_rename_remove() {
        let dir = tree();
        let root = dir.path();
        let made = make_dir(&root.join("n/m"), &me()).expect("make");
        assert_eq!(made.kind, FileKind::Directory);
        assert!(matches!(
            make_dir(&root.join("n/m"), &me()),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            make_dir(&root.join("c.txt"), &me()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            make_dir(&root.join("c.txt/sub"), &me()),
            Err(Error::Io { .. })
        ));

        let moved = rename(&root.join("c.txt"), &root.join("new/dir/c2.txt"), &me()).expect("move");
        assert_eq!(moved.name, "c2.txt");
        assert!(!root.join("c.txt").exists());
        assert!(matches!(
            rename(&root.join("c.txt"), &root.join("x"), &me()),
            Err(Error::NotFound(_))
        ));
        let link =
            rename(&root.join("link-to-a"), &root.join("moved-link"), &me()).expect("move link");
        assert!(link.is_symlink);

        remove(&root.join("a")).expect("remove dir");
        assert!(!root.join("a").exists());
        remove(&root.join("a")).expect("missing is fine");
        remove(&root.join("moved-link")).expect("remove dangling link");
        assert!(std::fs::symlink_metadata(root.join("moved-link")).is_err());
        assert!(is_protected(Path::new("/")));
        assert!(is_protected(Path::new("//.")));
        assert!(!is_protected(root));
    }
}
