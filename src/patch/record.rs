//! The record of applied patches: one JSON file in the guest filesystem, so a snapshot
//! carries it and every sandbox forked from the snapshot knows exactly what was applied.
//! This module reads, checks and atomically rewrites it; it never runs anything.
//!
//! ```json
//! {
//!   "version": 1,
//!   "lastApplied": 2,
//!   "applied": [
//!     {"sequence": 1, "sha256": "…64 hex digits…", "appliedAt": "2026-05-06T07:08:09.123Z"},
//!     {"sequence": 2, "sha256": "…", "appliedAt": "…"}
//!   ]
//! }
//! ```
//!
//! A missing file is an empty record (nothing applied). A file that is not exactly this
//! shape (bad JSON, unknown version, sequences out of order, a `lastApplied` that is not
//! the highest applied sequence, a malformed hash) is refused with [`Error::DataLoss`]:
//! treating it as empty would run every patch again.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The only format version this daemon reads and writes.
pub const RECORD_VERSION: u32 = 1;
/// Mode of the record file: it holds hashes and times, nothing secret.
const RECORD_MODE: u32 = 0o644;
/// Suffix of a record being written; a leftover one is a write that never finished.
pub const TEMP_SUFFIX: &str = ".envd-tmp";

/// One applied patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// SHA-256 of the script, lower-case hex.
    pub sha256: String,
    /// When it finished, RFC 3339 (kept as written).
    pub applied_at: String,
}

/// What has been applied here, by sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Applied patches by sequence (all positive).
    pub applied: BTreeMap<u64, Applied>,
}

/// The SHA-256 of a script, as the record keeps it.
pub fn hash(script: &str) -> String {
    let digest = Sha256::digest(script.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `time` as the record writes it.
pub fn timestamp(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The file as written, field for field.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    version: u32,
    last_applied: u64,
    applied: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileEntry {
    sequence: u64,
    sha256: String,
    applied_at: String,
}

impl Record {
    /// The highest applied sequence, 0 when nothing was applied.
    pub fn last_applied(&self) -> u64 {
        self.applied.keys().next_back().copied().unwrap_or(0)
    }

    /// Reads the record at `path`; a missing file is an empty record.
    ///
    /// # Errors
    /// [`Error::DataLoss`] when the file is not a valid record; [`Error::Io`] when it
    /// cannot be read.
    pub fn load(path: &Path) -> Result<Record> {
        match std::fs::read(path) {
            Ok(bytes) => Record::parse(&bytes, path),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Record::default()),
            Err(err) => Err(Error::io(
                format!("reading the patch record {}", path.display()),
                err,
            )),
        }
    }

    /// Parses a record read from `path` (named in errors).
    ///
    /// # Errors
    /// [`Error::DataLoss`] saying what is wrong, when `bytes` is not a valid record.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Record> {
        let corrupt = |why: String| {
            Error::DataLoss(format!(
                "the patch record {} is corrupt ({why}); no patch runs until it is repaired \
                 or removed (removing it runs every patch again)",
                path.display()
            ))
        };
        let file: File = serde_json::from_slice(bytes).map_err(|err| corrupt(err.to_string()))?;
        if file.version != RECORD_VERSION {
            return Err(corrupt(format!(
                "version {} is not {RECORD_VERSION}",
                file.version
            )));
        }
        let mut record = Record::default();
        for entry in file.applied {
            if entry.sequence == 0 {
                return Err(corrupt("sequence 0".into()));
            }
            if entry.sequence <= record.last_applied() {
                return Err(corrupt(format!(
                    "sequence {} is not above {}",
                    entry.sequence,
                    record.last_applied()
                )));
            }
            if entry.sha256.len() != 64
                || !entry
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(corrupt(format!(
                    "the hash of sequence {} is not 64 lower-case hex digits",
                    entry.sequence
                )));
            }
            record.applied.insert(
                entry.sequence,
                Applied {
                    sha256: entry.sha256,
                    applied_at: entry.applied_at,
                },
            );
        }
        if file.last_applied != record.last_applied() {
            return Err(corrupt(format!(
                "lastApplied is {} but the highest applied sequence is {}",
                file.last_applied,
                record.last_applied()
            )));
        }
        Ok(record)
    }

    /// The record as written: pretty JSON (operators read it) and a newline.
    pub fn to_json(&self) -> Vec<u8> {
        let file = File {
            version: RECORD_VERSION,
            last_applied: self.last_applied(),
            applied: self
                .applied
                .iter()
                .map(|(&sequence, applied)| FileEntry {
                    sequence,
                    sha256: applied.sha256.clone(),
                    applied_at: applied.applied_at.clone(),
                })
                .collect(),
        };
        // Plain structs of strings and integers always serialize.
        let mut json = serde_json::to_vec_pretty(&file).unwrap_or_default();
        json.push(b'\n');
        json
    }

    /// Replaces the record at `path` atomically: a temp file in the same directory (created
    /// with its parents if missing), fsync, rename over `path`, fsync of the directory. A
    /// reader, a crash or a snapshot sees the old record or the new one, never a mix.
    ///
    /// # Errors
    /// [`Error::Io`] (or [`Error::InsufficientStorage`]) naming the path; the previous
    /// record is then untouched and no temp file is left behind.
    pub fn save(&self, path: &Path) -> Result<()> {
        let failure =
            |err: io::Error| Error::io(format!("writing the patch record {}", path.display()), err);
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(failure)?;
        let temp = temp_path(path);
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(RECORD_MODE)
                .open(&temp)?;
            file.write_all(&self.to_json())?;
            file.sync_all()?;
            std::fs::rename(&temp, path)?;
            // The rename is durable once the directory is.
            std::fs::File::open(dir)?.sync_all()
        })();
        written.map_err(|err| {
            // Best effort: the temp file may not exist, or may already be renamed.
            let _ = std::fs::remove_file(&temp);
            failure(err)
        })
    }
}

/// A hidden, unique sibling of `path`.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}{TEMP_SUFFIX}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(hash: &str) -> Applied {
        Applied {
            sha256: hash.into(),
            applied_at: "2026-05-06T07:08:09.123Z".into(),
        }
    }

    fn sample() -> Record {
        Record {
            applied: [(1, applied(&hash("a"))), (4, applied(&hash("b")))].into(),
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(TEMP_SUFFIX))
            .collect()
    }

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(
            hash(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_ne!(hash("echo a"), hash("echo a\n"));
    }

    #[test]
    fn round_trips_and_reports_the_last_applied() {
        let record = sample();
        assert_eq!(record.last_applied(), 4);
        assert_eq!(Record::default().last_applied(), 0);
        let parsed = Record::parse(&record.to_json(), Path::new("/r")).expect("parse");
        assert_eq!(parsed, record);
    }

    #[test]
    fn refuses_corrupt_records() {
        let h = hash("x");
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "EOF"),
            ("{".into(), "EOF"),
            ("not json".into(), "expected"),
            ("[]".into(), "invalid length 0"),
            ("\"text\"".into(), "invalid type"),
            (
                r#"{"version":2,"lastApplied":0,"applied":[]}"#.into(),
                "version 2",
            ),
            (r#"{"version":1,"applied":[]}"#.into(), "lastApplied"),
            (
                r#"{"version":1,"lastApplied":0,"applied":[],"extra":1}"#.into(),
                "unknown field",
            ),
            (
                format!(
                    r#"{{"version":1,"lastApplied":0,"applied":[{{"sequence":0,"sha256":"{h}","appliedAt":""}}]}}"#
                ),
                "sequence 0",
            ),
            (
                format!(
                    r#"{{"version":1,"lastApplied":2,"applied":[{{"sequence":2,"sha256":"{h}","appliedAt":""}},{{"sequence":1,"sha256":"{h}","appliedAt":""}}]}}"#
                ),
                "sequence 1 is not above 2",
            ),
            (
                format!(
                    r#"{{"version":1,"lastApplied":2,"applied":[{{"sequence":2,"sha256":"{h}","appliedAt":""}},{{"sequence":2,"sha256":"{h}","appliedAt":""}}]}}"#
                ),
                "sequence 2 is not above 2",
            ),
            (
                format!(
                    r#"{{"version":1,"lastApplied":5,"applied":[{{"sequence":2,"sha256":"{h}","appliedAt":""}}]}}"#
                ),
                "lastApplied is 5",
            ),
            (
                r#"{"version":1,"lastApplied":3,"applied":[]}"#.into(),
                "lastApplied is 3",
            ),
            (
                r#"{"version":1,"lastApplied":1,"applied":[{"sequence":1,"sha256":"abc","appliedAt":""}]}"#.into(),
                "64 lower-case hex",
            ),
            (
                format!(
                    r#"{{"version":1,"lastApplied":1,"applied":[{{"sequence":1,"sha256":"{}","appliedAt":""}}]}}"#,
                    h.to_uppercase()
                ),
                "64 lower-case hex",
            ),
            (
                r#"{"version":1,"lastApplied":-1,"applied":[]}"#.into(),
                "invalid value",
            ),
        ];
        for (text, why) in cases {
            let err = Record::parse(text.as_bytes(), Path::new("/var/lib/envd/patches.json"))
                .expect_err(&text);
            let message = err.to_string();
            assert!(matches!(err, Error::DataLoss(_)), "{text}: {err:?}");
            assert!(message.contains(why), "{text}: {message}");
            assert!(
                message.contains("/var/lib/envd/patches.json is corrupt"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_missing_record_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Record::load(&dir.path().join("none/patches.json")).expect("load");
        assert_eq!(record, Record::default());
    }

    #[test]
    fn saves_atomically_creating_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state dir/pätches.json");
        let record = sample();
        record.save(&path).expect("save");
        assert_eq!(Record::load(&path).expect("load"), record);
        let mut more = record.clone();
        more.applied.insert(9, applied(&hash("c")));
        more.save(&path).expect("replace");
        assert_eq!(Record::load(&path).expect("load").last_applied(), 9);
        assert!(leftovers(path.parent().expect("dir")).is_empty());
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("}\n"), "{text}");
        assert!(text.contains("\"lastApplied\": 9"), "{text}");
    }

    #[test]
    fn a_failed_save_leaves_the_old_record_and_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The target is a non-empty directory: the rename fails after the temp file is
        // written and synced.
        let path = dir.path().join("patches.json");
        std::fs::create_dir(&path).expect("mkdir");
        std::fs::write(path.join("keep"), b"x").expect("write");
        let err = sample().save(&path).expect_err("rename over a directory");
        assert!(
            err.to_string()
                .starts_with(&format!("writing the patch record {}", path.display())),
            "{err}"
        );
        assert!(leftovers(dir.path()).is_empty());
        assert!(path.join("keep").exists());
        // A parent that is a file cannot be created.
        let blocked = dir.path().join("keep-file");
        std::fs::write(&blocked, b"x").expect("write");
        assert!(sample().save(&blocked.join("patches.json")).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let text = timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1500));
        assert_eq!(text, "1970-01-01T00:00:01.500Z");
    }
}
