//! How a process ended, described the way envd's clients read it (reference §6.3):
//! `exit_code` (−1 when killed by a signal), `exited`, Go's process-state text as `status`,
//! and `error` for any unsuccessful end.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// The end of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit status, or −1 when a signal ended the process.
    pub exit_code: i32,
    /// True only for a normal exit.
    pub exited: bool,
    /// `exit status 3`, `signal: killed`, `signal: segmentation fault (core dumped)`, ...
    pub status: String,
    /// The status text again when the end was not a clean exit 0.
    pub error: Option<String>,
}

impl Exit {
    /// Describes a wait status.
    pub fn from_status(status: ExitStatus) -> Exit {
        if let Some(code) = status.code() {
            let text = format!("exit status {code}");
            return Exit {
                exit_code: code,
                exited: true,
                error: (code != 0).then(|| text.clone()),
                status: text,
            };
        }
        let mut text = match status.signal() {
            Some(signal) => format!("signal: {}", signal_name(signal)),
            None => "unknown wait status".to_owned(),
        };
        if status.core_dumped() {
            text.push_str(" (core dumped)");
        }
        Exit {
            exit_code: -1,
            exited: false,
            error: Some(text.clone()),
            status: text,
        }
    }

    /// An end for a process whose status could not be collected.
    pub fn wait_failed(err: &std::io::Error) -> Exit {
        let text = format!("wait: {err}");
        Exit {
            exit_code: -1,
            exited: false,
            error: Some(text.clone()),
            status: text,
        }
    }
}

/// Go's description of a Linux signal (`syscall.Signal.String()`).
fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        libc::SIGSTKFLT => "stack fault",
        libc::SIGCHLD => "child exited",
        libc::SIGCONT => "continued",
        libc::SIGSTOP => "stopped (signal)",
        libc::SIGTSTP => "stopped",
        libc::SIGTTIN => "stopped (tty input)",
        libc::SIGTTOU => "stopped (tty output)",
        libc::SIGURG => "urgent I/O condition",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        libc::SIGVTALRM => "virtual timer expired",
        libc::SIGPROF => "profiling timer expired",
        libc::SIGWINCH => "window changed",
        libc::SIGIO => "I/O possible",
        libc::SIGPWR => "power failure",
        libc::SIGSYS => "bad system call",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_exits_and_signals_like_go() {
        let ok = Exit::from_status(ExitStatus::from_raw(0));
        assert_eq!(
            (ok.exit_code, ok.exited, ok.status.as_str(), ok.error),
            (0, true, "exit status 0", None)
        );
        let three = Exit::from_status(ExitStatus::from_raw(3 << 8));
        assert_eq!(three.exit_code, 3);
        assert_eq!(three.error.as_deref(), Some("exit status 3"));
        let killed = Exit::from_status(ExitStatus::from_raw(libc::SIGKILL));
        assert_eq!(
            (killed.exit_code, killed.exited, killed.status.as_str()),
            (-1, false, "signal: killed")
        );
        let segv = Exit::from_status(ExitStatus::from_raw(libc::SIGSEGV | 0x80));
        assert_eq!(segv.status, "signal: segmentation fault (core dumped)");
        let term = Exit::from_status(ExitStatus::from_raw(libc::SIGTERM));
        assert_eq!(term.status, "signal: terminated");
    }
}
