//! `POST /patches` and `GET /patches` against the real binary: order, skips, failures and
//! resuming, conflicts, timeouts that kill only the patch's group, concurrent calls, the
//! record across restarts and copies (as a snapshot carries it), the token, validation.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::process::{alive, started, wait_dead};
use common::{Daemon, TOKEN_HEADER, http, init_args};
use serde_json::{Value, json};

/// A daemon whose record lives in a fresh temp directory, with a short kill grace.
struct Sandbox {
    dir: tempfile::TempDir,
    daemon: Daemon,
}

impl Sandbox {
    fn start() -> Sandbox {
        let dir = tempfile::tempdir().expect("tempdir");
        let daemon = start_daemon(&dir.path().join("state/patches.json"), dir.path());
        Sandbox { dir, daemon }
    }

    fn record(&self) -> PathBuf {
        self.dir.path().join("state/patches.json")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

/// Starts a daemon recording patches in `record`; `/init` stays away from the machine's
/// clock and trust store (CA files go to `ca_dir`).
fn start_daemon(record: &Path, ca_dir: &Path) -> Daemon {
    start_daemon_with(record, ca_dir, &[])
}

fn start_daemon_with(record: &Path, ca_dir: &Path, envs: &[(&str, &str)]) -> Daemon {
    let mut args = init_args(ca_dir);
    args.extend([
        "--patch-record-file".to_owned(),
        record.to_str().expect("utf-8").to_owned(),
        "--kill-grace-ms".to_owned(),
        "300".to_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start_with(&args, envs)
}

/// A script appending `line` to `log`.
fn append(log: &Path, line: &str) -> String {
    format!("echo '{line}' >> '{}'", log.display())
}

/// `{"patches": [...]}` from `(sequence, script)` pairs.
fn body(patches: &[(u64, String)]) -> Value {
    json!({
        "patches": patches
            .iter()
            .map(|(sequence, script)| json!({"sequence": sequence, "script": script}))
            .collect::<Vec<_>>()
    })
}

async fn post_as(daemon: &Daemon, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut request = http()
        .post(daemon.url("/patches"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    let response = request.send().await.expect("POST /patches");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{text:?}: {err}"));
    (status, json)
}

async fn post(daemon: &Daemon, body: Value) -> (u16, Value) {
    post_as(daemon, body, None).await
}

/// A POST that must be answered 200; returns the attempt.
async fn apply(daemon: &Daemon, body: Value) -> Value {
    let (status, json) = post(daemon, body).await;
    assert_eq!(status, 200, "{json}");
    json
}

async fn get_as(daemon: &Daemon, token: Option<&str>) -> (u16, Value) {
    let mut request = http().get(daemon.url("/patches"));
    if let Some(token) = token {
        request = request.header(TOKEN_HEADER, token);
    }
    let response = request.send().await.expect("GET /patches");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

async fn get(daemon: &Daemon) -> Value {
    let (status, json) = get_as(daemon, None).await;
    assert_eq!(status, 200, "{json}");
    json
}

/// `(sequence, status)` of every result of an attempt.
fn statuses(attempt: &Value) -> Vec<(u64, String)> {
    attempt["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["sequence"].as_u64().expect("sequence"),
                r["status"].as_str().expect("status").to_owned(),
            )
        })
        .collect()
}

fn expect(pairs: &[(u64, &str)]) -> Vec<(u64, String)> {
    pairs.iter().map(|(s, t)| (*s, (*t).to_owned())).collect()
}

#[tokio::test]
async fn applies_in_ascending_order_and_a_resend_is_a_no_op() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    let empty = get(&sandbox.daemon).await;
    assert_eq!(
        empty,
        json!({"lastApplied": 0, "applied": [], "running": null, "lastAttempt": null})
    );
    // Sent out of order; applied (and answered) in ascending order.
    let patches = [
        (3, append(&log, "three")),
        (1, append(&log, "one")),
        (2, append(&log, "two")),
    ];
    let attempt = apply(&sandbox.daemon, body(&patches)).await;
    assert_eq!(
        statuses(&attempt),
        expect(&[(1, "applied"), (2, "applied"), (3, "applied")])
    );
    assert_eq!(attempt["lastApplied"], 3);
    assert!(attempt["results"][0]["durationMs"].is_u64(), "{attempt}");
    assert_eq!(sandbox.log_text(), "one\ntwo\nthree\n");

    let again = apply(&sandbox.daemon, body(&patches)).await;
    assert_eq!(
        statuses(&again),
        expect(&[(1, "skipped"), (2, "skipped"), (3, "skipped")])
    );
    assert_eq!(sandbox.log_text(), "one\ntwo\nthree\n", "nothing ran again");

    let record: Value =
        serde_json::from_slice(&std::fs::read(sandbox.record()).expect("record")).expect("JSON");
    assert_eq!(record["version"], 1);
    assert_eq!(record["lastApplied"], 3);
    let listed = get(&sandbox.daemon).await;
    assert_eq!(listed["lastApplied"], 3);
    assert_eq!(listed["applied"], record["applied"]);
    assert_eq!(listed["running"], Value::Null);
    assert_eq!(statuses(&listed["lastAttempt"]), statuses(&again));
    // Only new patches may be sent; sequences need not be contiguous.
    let later = apply(&sandbox.daemon, body(&[(10, append(&log, "ten"))])).await;
    assert_eq!(statuses(&later), expect(&[(10, "applied")]));
    assert_eq!(sandbox.log_text(), "one\ntwo\nthree\nten\n");
    let leftovers: Vec<_> = std::fs::read_dir(sandbox.record().parent().expect("dir"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers, ["patches.json"], "no temp files");
}

#[tokio::test]
async fn a_failure_stops_the_chain_and_the_fixed_patch_resumes_it() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    let broken = format!(
        "{}\necho partial; echo 'oops: no such package' >&2; exit 2",
        append(&log, "two-started")
    );
    let attempt = apply(
        &sandbox.daemon,
        body(&[
            (1, append(&log, "one")),
            (2, broken),
            (3, append(&log, "three")),
        ]),
    )
    .await;
    assert_eq!(
        statuses(&attempt),
        expect(&[(1, "applied"), (2, "failed"), (3, "not_run")])
    );
    let failed = &attempt["results"][1];
    assert_eq!(failed["exitCode"], 2, "{failed}");
    assert_eq!(failed["error"], "exit status 2");
    assert_eq!(failed["timedOut"], false);
    assert_eq!(failed["stdout"], "partial\n");
    assert_eq!(failed["stderr"], "oops: no such package\n");
    assert_eq!(failed["stderrTruncated"], false);
    assert!(failed["durationMs"].is_u64());
    assert_eq!(attempt["lastApplied"], 1);
    assert_eq!(sandbox.log_text(), "one\ntwo-started\n");

    // The control plane reads the failure back.
    let status = get(&sandbox.daemon).await;
    assert_eq!(status["lastApplied"], 1);
    assert_eq!(status["lastAttempt"]["results"][1], *failed);
    assert_eq!(status["lastAttempt"]["lastApplied"], 1);

    // A failed patch was not applied: the same sequence with a fixed script runs.
    let resumed = apply(
        &sandbox.daemon,
        body(&[
            (1, append(&log, "one")),
            (2, append(&log, "two-fixed")),
            (3, append(&log, "three")),
        ]),
    )
    .await;
    assert_eq!(
        statuses(&resumed),
        expect(&[(1, "skipped"), (2, "applied"), (3, "applied")])
    );
    assert_eq!(sandbox.log_text(), "one\ntwo-started\ntwo-fixed\nthree\n");
    assert_eq!(get(&sandbox.daemon).await["lastAttempt"]["lastApplied"], 3);
}

#[tokio::test]
async fn a_reused_sequence_is_a_conflict_and_nothing_runs() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    apply(&sandbox.daemon, body(&[(1, append(&log, "one"))])).await;
    let (status, error) = post(
        &sandbox.daemon,
        body(&[(1, append(&log, "ONE")), (2, append(&log, "two"))]),
    )
    .await;
    assert_eq!(status, 409, "{error}");
    assert_eq!(error["code"], 409);
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains("patch 1 was applied with a different script"),
        "{message}"
    );
    assert_eq!(sandbox.log_text(), "one\n", "patch 2 did not run either");

    // A sequence below the last applied one that was never applied here cannot be
    // slipped in out of order.
    apply(&sandbox.daemon, body(&[(3, append(&log, "three"))])).await;
    let (status, error) = post(&sandbox.daemon, body(&[(2, append(&log, "two"))])).await;
    assert_eq!(status, 409, "{error}");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("patch 2 was never applied here and is below the last applied patch 3"),
        "{error}"
    );
    assert_eq!(sandbox.log_text(), "one\nthree\n");
    let status = get(&sandbox.daemon).await;
    assert_eq!(status["lastApplied"], 3);
    assert_eq!(
        statuses(&status["lastAttempt"]),
        expect(&[(3, "applied")]),
        "refused calls are not attempts"
    );
}

async fn start_unrelated_process(daemon: &Daemon) -> u32 {
    use envd::proto::process::{self as pb, process_client::ProcessClient};
    let mut client = ProcessClient::new(common::grpc_channel(daemon).await);
    let request = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/sleep".into(),
            args: vec!["1000".into()],
            cwd: Some("/".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    // The stream is dropped: the process keeps running.
    started(&mut client, request).await.0
}

#[tokio::test]
async fn a_timeout_kills_the_patch_group_and_nothing_else() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    let mut own = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("sleep");
    let managed = start_unrelated_process(&sandbox.daemon).await;
    let background = sandbox.dir.path().join("background.pid");
    let hanging = format!("sleep 1000 & echo $! > '{}'; wait", background.display());
    let request = json!({"patches": [
        {"sequence": 1, "script": hanging, "timeoutMs": 500},
        {"sequence": 2, "script": append(&log, "two")},
    ]});
    let attempt = apply(&sandbox.daemon, request).await;
    assert_eq!(statuses(&attempt), expect(&[(1, "failed"), (2, "not_run")]));
    let failed = &attempt["results"][0];
    assert_eq!(failed["timedOut"], true, "{failed}");
    assert_eq!(
        failed["error"],
        "timed out after 500 ms (signal: terminated)"
    );
    assert!(
        failed.get("exitCode").is_none(),
        "a signal has no exit code"
    );
    assert!(failed["durationMs"].as_u64().expect("duration") >= 500);
    let background: u32 = std::fs::read_to_string(&background)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    wait_dead(background).await;

    assert!(
        own.try_wait().expect("try_wait").is_none(),
        "the test's own process lives"
    );
    assert!(alive(managed), "a process of the process service lives");
    let _ = own.kill();
    let _ = own.wait();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(managed).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_eq!(sandbox.log_text(), "");
}

#[tokio::test]
async fn a_patch_ignoring_sigterm_is_killed_after_the_grace() {
    let sandbox = Sandbox::start();
    let request = json!({"patches": [
        {"sequence": 1, "script": "trap '' TERM; sleep 1000 & wait", "timeoutMs": 200},
    ]});
    let attempt = apply(&sandbox.daemon, request).await;
    assert_eq!(
        attempt["results"][0]["error"], "timed out after 200 ms (signal: killed)",
        "{attempt}"
    );
}

#[tokio::test]
async fn concurrent_calls_never_run_a_patch_twice() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    // The first patch takes a while, so the other calls arrive while it runs.
    let mut patches = vec![(1, format!("sleep 0.3; {}", append(&log, "1")))];
    patches.extend((2..=5).map(|n| (n, append(&log, &n.to_string()))));
    let request = body(&patches);
    let mut calls = tokio::task::JoinSet::new();
    let url = sandbox.daemon.url("/patches");
    for _ in 0..8 {
        let (url, request) = (url.clone(), request.to_string());
        calls.spawn(async move {
            let response = http().post(url).body(request).send().await.expect("POST");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("JSON")
        });
    }
    let mut applied = std::collections::BTreeMap::<u64, usize>::new();
    while let Some(attempt) = calls.join_next().await {
        for (sequence, status) in statuses(&attempt.expect("call")) {
            match status.as_str() {
                "applied" => *applied.entry(sequence).or_default() += 1,
                "skipped" => {}
                other => panic!("patch {sequence}: {other}"),
            }
        }
    }
    assert_eq!(
        applied,
        (1..=5).map(|n| (n, 1)).collect(),
        "each patch applied by exactly one call"
    );
    assert_eq!(sandbox.log_text(), "1\n2\n3\n4\n5\n");
}

#[tokio::test]
async fn the_record_survives_a_restart() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    let patches = [
        (1, append(&log, "one")),
        (2, append(&log, "two")),
        (3, append(&log, "three")),
    ];
    apply(&sandbox.daemon, body(&patches[..2])).await;
    let Sandbox { dir, daemon } = sandbox;
    drop(daemon);
    let second = start_daemon(&dir.path().join("state/patches.json"), dir.path());
    let status = get(&second).await;
    assert_eq!(status["lastApplied"], 2);
    assert_eq!(status["lastAttempt"], Value::Null, "attempts are not kept");
    let attempt = apply(&second, body(&patches)).await;
    assert_eq!(
        statuses(&attempt),
        expect(&[(1, "skipped"), (2, "skipped"), (3, "applied")])
    );
    assert_eq!(
        std::fs::read_to_string(&log).expect("log"),
        "one\ntwo\nthree\n"
    );
}

#[tokio::test]
async fn a_copied_record_carries_what_was_applied() {
    let parent = Sandbox::start();
    let log = parent.log();
    let patches = [
        (1, append(&log, "one")),
        (2, append(&log, "two")),
        (3, append(&log, "three")),
    ];
    apply(&parent.daemon, body(&patches[..2])).await;
    // What a snapshot does: the fork gets the parent's file.
    let fork_dir = tempfile::tempdir().expect("tempdir");
    let fork_record = fork_dir.path().join("var/lib/envd/patches.json");
    std::fs::create_dir_all(fork_record.parent().expect("dir")).expect("mkdir");
    std::fs::copy(parent.record(), &fork_record).expect("copy");
    let fork = start_daemon(&fork_record, fork_dir.path());
    assert_eq!(
        get(&fork).await["applied"],
        get(&parent.daemon).await["applied"]
    );
    let attempt = apply(&fork, body(&patches)).await;
    assert_eq!(
        statuses(&attempt),
        expect(&[(1, "skipped"), (2, "skipped"), (3, "applied")])
    );
    assert_eq!(
        get(&parent.daemon).await["lastApplied"],
        2,
        "the parent is untouched"
    );
    // The fork inherits the parent's record, so a reused sequence conflicts there too.
    let (status, _) = post(&fork, body(&[(2, append(&log, "TWO"))])).await;
    assert_eq!(status, 409);
    assert_eq!(parent.log_text(), "one\ntwo\nthree\n");
}

#[tokio::test]
async fn the_token_is_required_once_set() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    sandbox
        .daemon
        .init_ok(json!({"accessToken": "s3cret"}))
        .await;
    let request = body(&[(1, append(&log, "one"))]);
    for token in [None, Some("wrong")] {
        let (status, error) = post_as(&sandbox.daemon, request.clone(), token).await;
        assert_eq!(status, 401, "{error}");
        assert_eq!(get_as(&sandbox.daemon, token).await.0, 401);
    }
    assert!(!log.exists(), "nothing ran");
    let (status, attempt) = post_as(&sandbox.daemon, request, Some("s3cret")).await;
    assert_eq!(status, 200);
    assert_eq!(statuses(&attempt), expect(&[(1, "applied")]));
    let (status, listed) = get_as(&sandbox.daemon, Some("s3cret")).await;
    assert_eq!((status, listed["lastApplied"].as_u64()), (200, Some(1)));
}

#[tokio::test]
async fn get_shows_the_running_patch() {
    let sandbox = Sandbox::start();
    let dir = sandbox.dir.path().to_owned();
    let fifo = dir.join("gate");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let started = dir.join("started");
    let script = format!(
        "touch '{}'; cat '{}' > /dev/null",
        started.display(),
        fifo.display()
    );
    let url = sandbox.daemon.url("/patches");
    let call = tokio::spawn(async move {
        let response = http()
            .post(url)
            .body(body(&[(4, script)]).to_string())
            .send()
            .await
            .expect("POST");
        response.json::<Value>().await.expect("JSON")
    });
    let probe = started.clone();
    tokio::task::spawn_blocking(move || {
        common::wait_for_dir_change(
            &dir,
            || probe.exists(),
            Duration::from_secs(20),
            "the patch to start",
        );
    })
    .await
    .expect("wait");
    let status = get(&sandbox.daemon).await;
    assert_eq!(status["running"], 4, "{status}");
    assert_eq!(status["lastApplied"], 0);
    // Let it finish: opening the fifo for writing and closing it gives `cat` its EOF.
    std::fs::write(&fifo, b"").expect("open the fifo");
    let attempt = call.await.expect("call");
    assert_eq!(statuses(&attempt), expect(&[(4, "applied")]));
    let status = get(&sandbox.daemon).await;
    assert_eq!(status["running"], Value::Null);
    assert_eq!(status["lastApplied"], 4);
}

#[tokio::test]
async fn bad_requests_are_refused_and_run_nothing() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    let ok = append(&log, "x");
    let big = "#".repeat(1024 * 1024 + 1);
    let cases = [
        (
            json!({"patches": [{"sequence": 1, "script": ok}, {"sequence": 1, "script": ok}]}),
            "patch 1: the sequence appears more than once",
        ),
        (
            json!({"patches": [{"sequence": 0, "script": ok}]}),
            "patch 0: sequences start at 1",
        ),
        (
            json!({"patches": [{"sequence": -3, "script": ok}]}),
            "error decoding the request body",
        ),
        (
            json!({"patches": [{"sequence": 1}]}),
            "missing field `script`",
        ),
        (
            json!({"patches": [{"sequence": 1, "script": ""}]}),
            "the script is empty",
        ),
        (
            json!({"patches": [{"sequence": 1, "script": big}]}),
            "at most 1048576",
        ),
        (
            json!({"patches": [{"sequence": 1, "script": ok, "timeoutMs": 0}]}),
            "timeoutMs must be between 1 and",
        ),
        (
            json!({"patches": [{"sequence": 1, "script": ok, "timeoutMs": 86_400_001}]}),
            "timeoutMs must be between 1 and 86400000",
        ),
        (
            json!({"patches": [{"sequence": 1, "script": ok, "timeout": 5}]}),
            "unknown field `timeout`",
        ),
        (
            json!({"patches": [{"sequence": 1, "script": ok, "user": ""}]}),
            "the user is empty",
        ),
        (
            json!([{"sequence": 1, "script": ok}]),
            "error decoding the request body",
        ),
    ];
    for (request, want) in cases {
        let (status, error) = post(&sandbox.daemon, request).await;
        assert_eq!(status, 400, "{want}: {error}");
        let message = error["message"].as_str().expect("message");
        assert!(message.contains(want), "{want}: {message}");
    }
    let too_big = "x".repeat(9 * 1024 * 1024);
    let response = http()
        .post(sandbox.daemon.url("/patches"))
        .body(too_big)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 400);
    assert!(!log.exists(), "nothing ran");
    assert!(!sandbox.record().exists(), "nothing was recorded");
    assert_eq!(get(&sandbox.daemon).await["lastAttempt"], Value::Null);
}

#[tokio::test]
async fn an_unknown_user_fails_the_patch_with_a_clear_message() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    let request = json!({"patches": [
        {"sequence": 1, "script": append(&log, "one")},
        {"sequence": 2, "script": append(&log, "two"), "user": "no-such-user-envd"},
        {"sequence": 3, "script": append(&log, "three")},
    ]});
    let attempt = apply(&sandbox.daemon, request).await;
    assert_eq!(
        statuses(&attempt),
        expect(&[(1, "applied"), (2, "failed"), (3, "not_run")])
    );
    assert_eq!(
        attempt["results"][1],
        json!({"sequence": 2, "status": "failed",
               "error": "could not start: user 'no-such-user-envd' does not exist"})
    );
    assert_eq!(sandbox.log_text(), "one\n");
}

#[tokio::test]
async fn output_tails_are_bounded() {
    let sandbox = Sandbox::start();
    let script = "head -c 10000 /dev/zero | tr '\\0' a; printf END; head -c 5000 /dev/zero | tr '\\0' b >&2; exit 1";
    let attempt = apply(&sandbox.daemon, body(&[(1, script.to_owned())])).await;
    let failed = &attempt["results"][0];
    let stdout = failed["stdout"].as_str().expect("stdout");
    assert_eq!(stdout.len(), 4096);
    assert!(stdout.ends_with("aaaEND"), "the end is kept");
    assert_eq!(failed["stdoutTruncated"], true);
    assert_eq!(failed["stderr"].as_str().expect("stderr").len(), 4096);
    assert_eq!(failed["exitCode"], 1);
}

#[tokio::test]
async fn a_corrupt_record_stops_everything() {
    let sandbox = Sandbox::start();
    let log = sandbox.log();
    std::fs::create_dir_all(sandbox.record().parent().expect("dir")).expect("mkdir");
    std::fs::write(sandbox.record(), b"{\"version\":1,\"lastApplied\":").expect("write");
    let (status, error) = post(&sandbox.daemon, body(&[(1, append(&log, "one"))])).await;
    assert_eq!(status, 500, "{error}");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains(&format!(
            "the patch record {} is corrupt",
            sandbox.record().display()
        )),
        "{message}"
    );
    assert!(!log.exists(), "nothing re-ran");
    let (status, _) = get_as(&sandbox.daemon, None).await;
    assert_eq!(status, 500);
    assert_eq!(
        std::fs::read(sandbox.record()).expect("record"),
        b"{\"version\":1,\"lastApplied\":",
        "the corrupt file is left for an operator"
    );
}

#[tokio::test]
async fn scripts_run_with_their_shebang_in_the_users_home_with_the_process_environment() {
    // Script files go to the daemon's TMPDIR: a private one shows they are cleaned up.
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let daemon = start_daemon_with(
        &dir.path().join("state/patches.json"),
        dir.path(),
        &[("TMPDIR", tmp.to_str().expect("utf-8"))],
    );
    let sandbox = Sandbox { dir, daemon };
    sandbox
        .daemon
        .init_ok(json!({"envVars": {"FROM_INIT": "yes"}}))
        .await;
    let out = sandbox.dir.path().join("env");
    let shell = format!(
        "printf '%s\\n' \"$HOME\" \"$USER\" \"$PWD\" \"$FROM_INIT\" \"$ENVD_PATCH_SEQUENCE\" > '{}'; \
         [ -t 0 ] || read -r line || echo stdin-is-empty >> '{}'",
        out.display(),
        out.display()
    );
    let awk_out = sandbox.dir.path().join("awk");
    let awk = format!(
        "#!/usr/bin/awk -f\nBEGIN {{ print \"awk ran\" > \"{}\" }}\n",
        awk_out.display()
    );
    let attempt = apply(&sandbox.daemon, body(&[(1, shell), (2, awk)])).await;
    assert_eq!(
        statuses(&attempt),
        expect(&[(1, "applied"), (2, "applied")]),
        "{attempt}"
    );
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .expect("passwd")
        .expect("an entry");
    let home = me.dir.to_str().expect("utf-8");
    // A user without a home directory (`nobody`) runs in `/`.
    let cwd = if me.dir.is_dir() { home } else { "/" };
    assert_eq!(
        std::fs::read_to_string(&out).expect("env"),
        format!("{home}\n{}\n{cwd}\nyes\n1\nstdin-is-empty\n", me.name)
    );
    assert_eq!(std::fs::read_to_string(&awk_out).expect("awk"), "awk ran\n");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .expect("tmp")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "script files are removed: {leftovers:?}"
    );
}

#[tokio::test]
async fn patches_run_as_the_named_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: running a patch as another user needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::start();
    // `nobody` must reach a file it can write.
    std::fs::set_permissions(sandbox.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let shared = sandbox.dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = shared.join("who");
    let script = format!("{{ id -un; pwd; }} > '{}'", out.display());
    let attempt = apply(
        &sandbox.daemon,
        json!({"patches": [{"sequence": 1, "script": script, "user": "nobody"}]}),
    )
    .await;
    assert_eq!(statuses(&attempt), expect(&[(1, "applied")]), "{attempt}");
    // nobody's home (/nonexistent) does not exist: the patch runs in `/`.
    assert_eq!(std::fs::read_to_string(&out).expect("who"), "nobody\n/\n");
}
