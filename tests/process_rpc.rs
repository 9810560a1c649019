//! The process service against the real binary, with a tonic gRPC client and a Connect
//! client: output, exit codes, environment, users, binary output, PTYs, stdin, signals to
//! whole groups, deadlines, reconnects, tags, keepalives, retention.

mod common;

use std::time::Duration;

use common::process::{Collected, collect, collect_rest, started};
use common::{Daemon, envelope, envelopes, grpc_channel, http};
use envd::proto::process::{
    self as pb, process_client::ProcessClient, process_event::Event, process_selector::Selector,
};
use tonic::transport::Channel;

fn start_request(cmd: &str, args: &[&str]) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn bash(script: &str) -> pb::StartRequest {
    start_request("/bin/bash", &["-c", script])
}

fn pid(pid: u32) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(Selector::Pid(pid)),
    })
}

fn tag(tag: &str) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(Selector::Tag(tag.into())),
    })
}

async fn client(daemon: &Daemon) -> ProcessClient<Channel> {
    ProcessClient::new(grpc_channel(daemon).await)
}

async fn run(client: &mut ProcessClient<Channel>, request: pb::StartRequest) -> Collected {
    let stream = client.start(request).await.expect("start").into_inner();
    collect(stream).await
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Children of `parent` that are zombies (exited, not reaped).
fn zombie_children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Fields after the command name: state, ppid, ...
            let rest = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            state == Some("Z") && ppid == Some(parent)
        })
        .collect()
}

#[tokio::test]
async fn output_exit_codes_env_and_cwd() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let out = run(&mut client, bash("echo out; echo err >&2; exit 3")).await;
    assert!(out.pid > 0);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let end = out.end.expect("end");
    assert_eq!(
        (end.exit_code, end.exited, end.status.as_str()),
        (3, true, "exit status 3")
    );
    assert_eq!(end.error.as_deref(), Some("exit status 3"));

    let mut request = bash("echo \"$FOO|$HOME|$USER|$PWD|$E2B_SANDBOX\"");
    let process = request.process.as_mut().expect("config");
    process.envs.insert("FOO".into(), "bar baz".into());
    process.cwd = Some("/tmp".into());
    let out = run(&mut client, request).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "bar baz|/root|root|/tmp|true\n"
    );
    let end = out.end.expect("end");
    assert_eq!((end.exit_code, end.error), (0, None));
}

#[tokio::test]
async fn missing_binaries_and_cwds() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let out = run(&mut client, start_request("/no/such/binary", &["x"])).await;
    assert_eq!(out.end.expect("end").exit_code, 127);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{:?}",
        out.stderr
    );

    let mut request = bash("true");
    request.process.as_mut().expect("config").cwd = Some("/no/such/dir".into());
    let status = client.start(request).await.expect_err("bad cwd");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("cwd '/no/such/dir' does not exist"),
        "{status:?}"
    );
}

#[tokio::test]
async fn runs_as_the_requested_user() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipping: switching users needs root");
        return;
    }
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut config = bash("id -u; id -g; echo $USER $HOME");
    // nobody's home usually does not exist, and the working directory must.
    config.process.as_mut().expect("config").cwd = Some("/tmp".into());
    let mut request = tonic::Request::new(config);
    // Basic base64("nobody:")
    request.metadata_mut().insert(
        "authorization",
        "Basic bm9ib2R5Og==".parse().expect("header"),
    );
    let stream = client.start(request).await.expect("start").into_inner();
    let out = collect(stream).await;
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("nobody exists");
    let want = format!(
        "{}\n{}\nnobody {}\n",
        nobody.uid,
        nobody.gid,
        nobody.dir.display()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
}

#[tokio::test]
async fn binary_output_is_byte_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let file = dir.path().join("blob");
    let blob: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &blob).expect("write");
    let out = run(
        &mut client,
        start_request("/bin/cat", &[file.to_str().expect("utf-8")]),
    )
    .await;
    assert_eq!(out.stdout.len(), blob.len());
    assert!(out.stdout == blob, "stdout differs from the file");
    assert_eq!(out.end.expect("end").exit_code, 0);
}

#[tokio::test]
async fn pty_is_a_terminal_and_resizes() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut request = bash("tty; stty size; read line; stty size");
    request.pty = Some(pb::Pty {
        size: Some(pb::pty::Size {
            cols: 100,
            rows: 30,
        }),
    });
    let (pid, mut stream) = started(&mut client, request).await;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("30 100") {
        let message = stream
            .message()
            .await
            .expect("event")
            .expect("still running");
        if let Some(Event::Data(data)) = message.event.and_then(|e| e.event) {
            if let Some(pb::process_event::data_event::Output::Pty(bytes)) = data.output {
                seen.extend(bytes);
            }
        }
    }
    let status = client
        .close_stdin(pb::CloseStdinRequest {
            process: self::pid(pid),
        })
        .await
        .expect_err("a terminal has no stdin pipe to close");
    assert!(status.message().contains("send Ctrl+D"), "{status:?}");
    client
        .update(pb::UpdateRequest {
            process: self::pid(pid),
            pty: Some(pb::Pty {
                size: Some(pb::pty::Size {
                    cols: 120,
                    rows: 40,
                }),
            }),
        })
        .await
        .expect("resize");
    client
        .send_input(pb::SendInputRequest {
            process: self::pid(pid),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Pty(b"go\n".to_vec())),
            }),
        })
        .await
        .expect("input");
    let mut out = collect_rest(stream).await;
    seen.extend(std::mem::take(&mut out.pty));
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("30 100"), "{text}");
    assert!(text.contains("40 120"), "{text}");
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "a PTY merges output"
    );
    assert_eq!(out.end.expect("end").exit_code, 0);
}

#[tokio::test]
async fn stdin_close_stdin_and_input_errors() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let (pid, stream) = started(&mut client, start_request("/usr/bin/wc", &["-c"])).await;
    for chunk in [&b"hello "[..], b"world"] {
        client
            .send_input(pb::SendInputRequest {
                process: self::pid(pid),
                input: Some(pb::ProcessInput {
                    input: Some(pb::process_input::Input::Stdin(chunk.to_vec())),
                }),
            })
            .await
            .expect("input");
    }
    let status = client
        .send_input(pb::SendInputRequest {
            process: self::pid(pid),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Pty(b"x".to_vec())),
            }),
        })
        .await
        .expect_err("no tty");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let status = client
        .update(pb::UpdateRequest {
            process: self::pid(pid),
            pty: Some(pb::Pty {
                size: Some(pb::pty::Size { cols: 1, rows: 1 }),
            }),
        })
        .await
        .expect_err("no tty to resize");
    assert!(status.message().contains("tty not assigned"), "{status:?}");
    client
        .close_stdin(pb::CloseStdinRequest {
            process: self::pid(pid),
        })
        .await
        .expect("close");
    let out = collect_rest(stream).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "11");

    // Closing twice is fine (the process here does not read stdin, so it is still alive).
    let (pid, stream) = started(&mut client, start_request("/bin/sleep", &["1000"])).await;
    for _ in 0..2 {
        client
            .close_stdin(pb::CloseStdinRequest {
                process: self::pid(pid),
            })
            .await
            .expect("close");
    }
    client
        .send_signal(pb::SendSignalRequest {
            process: self::pid(pid),
            signal: pb::Signal::Sigkill as i32,
        })
        .await
        .expect("kill");
    assert_eq!(
        collect_rest(stream).await.end.expect("end").status,
        "signal: killed"
    );

    // stdin: false means /dev/null: `cat` ends at once.
    let mut request = start_request("/bin/cat", &[]);
    request.stdin = Some(false);
    let out = run(&mut client, request).await;
    assert_eq!(out.end.expect("end").exit_code, 0);
}

#[tokio::test]
async fn stream_input_orders_data_and_refuses_data_before_start() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let (pid, stream) = started(&mut client, start_request("/bin/cat", &[])).await;
    use pb::stream_input_request::{DataEvent, Event as In, StartEvent};
    let mut messages = vec![pb::StreamInputRequest {
        event: Some(In::Start(StartEvent {
            process: self::pid(pid),
        })),
    }];
    for i in 0..50 {
        messages.push(pb::StreamInputRequest {
            event: Some(In::Data(DataEvent {
                input: Some(pb::ProcessInput {
                    input: Some(pb::process_input::Input::Stdin(
                        format!("{i},").into_bytes(),
                    )),
                }),
            })),
        });
    }
    client
        .stream_input(futures_util::stream::iter(messages))
        .await
        .expect("stream input");
    client
        .close_stdin(pb::CloseStdinRequest {
            process: self::pid(pid),
        })
        .await
        .expect("close");
    let out = collect_rest(stream).await;
    let want: String = (0..50).map(|i| format!("{i},")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);

    let early = pb::StreamInputRequest {
        event: Some(In::Data(DataEvent {
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Stdin(b"x".to_vec())),
            }),
        })),
    };
    let status = client
        .stream_input(futures_util::stream::iter([early]))
        .await
        .expect_err("data before start");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
}

/// Fields 5 to 7 of `/proc/<pid>/stat` as a process printed its own: process group,
/// session and controlling terminal (0 for none).
fn ids(stat: &[u8]) -> [i64; 3] {
    let text = String::from_utf8_lossy(stat);
    let fields: Vec<i64> = text
        .rsplit_once(')')
        .expect("a stat line")
        .1
        .split_whitespace()
        .skip(2)
        .take(3)
        .map(|f| f.parse().expect("a number"))
        .collect();
    fields.try_into().expect("three fields")
}

#[tokio::test]
async fn a_process_leads_a_session_of_its_own_with_a_terminal_only_when_asked() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    for with_terminal in [false, true] {
        // `exec`, so the process that reads its stat is the one started.
        let mut request = bash("exec cat /proc/self/stat");
        if with_terminal {
            request.pty = Some(pb::Pty {
                size: Some(pb::pty::Size { cols: 80, rows: 24 }),
            });
        }
        let out = collect(client.start(request).await.expect("start").into_inner()).await;
        let [group, session, terminal] = ids(if with_terminal { &out.pty } else { &out.stdout });
        assert_eq!(
            (group, session),
            (i64::from(out.pid), i64::from(out.pid)),
            "leads its own session and process group (signals reach the group); terminal: {with_terminal}"
        );
        assert_eq!(
            terminal != 0,
            with_terminal,
            "a controlling terminal only with a PTY"
        );
    }
}

#[tokio::test]
async fn kill_reaches_the_whole_group() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let (pid, mut stream) = started(&mut client, bash("sleep 1000 & echo $!; wait")).await;
    let message = stream.message().await.expect("event").expect("open");
    let Some(Event::Data(data)) = message.event.and_then(|e| e.event) else {
        panic!("expected the grandchild's pid");
    };
    let Some(pb::process_event::data_event::Output::Stdout(line)) = data.output else {
        panic!("expected stdout");
    };
    let grandchild: u32 = String::from_utf8_lossy(&line).trim().parse().expect("pid");
    assert!(alive(grandchild));
    client
        .send_signal(pb::SendSignalRequest {
            process: self::pid(pid),
            signal: pb::Signal::Sigkill as i32,
        })
        .await
        .expect("kill");
    let out = collect_rest(stream).await;
    let end = out.end.expect("end");
    assert_eq!(
        (end.exit_code, end.exited, end.status.as_str()),
        (-1, false, "signal: killed")
    );
    // The grandchild was in the group: it is gone (reaped by init, so wait for that).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(grandchild) {
        assert!(
            std::time::Instant::now() < deadline,
            "grandchild {grandchild} survived"
        );
        tokio::task::yield_now().await;
    }
    // The process's keeper is the daemon's child. It exits once the daemon has released
    // it, which comes after the end event, so it may still be exiting here: every child is
    // reaped within the bound, none is left a zombie.
    common::wait_until("every child is reaped", Duration::from_secs(10), || {
        zombie_children(daemon.pid()).is_empty()
    })
    .await;
    let status = client
        .send_signal(pb::SendSignalRequest {
            process: self::pid(pid),
            signal: pb::Signal::Unspecified as i32,
        })
        .await
        .expect_err("unknown pid or bad signal");
    assert!(matches!(
        status.code(),
        tonic::Code::NotFound | tonic::Code::Unimplemented
    ));
}

#[tokio::test]
async fn tags_select_the_right_process() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut pids = Vec::new();
    let mut streams = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let mut request = start_request("/bin/cat", &[]);
        request.tag = Some(name.into());
        let (pid, stream) = started(&mut client, request).await;
        pids.push(pid);
        streams.push(stream);
    }
    let listed = client
        .list(pb::ListRequest {})
        .await
        .expect("list")
        .into_inner();
    for (name, pid) in ["alpha", "beta", "gamma"].iter().zip(&pids) {
        let info = listed
            .processes
            .iter()
            .find(|p| p.pid == *pid)
            .expect("listed");
        assert_eq!(info.tag.as_deref(), Some(*name));
        assert_eq!(info.config.as_ref().expect("config").cmd, "/bin/cat");
    }
    client
        .send_signal(pb::SendSignalRequest {
            process: tag("beta"),
            signal: pb::Signal::Sigterm as i32,
        })
        .await
        .expect("kill beta");
    let beta = collect_rest(streams.remove(1)).await;
    assert_eq!(beta.end.expect("end").status, "signal: terminated");
    for (name, stream) in [("alpha", streams.remove(0)), ("gamma", streams.remove(0))] {
        client
            .close_stdin(pb::CloseStdinRequest { process: tag(name) })
            .await
            .expect("close");
        let out = collect_rest(stream).await;
        assert_eq!(out.end.expect("end").exit_code, 0, "{name}");
    }
}

#[tokio::test]
async fn a_deadline_kills_the_process_and_ends_the_stream() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut request = tonic::Request::new(bash("echo started; exec sleep 1000"));
    request.set_timeout(Duration::from_millis(1500));
    let (pid, stream) = started(&mut client, request).await;
    let out = collect_rest(stream).await;
    assert_eq!(
        out.error.expect("deadline").code(),
        tonic::Code::DeadlineExceeded
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process outlived its deadline"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn disconnect_list_reconnect_and_retention() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let (pid, stream) = started(&mut client, bash("read line; echo got $line")).await;
    drop(stream);
    let listed = client
        .list(pb::ListRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.processes.iter().any(|p| p.pid == pid),
        "still running after the client left"
    );
    let connected = client
        .connect(pb::ConnectRequest {
            process: self::pid(pid),
        })
        .await
        .expect("connect")
        .into_inner();
    client
        .send_input(pb::SendInputRequest {
            process: self::pid(pid),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Stdin(b"back\n".to_vec())),
            }),
        })
        .await
        .expect("input");
    let out = collect(connected).await;
    assert_eq!(out.pid, pid);
    assert_eq!(out.stdout, b"got back\n");
    assert_eq!(out.end.expect("end").exit_code, 0);

    // After the end, Connect still reports the retained exit.
    let late = client
        .connect(pb::ConnectRequest {
            process: self::pid(pid),
        })
        .await
        .expect("late connect")
        .into_inner();
    let out = collect(late).await;
    assert_eq!(out.end.expect("retained end").exit_code, 0);

    let status = client
        .connect(pb::ConnectRequest {
            process: self::pid(999_999_999),
        })
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn keepalives_flow_on_quiet_streams_and_bad_intervals_are_harmless() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    let mut request = tonic::Request::new(bash("exec sleep 2.5"));
    request
        .metadata_mut()
        .insert("keepalive-ping-interval", "1".parse().expect("header"));
    let stream = client.start(request).await.expect("start").into_inner();
    let out = collect(stream).await;
    assert!(out.keepalives >= 1, "{out:?}");
    for bad in ["0", "-5", "soon"] {
        let mut request = tonic::Request::new(bash("echo fine"));
        request
            .metadata_mut()
            .insert("keepalive-ping-interval", bad.parse().expect("header"));
        let stream = client.start(request).await.expect("start").into_inner();
        let out = collect(stream).await;
        assert_eq!(out.stdout, b"fine\n", "interval {bad}");
    }
}

#[tokio::test]
async fn connect_json_streams_and_errors() {
    let daemon = Daemon::start();
    let body = envelope(
        0,
        br#"{"process":{"cmd":"/bin/bash","args":["-c","printf hi"]},"stdin":false}"#,
    );
    let response = http()
        .post(daemon.url("/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header("keepalive-ping-interval", "50")
        .header("connect-timeout-ms", "60000")
        .body(body)
        .send()
        .await
        .expect("start");
    assert_eq!(response.status(), 200);
    let frames = envelopes(response.bytes().await.expect("body"));
    let json: Vec<serde_json::Value> = frames
        .iter()
        .map(|(_, payload)| serde_json::from_slice(payload).expect("json"))
        .collect();
    assert!(
        json[0]["event"]["start"]["pid"].as_u64().is_some(),
        "{json:?}"
    );
    assert_eq!(json[1]["event"]["data"]["stdout"], "aGk=");
    assert_eq!(json[2]["event"]["end"]["status"], "exit status 0");
    assert_eq!(frames.last().expect("end-stream").0, 0x02);
    assert_eq!(
        json.last().expect("end-stream"),
        &serde_json::json!({"metadata": {"envd-end-reason": ["exit"]}}),
        "a clean end carries why the process ended"
    );

    // An unknown pid on a stream is HTTP 200 with a not_found end-stream error.
    let response = http()
        .post(daemon.url("/process.Process/Connect"))
        .header("content-type", "application/connect+json")
        .body(envelope(0, br#"{"process":{"pid":999999999}}"#))
        .send()
        .await
        .expect("connect");
    assert_eq!(response.status(), 200);
    let frames = envelopes(response.bytes().await.expect("body"));
    let (flags, payload) = frames.last().expect("end-stream");
    assert_eq!(*flags, 0x02);
    let end: serde_json::Value = serde_json::from_slice(payload).expect("json");
    assert_eq!(end["error"]["code"], "not_found");
    assert_eq!(
        end["error"]["message"],
        "process with pid 999999999 not found"
    );
}

/// The kernel function a process is sleeping in.
fn wchan(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
}

#[tokio::test]
async fn a_flood_nobody_reads_keeps_memory_bounded() {
    let daemon = Daemon::start();
    let mut client = client(&daemon).await;
    // 2 GiB of output; the client reads nothing after `start`.
    let (pid, stream) = started(&mut client, bash("exec head -c 2147483648 /dev/zero")).await;
    // Back-pressure: the writer ends up blocked on its full pipe instead of the daemon
    // buffering what it writes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !wchan(pid).contains("pipe") {
        assert!(
            alive(pid),
            "the writer finished: its output was buffered, not back-pressured"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "writer never blocked (wchan {})",
            wchan(pid)
        );
        tokio::task::yield_now().await;
    }
    let rss_kib = daemon.status_kib("VmRSS");
    assert!(
        rss_kib < 64 * 1024,
        "daemon RSS {rss_kib} KiB while a client lags"
    );
    // Once the client leaves, output is discarded and the writer runs to its end.
    drop(stream);
    let connected = client
        .connect(pb::ConnectRequest {
            process: self::pid(pid),
        })
        .await;
    drop(connected);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "writer still blocked with nobody subscribed"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_stalled_subscriber_does_not_stall_a_live_one() {
    let daemon = Daemon::start();
    let mut starter = client(&daemon).await;
    let (pid, mut stalled) = started(
        &mut starter,
        bash("read go; head -c 67108864 /dev/zero; echo done"),
    )
    .await;
    // A second subscriber on its own connection reads everything.
    let mut reader = client(&daemon).await;
    let live = reader
        .connect(pb::ConnectRequest {
            process: self::pid(pid),
        })
        .await
        .expect("connect")
        .into_inner();
    starter
        .send_input(pb::SendInputRequest {
            process: self::pid(pid),
            input: Some(pb::ProcessInput {
                input: Some(pb::process_input::Input::Stdin(b"go\n".to_vec())),
            }),
        })
        .await
        .expect("input");
    let out = collect(live).await;
    assert_eq!(
        out.stdout.len(),
        64 * 1024 * 1024 + 5,
        "the live subscriber lost output"
    );
    assert_eq!(out.end.expect("end").exit_code, 0);
    // The stalled one was dropped with a clear error once it fell behind.
    let status = loop {
        match stalled.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stalled subscriber's stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
}

#[tokio::test]
async fn grpc_web_streams_a_process() {
    use prost::Message;
    let daemon = Daemon::start();
    let request = bash("printf web").encode_to_vec();
    let response = http()
        .post(daemon.url("/process.Process/Start"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(envelope(0, &request))
        .send()
        .await
        .expect("start");
    assert_eq!(response.status(), 200);
    let frames = envelopes(response.bytes().await.expect("body"));
    let (trailer_flags, trailers) = frames.last().expect("trailers");
    assert_eq!(*trailer_flags & 0x80, 0x80);
    assert!(String::from_utf8_lossy(trailers).contains("grpc-status:0"));
    let events: Vec<Event> = frames[..frames.len() - 1]
        .iter()
        .map(|(_, payload)| {
            pb::StartResponse::decode(payload.clone())
                .expect("message")
                .event
                .and_then(|e| e.event)
                .expect("event")
        })
        .collect();
    assert!(matches!(events.first(), Some(Event::Start(_))));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Data(pb::process_event::DataEvent { output: Some(pb::process_event::data_event::Output::Stdout(b)) }) if b == b"web"
    )));
    assert!(matches!(events.last(), Some(Event::End(end)) if end.exit_code == 0));
}
