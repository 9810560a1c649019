//! Per-inode locks for metadata: a `PATCH` changes several attributes one by one, and a
//! reader through the daemon must never see it half-done. Writers take an inode's lock
//! exclusively, readers shared. Locks are striped by (device, inode), so two files
//! rarely share one and the table never grows.
//!
//! The table is process-wide on purpose: every reader of metadata (upload responses,
//! `Stat`, `ListDir`, watch events) must see the same locks, and threading one object
//! through every `EntryInfo` builder would buy nothing but noise.

use std::hash::{Hash, Hasher};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const STRIPES: usize = 64;

static LOCKS: [RwLock<()>; STRIPES] = [const { RwLock::new(()) }; STRIPES];

fn stripe(dev: u64, ino: u64) -> &'static RwLock<()> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (dev, ino).hash(&mut hasher);
    let index = usize::try_from(hasher.finish() % STRIPES as u64).unwrap_or(0);
    &LOCKS[index]
}

/// Shared access to an inode's metadata.
pub fn read(dev: u64, ino: u64) -> RwLockReadGuard<'static, ()> {
    stripe(dev, ino)
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Exclusive access to an inode's metadata.
pub fn write(dev: u64, ino: u64) -> RwLockWriteGuard<'static, ()> {
    stripe(dev, ino)
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
