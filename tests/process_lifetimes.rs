//! Process deadlines through the `envd_ext.Processes` extension: stable `end_at`,
//! SetTimeout (extend, shorten, remove, storms, bad values), the SIGTERM-then-SIGKILL kill
//! path that takes the whole group, and the end reason clients can read.

mod common;

use std::time::{Duration, SystemTime};

use common::process::{alive, read_stdout_until, started, wait_dead};
use common::{Daemon, envelope, envelopes, grpc_channel, http};
use envd::proto::envd_ext::{self as ext, processes_client::ProcessesClient};
use envd::proto::process::{self as pb, process_client::ProcessClient, process_selector::Selector};
use tonic::transport::Channel;

struct Clients {
    process: ProcessClient<Channel>,
    ext: ProcessesClient<Channel>,
}

async fn clients(daemon: &Daemon) -> Clients {
    let channel = grpc_channel(daemon).await;
    Clients {
        process: ProcessClient::new(channel.clone()),
        ext: ProcessesClient::new(channel),
    }
}

fn by_pid(pid: u32) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(Selector::Pid(pid)),
    })
}

fn bash(script: &str) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Starts a process (optionally with a `Connect-Timeout-Ms` deadline) and returns its pid
/// once `start` arrived; the stream is dropped (the process keeps running).
async fn start(clients: &mut Clients, script: &str, deadline: Option<Duration>) -> u32 {
    let mut request = tonic::Request::new(bash(script));
    if let Some(deadline) = deadline {
        request.set_timeout(deadline);
    }
    started(&mut clients.process, request).await.0
}

async fn set_timeout(
    clients: &mut Clients,
    pid: u32,
    timeout_ms: i64,
) -> Result<Option<SystemTime>, tonic::Status> {
    let response = clients
        .ext
        .set_timeout(ext::SetTimeoutRequest {
            process: by_pid(pid),
            timeout_ms,
        })
        .await?
        .into_inner();
    Ok(response.end_at.map(system_time))
}

fn system_time(ts: envd::proto::wkt::Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(ts.seconds).expect("after 1970"),
            u32::try_from(ts.nanos).expect("nanos"),
        )
}

async fn listed(clients: &mut Clients, pid: u32) -> ext::ManagedProcess {
    let list = clients
        .ext
        .list(ext::ListProcessesRequest {})
        .await
        .expect("list")
        .into_inner();
    list.processes
        .into_iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("pid {pid} not listed"))
}

/// Attaches with Connect over Connect JSON and returns (stdout, end event JSON, end-stream JSON).
async fn attach(daemon: &Daemon, pid: u32) -> (String, serde_json::Value, serde_json::Value) {
    let response = http()
        .post(daemon.url("/process.Process/Connect"))
        .header("content-type", "application/connect+json")
        .body(envelope(
            0,
            format!(r#"{{"process":{{"pid":{pid}}}}}"#).as_bytes(),
        ))
        .send()
        .await
        .expect("connect");
    assert_eq!(response.status(), 200);
    let frames = envelopes(response.bytes().await.expect("body"));
    let mut stdout = Vec::new();
    let mut end = serde_json::Value::Null;
    let mut end_stream = serde_json::Value::Null;
    for (flags, payload) in frames {
        let json: serde_json::Value = serde_json::from_slice(&payload).expect("json");
        if flags & 0x02 != 0 {
            end_stream = json;
        } else if let Some(data) = json["event"]["data"]["stdout"].as_str() {
            use base64::Engine;
            stdout.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .expect("base64"),
            );
        } else if !json["event"]["end"].is_null() {
            end = json["event"]["end"].clone();
        }
    }
    (String::from_utf8(stdout).expect("utf-8"), end, end_stream)
}

#[tokio::test]
async fn a_deadline_terminates_the_whole_group_and_says_why() {
    let daemon = Daemon::start();
    let mut c = clients(&daemon).await;
    // The shell prints its background child's pid, then waits for it.
    // Started with a one-minute deadline, which the test then shortens.
    let mut request = tonic::Request::new(bash("sleep 1000 & echo $!; wait"));
    request.set_timeout(Duration::from_secs(60));
    let (pid, mut stream) = started(&mut c.process, request).await;
    let line = read_stdout_until(&mut stream, |seen| !seen.is_empty()).await;
    let grandchild: u32 = line.trim().parse().expect("pid");
    drop(stream);
    assert!(alive(grandchild));
    let before = listed(&mut c, pid).await;
    let original = before
        .end_at
        .map(system_time)
        .expect("a deadline from Connect-Timeout-Ms");
    assert!(
        original > SystemTime::now() + Duration::from_secs(50),
        "about a minute away"
    );
    assert_eq!(before.state(), ext::ProcessState::Running);
    let end_at = set_timeout(&mut c, pid, 500)
        .await
        .expect("shorten")
        .expect("end_at");
    assert!(end_at < original);
    assert_eq!(
        listed(&mut c, pid).await.end_at.map(system_time),
        Some(end_at),
        "the deadline in force"
    );

    let (_, end, end_stream) = attach(&daemon, pid).await;
    assert_eq!(end["status"], "signal: terminated", "{end}");
    assert_eq!(
        end_stream["metadata"]["envd-end-reason"],
        serde_json::json!(["deadline"])
    );
    wait_dead(grandchild).await;
    let after = listed(&mut c, pid).await;
    assert_eq!(after.state(), ext::ProcessState::Exited);
    assert_eq!(after.end_reason(), ext::EndReason::Deadline);
    assert_eq!(after.end.expect("end").status, "signal: terminated");
}

#[tokio::test]
async fn sigkill_follows_the_grace_when_sigterm_is_ignored() {
    let daemon = Daemon::start_with(&["--kill-grace-ms", "300"], &[]);
    let mut c = clients(&daemon).await;
    let pid = start(
        &mut c,
        "trap '' TERM; echo ready; sleep 1000",
        Some(Duration::from_millis(800)),
    )
    .await;
    let (_, end, end_stream) = attach(&daemon, pid).await;
    assert_eq!(end["status"], "signal: killed", "{end}");
    assert_eq!(
        end_stream["metadata"]["envd-end-reason"],
        serde_json::json!(["deadline"])
    );
}

#[tokio::test]
async fn extending_before_expiry_keeps_the_process_alive() {
    let daemon = Daemon::start();
    let mut c = clients(&daemon).await;
    let started = SystemTime::now();
    let pid = start(
        &mut c,
        "sleep 2; echo survived",
        Some(Duration::from_millis(1000)),
    )
    .await;
    let original = listed(&mut c, pid)
        .await
        .end_at
        .map(system_time)
        .expect("deadline from Connect-Timeout-Ms");
    assert!(original > started && original <= started + Duration::from_millis(1500));
    // Stable: read again, same value.
    assert_eq!(
        listed(&mut c, pid).await.end_at.map(system_time),
        Some(original)
    );
    let extended = set_timeout(&mut c, pid, 30_000)
        .await
        .expect("extend")
        .expect("end_at");
    assert!(extended > original);
    let (stdout, end, end_stream) = attach(&daemon, pid).await;
    assert_eq!(
        stdout, "survived\n",
        "the process outlived its original deadline"
    );
    assert_eq!(
        end["exitCode"],
        serde_json::Value::Null,
        "exit code 0 is omitted in JSON: {end}"
    );
    assert_eq!(end["status"], "exit status 0");
    assert_eq!(
        end_stream["metadata"]["envd-end-reason"],
        serde_json::json!(["exit"])
    );
}

#[tokio::test]
async fn removing_the_deadline_and_bad_values() {
    let daemon = Daemon::start_with(&["--max-process-timeout-secs", "10"], &[]);
    let mut c = clients(&daemon).await;
    let pid = start(
        &mut c,
        "sleep 1.5; echo kept",
        Some(Duration::from_millis(700)),
    )
    .await;
    assert_eq!(set_timeout(&mut c, pid, 0).await.expect("remove"), None);
    assert!(listed(&mut c, pid).await.end_at.is_none());
    for (bad, code) in [
        (-1i64, tonic::Code::InvalidArgument),
        (10_001, tonic::Code::InvalidArgument),
    ] {
        let status = set_timeout(&mut c, pid, bad).await.expect_err("refused");
        assert_eq!(status.code(), code, "{bad}");
    }
    let (stdout, _, end_stream) = attach(&daemon, pid).await;
    assert_eq!(stdout, "kept\n");
    assert_eq!(
        end_stream["metadata"]["envd-end-reason"],
        serde_json::json!(["exit"])
    );
    let status = set_timeout(&mut c, pid, 1000).await.expect_err("exited");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let status = set_timeout(&mut c, 999_999_999, 1000)
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn signals_say_signal() {
    let daemon = Daemon::start();
    let mut c = clients(&daemon).await;
    let pid = start(&mut c, "sleep 1000", None).await;
    let attached = tokio::spawn({
        let daemon_url = daemon.url("/process.Process/Connect");
        async move {
            http()
                .post(daemon_url)
                .header("content-type", "application/connect+json")
                .body(envelope(
                    0,
                    format!(r#"{{"process":{{"pid":{pid}}}}}"#).as_bytes(),
                ))
                .send()
                .await
                .expect("connect")
                .bytes()
                .await
                .expect("body")
        }
    });
    // Whether the attach subscribes before or after the kill, it gets the end (live or retained).
    c.process
        .send_signal(pb::SendSignalRequest {
            process: by_pid(pid),
            signal: pb::Signal::Sigkill as i32,
        })
        .await
        .expect("kill");
    let frames = envelopes(attached.await.expect("attach"));
    let end_stream: serde_json::Value =
        serde_json::from_slice(&frames.last().expect("end").1).expect("json");
    assert_eq!(
        end_stream["metadata"]["envd-end-reason"],
        serde_json::json!(["signal"])
    );
    wait_dead(pid).await;
    let after = listed(&mut c, pid).await;
    assert_eq!(after.end_reason(), ext::EndReason::Signal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_set_timeout_storm_leaves_the_last_acknowledged_deadline() {
    let daemon = Daemon::start();
    let mut c = clients(&daemon).await;
    let pid = start(&mut c, "sleep 1000", None).await;
    let mut tasks = Vec::new();
    for i in 0..100i64 {
        let mut ext = c.ext.clone();
        tasks.push(tokio::spawn(async move {
            let timeout_ms = 60_000 + i * 1000;
            ext.set_timeout(ext::SetTimeoutRequest {
                process: by_pid(pid),
                timeout_ms,
            })
            .await
            .expect("set")
            .into_inner()
            .end_at
            .map(system_time)
            .expect("end_at")
        }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.push(task.await.expect("task"));
    }
    let in_force = listed(&mut c, pid)
        .await
        .end_at
        .map(system_time)
        .expect("deadline");
    assert!(
        acknowledged.contains(&in_force),
        "the deadline in force was acknowledged to someone"
    );
    // Sequentially, the last acknowledged value is exactly what is in force.
    for timeout_ms in [5_000, 90_000, 45_000] {
        let acked = set_timeout(&mut c, pid, timeout_ms)
            .await
            .expect("set")
            .expect("end_at");
        assert_eq!(
            listed(&mut c, pid).await.end_at.map(system_time),
            Some(acked)
        );
    }
    c.process
        .send_signal(pb::SendSignalRequest {
            process: by_pid(pid),
            signal: pb::Signal::Sigkill as i32,
        })
        .await
        .expect("kill");
}

#[tokio::test]
async fn extension_works_over_connect_json() {
    let daemon = Daemon::start();
    let mut c = clients(&daemon).await;
    let pid = start(&mut c, "sleep 1000", None).await;
    let (status, body) = common::connect_json(
        &daemon,
        "/envd_ext.Processes/SetTimeout",
        serde_json::json!({"process": {"pid": pid}, "timeoutMs": "60000"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["endAt"].as_str().expect("endAt").ends_with('Z'));
    let (status, body) =
        common::connect_json(&daemon, "/envd_ext.Processes/List", serde_json::json!({})).await;
    assert_eq!(status, 200);
    let entry = body["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
        .expect("listed")
        .clone();
    assert_eq!(entry["state"], "PROCESS_STATE_RUNNING");
    c.process
        .send_signal(pb::SendSignalRequest {
            process: by_pid(pid),
            signal: pb::Signal::Sigkill as i32,
        })
        .await
        .expect("kill");
}
