//! Installing the control plane's CA certificate into the system trust store (`/init`
//! `caBundle`, reference §3.3). The PEM is added to the bundle file that TLS clients read
//! and kept in its own file, so a later, different PEM replaces it instead of piling up,
//! also across a daemon restart. Blocking; writing the bundle needs root.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The bundle TLS clients read on Debian-like systems.
pub const DEFAULT_BUNDLE_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where the installed PEM is kept, in the place `update-ca-certificates` looks.
pub const DEFAULT_CERT_FILE: &str = "/usr/local/share/ca-certificates/e2b-ca.crt";
/// Mode of the files written (world-readable, as trust stores are).
const FILE_MODE: u32 = 0o644;

/// The two files a CA installation touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaStore {
    /// The system bundle the PEM is added to.
    pub bundle: PathBuf,
    /// The file holding the PEM this daemon installed last.
    pub cert: PathBuf,
}

impl CaStore {
    /// Adds `pem` to the bundle, replacing the PEM installed before (`previous`, else the one
    /// kept in the cert file). Re-installing the PEM already there changes nothing, so a
    /// repeated `/init` leaves the bundle as it was.
    ///
    /// Returns the PEM as installed (trailing whitespace reduced to one newline).
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] when the daemon may not write the files (not root);
    /// [`Error::Io`] for other failures. The bundle is replaced atomically, so a failure
    /// leaves it as it was.
    pub fn install(&self, pem: &str, previous: Option<&str>) -> Result<String> {
        let pem = normalize(pem);
        let kept = match previous {
            Some(previous) => Some(previous.to_owned()),
            None => read_optional(&self.cert)?.map(|text| normalize(&text)),
        };
        let bundle_path = resolve_link(&self.bundle);
        let current = read_optional(&bundle_path)?.unwrap_or_default();
        let mut updated = current.clone();
        if let Some(old) = kept.as_deref().filter(|old| *old != pem) {
            if let Some(at) = updated.find(old) {
                updated.replace_range(at..at + old.len(), "");
            }
        }
        if !updated.contains(&pem) {
            if !updated.is_empty() && !updated.ends_with('\n') {
                updated.push('\n');
            }
            updated.push_str(&pem);
        }
        if updated != current {
            write_atomic(&bundle_path, updated.as_bytes())?;
        }
        if kept.as_deref() != Some(pem.as_str()) {
            if let Some(dir) = self.cert.parent() {
                std::fs::create_dir_all(dir).map_err(|err| failure("creating", dir, err))?;
            }
            write_atomic(&self.cert, pem.as_bytes())?;
        }
        Ok(pem)
    }
}

/// Exactly one trailing newline.
fn normalize(pem: &str) -> String {
    let mut pem = pem.trim_end().to_owned();
    pem.push('\n');
    pem
}

/// A symlinked bundle is updated where it points, so the link stays a link.
fn resolve_link(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(failure("reading", path, err)),
    }
}

/// Writes `data` to a temp file beside `path` and renames it over `path`.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.{}.envd-tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&temp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    written.map_err(|err| {
        // Best effort: the temp file may not even exist.
        let _ = std::fs::remove_file(&temp);
        failure("writing", path, err)
    })
}

/// The error for `doing` (reading, writing...) `path`.
fn failure(doing: &str, path: &Path, err: io::Error) -> Error {
    let context = format!("failed to install CA bundle: {doing} {}", path.display());
    if err.kind() == io::ErrorKind::PermissionDenied && !super::is_root() {
        return Error::PermissionDenied(format!(
            "{context}: {err} (installing a CA certificate needs root)"
        ));
    }
    Error::io(context, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
    const B: &str = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n\n";
    const SYSTEM: &str = "-----BEGIN CERTIFICATE-----\nSYS\n-----END CERTIFICATE-----\n";

    fn store(dir: &Path) -> CaStore {
        CaStore {
            bundle: dir.join("certs/ca-certificates.crt"),
            cert: dir.join("local/e2b-ca.crt"),
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read")
    }

    #[test]
    fn install_replace_and_repeat() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = store(dir.path());
        std::fs::create_dir_all(ca.bundle.parent().expect("parent")).expect("mkdir");
        std::fs::write(&ca.bundle, SYSTEM).expect("bundle");

        let installed = ca.install(A, None).expect("install A");
        assert_eq!(installed, format!("{A}\n"));
        assert_eq!(read(&ca.bundle), format!("{SYSTEM}{A}\n"));
        assert_eq!(read(&ca.cert), format!("{A}\n"));

        // The same PEM again, even by a restarted daemon (no previous in memory): no change.
        ca.install(&format!("{A}\n\n"), None).expect("repeat");
        assert_eq!(read(&ca.bundle), format!("{SYSTEM}{A}\n"));

        // A different PEM replaces the old one.
        let b = ca.install(B, Some(&installed)).expect("install B");
        assert_eq!(
            b,
            "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"
        );
        assert_eq!(read(&ca.bundle), format!("{SYSTEM}{b}"));
        assert_eq!(read(&ca.cert), b);
    }

    #[test]
    fn a_missing_bundle_is_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = store(dir.path());
        std::fs::create_dir_all(ca.bundle.parent().expect("parent")).expect("mkdir");
        ca.install(A, None).expect("install");
        assert_eq!(read(&ca.bundle), format!("{A}\n"));
    }
}
