//! The command line, parsed once into a validated [`Config`] that is passed down.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::Parser;

/// The port envd listens on; the SDKs assume it.
pub const DEFAULT_PORT: u16 = 49983;
/// All interfaces: the host-side proxy reaches the daemon from outside the guest.
pub const DEFAULT_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// How long a graceful shutdown waits for in-flight requests before giving up on them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The user requests act as when they name none (envd's default until `/init` changes it).
pub const DEFAULT_USER: &str = "root";

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
    /// The user requests act as when they name none.
    #[arg(long, env = "ENVD_DEFAULT_USER", default_value = DEFAULT_USER)]
    pub default_user: String,
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
}

impl Config {
    /// Validates the command line.
    ///
    /// # Errors
    /// A message for the operator when a value is unusable.
    pub fn from_cli(cli: Cli) -> Result<Self, String> {
        if cli.default_user.is_empty() {
            return Err("--default-user must not be empty".into());
        }
        Ok(Config {
            listen: SocketAddr::new(cli.addr, cli.port),
            shutdown_grace: Duration::from_secs(cli.shutdown_grace_secs),
            default_user: cli.default_user,
        })
    }

    /// A configuration for tests and embedding: loopback, an ephemeral port.
    pub fn ephemeral() -> Self {
        Config {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            default_user: DEFAULT_USER.into(),
        }
    }
}
