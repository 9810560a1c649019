//! The command line, parsed once into a validated [`Config`] that is passed down.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::TypedValueParser as _;

/// The port envd listens on; the SDKs assume it.
pub const DEFAULT_PORT: u16 = 49983;
/// All interfaces: the host-side proxy reaches the daemon from outside the guest.
pub const DEFAULT_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// How long a graceful shutdown waits for in-flight requests before giving up on them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The user requests act as when they name none (envd's default until `/init` changes it).
pub const DEFAULT_USER: &str = "root";
/// Directory watchers at once: each is an inotify instance, and the kernel allows 128 per
/// user by default (`fs.inotify.max_user_instances`), shared with everything else root runs.
pub const DEFAULT_MAX_WATCHERS: usize = 100;
/// A polling watcher nobody polls for this long is removed.
pub const DEFAULT_WATCHER_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Time between a deadline's SIGTERM and SIGKILL: enough for a process to flush and exit.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);
/// Longest deadline `SetTimeout` accepts (a sandbox lives at most about a day).
pub const DEFAULT_MAX_PROCESS_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Where state that survives a restart lives: `/run` is gone after a reboot, as the
/// processes it describes are.
pub const DEFAULT_STATE_DIR: &str = "/run/envd";
/// Whether `/init` may set the system clock: yes, a resumed sandbox's clock is stale.
pub const DEFAULT_SET_CLOCK: bool = true;
/// The record of applied patches: on the guest's own disk, so snapshots carry it, in the
/// conventional place for a daemon's state.
pub const DEFAULT_PATCH_RECORD_FILE: &str = "/var/lib/envd/patches.json";
/// Where uploads record their temp files until they are published, so the next start can
/// remove what a crash left behind. Persistent (not `/run`): the temp files are on disk too.
pub const DEFAULT_UPLOAD_JOURNAL_DIR: &str = "/var/lib/envd/uploads";

/// The daemon's command line. Every flag also reads an `ENVD_*` environment variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "envd",
    version,
    about = "In-sandbox daemon: files, filesystem and processes, wire-compatible with E2B's envd"
)]
pub struct Cli {
    /// Address to bind.
    #[arg(long, env = "ENVD_ADDR", default_value_t = DEFAULT_ADDR)]
    pub addr: IpAddr,
    /// TCP port to bind; 0 picks a free one (the bound address is printed on stdout).
    #[arg(long, env = "ENVD_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Seconds a graceful shutdown waits for in-flight requests.
    #[arg(long, env = "ENVD_SHUTDOWN_GRACE_SECS", default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs())]
    pub shutdown_grace_secs: u64,
    /// The user requests act as when they name none [default: root, or the daemon's own
    /// user when it does not run as root].
    #[arg(long, env = "ENVD_DEFAULT_USER")]
    pub default_user: Option<String>,
    /// The state directory (the `/init` state, the process table, keeper sockets); an
    /// empty value keeps no state.
    // An `OsString` parser: clap's `PathBuf` parser refuses the empty value.
    #[arg(
        long,
        env = "ENVD_STATE_DIR",
        default_value = DEFAULT_STATE_DIR,
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub state_dir: PathBuf,
    /// Whether `/init` may set the system clock to the host's time.
    #[arg(long, env = "ENVD_SET_CLOCK", default_value_t = DEFAULT_SET_CLOCK, action = clap::ArgAction::Set)]
    pub set_clock: bool,
    /// The system CA bundle an `/init` `caBundle` is added to.
    #[arg(long, env = "ENVD_CA_BUNDLE_FILE", default_value = crate::host::ca::DEFAULT_BUNDLE_FILE)]
    pub ca_bundle_file: PathBuf,
    /// Where the installed `caBundle` PEM is kept (to replace it on the next change).
    #[arg(long, env = "ENVD_CA_CERT_FILE", default_value = crate::host::ca::DEFAULT_CERT_FILE)]
    pub ca_cert_file: PathBuf,
    /// Directory watchers (streams and polling) allowed at once.
    #[arg(long, env = "ENVD_MAX_WATCHERS", default_value_t = DEFAULT_MAX_WATCHERS)]
    pub max_watchers: usize,
    /// Seconds after which a polling watcher nobody polls is removed.
    #[arg(long, env = "ENVD_WATCHER_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_WATCHER_IDLE_TIMEOUT.as_secs())]
    pub watcher_idle_timeout_secs: u64,
    /// Milliseconds between a deadline's SIGTERM and SIGKILL.
    #[arg(long, env = "ENVD_KILL_GRACE_MS", default_value_t = u64::try_from(DEFAULT_KILL_GRACE.as_millis()).unwrap_or(u64::MAX))]
    pub kill_grace_ms: u64,
    /// Longest process deadline `SetTimeout` accepts (and longest patch timeout), in seconds.
    #[arg(long, env = "ENVD_MAX_PROCESS_TIMEOUT_SECS", default_value_t = DEFAULT_MAX_PROCESS_TIMEOUT.as_secs())]
    pub max_process_timeout_secs: u64,
    /// The record of applied patches (`/patches`); created with its directory on the first
    /// patch.
    #[arg(long, env = "ENVD_PATCH_RECORD_FILE", default_value = DEFAULT_PATCH_RECORD_FILE)]
    pub patch_record_file: PathBuf,
    /// Directory of the upload journal (in-progress temp files); empty turns it off.
    #[arg(long, env = "ENVD_UPLOAD_JOURNAL_DIR", default_value = DEFAULT_UPLOAD_JOURNAL_DIR)]
    pub upload_journal_dir: std::ffi::OsString,
    /// Connection, header, body and message limits.
    #[command(flatten)]
    pub limits: crate::limits::LimitArgs,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// The initial default user.
    pub default_user: String,
    /// Directory watchers allowed at once.
    pub max_watchers: usize,
    /// Idle time after which a polling watcher is removed.
    pub watcher_idle_timeout: Duration,
    /// Time between a deadline's SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Longest deadline `SetTimeout` accepts.
    pub max_process_timeout: Duration,
    /// The state directory; `None` keeps no state.
    pub state_dir: Option<PathBuf>,
    /// Whether `/init` may set the system clock.
    pub set_clock: bool,
    /// Where `/init` installs a CA certificate.
    pub ca: crate::host::ca::CaStore,
    /// The record of applied patches.
    pub patch_record_file: PathBuf,
    /// The upload journal's directory, or `None` to keep none.
    pub upload_journal: Option<PathBuf>,
    /// Connection, header, body and message limits.
    pub limits: crate::limits::Limits,
}

impl Config {
    /// Validates the command line.
    ///
    /// # Errors
    /// A message for the operator when a value is unusable.
    pub fn from_cli(cli: Cli) -> Result<Self, String> {
        if cli.patch_record_file.as_os_str().is_empty() {
            return Err("--patch-record-file must not be empty".into());
        }
        let default_user = match cli.default_user {
            Some(user) if user.is_empty() => {
                return Err("--default-user must not be empty".into());
            }
            Some(user) => user,
            None => own_user_unless_root()?,
        };
        let limits = crate::limits::Limits::from_args(&cli.limits)?;
        Ok(Config {
            listen: SocketAddr::new(cli.addr, cli.port),
            shutdown_grace: Duration::from_secs(cli.shutdown_grace_secs),
            default_user,
            state_dir: (!cli.state_dir.as_os_str().is_empty()).then_some(cli.state_dir),
            set_clock: cli.set_clock,
            ca: crate::host::ca::CaStore {
                bundle: cli.ca_bundle_file,
                cert: cli.ca_cert_file,
            },
            max_watchers: cli.max_watchers,
            watcher_idle_timeout: Duration::from_secs(cli.watcher_idle_timeout_secs),
            kill_grace: Duration::from_millis(cli.kill_grace_ms),
            max_process_timeout: Duration::from_secs(cli.max_process_timeout_secs),
            patch_record_file: cli.patch_record_file,
            upload_journal: (!cli.upload_journal_dir.is_empty())
                .then(|| PathBuf::from(cli.upload_journal_dir)),
            limits,
        })
    }

    /// A configuration for tests and embedding: loopback, an ephemeral port.
    pub fn ephemeral() -> Self {
        Config {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            default_user: DEFAULT_USER.into(),
            max_watchers: DEFAULT_MAX_WATCHERS,
            watcher_idle_timeout: DEFAULT_WATCHER_IDLE_TIMEOUT,
            kill_grace: DEFAULT_KILL_GRACE,
            max_process_timeout: DEFAULT_MAX_PROCESS_TIMEOUT,
            state_dir: None,
            // Tests must never move the machine's clock.
            set_clock: false,
            ca: crate::host::ca::CaStore {
                bundle: crate::host::ca::DEFAULT_BUNDLE_FILE.into(),
                cert: crate::host::ca::DEFAULT_CERT_FILE.into(),
            },
            patch_record_file: DEFAULT_PATCH_RECORD_FILE.into(),
            // In-process tests share a machine: a journal is opted into per test.
            upload_journal: None,
            limits: crate::limits::Limits::default(),
        }
    }
}

/// The default user when none is configured: root when the daemon runs as root, else the
/// daemon's own user, since a daemon without root can only create files as itself.
fn own_user_unless_root() -> Result<String, String> {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Ok(DEFAULT_USER.into());
    }
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => Ok(user.name),
        _ => Err(format!(
            "uid {uid} has no entry in /etc/passwd; pass --default-user"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The help says an empty state directory or upload journal turns either off: the
    /// command line and the environment must both accept the empty value.
    #[test]
    fn an_empty_state_dir_or_journal_keeps_none() {
        let cli = Cli::try_parse_from(["envd", "--state-dir=", "--upload-journal-dir="])
            .expect("empty values parse");
        assert!(cli.state_dir.as_os_str().is_empty());
        assert!(cli.upload_journal_dir.is_empty());
        let cli = Cli::try_parse_from(["envd", "--state-dir", "/run/x"]).expect("parses");
        assert_eq!(cli.state_dir, PathBuf::from("/run/x"));
        let config = Config::from_cli(
            Cli::try_parse_from(["envd", "--state-dir=", "--default-user", "root"])
                .expect("parses"),
        );
        let config = config.expect("valid");
        assert_eq!(config.state_dir, None);
    }
}
