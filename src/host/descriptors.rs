//! The daemon's own descriptor budget. Every connection, upload, download, watcher and
//! process pipe holds descriptors, so at start the soft `RLIMIT_NOFILE` is raised to the
//! hard limit, as Go's runtime does for envd (a service's soft limit is often 1024). What
//! happens when even that runs out is handled where descriptors are taken: the accept loop
//! backs off, and requests get `429`/`resource_exhausted` "too many open files".

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The soft and hard descriptor limits after raising the soft one to the hard one.
///
/// # Errors
/// When the limits cannot be read or set (the daemon then runs with what it has).
pub fn raise_limit() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    getrlimit(Resource::RLIMIT_NOFILE)
}

/// Descriptors this process has open now (entries of `/proc/self/fd`). Blocking.
///
/// # Errors
/// When `/proc` cannot be read.
pub fn open_count() -> std::io::Result<usize> {
    // The directory handle used for reading is itself one of the entries.
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (soft, hard) = raise_limit().expect("rlimit");
        assert_eq!(soft, hard);
        // Other tests open files concurrently: only check that there is a count.
        assert!(
            open_count().expect("count") > 0,
            "stdin, stdout, stderr at least"
        );
    }
}
