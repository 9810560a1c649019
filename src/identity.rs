//! Who a request acts as: the user named by the request (Basic auth on RPCs, `username=` on
//! `/files`) or the default user, and that user's home and the default workdir for path
//! resolution.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::Engine;

use crate::error::{Error, Result};
use crate::fs::lookups::StampedCache;
use crate::fs::path;
use crate::fs::user::User;

/// Defaults that `/init` may change while the daemon runs.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// The user a request acts as when it names none.
    pub user: String,
    /// What an empty path means, when set.
    pub workdir: Option<PathBuf>,
}

/// The daemon's identity state. Shared by every request; short critical sections only.
#[derive(Debug)]
pub struct Identity {
    defaults: RwLock<Defaults>,
    users: UserCache,
}

/// The user database file whose change invalidates cached users at once.
const PASSWD: &str = "/etc/passwd";

/// Users found by name, so that a request does not read and parse the user database each
/// time (see [`StampedCache`]).
#[derive(Debug)]
struct UserCache(StampedCache<User>);

impl Default for UserCache {
    fn default() -> Self {
        UserCache(StampedCache::new(PASSWD))
    }
}

impl UserCache {
    fn lookup(&self, name: &str) -> Result<Option<User>> {
        self.0.get(name, || User::lookup(name))
    }
}

/// A resolved requester: the user and the workdir that apply to its paths.
#[derive(Debug, Clone)]
pub struct Requester {
    /// The user the request acts as.
    pub user: User,
    /// The default workdir in force when the request arrived.
    pub workdir: Option<PathBuf>,
}

impl Requester {
    /// Resolves a client path for this requester (reference §2.6).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `~name` paths.
    pub fn resolve(&self, client_path: &str) -> Result<PathBuf> {
        path::resolve(client_path, &self.user.home, self.workdir.as_deref())
    }
}

impl Identity {
    /// Starts with `default_user` and no default workdir.
    pub fn new(default_user: &str) -> Self {
        Identity {
            defaults: RwLock::new(Defaults {
                user: default_user.to_owned(),
                workdir: None,
            }),
            users: UserCache::default(),
        }
    }

    /// A snapshot of the defaults.
    pub fn defaults(&self) -> Defaults {
        self.defaults
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the default user and/or workdir (empty values are ignored).
    pub fn set_defaults(&self, user: Option<&str>, workdir: Option<&Path>) {
        let mut defaults = self
            .defaults
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            user.clone_into(&mut defaults.user);
        }
        if let Some(dir) = workdir.filter(|d| !d.as_os_str().is_empty()) {
            defaults.workdir = Some(dir.to_path_buf());
        }
    }

    /// The requester of an RPC: the user of a valid `Authorization: Basic` header, else the
    /// default user. A header that is not valid Basic auth counts as absent.
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] when the named or default user does not exist; the
    /// lookup's own error when the user database cannot be read.
    pub fn for_rpc(&self, authorization: Option<&[u8]>) -> Result<Requester> {
        let defaults = self.defaults();
        let user = match authorization.and_then(basic_auth_user) {
            Some(name) => self
                .users
                .lookup(&name)?
                .ok_or_else(|| Error::Unauthenticated(format!("invalid username: '{name}'")))?,
            None if defaults.user.is_empty() => {
                return Err(Error::Unauthenticated("no user specified".into()));
            }
            None => self.users.lookup(&defaults.user)?.ok_or_else(|| {
                Error::Unauthenticated(format!("invalid default user: '{}'", defaults.user))
            })?,
        };
        Ok(Requester {
            user,
            workdir: defaults.workdir,
        })
    }

    /// The requester of a `/files` call: the `username` query value when present (even if
    /// empty), else the default user.
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] `error looking up user '<u>'` for an unknown user; the
    /// lookup's own error when the user database cannot be read.
    pub fn for_files(&self, username: Option<&str>) -> Result<Requester> {
        let defaults = self.defaults();
        let name = username.unwrap_or(&defaults.user);
        let user = self.users.lookup(name)?.ok_or_else(|| {
            Error::Unauthenticated(format!(
                "error looking up user '{name}': user: unknown user {name}"
            ))
        })?;
        Ok(Requester {
            user,
            workdir: defaults.workdir,
        })
    }
}

/// The user name of an `Authorization: Basic base64(user:password)` header.
fn basic_auth_user(header: &[u8]) -> Option<String> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, _password) = decoded.split_once(':')?;
    Some(user.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basic_auth() {
        assert_eq!(basic_auth_user(b"Basic cm9vdDo="), Some("root".into()));
        assert_eq!(basic_auth_user(b"basic dXNlcjpwdw=="), Some("user".into()));
        assert_eq!(basic_auth_user(b"Bearer cm9vdDo="), None);
        assert_eq!(basic_auth_user(b"Basic !!!"), None);
        assert_eq!(basic_auth_user(b"Basic cm9vdA=="), None, "no colon");
    }

    #[test]
    fn resolves_requesters() {
        let identity = Identity::new("root");
        let root = identity.for_rpc(None).expect("default root");
        assert_eq!(root.user.uid, 0);
        let err = identity
            .for_rpc(Some(b"Basic bm9ib2R5LWVudmQ6"))
            .expect_err("unknown");
        assert_eq!(err.to_string(), "invalid username: 'nobody-envd'");
        let err = identity.for_files(Some("")).expect_err("empty");
        assert!(matches!(err, Error::Unauthenticated(_)));
        identity.set_defaults(None, Some(Path::new("/tmp")));
        let req = identity.for_files(None).expect("default");
        assert_eq!(req.resolve("").expect("resolve"), PathBuf::from("/tmp"));
    }

    #[test]
    fn cached_users_are_the_database_users_and_unknown_names_stay_unknown() {
        let cache = UserCache::default();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .expect("lookup")
            .expect("in the database");
        let direct = User::lookup(&me.name).expect("lookup");
        assert_eq!(cache.lookup(&me.name).expect("first"), direct);
        assert_eq!(cache.lookup(&me.name).expect("cached"), direct);
        let unknown = "no-such-user-envd-test";
        assert_eq!(cache.lookup(unknown).expect("lookup"), None);
        assert!(!cache.0.holds(unknown), "unknown names are not cached");
    }
}
