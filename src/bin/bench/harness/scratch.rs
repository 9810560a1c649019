//! A fresh ext4 filesystem for one row: an image file in the run's directory, loop-mounted.
//!
//! How fast ext4 creates a file depends on what the filesystem went through in the last
//! minutes: it allocates a new inode by scanning past the ones freed recently (ext4's
//! `recently_deleted`: up to five minutes), so the same row measured 2,200 or 13,000 files/s
//! depending on what had been removed before it (an earlier row, a build). On a filesystem
//! made for the row, both sides start from the same, empty, state.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Image size (sparse): room for the small-upload row's files, 20 rounds of 10,000 files of
/// 4 KiB (the floor, the daemon and three bare servers, four rounds each), and an inode
/// each (ext4 makes one per 16 KiB).
const IMAGE_BYTES: u64 = 4 << 30;

/// A mounted scratch filesystem; unmounted and removed on drop.
pub struct Scratch {
    image: PathBuf,
    mount: PathBuf,
}

impl Scratch {
    /// Makes and mounts one under `parent`; why not when it cannot (it needs root,
    /// `mkfs.ext4` and loop devices).
    pub fn mount(parent: &Path) -> Result<Scratch, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root".into());
        }
        let image = parent.join("scratch.img");
        let mount = parent.join("scratch");
        std::fs::create_dir_all(&mount).map_err(|err| err.to_string())?;
        let file = std::fs::File::create(&image).map_err(|err| err.to_string())?;
        file.set_len(IMAGE_BYTES).map_err(|err| err.to_string())?;
        drop(file);
        let scratch = Scratch { image, mount };
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&scratch.image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&scratch.image)
            .arg(&scratch.mount))?;
        Ok(scratch)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.mount)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("{command:?}: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
