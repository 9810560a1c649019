//! The only module allowed `unsafe`: what a child needs between `fork` and `exec`, the
//! keepers' `posix_spawn`-like start ([`vfork`]), the terminal ioctls, priorities, the
//! entry point's share of std's start-up, letting go of the relocation table after it
//! ([`relocations`]), forking spare keepers ([`fork`]), and the C `pow` the binary defines
//! for itself. Every block says why it is sound.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

pub mod fork;
pub mod relocations;
pub mod vfork;

/// Credentials and setup applied in the child before `exec`.
#[derive(Debug, Clone)]
pub struct ChildSetup {
    /// `(uid, primary gid, supplementary gids)` to switch to; `None` keeps the daemon's.
    pub credentials: Option<(u32, u32, Vec<u32>)>,
    /// Make the child's stdin (a PTY slave) its controlling terminal.
    pub controlling_tty: bool,
    /// `oom_score_adj` for the child: user work is killed before the daemon.
    pub oom_score_adj: Option<i32>,
    /// Kill the child when its parent (its keeper) dies: a process nobody keeps cannot be
    /// managed any more.
    pub die_with_parent: bool,
}

/// Installs `setup` to run in the child after `fork`: a new session (so the child leads
/// its own process group and signals can reach the whole group), the controlling
/// terminal, priority and OOM score reset, then groups, gid and uid.
pub fn configure_child(command: &mut std::process::Command, setup: ChildSetup) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = setup
        .credentials
        .as_ref()
        .map(|(_, _, groups)| groups.clone())
        .unwrap_or_default();
    let oom = setup
        .oom_score_adj
        .map(|score| format!("{score}\n").into_bytes());
    // SAFETY: the closure runs in the forked child before exec. It only makes
    // async-signal-safe system calls (setsid, ioctl, setpriority, open, write, close,
    // setgroups, setgid, setuid) and allocates nothing: `groups` and `oom` were prepared
    // above, in the parent, and are only borrowed here.
    unsafe {
        command.pre_exec(move || {
            new_session(setup.controlling_tty, oom.as_deref())?;
            if let Some((uid, gid, _)) = setup.credentials {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // After the credential change, which would clear it.
            if setup.die_with_parent {
                let parent = libc::getppid();
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The parent died before the setting took effect.
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
            Ok(())
        });
    }
}

/// In a new child, before its credentials change: a new session (the child leads its own
/// process group, which signals then reach whole), its stdin as controlling terminal when
/// asked, nice 0 (undoing the daemon's own boosts: it may run at nice -20) and `oom`
/// (bytes for `oom_score_adj`).
///
/// # Safety
/// Only system calls: callable between fork (or vfork) and exec, where nothing may lock
/// or allocate.
unsafe fn new_session(controlling_tty: bool, oom: Option<&[u8]>) -> io::Result<()> {
    // SAFETY: system calls on a literal path and on `oom`, a live borrow.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::setpriority(libc::PRIO_PROCESS, 0, 0);
        if let Some(oom) = oom {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, oom.as_ptr().cast(), oom.len());
                libc::close(fd);
            }
        }
    }
    Ok(())
}

/// Sets a terminal's window size.
///
/// # Errors
/// The OS error of `TIOCSWINSZ`.
pub fn set_window_size(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is a live descriptor for the borrow's lifetime and `size` is a valid
    // `winsize` that the kernel only reads.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd for `pid`: readable once the process exits (Linux 5.3+).
///
/// # Errors
/// The OS error of `pidfd_open`.
pub fn pidfd_open(pid: u32) -> io::Result<std::os::fd::OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
    // memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// What std's start-up does before `fn main`, for a binary with its own C `main`
/// (`src/main.rs` says why): descriptors 0–2 are made valid (a closed one is opened on
/// `/dev/null`, so that the first file the daemon opens never becomes its stdout), and
/// SIGPIPE is ignored.
pub fn start_like_std() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
        {
            // SAFETY: a constant NUL-terminated path; the lowest free number is `fd`, the
            // descriptor left open on purpose (never closed, as std's own).
            let opened = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            if opened == -1 {
                // std aborts here too: nothing safe can be written anywhere.
                std::process::abort();
            }
        }
    }
    ignore_sigpipe();
}

/// Ignores SIGPIPE in this process (the daemon and its keepers: both start in
/// [`start_like_std`]), so writing to a peer that went away is an error, not death.
/// (Children get the default back: the standard library and [`vfork`] reset it before
/// exec.)
fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN touches no handler code and is valid at any time.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// `read` applied to the fields of `/proc/<pid>/stat` after the command name (which may
/// hold spaces and parentheses, so they follow its last `)`): the first is field 3, the
/// state. One read: the kernel writes the whole line at once (well under the buffer),
/// where `read_to_string` would stat the file and read in growing steps.
pub fn with_stat_fields<T>(
    pid: u32,
    read: impl FnOnce(std::str::SplitWhitespace<'_>) -> Option<T>,
) -> Option<T> {
    use std::io::Read;
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut buffer = [0u8; 4096];
    let len = file.read(&mut buffer).ok()?;
    let stat = std::str::from_utf8(&buffer[..len]).ok()?;
    read(stat.rsplit_once(')')?.1.split_whitespace())
}

/// Now, in the unit of a process's start time (`/proc/<pid>/stat` field 22): clock ticks
/// (`_SC_CLK_TCK`) of `CLOCK_BOOTTIME`, the clock the kernel stamps a new process with and
/// divides the same way. `None` when the clock or the tick rate cannot be read.
pub fn boot_ticks() -> Option<u64> {
    static NANOS_PER_TICK: std::sync::LazyLock<Option<u64>> = std::sync::LazyLock::new(|| {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        u64::try_from(hz)
            .ok()
            .filter(|&hz| hz > 0 && 1_000_000_000 % hz == 0)
            .map(|hz| 1_000_000_000 / hz)
    });
    let per_tick = (*NANOS_PER_TICK)?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let nanos =
        u64::try_from(now.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(now.tv_nsec()).ok()?;
    Some(nanos / per_tick)
}

/// Swaps the files at `a` and `b` atomically (`renameat2` with `RENAME_EXCHANGE`): each
/// name then names the other's file.
///
/// # Errors
/// The OS error: `ENOENT` when either is missing, `EINVAL` (or `Unsupported` here) where
/// the filesystem or the platform cannot exchange.
pub fn exchange(a: &std::path::Path, b: &std::path::Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE).map_err(io::Error::from)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (a, b);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The nice value of process `pid`.
///
/// # Errors
/// The OS error when there is no such process.
pub fn nice_of(pid: u32) -> io::Result<i32> {
    // getpriority can return -1 as a value: errno tells an error from it.
    nix::errno::Errno::clear();
    // SAFETY: getpriority only reads the scheduling attributes of a process.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, pid) };
    match nix::errno::Errno::last_raw() {
        0 => Ok(nice),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Sets the nice value of process `pid` (lowering it needs root).
///
/// # Errors
/// The OS error (no such process, not permitted).
pub fn set_nice(pid: u32, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority only changes the scheduling attributes of a process.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, nice) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Keeps freed memory below this much at the top of a malloc arena instead of returning it
/// to the kernel at once.
const MALLOC_TRIM_THRESHOLD: i32 = 8 * 1024 * 1024;
/// Allocations from this size up get their own mapping; smaller ones come from the arenas.
const MALLOC_MMAP_THRESHOLD: i32 = 4 * 1024 * 1024;

/// Tunes glibc's malloc for the daemon, once at start.
///
/// - At most `arenas` arenas. By default every thread that allocates gets an arena of its
///   own (up to eight per core), and each keeps the memory freed into it: the blocking
///   threads that write uploads and walk directories would each hold a few MiB for as long
///   as the daemon lives. One arena per core keeps contention low and memory shared.
/// - Fixed trim and mapping thresholds ([`MALLOC_TRIM_THRESHOLD`],
///   [`MALLOC_MMAP_THRESHOLD`]). A large upload allocates and frees a buffer for every few
///   hundred KiB of body; with glibc's defaults the freed memory went back to the kernel
///   and every new buffer faulted its pages in again, which cost the multipart upload row
///   about a tenth of its throughput (README, "Benchmark"). The price is up to 8 MiB per
///   arena kept after a burst of uploads, none at idle after start.
pub fn tune_malloc(arenas: i32) {
    // SAFETY: `mallopt` only sets tunables of the allocator; called once at start, before
    // the runtime's threads exist.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
        libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (arenas, MALLOC_TRIM_THRESHOLD, MALLOC_MMAP_THRESHOLD);
}

/// The C library's `pow`, defined in the binary so that the dynamic linker does not load
/// libm for it: tokio's multi-threaded scheduler (`f64::powf`, in its poll-time average) is
/// the only user of libm in the whole binary, and mapping and relocating libm.so kept
/// 0.5 MiB resident in an idle daemon (README, "Benchmark", `idle_rss`). The `libm` crate
/// is the Rust port of the FreeBSD/musl implementation (within 1 ulp; glibc's is within
/// 0.52). Shared libraries do not see this definition: the executable exports no symbols
/// they could bind to, so a library that uses `pow` still gets its own libm.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
// SAFETY: `pow` is not defined anywhere else in the binary (libm.so is no longer linked:
// the linker would otherwise have resolved tokio's reference there), and this definition
// has the C signature and semantics of pow(3): it only computes on its arguments.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn pow_is_pow() {
        use super::pow;
        let close = |got: f64, want: f64| (got - want).abs() <= want.abs() * f64::EPSILON;
        assert_eq!(pow(2.0, 10.0), 1024.0);
        assert_eq!(pow(-2.0, 3.0), -8.0);
        assert_eq!(pow(5.0, 0.0), 1.0);
        assert!(close(pow(2.0, 0.5), std::f64::consts::SQRT_2));
        assert!(close(pow(std::f64::consts::E, 2.0), 7.389_056_098_930_65));
        // tokio's use: the weight of `n` polls in its moving average.
        assert!(close(pow(0.9, 3.0), 0.729));
        assert!(pow(-1.0, 0.5).is_nan());
        assert_eq!(pow(0.0, -1.0), f64::INFINITY);
    }
}
