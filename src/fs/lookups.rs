//! Lookups in the system's user and group databases, cached while the file behind them is
//! unchanged: through NSS each one opens, reads and parses a file (seven syscalls or more),
//! a large share of a small upload's or a process start's own work.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a cached answer is trusted while its database file stays the same; bounds how
/// stale an answer from another NSS source (LDAP, say) can get.
const TTL: Duration = Duration::from_secs(2);
/// Answers kept at most per cache (a sandbox has a handful of users).
const MAX_ENTRIES: usize = 64;

/// What identifies one version of a database file: device, inode, size, and modification
/// and change times. `None` when it cannot be read (nothing is then trusted).
type Stamp = Option<(u64, u64, u64, [i64; 4])>;

fn stamp(file: &Path) -> Stamp {
    std::fs::metadata(file).ok().map(|m| {
        (
            m.dev(),
            m.ino(),
            m.size(),
            [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()],
        )
    })
}

/// Answers by key, each used only while `file` is the same file with the same size and
/// times as when it was looked up (one `stat`), and for at most [`TTL`]. "Not found" is
/// never cached: a user added a moment ago is found.
#[derive(Debug)]
pub struct StampedCache<V> {
    file: &'static str,
    entries: Mutex<HashMap<String, (V, Stamp, Instant)>>,
}

impl<V: Clone> StampedCache<V> {
    /// An empty cache of answers that depend on `file`.
    pub fn new(file: &'static str) -> Self {
        StampedCache {
            file,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The cached answer for `key`, or `lookup`'s (kept when found).
    ///
    /// # Errors
    /// `lookup`'s.
    pub fn get(&self, key: &str, lookup: impl FnOnce() -> Result<Option<V>>) -> Result<Option<V>> {
        let stamp = stamp(Path::new(self.file));
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((value, seen, at)) = entries.get(key) {
            if stamp.is_some() && *seen == stamp && at.elapsed() < TTL {
                return Ok(Some(value.clone()));
            }
        }
        drop(entries);
        let found = lookup()?;
        if let Some(value) = &found {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(key.to_owned(), (value.clone(), stamp, Instant::now()));
        }
        Ok(found)
    }

    /// Whether an answer for `key` is held (for tests).
    pub fn holds(&self, key: &str) -> bool {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(key)
    }
}

/// The group database: a change to it changes the answer of [`groups`] at once.
const GROUP: &str = "/etc/group";

static GROUPS: LazyLock<StampedCache<Vec<u32>>> = LazyLock::new(|| StampedCache::new(GROUP));

/// The groups of user `name` whose primary group is `gid` (`getgrouplist`), cached.
///
/// # Errors
/// [`Error::InvalidArgument`] for a name with a NUL; [`Error::Io`] when the lookup fails.
pub fn groups(name: &str, gid: u32) -> Result<Vec<u32>> {
    let key = format!("{name}:{gid}");
    let found = GROUPS.get(&key, || {
        let c_name = CString::new(name)
            .map_err(|_| Error::InvalidArgument("user name contains NUL".into()))?;
        let groups = nix::unistd::getgrouplist(&c_name, nix::unistd::Gid::from_raw(gid))
            .map_err(|err| Error::io(format!("looking up the groups of '{name}'"), err.into()))?;
        Ok(Some(groups.into_iter().map(|g| g.as_raw()).collect()))
    })?;
    Ok(found.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_groups_are_the_database_groups() {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .expect("lookup")
            .expect("in the database");
        let c_name = CString::new(me.name.clone()).expect("name");
        let direct: Vec<u32> = nix::unistd::getgrouplist(&c_name, me.gid)
            .expect("getgrouplist")
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(groups(&me.name, me.gid.as_raw()).expect("first"), direct);
        assert!(GROUPS.holds(&format!("{}:{}", me.name, me.gid)));
        assert_eq!(groups(&me.name, me.gid.as_raw()).expect("cached"), direct);
    }

    #[test]
    fn answers_follow_the_file_and_misses_are_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("db");
        std::fs::write(&file, "one").expect("write");
        let leaked: &'static str = Box::leak(file.to_string_lossy().into_owned().into_boxed_str());
        let cache = StampedCache::<String>::new(leaked);
        let read = || Ok(Some(std::fs::read_to_string(leaked).expect("read")));
        assert_eq!(cache.get("k", read).expect("get"), Some("one".into()));
        // Unchanged file: the cached answer, not a new lookup.
        assert_eq!(
            cache.get("k", || panic!("looked up again")).expect("get"),
            Some("one".into())
        );
        // A changed file (size differs) is looked up again.
        std::fs::write(&file, "two!").expect("write");
        assert_eq!(cache.get("k", read).expect("get"), Some("two!".into()));
        assert_eq!(cache.get("missing", || Ok(None)).expect("get"), None);
        assert!(!cache.holds("missing"), "misses are not cached");
    }
}
