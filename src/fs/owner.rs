//! Giving what the daemon creates to the requesting user (reference §2.7), and what that
//! takes: root can give a file to anyone; a daemon without root can only create files as
//! itself. So without root, a request acting as another user is refused up front with a
//! message saying why, and a request acting as the daemon's own user skips the chown.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fs::user::User;

/// Checks, before anything is created, that the daemon can make `owner` the owner of
/// `path`.
///
/// # Errors
/// [`Error::PermissionDenied`] when the daemon is not root and `owner` is another user.
pub fn ensure_can_own(owner: &User, path: &Path) -> Result<()> {
    let me = nix::unistd::geteuid();
    if me.is_root() || me.as_raw() == owner.uid {
        return Ok(());
    }
    let my_name = nix::unistd::User::from_uid(me)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {me}"), |user| format!("'{}'", user.name));
    Err(Error::PermissionDenied(format!(
        "cannot create {} as user '{}' (uid {}): envd runs as {my_name} without root and can \
         only create files as itself; act as {my_name} or run envd as root",
        path.display(),
        owner.name,
        owner.uid
    )))
}

/// Makes `owner` the owner of the open `file` (at `path`, for the message). Without root
/// there is nothing to do: [`ensure_can_own`] has made sure `owner` is the daemon itself.
///
/// # Errors
/// [`Error::Io`] when `fchown` fails.
pub fn give_file(file: &File, path: &Path, owner: &User) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(owner.uid), Some(owner.gid))
        .map_err(|err| Error::io(format!("error changing owner of {}", path.display()), err))
}

/// Makes `owner` the owner of `path` itself (a symlink is not followed). Without root,
/// as [`give_file`].
///
/// # Errors
/// [`Error::Io`] when `lchown` fails.
pub fn give_path(path: &Path, owner: &User) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))
        .map_err(|err| Error::io(format!("error changing owner of {}", path.display()), err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn user(uid: u32) -> User {
        User {
            name: format!("u{uid}"),
            uid,
            gid: uid,
            home: PathBuf::from("/"),
            shell: PathBuf::from("/bin/sh"),
        }
    }

    #[test]
    fn the_daemon_can_always_own_its_own_files() {
        let me = nix::unistd::geteuid().as_raw();
        ensure_can_own(&user(me), Path::new("/x")).expect("own user");
        let other = user(me.wrapping_add(12_345));
        let result = ensure_can_own(&other, Path::new("/x"));
        if nix::unistd::geteuid().is_root() {
            result.expect("root can give files to anyone");
        } else {
            let err = result.expect_err("not root");
            assert!(matches!(err, Error::PermissionDenied(_)));
            assert!(err.to_string().contains("without root"), "{err}");
        }
    }
}
