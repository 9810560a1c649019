//! Unnamed files: a new file is uploaded as an `O_TMPFILE` file in its directory and linked
//! in under its name once complete. That is one directory operation instead of a temp
//! name's creation and a rename (two, each a lookup and a change of a directory that may
//! hold thousands of entries), and nothing to clean up after a crash: the kernel frees an
//! unnamed file when its last descriptor closes.
//!
//! Directory watchers see such a file's events under the name `#<inode>` until it is
//! linked, and the link itself as a bare `CREATE`. [`is_unnamed_event`] tells the first
//! apart, and [`was_linked`] the second (the watcher reports it as a written new file, as
//! it reports a temp file renamed into place).

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Opens an unnamed file for writing in `dir`; `None` when this cannot be used here: the
/// filesystem has no `O_TMPFILE`, or the daemon could not link the file in afterwards
/// (neither `CAP_DAC_READ_SEARCH` nor `/proc`).
///
/// # Errors
/// Any other error of `open` (no space, no inodes, no permission).
pub fn open(dir: &Path, mode: u32) -> io::Result<Option<File>> {
    if !can_link() {
        return Ok(None);
    }
    let opened = OpenOptions::new()
        .write(true)
        .mode(mode)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match opened {
        Ok(file) => Ok(Some(file)),
        // No O_TMPFILE in the kernel or the filesystem.
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Whether an unnamed file can be linked in: through its descriptor with `CAP_DAC_READ_SEARCH`
/// (root's), or else through `/proc/self/fd`.
fn can_link() -> bool {
    static CAN: LazyLock<bool> =
        LazyLock::new(|| nix::unistd::geteuid().is_root() || Path::new("/proc/self/fd").is_dir());
    *CAN
}

/// Gives the unnamed `file` the name `target`, and remembers it for the watchers.
///
/// # Errors
/// `EEXIST` when `target` exists (a link never replaces); any other error of `linkat`.
pub fn link(file: &File, target: &Path) -> io::Result<()> {
    let meta = file.metadata()?;
    remember(meta.dev(), meta.ino());
    let by_descriptor = nix::unistd::linkat(
        file,
        "",
        nix::fcntl::AT_FDCWD,
        target,
        nix::fcntl::AtFlags::AT_EMPTY_PATH,
    );
    match by_descriptor {
        Ok(()) => Ok(()),
        // Without CAP_DAC_READ_SEARCH: through the descriptor's /proc link instead.
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::EPERM) => {
            link_through_proc(file, target)
        }
        Err(err) => Err(err.into()),
    }
}

fn link_through_proc(file: &File, target: &Path) -> io::Result<()> {
    let proc_link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        &proc_link,
        nix::fcntl::AT_FDCWD,
        target,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )
    .map_err(io::Error::from)
}

/// Whether a watcher's event for `name` in directory `dir` is an unnamed file's: the
/// kernel's `#<inode>` name for it, which is not an entry of the directory.
pub fn is_unnamed_event(dir: &Path, name: &OsStr) -> bool {
    let bytes = name.as_encoded_bytes();
    bytes.len() > 1
        && bytes[0] == b'#'
        && bytes[1..].iter().all(u8::is_ascii_digit)
        && std::fs::symlink_metadata(dir.join(name))
            .is_err_and(|err| err.kind() == io::ErrorKind::NotFound)
}

/// Whether the file at `path` is one that an upload linked in lately.
pub fn was_linked(path: &Path) -> bool {
    if LINKED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_empty()
    {
        return false;
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    let key = (meta.dev(), meta.ino());
    forget_old(&mut LINKED.lock().unwrap_or_else(PoisonError::into_inner))
        .iter()
        .any(|(dev, ino, _)| (*dev, *ino) == key)
}

/// How long a linked file is remembered: watchers read their events well within it.
const REMEMBERED_FOR: Duration = Duration::from_secs(60);
/// Linked files remembered at most.
const REMEMBERED_MAX: usize = 4096;

/// Files linked lately: device, inode, when.
static LINKED: LazyLock<Mutex<VecDeque<(u64, u64, Instant)>>> =
    LazyLock::new(|| Mutex::new(VecDeque::new()));

fn remember(dev: u64, ino: u64) {
    let mut linked = LINKED.lock().unwrap_or_else(PoisonError::into_inner);
    forget_old(&mut linked);
    if linked.len() >= REMEMBERED_MAX {
        linked.pop_front();
    }
    linked.push_back((dev, ino, Instant::now()));
}

fn forget_old(linked: &mut VecDeque<(u64, u64, Instant)>) -> &mut VecDeque<(u64, u64, Instant)> {
    while linked
        .front()
        .is_some_and(|(_, _, at)| at.elapsed() > REMEMBERED_FOR)
    {
        linked.pop_front();
    }
    linked
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn unnamed_in(dir: &Path) -> File {
        open(dir, 0o644)
            .expect("open")
            .expect("O_TMPFILE on the test's filesystem")
    }

    #[test]
    fn an_unnamed_file_is_linked_whole_and_remembered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut file = unnamed_in(dir.path());
        file.write_all(b"content").expect("write");
        let ino = file.metadata().expect("fstat").ino();
        // Its events carry the kernel's name for it, which is no entry of the directory.
        let kernel_name = format!("#{ino}");
        assert!(is_unnamed_event(dir.path(), OsStr::new(&kernel_name)));
        let target = dir.path().join("named");
        link(&file, &target).expect("link");
        assert_eq!(std::fs::read(&target).expect("read"), b"content");
        assert!(was_linked(&target));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").expect("write");
        assert!(!was_linked(&plain));
        // A real file that happens to be named like one is an entry, reported as such.
        let real = dir.path().join("#12345");
        std::fs::write(&real, b"x").expect("write");
        assert!(!is_unnamed_event(dir.path(), OsStr::new("#12345")));
        assert!(!is_unnamed_event(dir.path(), OsStr::new("#")));
        assert!(!is_unnamed_event(dir.path(), OsStr::new("#12a")));
    }

    #[test]
    fn the_proc_link_works_without_the_capability_and_links_never_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut file = unnamed_in(dir.path());
        file.write_all(b"through proc").expect("write");
        let target = dir.path().join("via-proc");
        link_through_proc(&file, &target).expect("link through /proc");
        assert_eq!(std::fs::read(&target).expect("read"), b"through proc");
        let other = unnamed_in(dir.path());
        let err = link(&other, &target).expect_err("the name is taken");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&target).expect("read"), b"through proc");
    }
}
