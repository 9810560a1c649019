//! The machine the daemon runs on: its clock, its certificate trust store, its load, and
//! the daemon's own descriptor budget on it. Transport-free. Functions that touch files
//! block; callers run them off the runtime.

pub mod ca;
pub mod clock;
pub mod descriptors;
pub mod metrics;

/// True when the daemon runs as root (effective uid 0), which setting the clock, writing
/// the trust store and giving files to other users need.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
