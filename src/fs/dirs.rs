//! Directory creation shared by uploads, `MakeDir` and `Move`: one level at a time, each new
//! level owned by the requesting user (reference §2.7).

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::fs::owner;
use crate::fs::user::User;

/// Mode for directories the daemon creates (the umask still applies).
const DIR_MODE: u32 = 0o755;

/// Creates every missing directory of `path` (like `mkdir -p`), chowning each level it
/// creates to `owner`. Existing directories are left alone; a level created concurrently by
/// someone else is chowned all the same.
///
/// # Errors
/// [`Error::InvalidArgument`] `path is a file: <component>` when a component exists and is
/// not a directory; [`Error::PermissionDenied`] when a level is missing and the daemon (not
/// root) cannot give it to `owner`; [`Error::Io`] (or 507) when creating or chowning fails.
pub fn ensure(path: &Path, owner: &User) -> Result<()> {
    // Most often the directory is there: one lookup instead of one per level.
    if std::fs::metadata(path).is_ok_and(|meta| meta.is_dir()) {
        return Ok(());
    }
    let mut current = PathBuf::new();
    for component in path.components() {
        current.push(component);
        if matches!(
            component,
            Component::RootDir | Component::Prefix(_) | Component::CurDir
        ) {
            continue;
        }
        match std::fs::metadata(&current) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "path is a file: {}",
                    current.display()
                )));
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                owner::ensure_can_own(owner, &current)?;
            }
            Err(err) => {
                return Err(Error::io(
                    format!("error checking directory {}", current.display()),
                    err,
                ));
            }
        }
        match std::fs::DirBuilder::new().mode(DIR_MODE).create(&current) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && current.is_dir() => {}
            Err(err) => {
                return Err(Error::io(
                    format!("error creating directory {}", current.display()),
                    err,
                ));
            }
        }
        owner::give_path(&current, owner)?;
    }
    Ok(())
}

/// [`ensure`] for the parent directory of `path`.
///
/// # Errors
/// As [`ensure`].
pub fn ensure_parent(path: &Path, owner: &User) -> Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => ensure(parent, owner),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn current_user() -> User {
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        User {
            name: "me".into(),
            uid,
            gid,
            home: PathBuf::from("/"),
            shell: PathBuf::from("/bin/sh"),
        }
    }

    #[test]
    fn creates_missing_levels_and_refuses_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("a/b c/ü");
        ensure(&deep, &current_user()).expect("ensure");
        assert!(deep.is_dir());
        let meta = std::fs::metadata(&deep).expect("stat");
        assert_eq!(meta.uid(), current_user().uid);
        ensure(&deep, &current_user()).expect("idempotent");

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let err = ensure(&file.join("below"), &current_user()).expect_err("file in the way");
        assert!(err.to_string().contains("path is a file"), "{err}");
    }
}
