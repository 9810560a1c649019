//! envd: the daemon inside every sandbox.
//!
//! Module map:
//! - [`config`]: the command line, validated once into a [`config::Config`].
//! - [`limits`]: every bound on what a client can make the daemon hold or wait for.
//! - [`error`]: the core error enum and its only mappings to HTTP and RPC codes.
//! - [`server`]: one listener speaking HTTP/1.1 and cleartext HTTP/2; graceful shutdown.
//! - [`panics`]: a panic in request handling becomes a 500 or `internal`, logged once.
//! - [`http`]: REST resources (`/health`, `/files`, `/init`, `/envs`, `/metrics`,
//!   `/patches`).
//! - [`rpc`]: the tonic services and the Connect and gRPC-Web layers that translate into them.
//! - [`fs`]: the transport-free filesystem core (paths, users, entries, metadata, writes).
//! - [`env`]: the environment new processes get (internal and `/init` variables).
//! - [`persist`]: the state directory (what survives a restart).
//! - [`process`]: the transport-free process core (spawn, PTY, output fan-out, signals).
//! - [`sys`]: the one module allowed `unsafe` (child setup before exec, the keepers'
//!   vfork-style start, terminal ioctls).
//! - [`supervisor`]: systemd readiness and watchdog.
//! - [`identity`]: who a request acts as (default user, Basic auth, `username=`).
//! - [`auth`]: the access token, the gate every request passes, signed `/files` URLs.
//! - [`init`]: `/init`, the control plane's setup of the sandbox.
//! - [`patch`]: sequenced fix-up scripts, applied once each, recorded in the guest.
//! - [`host`]: the machine itself: clock, CA trust store, load metrics.
//! - [`proto`]: generated protobuf code; never edited by hand.

pub mod auth;
pub mod config;
pub mod env;
pub mod error;
pub mod fs;
pub mod host;
pub mod http;
pub mod identity;
pub mod init;
pub mod limits;
pub mod panics;
pub mod patch;
pub mod persist;
pub mod process;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod state;
pub mod supervisor;
pub mod sys;
