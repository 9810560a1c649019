//! Keepers: one small process per managed process, in the manner of container runtimes'
//! shims, so that processes outlive the daemon (a crash, an OOM kill, an upgrade).
//!
//! A keeper is started ahead of need (a spare), as `envd __keeper <socket>`: forked by
//! the daemon's [`nursery`], or, when the nursery cannot, an exec of the daemon's own
//! binary. Either way it holds one end of a socket pair (an exec'd one as its stdin); a
//! start sends the [`KeeperSpec`] there, and that pair is the first daemon's link. The
//! keeper starts the process as its child, holds its stdio (pipes or a terminal), reaps
//! it, and serves one daemon at a time (later ones on a unix socket in the state
//! directory): output and the exit status flow to the daemon, input, resizes and
//! "release" flow back. While no daemon is connected the keeper buffers output up to
//! [`DETACHED_BUFFER`] bytes, then stops reading (the process blocks on a full pipe, so
//! nothing is lost); a new daemon connects to the socket and finds everything there.
//!
//! Signals do not go through the keeper: the daemon sends them to the process group.

pub mod client;
pub mod nursery;
pub mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Output a keeper holds while no daemon is connected.
pub const DETACHED_BUFFER: usize = 1024 * 1024;
/// How long an ended process's keeper waits for a daemon to collect its exit.
pub const ORPHAN_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(600);
/// The hidden first argument that makes the binary a keeper.
pub const KEEPER_ARG: &str = "__keeper";

/// Frame kinds, keeper → daemon.
pub mod to_daemon {
    /// JSON [`super::Hello`], first on every connection.
    pub const HELLO: u8 = 1;
    /// Standard output bytes.
    pub const STDOUT: u8 = 2;
    /// Standard error bytes.
    pub const STDERR: u8 = 3;
    /// Terminal bytes.
    pub const PTY: u8 = 4;
    /// The raw wait status (i32, big-endian), after all output.
    pub const EXIT: u8 = 5;
    /// Instead of the first hello: the process could not be started (UTF-8, the message
    /// for the client: a missing working directory, or why the start failed).
    pub const START_FAILED: u8 = 6;
}

/// Frame kinds, daemon → keeper.
pub mod to_keeper {
    /// Bytes for stdin.
    pub const STDIN: u8 = 10;
    /// Bytes for the terminal.
    pub const PTY_IN: u8 = 11;
    /// Close stdin.
    pub const CLOSE_STDIN: u8 = 12;
    /// Terminal size: cols and rows, u16 big-endian each.
    pub const RESIZE: u8 = 13;
    /// The daemon has the exit: the keeper may go.
    pub const RELEASE: u8 = 14;
    /// The process was killed: do not wait for its output to drain after it exits.
    pub const KILLED: u8 = 15;
    /// JSON [`super::KeeperSpec`]: the one frame a new keeper waits for on its stdin.
    pub const SPEC: u8 = 16;
}

/// Everything a keeper needs to start a process; computed by the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeeperSpec {
    /// Program.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// `(uid, gid, supplementary gids)` to switch to; `None` keeps the keeper's.
    pub credentials: Option<(u32, u32, Vec<u32>)>,
    /// Terminal size `(cols, rows)` for a PTY process.
    pub pty: Option<(u16, u16)>,
    /// Whether stdin is a pipe (else `/dev/null`); ignored with a PTY.
    pub stdin: bool,
    /// The child's `oom_score_adj`.
    pub oom_score_adj: Option<i32>,
}

/// What a keeper says first on every connection, and on its handshake line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The process's pid.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22), to tell it from a reused pid.
    pub start_time: u64,
    /// Whether it has a terminal.
    pub pty: bool,
}

/// The start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22).
pub fn start_time(pid: u32) -> Option<u64> {
    crate::sys::with_stat_fields(pid, |mut fields| fields.nth(19)?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_start_time() {
        let me = std::process::id();
        let first = start_time(me).expect("own start time");
        assert!(first > 0);
        assert_eq!(start_time(me), Some(first), "stable");
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn a_spawn_within_one_boot_tick_started_in_that_tick() {
        // What the keeper relies on to skip reading /proc: the kernel stamps a child with
        // the clock `boot_ticks` reads, in the same unit.
        let mut compared = 0;
        for _ in 0..200 {
            let before = crate::sys::boot_ticks().expect("boot clock");
            let mut child = std::process::Command::new("/bin/sleep")
                .arg("5")
                .spawn()
                .expect("spawn");
            let after = crate::sys::boot_ticks().expect("boot clock");
            let pid = child.id();
            let kernel = start_time(pid).expect("start time");
            child.kill().expect("kill");
            child.wait().expect("reap");
            assert!(
                before <= kernel && kernel <= after,
                "{before} <= {kernel} <= {after}"
            );
            if before == after {
                compared += 1;
                if compared == 20 {
                    break;
                }
            }
        }
        assert!(compared > 0, "no spawn fell within one tick");
    }
}
