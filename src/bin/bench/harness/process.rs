//! Row 6: `Start` of a command, over Connect (streaming JSON) until its `end` event, against
//! the harness spawning the same command with the same environment and waiting for it, with
//! two ceilings measured alongside (see `bare_start`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};

use super::bare_start::{self, Via};
use super::report::{Row, Target};
use super::stats;
use super::{Ctx, blocking};

/// Target for this round: what the daemon adds to a spawn at the median.
const MAX_OVERHEAD_MS: f64 = 0.5;
/// The RPC's path, on the daemon and on the bare servers alike.
const START: &str = "/process.Process/Start";

/// Row 6: one row per command.
///
/// # Errors
/// When a start fails or a command does not exit 0.
pub async fn start(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let commands: [(&'static str, &str, &[&str]); 2] = [
        ("start_true", "/bin/true", &[]),
        ("start_bash_login", "/bin/bash", &["-l", "-c", "echo hi"]),
    ];
    let env = UserEnv::of_this_user()?;
    // The ceilings (see `bare_start`): what a bare server adds to the floor when it spawns
    // the command itself, and when it goes through the daemon binary's keeper.
    let direct = bare_start::serve(Via::Direct, env.clone())?;
    let keeper = bare_start::serve(
        Via::Keeper {
            binary: ctx.options.daemon.clone(),
            dir: ctx.dir.clone(),
        },
        env.clone(),
    )?;
    let servers = [&direct, &keeper];
    let mut rows = Vec::new();
    for (id, cmd, args) in commands {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let daemon_url = ctx.daemon.url(START);
        // Warm-up: page cache, each server's first spawn.
        start_over_connect(ctx, &daemon_url, cmd, &args).await?;
        for server in servers {
            start_over_connect(ctx, &server.url(START), cmd, &args).await?;
        }
        let mut floor = Vec::new();
        let mut daemon = Vec::new();
        let mut bare: [Vec<Duration>; 2] = Default::default();
        ctx.daemon.reset_peak()?;
        for _ in 0..ctx.options.process_iterations {
            let (cmd2, args2, env2) = (cmd.to_owned(), args.clone(), env.clone());
            floor.push(blocking(move || timed_spawn(&cmd2, &args2, &env2)).await?);
            daemon.push(start_over_connect(ctx, &daemon_url, cmd, &args).await?);
            for (server, samples) in servers.iter().zip(&mut bare) {
                samples.push(start_over_connect(ctx, &server.url(START), cmd, &args).await?);
            }
        }
        let peak = ctx.daemon.status_kib("VmHWM")?;
        let daemon = stats::lower_better(&stats::millis(&daemon));
        let floor = stats::lower_better(&stats::millis(&floor));
        let overhead = daemon.median - floor.median;
        let line = std::iter::once(cmd)
            .chain(args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        let mut note = String::new();
        for (what, samples) in [
            "spawning the command itself (processes that die with the server)",
            "through a spare keeper of the daemon binary (processes that outlive the server)",
        ]
        .iter()
        .zip(&bare)
        {
            let ceiling = stats::lower_better(&stats::millis(samples));
            if !note.is_empty() {
                note.push('\n');
            }
            note.push_str(&format!(
                "ceiling, a bare HTTP server {what}: p50 {:.3} ms, {:+.3} ms over the floor",
                ceiling.median,
                ceiling.median - floor.median,
            ));
        }
        rows.push(Row {
            id,
            title: format!("Start `{line}` over Connect to its end event"),
            unit: "ms",
            daemon,
            floor: Some(floor),
            floor_is: "spawn with the same env and cwd, read stdout and stderr, wait",
            rate: None,
            ratio: Some(overhead),
            ratio_is: "ms over floor at p50",
            target: Target::at_most("overhead <= 0.5 ms at p50", Some(overhead), MAX_OVERHEAD_MS),
            daemon_peak_rss_kib: Some(peak),
            note: Some(note),
        });
    }
    Ok(rows)
}

/// The environment the daemon gives a process of the default user (root, or the daemon's
/// own user): PATH, HOME, USER, LOGNAME, SHELL; and the cwd, the user's home. The floor
/// and the ceilings run their commands with the same.
#[derive(Debug, Clone)]
pub struct UserEnv {
    /// The variables.
    pub vars: Vec<(String, String)>,
    /// The working directory.
    pub home: std::path::PathBuf,
}

impl UserEnv {
    /// The harness's own user's.
    ///
    /// # Errors
    /// When the user is not in the user database.
    pub fn of_this_user() -> anyhow::Result<UserEnv> {
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())?
            .context("the harness's own user is not in the user database")?;
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        let vars = vec![
            ("PATH".to_owned(), path),
            ("HOME".to_owned(), user.dir.to_string_lossy().into_owned()),
            ("USER".to_owned(), user.name.clone()),
            ("LOGNAME".to_owned(), user.name.clone()),
            (
                "SHELL".to_owned(),
                user.shell.to_string_lossy().into_owned(),
            ),
        ];
        Ok(UserEnv {
            vars,
            home: user.dir,
        })
    }
}

/// The floor: the command spawned in `env`, its stdout and stderr read to their end, and
/// waited for, timed; it must exit 0.
fn timed_spawn(cmd: &str, args: &[String], env: &UserEnv) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = Command::new(cmd)
        .args(args)
        .env_clear()
        .envs(env.vars.iter().cloned())
        .current_dir(&env.home)
        .stdin(Stdio::null())
        .output()?
        .status;
    let elapsed = start.elapsed();
    if !status.success() {
        bail!("{cmd} exited with {status}");
    }
    Ok(elapsed)
}

/// One `Start` over Connect streaming JSON; the time from the request to the `end` event.
async fn start_over_connect(
    ctx: &Ctx,
    url: &str,
    cmd: &str,
    args: &[String],
) -> anyhow::Result<Duration> {
    let message = serde_json::json!({ "process": { "cmd": cmd, "args": args } }).to_string();
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0u8);
    body.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    body.extend_from_slice(message.as_bytes());
    let start = Instant::now();
    let mut response = ctx
        .http
        .post(url)
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(body)
        .send()
        .await?;
    if response.status() != 200 {
        bail!("Start answered {}", response.status());
    }
    let mut buffer = BytesMut::new();
    let mut elapsed = None;
    let mut status = None;
    while let Some(chunk) = response.chunk().await? {
        buffer.extend_from_slice(&chunk);
        while buffer.len() >= 5 {
            let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
            if buffer.len() < 5 + len {
                break;
            }
            let flags = buffer[0];
            buffer.advance(5);
            let frame = buffer.split_to(len);
            let json: serde_json::Value = serde_json::from_slice(&frame)?;
            if flags & 0x02 != 0 {
                if json.get("error").is_some() {
                    bail!("Start ended with {json}");
                }
            } else if let Some(end) = json["event"].get("end") {
                elapsed.get_or_insert_with(|| start.elapsed());
                status = end["status"].as_str().map(str::to_owned);
            }
        }
    }
    let elapsed = elapsed.context("the stream ended without an end event")?;
    if status.as_deref() != Some("exit status 0") {
        bail!("{cmd} ended with {status:?}");
    }
    Ok(elapsed)
}
