//! The managed processes a restarted daemon re-adopts: for each, what identifies it (pid
//! and start time, so a reused pid is never adopted), where its keeper listens, and what
//! `List` and deadlines need.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::process::registry::Config;

/// The state file's name in the state directory.
pub const FILE: &str = "processes.json";

/// The pid of a record saved while its keeper was starting the process: a restarted daemon
/// adopts whatever process that keeper answers for (its socket is this daemon's alone).
pub const PID_PENDING: u32 = 0;

/// One managed process, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedProcess {
    /// Its pid ([`PID_PENDING`] while its keeper was starting it).
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22; 0 while pending).
    pub start_time: u64,
    /// Its tag.
    pub tag: Option<String>,
    /// What was asked for.
    pub config: Config,
    /// Its keeper's socket.
    pub socket: PathBuf,
    /// Whether its stdin pipe is open.
    pub stdin: bool,
    /// Its deadline, if any.
    pub end_at: Option<SystemTime>,
}
