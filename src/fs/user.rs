//! Users and groups from the system databases: who a request acts as, and the names shown
//! as an entry's owner and group.

use std::collections::HashMap;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::unistd::{Gid, Group, Uid};

use crate::error::{Error, Result};

/// A system user, as far as the daemon needs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory: relative paths resolve against it.
    pub home: PathBuf,
    /// Login shell (`SHELL` of the processes it starts), read in the same lookup so a
    /// process start reads the user database once.
    pub shell: PathBuf,
}

impl User {
    /// Looks a user up by name. `Ok(None)` when there is no such user (or the name is
    /// empty).
    ///
    /// # Errors
    /// When the user database cannot be read for lack of resources (no descriptor or memory
    /// left, an I/O error): the user may well exist, so that is not "unknown user".
    pub fn lookup(name: &str) -> Result<Option<User>> {
        if name.is_empty() || name.contains('\0') {
            return Ok(None);
        }
        let user = match nix::unistd::User::from_name(name) {
            Ok(user) => user,
            Err(errno @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOMEM | Errno::EIO)) => {
                return Err(Error::io(
                    format!("error looking up user '{name}'"),
                    std::io::Error::from(errno),
                ));
            }
            // Some NSS modules report "no such user" as an error (ENOENT, ESRCH, ...).
            Err(_) => None,
        };
        Ok(user.map(|user| User {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
            shell: user.shell,
        }))
    }
}

/// Owner and group names by id, memoised for one request (a listing of thousands of entries
/// owned by a handful of users reads the databases a handful of times).
#[derive(Debug, Default)]
pub struct NameCache {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl NameCache {
    /// The user name for `uid`, or the decimal id when the database has none.
    pub fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map_or_else(|| uid.to_string(), |u| u.name)
            })
            .clone()
    }

    /// The group name for `gid`, or the decimal id when the database has none.
    pub fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                Group::from_gid(Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map_or_else(|| gid.to_string(), |g| g.name)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_unknown_users_do_not() {
        let root = User::lookup("root")
            .expect("readable")
            .expect("root is in every passwd");
        assert_eq!(root.uid, 0);
        for name in ["no-such-user-envd-test", "", "ro\0ot"] {
            assert!(User::lookup(name).expect("readable").is_none(), "{name:?}");
        }
    }

    #[test]
    fn names_fall_back_to_numbers() {
        let mut names = NameCache::default();
        assert_eq!(names.user(0), "root");
        assert_eq!(names.user(4_000_000_000), "4000000000");
        assert_eq!(names.group(4_000_000_001), "4000000001");
    }
}
