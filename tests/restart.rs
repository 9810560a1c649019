//! Surviving a restart: `kill -9` of the daemon, then a new daemon on the same state
//! directory finds the processes its predecessor started (through their keepers), the
//! `/init` state, and talks systemd's notify protocol.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::process::{
    alive, collect, collect_rest, read_start, read_stdout_until, started, wait_dead,
};
use common::{Daemon, daemon_helpers, grpc_channel, http, kill_keepers, wait_until};
use envd::proto::process::{self as pb, process_client::ProcessClient, process_selector::Selector};
use nix::sys::signal::Signal;
use serde_json::json;

/// A state directory the test owns, and cleans up (keepers included).
struct State(tempfile::TempDir);

impl State {
    fn new() -> State {
        State(tempfile::tempdir().expect("state dir"))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn start(&self) -> Daemon {
        Daemon::start_with(&["--state-dir", self.path().to_str().expect("utf-8")], &[])
    }
}

impl Drop for State {
    fn drop(&mut self) {
        kill_keepers(self.path());
    }
}

fn bash(script: &str, tag: Option<&str>) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }),
        tag: tag.map(str::to_owned),
        ..Default::default()
    }
}

fn by_pid(pid: u32) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(Selector::Pid(pid)),
    })
}

/// Starts a process and reads events until its stdout has shown `line`; returns the pid.
async fn start_and_see(daemon: &Daemon, request: pb::StartRequest, line: &str) -> u32 {
    let mut client = ProcessClient::new(grpc_channel(daemon).await);
    let (pid, mut stream) = started(&mut client, request).await;
    read_stdout_until(&mut stream, |seen| seen.contains(line)).await;
    pid
}

/// The processes a daemon's `List` shows.
async fn list(daemon: &Daemon) -> Vec<pb::ProcessInfo> {
    let mut client = ProcessClient::new(grpc_channel(daemon).await);
    client
        .list(pb::ListRequest {})
        .await
        .expect("list")
        .into_inner()
        .processes
}

/// The process `pid` as a daemon's `List` shows it (it must be there).
async fn listed(daemon: &Daemon, pid: u32) -> pb::ProcessInfo {
    list(daemon)
        .await
        .into_iter()
        .find(|p| p.pid == pid)
        .expect("listed")
}

/// Collects a Connect stream: (stdout, exit code of the end event).
async fn follow(daemon: &Daemon, pid: u32) -> (String, i32) {
    let mut client = ProcessClient::new(grpc_channel(daemon).await);
    let stream = client
        .connect(pb::ConnectRequest {
            process: by_pid(pid),
        })
        .await
        .expect("connect")
        .into_inner();
    let out = collect(stream).await;
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.exit_code(),
    )
}

#[tokio::test]
async fn processes_survive_kill_9_and_stay_manageable() {
    let state = State::new();
    let first = state.start();
    let pid = start_and_see(
        &first,
        bash("echo one; read x; echo got $x; exit 7", Some("survivor")),
        "one",
    )
    .await;
    let other = start_and_see(
        &first,
        bash("echo ready; exec sleep 1000", Some("sleeper")),
        "ready",
    )
    .await;
    first.signal_and_wait(Signal::SIGKILL);
    assert!(alive(pid) && alive(other), "processes outlive the daemon");

    let second = state.start();
    let survivor = listed(&second, pid).await;
    assert_eq!(survivor.tag.as_deref(), Some("survivor"));
    assert_eq!(
        survivor.config.as_ref().expect("config").args[1],
        "echo one; read x; echo got $x; exit 7"
    );

    // Connect re-attaches (subscribed once its start event arrives); input reaches the
    // process; the output after the attach and the right exit code follow.
    let mut client = ProcessClient::new(grpc_channel(&second).await);
    let mut attached = client
        .connect(pb::ConnectRequest {
            process: by_pid(pid),
        })
        .await
        .expect("connect")
        .into_inner();
    read_start(&mut attached).await;
    client
        .send_input(pb::SendInputRequest {
            process: by_pid(pid),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Stdin(b"back\n".to_vec())),
            }),
        })
        .await
        .expect("input after the restart");
    let out = collect_rest(attached).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got back\n");
    assert_eq!(out.exit_code(), 7);

    // Signals work on adopted processes.
    client
        .send_signal(pb::SendSignalRequest {
            process: by_pid(other),
            signal: pb::Signal::Sigkill as i32,
        })
        .await
        .expect("kill after the restart");
    let (_, code) = follow(&second, other).await;
    assert_eq!(code, -1);
}

#[tokio::test]
async fn an_exit_while_the_daemon_was_down_is_reported() {
    let state = State::new();
    let trigger = state.path().join("trigger");
    let first = state.start();
    let script = format!(
        "echo waiting; while [ ! -e {} ]; do sleep 0.02; done; echo bye; exit 5",
        trigger.display()
    );
    let pid = start_and_see(&first, bash(&script, None), "waiting").await;
    first.signal_and_wait(Signal::SIGKILL);
    std::fs::write(&trigger, b"").expect("trigger");
    wait_dead(pid).await;
    let second = state.start();
    let (stdout, code) = follow(&second, pid).await;
    assert_eq!(
        code, 5,
        "the exit code of a process that ended while the daemon was down"
    );
    assert_eq!(stdout, "", "output from before the attach is not replayed");
}

#[tokio::test]
async fn a_recycled_pid_is_not_adopted_and_bad_state_files_are_set_aside() {
    let state = State::new();
    let first = state.start();
    let pid = start_and_see(&first, bash("echo up; exec sleep 1000", None), "up").await;
    // Until the saver has written its pid, the process is saved as pending (see
    // `a_process_saved_while_its_keeper_was_starting_it_is_adopted`).
    let table_path = state.path().join("processes.json");
    let saved_pid = |path: &Path| {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .is_some_and(|table| {
                table["data"]
                    .as_array()
                    .is_some_and(|entries| entries.iter().any(|e| e["pid"] == pid))
            })
    };
    wait_until(
        "the pid in the saved table",
        Duration::from_secs(10),
        || saved_pid(&table_path),
    )
    .await;
    first.signal_and_wait(Signal::SIGKILL);
    // Pretend the pid now belongs to another process: same pid, another start time.
    let mut table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&table_path).expect("table")).expect("json");
    let entry = table["data"]
        .as_array_mut()
        .expect("entries")
        .iter_mut()
        .find(|e| e["pid"] == pid)
        .expect("saved");
    // The keeper knows the start time without reading /proc (most of the time): it is
    // the one the kernel gives.
    let kernel_start = envd::process::keeper::start_time(pid).expect("the process lives");
    assert_eq!(entry["start_time"], json!(kernel_start), "saved start time");
    entry["start_time"] = json!(entry["start_time"].as_u64().expect("start time") + 1);
    std::fs::write(&table_path, serde_json::to_vec(&table).expect("json")).expect("write");
    let second = state.start();
    let listed = list(&second).await;
    assert!(
        listed.iter().all(|p| p.pid != pid),
        "a process whose start time differs is not adopted"
    );
    second.signal_and_wait(Signal::SIGKILL);

    for name in ["processes.json", "init.json"] {
        std::fs::write(state.path().join(name), b"{ this is not json").expect("corrupt");
        // A save the kill cut short would be completed from its temp file instead.
        let _ = std::fs::remove_file(state.path().join(format!(".{name}.tmp")));
    }
    let third = state.start();
    let response = http()
        .get(third.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(
        response.status(),
        204,
        "a corrupt state file never stops the daemon"
    );
    for name in ["processes.bad", "init.bad"] {
        assert!(state.path().join(name).exists(), "{name} kept aside");
    }
}

/// The keepers of processes started under `state` (spare ones included): their pids.
fn keepers(state: &Path) -> Vec<u32> {
    daemon_helpers(state, "__keeper")
}

/// A process's state letter and parent (`/proc/<pid>/stat` fields 3 and 4).
fn state_and_parent(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// The zombies whose parent is `pid`.
fn zombies_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| state_and_parent(*child) == Some(('Z', pid)))
        .collect()
}

#[tokio::test]
async fn a_process_saved_while_its_keeper_was_starting_it_is_adopted() {
    let state = State::new();
    let first = state.start();
    let pid = start_and_see(
        &first,
        bash("echo up; read x; exit 3", Some("pending")),
        "up",
    )
    .await;
    first.signal_and_wait(Signal::SIGKILL);
    // Make the saved record what the daemon writes while the keeper is still starting the
    // process (the crash came before its pid was known): no pid, no start time.
    let table_path = state.path().join("processes.json");
    let mut table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&table_path).expect("table")).expect("json");
    let entry = table["data"]
        .as_array_mut()
        .expect("entries")
        .iter_mut()
        .find(|e| e["tag"] == "pending")
        .expect("saved");
    entry["pid"] = json!(0);
    entry["start_time"] = json!(0);
    std::fs::write(&table_path, serde_json::to_vec(&table).expect("json")).expect("write");

    let second = state.start();
    let listed = list(&second).await;
    let adopted = listed
        .iter()
        .find(|p| p.tag.as_deref() == Some("pending"))
        .expect("adopted from its keeper's socket");
    assert_eq!(adopted.pid, pid, "the pid comes from the keeper");
    let mut client = ProcessClient::new(grpc_channel(&second).await);
    client
        .send_input(pb::SendInputRequest {
            process: by_pid(pid),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Stdin(b"go\n".to_vec())),
            }),
        })
        .await
        .expect("input to the adopted process");
    let (_, code) = follow(&second, pid).await;
    assert_eq!(code, 3);
}

#[tokio::test]
async fn a_dead_daemons_spare_keeper_exits_and_a_new_daemon_starts_its_own() {
    let state = State::new();
    let first = state.start();
    let pid = start_and_see(&first, bash("echo up; exec sleep 1000", None), "up").await;
    let live_keeper = |keepers: &[u32]| {
        keepers
            .iter()
            .copied()
            .find(|k| state_and_parent(pid).map(|(_, parent)| parent) == Some(*k))
            .expect("the process's keeper")
    };
    wait_until(
        "a spare keeper next to the process's",
        Duration::from_secs(10),
        || keepers(state.path()).len() == 2,
    )
    .await;
    let kept = live_keeper(&keepers(state.path()));
    first.signal_and_wait(Signal::SIGKILL);
    wait_until(
        "the spare keeper to exit with its daemon",
        Duration::from_secs(10),
        || keepers(state.path()) == [kept],
    )
    .await;
    assert!(alive(pid), "the process's own keeper stays");
    let second = state.start();
    wait_until("the new daemon's spare", Duration::from_secs(10), || {
        keepers(state.path()).len() == 2
    })
    .await;
    // A start through the new spare works, and its keeper is not the old one.
    let other = start_and_see(&second, bash("echo two", None), "two").await;
    assert_ne!(other, pid);
    drop(second);
}

/// A process's nice value (`/proc/<pid>/stat` field 19).
fn nice(pid: u32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields = stat.rsplit_once(')').expect("comm").1;
    fields
        .split_whitespace()
        .nth(16)
        .and_then(|n| n.parse().ok())
        .expect("nice")
}

#[tokio::test]
async fn a_spare_keeper_waits_nicer_and_a_process_runs_at_the_daemons_priority() {
    let state = State::new();
    let daemon = state.start();
    let own = nice(daemon.pid());
    wait_until("the spare keeper", Duration::from_secs(10), || {
        keepers(state.path()).len() == 1
    })
    .await;
    let spare = keepers(state.path())[0];
    // Lowered by the daemon just after the keeper's exec; only by root, who can raise it
    // again.
    let waiting = if nix::unistd::geteuid().is_root() {
        (own + 10).min(19)
    } else {
        own
    };
    wait_until(
        "the spare to wait at a lower priority",
        Duration::from_secs(10),
        || nice(spare) == waiting,
    )
    .await;
    // The process inherits its keeper's priority, given back before the spec is sent.
    let pid = start_and_see(
        &daemon,
        bash("echo \"nice=$(nice)\"; exec sleep 1000", None),
        "nice=",
    )
    .await;
    assert_eq!(nice(pid), own, "the process runs at the daemon's priority");
    let ppid: u32 = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .expect("stat")
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        .expect("ppid");
    assert_eq!(ppid, spare, "started through the spare");
    assert_eq!(nice(spare), own, "its keeper too");
    let mut client = ProcessClient::new(grpc_channel(&daemon).await);
    let _ = client
        .send_signal(pb::SendSignalRequest {
            process: by_pid(pid),
            signal: pb::Signal::Sigkill as i32,
        })
        .await;
    wait_dead(pid).await;
}

#[tokio::test]
async fn the_token_and_environment_survive_a_restart() {
    let state = State::new();
    let ca = tempfile::tempdir().expect("ca");
    let args = common::init_args(ca.path());
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let state_arg = state.path().to_str().expect("utf-8").to_owned();
    args.extend(["--state-dir", state_arg.as_str()]);
    let first = Daemon::start_with(&args, &[]);
    first
        .init_ok(json!({"accessToken": "restart-token", "envVars": {"KEPT": "yes"}, "timestamp": "2026-01-01T00:00:00Z"}))
        .await;
    first.signal_and_wait(Signal::SIGKILL);
    let second = Daemon::start_with(&args, &[]);
    let refused = http().get(second.url("/envs")).send().await.expect("envs");
    assert_eq!(
        refused.status(),
        401,
        "the token is enforced from the first request"
    );
    let envs: serde_json::Value = http()
        .get(second.url("/envs"))
        .header("x-access-token", "restart-token")
        .send()
        .await
        .expect("envs")
        .json()
        .await
        .expect("json");
    assert_eq!(envs["KEPT"], "yes");
    // An older /init changes nothing after the restart either.
    let stale = second
        .init(json!({"accessToken": "restart-token", "envVars": {}, "timestamp": "2025-01-01T00:00:00Z"}))
        .await;
    assert_eq!(stale.status(), 204);
    let envs: serde_json::Value = http()
        .get(second.url("/envs"))
        .header("x-access-token", "restart-token")
        .send()
        .await
        .expect("envs")
        .json()
        .await
        .expect("json");
    assert_eq!(envs["KEPT"], "yes");
}

#[test]
fn readiness_and_watchdog_over_the_notify_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path: PathBuf = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let notify = socket_path.to_str().expect("utf-8").to_owned();
    let daemon = Daemon::start_with(
        &[],
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        let n = socket
            .recv(&mut buf)
            .expect("a notify message within the deadline");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        seen.first().expect("first").contains("READY=1"),
        "ready comes first: {seen:?}"
    );
    let status = daemon.signal_and_wait(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0));
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on shutdown");
}

#[tokio::test]
async fn starts_back_to_back_and_at_once_leave_one_spare_keeper() {
    let state = State::new();
    let daemon = state.start();
    // Back to back: each start comes while the last one's spare is still to be started
    // (it is started just after the end), and waits for it or starts its own.
    for n in 0..6 {
        let line = format!("seq{n}");
        start_and_see(&daemon, bash(&format!("echo {line}"), None), &line).await;
    }
    // At once: one gets the spare, the others start keepers of their own.
    let starts = (0..6).map(|n| {
        let line = format!("par{n}");
        let daemon = &daemon;
        async move { start_and_see(daemon, bash(&format!("echo {line}"), None), &line).await }
    });
    let pids = futures_util::future::join_all(starts).await;
    assert_eq!(pids.len(), 6);
    // Every keeper of an ended process goes, and exactly one spare is left waiting.
    wait_until(
        "one spare keeper, and no other",
        Duration::from_secs(10),
        || keepers(state.path()).len() == 1,
    )
    .await;
}

#[tokio::test]
async fn a_table_too_large_to_write_inline_is_saved_and_adopted_after_kill_9() {
    // A process table over 64 KiB is written on the blocking pool, a small one on the
    // runtime's thread: this one goes the first way.
    let state = State::new();
    let first = state.start();
    let padding = "x".repeat(100_000);
    let mut request = bash("echo ready; exec sleep 1000", Some("large"));
    request
        .process
        .as_mut()
        .expect("a process config")
        .envs
        .insert("PADDING".into(), padding.clone());
    let pid = start_and_see(&first, request, "ready").await;
    let table = state.path().join("processes.json");
    let saved = std::fs::read(&table).expect("the process table");
    assert!(saved.len() > 100_000, "the table holds the environment");
    first.signal_and_wait(Signal::SIGKILL);

    let second = state.start();
    let adopted = listed(&second, pid).await;
    assert_eq!(adopted.tag.as_deref(), Some("large"));
    let envs = &adopted.config.as_ref().expect("config").envs;
    assert_eq!(envs.get("PADDING"), Some(&padding));
}

/// Waits for the one nursery of the daemon on `state` and its one spare; the nursery's pid.
async fn nursery_with_a_spare(state: &State) -> u32 {
    wait_until("the nursery and its spare", Duration::from_secs(10), || {
        daemon_helpers(state.path(), "__spares").len() == 1 && keepers(state.path()).len() == 1
    })
    .await;
    daemon_helpers(state.path(), "__spares")[0]
}

#[tokio::test]
async fn spare_keepers_are_forked_by_a_nursery_that_goes_with_the_daemon() {
    let state = State::new();
    let daemon = state.start();
    let nursery = nursery_with_a_spare(&state).await;
    assert_eq!(
        state_and_parent(nursery).map(|(_, p)| p),
        Some(daemon.pid())
    );
    let spare = keepers(state.path())[0];
    assert_eq!(
        state_and_parent(spare).map(|(_, p)| p),
        Some(nursery),
        "the spare is the nursery's child"
    );
    // Its command line is a keeper's, naming its own socket.
    let cmdline = std::fs::read(format!("/proc/{spare}/cmdline")).expect("cmdline");
    let args: Vec<&[u8]> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    assert_eq!(args[1], b"__keeper");
    assert!(
        std::path::Path::new(std::ffi::OsStr::from_bytes(args[2])).starts_with(state.path()),
        "{args:?}"
    );
    for n in 0..10 {
        let line = format!("run {n}");
        start_and_see(&daemon, bash(&format!("echo '{line}'"), None), &line).await;
    }
    // The keepers of ended processes are gone, reaped: one spare waits, no zombies.
    wait_until("one spare and no zombies", Duration::from_secs(10), || {
        keepers(state.path()).len() == 1 && zombies_of(nursery).is_empty()
    })
    .await;
    assert_eq!(
        daemon_helpers(state.path(), "__spares"),
        [nursery],
        "one nursery"
    );
    daemon.signal_and_wait(Signal::SIGKILL);
    wait_until(
        "the nursery and the spare to go with the daemon",
        Duration::from_secs(10),
        || daemon_helpers(state.path(), "__spares").is_empty() && keepers(state.path()).is_empty(),
    )
    .await;
}

#[tokio::test]
async fn a_nursery_that_dies_is_replaced_and_starts_go_on() {
    let state = State::new();
    let daemon = state.start();
    let first = nursery_with_a_spare(&state).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGKILL)
        .expect("kill the nursery");
    for n in 0..4 {
        let line = format!("after {n}");
        start_and_see(&daemon, bash(&format!("echo '{line}'"), None), &line).await;
    }
    wait_until(
        "a new nursery",
        Duration::from_secs(10),
        || matches!(daemon_helpers(state.path(), "__spares")[..], [other] if other != first),
    )
    .await;
    wait_until("one spare", Duration::from_secs(10), || {
        keepers(state.path()).len() == 1
    })
    .await;
}
