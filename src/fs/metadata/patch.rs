//! Merge-style metadata updates: set some keys, remove others, or clear the set, leaving
//! every key the request does not name alone. The resulting set must satisfy the same
//! rules as an upload's; if it would not, nothing changes.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use xattr::FileExt;

use crate::error::{Error, Result};
use crate::fs::metadata::{self, Metadata, Source, XATTR_PREFIX, lock};

/// What to do with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create or replace the key with this value.
    Set(String),
    /// Remove the key (absent keys are fine).
    Remove,
}

/// A metadata update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patch {
    /// Remove every key first.
    pub clear: bool,
    /// Per-key changes, applied after `clear`.
    pub changes: BTreeMap<String, Change>,
}

impl Patch {
    /// The set that results from applying this patch to `current`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the result breaks the upload rules.
    pub fn apply(&self, current: &Metadata) -> Result<Metadata> {
        let mut next = if self.clear {
            Metadata::new()
        } else {
            current.clone()
        };
        for (key, change) in &self.changes {
            match change {
                Change::Set(value) => {
                    next.insert(key.clone(), value.clone());
                }
                Change::Remove => {
                    next.remove(key);
                }
            }
        }
        metadata::validate(next.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))?;
        Ok(next)
    }
}

/// Applies `patch` to the entry at `path` (following symlinks, like uploads), atomically
/// with respect to every metadata reader and writer in the daemon, and returns the
/// resulting set as read back.
///
/// # Errors
/// [`Error::NotFound`] for a missing path, [`Error::InvalidArgument`] when the result
/// would be invalid, [`Error::InsufficientStorage`] when it does not fit, [`Error::Io`]
/// otherwise (including files that cannot carry `user.*` attributes).
pub fn apply_to(path: &Path, patch: &Patch) -> Result<Metadata> {
    // O_NONBLOCK: opening a fifo must not wait for a writer.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => {
                Error::NotFound(format!("path '{}' does not exist", path.display()))
            }
            _ => Error::io(format!("error opening '{}'", path.display()), err),
        })?;
    let stat = file
        .metadata()
        .map_err(|err| Error::io(format!("error checking '{}'", path.display()), err))?;
    let _guard = lock::write(stat.dev(), stat.ino());
    let current = metadata::read_unlocked(Source::File(&file)).map_err(|err| {
        Error::io(
            format!("error reading metadata of '{}'", path.display()),
            err,
        )
    })?;
    let next = patch.apply(&current)?;
    let fail = |err: std::io::Error| {
        if metadata::is_unsupported(&err) {
            Error::InvalidArgument(format!(
                "'{}' cannot carry metadata: its filesystem has no user xattrs",
                path.display()
            ))
        } else if crate::error::is_no_space(&err) {
            Error::InsufficientStorage(format!("not enough space for file metadata: {err}"))
        } else if err.raw_os_error() == Some(libc::EPERM) {
            Error::InvalidArgument(format!("'{}' cannot carry metadata: {err}", path.display()))
        } else {
            Error::io(
                format!("error writing metadata of '{}'", path.display()),
                err,
            )
        }
    };
    // Write first, remove after: if the disk is full, the old keys are still there.
    let mut written = Vec::new();
    for (key, value) in &next {
        if current.get(key) != Some(value) {
            if let Err(err) = file.set_xattr(format!("{XATTR_PREFIX}{key}"), value.as_bytes()) {
                undo(&file, &current, &written);
                return Err(fail(err));
            }
            written.push(key.clone());
        }
    }
    for key in current.keys().filter(|key| !next.contains_key(*key)) {
        if let Err(err) = file.remove_xattr(format!("{XATTR_PREFIX}{key}")) {
            if err.raw_os_error() != Some(libc::ENODATA) {
                return Err(fail(err));
            }
        }
    }
    metadata::read_unlocked(Source::File(&file)).map_err(|err| {
        Error::io(
            format!("error reading metadata of '{}'", path.display()),
            err,
        )
    })
}

/// Puts back what a failed patch had already written.
fn undo(file: &File, previous: &Metadata, written: &[String]) {
    for key in written {
        let name = format!("{XATTR_PREFIX}{key}");
        let result = match previous.get(key) {
            Some(value) => file.set_xattr(&name, value.as_bytes()),
            None => file.remove_xattr(&name),
        };
        if let Err(err) = result {
            tracing::warn!(%err, key, "restoring metadata after a failed patch");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn patch(clear: bool, changes: &[(&str, Option<&str>)]) -> Patch {
        Patch {
            clear,
            changes: changes
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        v.map_or(Change::Remove, |v| Change::Set(v.to_owned())),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn merge_rules() {
        let current = md(&[("owner", "alice"), ("job", "7")]);
        let cases: Vec<(&str, Patch, Result<Metadata, &str>)> = vec![
            (
                "upsert new",
                patch(false, &[("team", Some("red"))]),
                Ok(md(&[("owner", "alice"), ("job", "7"), ("team", "red")])),
            ),
            (
                "upsert existing",
                patch(false, &[("job", Some("8"))]),
                Ok(md(&[("owner", "alice"), ("job", "8")])),
            ),
            (
                "remove",
                patch(false, &[("job", None)]),
                Ok(md(&[("owner", "alice")])),
            ),
            (
                "remove absent",
                patch(false, &[("nope", None)]),
                Ok(current.clone()),
            ),
            ("leave alone", patch(false, &[]), Ok(current.clone())),
            ("clear", patch(true, &[]), Ok(md(&[]))),
            (
                "clear then set",
                patch(true, &[("fresh", Some("1"))]),
                Ok(md(&[("fresh", "1")])),
            ),
            (
                "bad value",
                patch(false, &[("k", Some("tab\t"))]),
                Err("non-printable"),
            ),
            (
                "bad key",
                patch(false, &[(&"k".repeat(247), Some("v"))]),
                Err("exceeds 246 bytes"),
            ),
            (
                "too big",
                patch(false, &[("big", Some(&"v".repeat(4080)))]),
                Err("total metadata size"),
            ),
        ];
        for (name, patch, want) in cases {
            match (patch.apply(&current), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{name}"),
                (Err(err), Err(text)) => assert!(err.to_string().contains(text), "{name}: {err}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn applies_to_files_and_directories_and_keeps_foreign_attributes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let probe = dir.path().join("probe");
        std::fs::write(&probe, b"").expect("probe");
        if xattr::set(&probe, "user.probe", b"1").is_err() {
            eprintln!("skipping: no user xattrs");
            return;
        }
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("write");
        xattr::set(&file, "user.foreign", b"keep").expect("foreign");
        let got =
            apply_to(&file, &patch(false, &[("a", Some("1")), ("b", Some("2"))])).expect("patch");
        assert_eq!(got, md(&[("a", "1"), ("b", "2")]));
        let got = apply_to(&file, &patch(false, &[("a", None)])).expect("patch");
        assert_eq!(got, md(&[("b", "2")]));
        let err =
            apply_to(&file, &patch(false, &[("c", Some(&"v".repeat(5000)))])).expect_err("too big");
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert_eq!(
            metadata::read(Source::Path(&file)).expect("read"),
            md(&[("b", "2")]),
            "nothing changed"
        );
        let got = apply_to(&file, &patch(true, &[])).expect("clear");
        assert!(got.is_empty());
        assert_eq!(
            xattr::get(&file, "user.foreign").expect("get"),
            Some(b"keep".to_vec())
        );
        let got = apply_to(dir.path(), &patch(false, &[("dir", Some("yes"))])).expect("directory");
        assert_eq!(got, md(&[("dir", "yes")]));
        assert!(matches!(
            apply_to(&dir.path().join("missing"), &patch(false, &[])),
            Err(Error::NotFound(_))
        ));
    }
}
