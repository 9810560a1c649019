//! Row 6's ceilings: a bare HTTP server (see `bare_server`) that answers a Connect `Start`
//! with the least any server must do: read the request, start the command, send the
//! `start` event as soon as it has started (the SDKs wait for it before a background
//! command's handle is theirs), wait for the command, and send the `end` event and the end
//! of the stream. Two ways of running the command, each a bound for a kind of daemon:
//!
//! - [`Via::Direct`]: the server spawns and waits for the command itself, as the floor does.
//!   A daemon whose processes die with it could come this close to the floor.
//! - [`Via::Keeper`]: through the daemon binary's own keeper (`envd __keeper`), the
//!   mechanism that lets processes outlive the daemon (README, "Surviving its own
//!   restart"): a spare keeper started ahead of need gets the spec on its socket pair,
//!   starts the command, says hello, and sends the exit when the command has ended. The
//!   server drives the keeper with the daemon's own keeper client (`Nursery`, `Spare`,
//!   `Link`: spares forked by the daemon binary's nursery, waiting at a lower priority, as
//!   the daemon's do), and only relays: it keeps no registry and saves no state. A daemon that keeps its processes alive across its own
//!   restarts with keepers could come this close to the floor, and no closer.

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use envd::process::keeper::client::{Link, Spare};
use envd::process::keeper::nursery::Nursery;
use envd::process::keeper::{KEEPER_ARG, KeeperSpec};
use envd::process::output::Hub;
use envd::rpc::envelope::{Decoder, encode};
use futures_util::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};

use super::bare_server::BareServer;
use super::process::UserEnv;

/// How the bare server runs a command.
#[derive(Debug, Clone)]
pub enum Via {
    /// Spawned and waited for by the server itself.
    Direct,
    /// Through a spare keeper of this daemon binary, its socket under the directory.
    Keeper {
        /// The daemon binary (run as `envd __keeper <socket>`).
        binary: PathBuf,
        /// Where the keepers' sockets go.
        dir: PathBuf,
    },
}

/// Starts a bare server that runs every `Start` it is sent the way `via` says, in `env`.
///
/// # Errors
/// When the server cannot be started.
pub fn serve(via: Via, env: UserEnv) -> anyhow::Result<BareServer> {
    let spares = match &via {
        Via::Direct => None,
        Via::Keeper { binary, dir } => {
            let spares = Spares {
                binary: binary.clone(),
                dir: dir.clone(),
                next: 0,
                ready: None,
                nursery: None,
            };
            Some(Arc::new(std::sync::Mutex::new(spares)))
        }
    };
    let env = Arc::new(env);
    BareServer::serve(move |request| {
        let (spares, env) = (spares.clone(), env.clone());
        async move {
            match start(request, spares, &env).await {
                Ok(response) => response,
                Err(err) => {
                    let body = Full::new(Bytes::from(format!("{err:#}"))).boxed_unsync();
                    let mut response = Response::new(body);
                    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    response
                }
            }
        }
    })
}

/// One `Start`: the command from the request, started; the answer streams its `start`
/// event at once and its `end` when `end` resolves.
async fn start(
    request: Request<Incoming>,
    spares: Option<Arc<std::sync::Mutex<Spares>>>,
    env: &UserEnv,
) -> anyhow::Result<Response<UnsyncBoxBody<Bytes, Infallible>>> {
    let body = request.into_body().collect().await?.to_bytes();
    let mut decoder = Decoder::new(body.len());
    decoder.push(&body);
    let (_, message) = decoder
        .next_frame()
        .map_err(|err| anyhow::anyhow!("bad envelope: {err:?}"))?
        .context("no request envelope")?;
    let request: serde_json::Value = serde_json::from_slice(&message)?;
    let process = &request["process"];
    let cmd = process["cmd"].as_str().context("no cmd")?.to_owned();
    let args: Vec<String> = process["args"]
        .as_array()
        .map(|args| {
            args.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    match spares {
        None => {
            let child = tokio::process::Command::new(&cmd)
                .args(&args)
                .env_clear()
                .envs(env.vars.iter().cloned())
                .current_dir(&env.home)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            let pid = child.id().unwrap_or(0);
            Ok(streamed(pid, async move {
                Ok(child.wait_with_output().await?.status)
            }))
        }
        Some(spares) => {
            let spare = lock(&spares).take()?;
            let link = begin(spare, &cmd, &args, env).await?;
            Ok(streamed(link.hello.pid, async move {
                let status = end(link).await;
                // As the daemon does (`ProcessTable::refill_after`): the next spare is
                // spawned once the end has gone out (this task runs after the answer's
                // last frame is written).
                tokio::spawn(async move { lock(&spares).refill() });
                Ok(status)
            }))
        }
    }
}

/// The answer to a `Start`: the `start` event now, then the `end` event and the end of the
/// stream once `end` resolves (a Connect error ends the stream when it fails).
fn streamed(
    pid: u32,
    end: impl Future<Output = anyhow::Result<ExitStatus>> + Send + 'static,
) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
    let start = serde_json::json!({ "event": { "start": { "pid": pid } } });
    let start = encode(0, start.to_string().as_bytes());
    let end = async move {
        let frames = match end.await {
            Ok(status) => end_frames(status),
            Err(err) => {
                let error = serde_json::json!({
                    "error": { "code": "internal", "message": format!("{err:#}") }
                });
                encode(0x02, error.to_string().as_bytes())
            }
        };
        Ok::<_, Infallible>(Frame::data(frames))
    };
    let frames = futures_util::stream::once(std::future::ready(Ok(Frame::data(start))))
        .chain(futures_util::stream::once(end));
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/connect+json"),
    );
    response
}

/// The `end` event of a command that ended with `status`, and the end of the stream.
fn end_frames(status: ExitStatus) -> Bytes {
    let text = match status.code() {
        Some(code) => format!("exit status {code}"),
        None => format!("signal: {}", status.signal().unwrap_or(0)),
    };
    let end = serde_json::json!({ "event": { "end": {
        "exitCode": status.code().unwrap_or(-1),
        "exited": status.code().is_some(),
        "status": text,
    } } });
    let mut frames = BytesMut::new();
    frames.extend_from_slice(&encode(0, end.to_string().as_bytes()));
    frames.extend_from_slice(&encode(0x02, b"{}"));
    frames.freeze()
}

fn lock(spares: &std::sync::Mutex<Spares>) -> std::sync::MutexGuard<'_, Spares> {
    spares
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The one spare the server keeps, and how to make the next.
struct Spares {
    binary: PathBuf,
    dir: PathBuf,
    next: usize,
    ready: Option<anyhow::Result<Spare>>,
    /// Started with the first spare; an exec'd spare when it cannot make one.
    nursery: Option<Nursery>,
}

impl Spares {
    /// The spare, spawning one first when there is none.
    fn take(&mut self) -> anyhow::Result<Spare> {
        if self.ready.is_none() {
            self.refill();
        }
        self.ready.take().context("no spare keeper")?
    }

    /// Has the nursery fork the next spare (as the daemon does), unless one is waiting.
    fn refill(&mut self) {
        if self.ready.is_none() {
            self.next += 1;
            let socket = self.dir.join(format!("bare-keeper-{}.sock", self.next));
            if self.nursery.is_none() {
                self.nursery = Nursery::start(&self.binary, &self.dir).ok();
            }
            let forked = self.nursery.as_ref().map(|n| n.spare(socket.clone()));
            self.ready = Some(
                match forked {
                    Some(Ok(spare)) => Ok(spare),
                    _ => Spare::spawn(&self.binary, socket),
                }
                .with_context(|| format!("spawning {} {KEEPER_ARG}", self.binary.display())),
            );
        }
    }
}

/// Has `spare` start the command; the link to its keeper once the keeper has said hello.
async fn begin(spare: Spare, cmd: &str, args: &[String], env: &UserEnv) -> anyhow::Result<Link> {
    let spec = KeeperSpec {
        program: cmd.to_owned(),
        args: args.to_vec(),
        env: env.vars.iter().cloned().collect(),
        cwd: env.home.clone(),
        credentials: None,
        pty: None,
        stdin: false,
        oom_score_adj: None,
    };
    spare
        .start(&spec)
        .await
        .map_err(|err| anyhow::Error::from(envd::error::Error::from(err)))
        .with_context(|| format!("starting {cmd} through a keeper"))
}

/// Waits for the exit (the output goes to a hub nobody listens to), then lets the keeper
/// go, as the daemon's lifecycle does.
async fn end(link: Link) -> ExitStatus {
    let status = link.forward_output(&Hub::new()).await;
    link.release().await;
    status
}
