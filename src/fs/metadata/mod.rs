//! User-defined file metadata, stored as `user.e2b.<key>` extended attributes (reference §4).
//!
//! One validator, one reader and one writer serve every caller: the upload path writes and
//! reads back through the open file, everything else reads by path (following symlinks).
//! Attributes outside the `user.e2b.` namespace are never read, reported or touched.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use xattr::FileExt;

use crate::error::{Error, Result};

pub mod lock;
pub mod patch;

/// The xattr namespace our keys live under.
pub const XATTR_PREFIX: &str = "user.e2b.";
/// 255 (the longest xattr name Linux takes) minus the prefix.
pub const MAX_KEY_BYTES: usize = 255 - XATTR_PREFIX.len();
/// Upper bound on Σ(len(prefix) + len(key) + len(value)) over a file's set.
pub const MAX_TOTAL_BYTES: usize = 4096;

/// A file's metadata: keys without the prefix, in key order.
pub type Metadata = BTreeMap<String, String>;

/// Checks a would-be metadata set against the upstream rules: keys non-empty and at most
/// [`MAX_KEY_BYTES`], keys and values printable ASCII (0x20–0x7E), and the total at most
/// [`MAX_TOTAL_BYTES`]. Entries are checked in key order, so the reported violation is
/// deterministic.
///
/// # Errors
/// [`Error::InvalidArgument`] `invalid metadata: <reason>`.
pub fn validate<'a>(entries: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<()> {
    let invalid = |reason: String| {
        Err(Error::InvalidArgument(format!(
            "invalid metadata: {reason}"
        )))
    };
    let mut total = 0usize;
    for (key, value) in entries {
        if key.is_empty() {
            return invalid("metadata key must not be empty".into());
        }
        if key.len() > MAX_KEY_BYTES {
            return invalid(format!(
                "metadata key {key:?} exceeds {MAX_KEY_BYTES} bytes"
            ));
        }
        if let Some((offset, byte)) = first_unprintable(key.as_bytes()) {
            return invalid(format!(
                "metadata key contains non-printable-ASCII byte 0x{byte:02x} at offset {offset}"
            ));
        }
        if let Some((offset, byte)) = first_unprintable(value) {
            return invalid(format!(
                "metadata value for key {key:?} contains non-printable-ASCII byte 0x{byte:02x} at offset {offset}"
            ));
        }
        total += XATTR_PREFIX.len() + key.len() + value.len();
    }
    if total > MAX_TOTAL_BYTES {
        return invalid(format!(
            "total metadata size {total} exceeds {MAX_TOTAL_BYTES} bytes"
        ));
    }
    Ok(())
}

fn first_unprintable(bytes: &[u8]) -> Option<(usize, u8)> {
    bytes
        .iter()
        .copied()
        .enumerate()
        .find(|(_, b)| !(0x20..=0x7e).contains(b))
}

/// Where metadata is read from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A path; symlinks are followed, so a link reports its target's metadata.
    Path(&'a Path),
    /// An open file (the upload path reads back what it wrote before publishing it).
    File(&'a File),
}

/// Reads the `user.e2b.*` set. A filesystem without xattr support has no metadata. Names or
/// values that are not UTF-8 (settable with `setfattr`) are skipped, as are names that
/// vanish between listing and reading.
///
/// # Errors
/// The OS error for anything but "unsupported" (callers treat it as "no metadata").
pub fn read(source: Source<'_>) -> io::Result<Metadata> {
    match source {
        Source::Path(path) => {
            let before = std::fs::metadata(path)?;
            read_path_of(path, (before.dev(), before.ino()))
        }
        Source::File(file) => {
            let stat = file.metadata()?;
            let _guard = lock::read(stat.dev(), stat.ino());
            read_unlocked(source)
        }
    }
}

/// [`read`] by path for a caller that has just seen `path` (symlinks followed) as the inode
/// `(dev, ino)`: a directory walk has its `stat` already, so this saves one per entry.
///
/// # Errors
/// As [`read`].
pub fn read_path_of(path: &Path, (mut dev, mut ino): (u64, u64)) -> io::Result<Metadata> {
    // A path may be renamed over between the lock and the read: retry until the inode read
    // is the inode locked. A failed check's `stat` is the next attempt's identity.
    loop {
        let guard = lock::read(dev, ino);
        let metadata = read_unlocked(Source::Path(path))?;
        drop(guard);
        let after = std::fs::metadata(path)?;
        if (after.dev(), after.ino()) == (dev, ino) {
            return Ok(metadata);
        }
        (dev, ino) = (after.dev(), after.ino());
    }
}

/// [`read`] without taking the inode lock, for callers that hold it already.
pub(super) fn read_unlocked(source: Source<'_>) -> io::Result<Metadata> {
    let names = match source {
        Source::Path(path) => xattr::list_deref(path),
        Source::File(file) => file.list_xattr(),
    };
    let names = match names {
        Ok(names) => names,
        Err(err) if is_unsupported(&err) => return Ok(Metadata::new()),
        Err(err) => return Err(err),
    };
    let mut metadata = Metadata::new();
    for name in names {
        let Some(key) = name.as_bytes().strip_prefix(XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(key) = std::str::from_utf8(key) else {
            continue;
        };
        let value = match source {
            Source::Path(path) => xattr::get_deref(path, &name),
            Source::File(file) => file.get_xattr(&name),
        };
        let Ok(Some(value)) = value else { continue };
        if let Ok(value) = String::from_utf8(value) {
            metadata.insert(key.to_owned(), value);
        }
    }
    Ok(metadata)
}

/// Reads metadata by path, treating any error as "no metadata" (with a debug log), as every
/// `EntryInfo` builder does.
pub fn read_or_empty(path: &Path) -> Metadata {
    or_empty(path, read(Source::Path(path)))
}

/// [`read_or_empty`] for a path just seen as the inode `(dev, ino)` (see [`read_path_of`]).
pub fn read_or_empty_of(path: &Path, identity: (u64, u64)) -> Metadata {
    or_empty(path, read_path_of(path, identity))
}

fn or_empty(path: &Path, read: io::Result<Metadata>) -> Metadata {
    read.unwrap_or_else(|err| {
        tracing::debug!(path = %path.display(), %err, "reading metadata");
        Metadata::new()
    })
}

/// Makes `file`'s `user.e2b.*` set exactly `metadata`: stale keys are removed, the rest set.
/// Other attributes are left alone. Returns `false` when the filesystem has no xattr support
/// (nothing written).
///
/// # Errors
/// [`Error::InsufficientStorage`] when the attributes do not fit, [`Error::Io`] otherwise.
pub fn replace(file: &File, path: &Path, metadata: &Metadata) -> Result<bool> {
    store(file, path, metadata, true)
}

/// As [`replace`], for a file just created: it has no `user.e2b.*` attributes yet, so none
/// are looked for.
///
/// # Errors
/// As [`replace`].
pub fn set_on_new(file: &File, path: &Path, metadata: &Metadata) -> Result<bool> {
    store(file, path, metadata, false)
}

fn store(file: &File, path: &Path, metadata: &Metadata, remove_stale: bool) -> Result<bool> {
    let fail = |err: io::Error| -> Result<bool> {
        if is_unsupported(&err) {
            tracing::warn!(path = %path.display(), %err, "filesystem has no xattr support; metadata not stored");
            return Ok(false);
        }
        if crate::error::is_no_space(&err) {
            return Err(Error::InsufficientStorage(format!(
                "not enough space for file metadata: {err}"
            )));
        }
        Err(Error::io(
            format!("error writing file metadata {}", path.display()),
            err,
        ))
    };
    if remove_stale {
        let existing = match file.list_xattr() {
            Ok(names) => names,
            Err(err) => return fail(err),
        };
        for name in existing {
            let stale = name
                .as_bytes()
                .strip_prefix(XATTR_PREFIX.as_bytes())
                .is_some_and(|key| {
                    !metadata.contains_key(OsStr::from_bytes(key).to_string_lossy().as_ref())
                });
            if stale {
                match file.remove_xattr(&name) {
                    Ok(()) => {}
                    Err(err) if err.raw_os_error() == Some(nix::errno::Errno::ENODATA as i32) => {}
                    Err(err) => return fail(err),
                }
            }
        }
    }
    for (key, value) in metadata {
        if let Err(err) = file.set_xattr(format!("{XATTR_PREFIX}{key}"), value.as_bytes()) {
            return fail(err);
        }
    }
    Ok(true)
}

/// Copies the `user.*` attributes that are *not* ours from `from` to `to`, so replacing a
/// file through a new inode keeps what other tools stored on it.
///
/// # Errors
/// The OS error; unsupported filesystems copy nothing and succeed.
pub fn copy_foreign(from: &Path, to: &File) -> io::Result<()> {
    let names = match xattr::list_deref(from) {
        Ok(names) => names,
        Err(err) if is_unsupported(&err) => return Ok(()),
        Err(err) => return Err(err),
    };
    for name in names {
        let bytes = name.as_bytes();
        if !bytes.starts_with(b"user.") || bytes.starts_with(XATTR_PREFIX.as_bytes()) {
            continue;
        }
        if let Some(value) = xattr::get_deref(from, &name)? {
            to.set_xattr(&name, &value)?;
        }
    }
    Ok(())
}

/// True when the error means "this filesystem (or namespace) has no extended attributes".
pub fn is_unsupported(err: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(err.raw_os_error(), Some(code) if code == Errno::ENOTSUP as i32 || code == Errno::EOPNOTSUPP as i32)
}

/// Extracts metadata from `X-Metadata-<key>` request headers: prefix matched
/// case-insensitively, key lower-cased (HTTP names already are), the first value of a
/// repeated header wins, a header named exactly `X-Metadata-` is ignored. At most
/// `max_headers` such headers (repeats and empty names included) are looked at. The result
/// is validated.
///
/// # Errors
/// [`Error::InvalidArgument`] when there are more than `max_headers` metadata headers or
/// the set breaks the rules of [`validate`].
pub fn from_headers(headers: &http::HeaderMap, max_headers: usize) -> Result<Metadata> {
    const HEADER_PREFIX: &str = "x-metadata-";
    let mut raw: BTreeMap<String, &[u8]> = BTreeMap::new();
    let mut seen = 0usize;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        seen += 1;
        if seen > max_headers {
            return Err(Error::InvalidArgument(format!(
                "invalid metadata: more than {max_headers} X-Metadata-* headers"
            )));
        }
        if key.is_empty() {
            continue;
        }
        raw.entry(key.to_ascii_lowercase())
            .or_insert(value.as_bytes());
    }
    validate(raw.iter().map(|(k, v)| (k.as_str(), *v)))?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(v).into_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(entries: &[(&str, &str)]) -> Result<()> {
        validate(entries.iter().map(|(k, v)| (*k, v.as_bytes())))
    }

    #[test]
    fn validation_boundaries() {
        let key246 = "k".repeat(246);
        let key247 = "k".repeat(247);
        let value2048 = "v".repeat(2048);
        // 9 + 1 + 4086 = 4096 exactly.
        let fits = "v".repeat(4086);
        let too_big = "v".repeat(4087);
        let ok: &[&[(&str, &str)]] = &[
            &[],
            &[("a", "")],
            &[(&key246, "x")],
            &[("big", &value2048)],
            &[("a", &fits)],
            &[("sp ace", "tilde~ and space")],
        ];
        for entries in ok {
            check(entries).expect("valid");
        }
        let bad: &[(&[(&str, &str)], &str)] = &[
            (&[("", "x")], "must not be empty"),
            (&[(&key247, "x")], "exceeds 246 bytes"),
            (&[("a\0b", "x")], "byte 0x00 at offset 1"),
            (&[("ké", "x")], "non-printable-ASCII byte 0xc3"),
            (
                &[("k", "tab\there")],
                "value for key \"k\" contains non-printable-ASCII byte 0x09 at offset 3",
            ),
            (&[("k", "ünï")], "byte 0xc3 at offset 0"),
            (
                &[("a", &too_big)],
                "total metadata size 4097 exceeds 4096 bytes",
            ),
            (
                &[("a", &value2048), ("b", &value2048)],
                "total metadata size 4116 exceeds 4096 bytes",
            ),
        ];
        for (entries, want) in bad {
            let err = check(entries).expect_err("invalid");
            let text = err.to_string();
            assert!(text.starts_with("invalid metadata: "), "{text}");
            assert!(text.contains(want), "{text} should contain {want}");
        }
    }

    #[test]
    fn headers_are_matched_case_insensitively_first_value_wins() {
        let mut headers = http::HeaderMap::new();
        headers.append("X-Metadata-Author", "first".parse().expect("value"));
        headers.append("x-metadata-author", "second".parse().expect("value"));
        headers.append("X-METADATA-Job-Id", "42".parse().expect("value"));
        headers.append("x-metadata-", "ignored".parse().expect("value"));
        headers.append("x-metadata", "ignored".parse().expect("value"));
        headers.append("content-type", "text/plain".parse().expect("value"));
        let metadata = from_headers(&headers, 100).expect("valid");
        let want: Metadata = [("author", "first"), ("job-id", "42")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(metadata, want);
    }

    #[test]
    fn non_ascii_header_values_are_refused() {
        let mut headers = http::HeaderMap::new();
        headers.append(
            "x-metadata-k",
            http::HeaderValue::from_bytes(b"caf\xc3\xa9").expect("obs-text is a valid value"),
        );
        assert!(matches!(
            from_headers(&headers, 100),
            Err(Error::InvalidArgument(_))
        ));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Header values as a client can send them: any byte HTTP allows in a value
        /// (visible ASCII, space, tab, obs-text), so also bytes the rules refuse.
        fn value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                "[ -~]{0,40}".prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..40).prop_map(|bytes| {
                    bytes
                        .into_iter()
                        .filter(|b| *b == b'\t' || *b >= 0x20 && *b != 0x7f)
                        .collect()
                }),
                (0usize..5000).prop_map(|n| vec![b'v'; n]),
            ]
        }

        proptest! {
            /// `from_headers` agrees with a plain model of the rules: every metadata header
            /// counts, the first value of a key wins, keys are lower-cased, and the set is
            /// accepted exactly when it is within the count and passes `validate`.
            #[test]
            fn headers_follow_the_rules(
                pairs in prop::collection::vec(("[A-Za-z0-9!#$%&'*+.^_`|~-]{0,12}", value()), 0..12),
                max in 0usize..12,
            ) {
                let mut headers = http::HeaderMap::new();
                headers.append("content-type", http::HeaderValue::from_static("text/plain"));
                let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                for (suffix, value) in &pairs {
                    let name = http::HeaderName::try_from(format!("x-metadata-{suffix}")).expect("token");
                    let value = http::HeaderValue::from_bytes(value).expect("allowed bytes");
                    headers.append(name, value);
                }
                // HeaderMap groups values by name (first insertion order); the first value of
                // a name is the first appended.
                for (suffix, value) in &pairs {
                    let key = suffix.to_ascii_lowercase();
                    if !key.is_empty() {
                        model.entry(key).or_insert_with(|| value.clone());
                    }
                }
                let got = from_headers(&headers, max);
                let valid = pairs.len() <= max
                    && validate(model.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).is_ok();
                match got {
                    Ok(metadata) => {
                        prop_assert!(valid);
                        let want: Metadata = model
                            .into_iter()
                            .map(|(k, v)| (k, String::from_utf8(v).expect("printable ASCII")))
                            .collect();
                        prop_assert_eq!(metadata, want);
                    }
                    Err(err) => {
                        prop_assert!(!valid, "refused a valid set: {err}");
                        prop_assert!(matches!(err, Error::InvalidArgument(_)));
                    }
                }
            }
        }
    }

    fn xattrs_supported(dir: &Path) -> bool {
        let probe = dir.join("probe");
        std::fs::write(&probe, b"").expect("probe");
        xattr::set(&probe, "user.envd-probe", b"1").is_ok()
    }

    #[test]
    fn replace_round_trip_keeps_foreign_attributes() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !xattrs_supported(dir.path()) {
            eprintln!("skipping: no user xattrs on {}", dir.path().display());
            return;
        }
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").expect("write");
        xattr::set(&path, "user.foreign", b"keep").expect("foreign");
        let file = File::options().write(true).open(&path).expect("open");
        let first: Metadata = [
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), String::new()),
        ]
        .into();
        assert!(replace(&file, &path, &first).expect("replace"));
        assert_eq!(read(Source::Path(&path)).expect("read"), first);
        assert_eq!(read(Source::File(&file)).expect("read"), first);
        let second: Metadata = [("c".to_owned(), "3".to_owned())].into();
        replace(&file, &path, &second).expect("replace");
        assert_eq!(read(Source::Path(&path)).expect("read"), second);
        replace(&file, &path, &Metadata::new()).expect("clear");
        assert!(read(Source::Path(&path)).expect("read").is_empty());
        assert_eq!(
            xattr::get(&path, "user.foreign").expect("get"),
            Some(b"keep".to_vec())
        );
    }

    #[test]
    fn reader_skips_non_utf8_and_follows_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        if !xattrs_supported(dir.path()) {
            eprintln!("skipping: no user xattrs on {}", dir.path().display());
            return;
        }
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").expect("write");
        xattr::set(&path, "user.e2b.good", b"yes").expect("set");
        xattr::set(&path, "user.e2b.bad", b"\xff\xfe").expect("set");
        xattr::set(&path, OsStr::from_bytes(b"user.e2b.\xff"), b"v").expect("set");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        let want: Metadata = [("good".to_owned(), "yes".to_owned())].into();
        assert_eq!(read(Source::Path(&link)).expect("read"), want);
        assert!(read_or_empty(&dir.path().join("missing")).is_empty());
    }
}
