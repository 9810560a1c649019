//! `POST /init`, `GET /envs` and `GET /metrics` against the real binary: repeated and
//! stale calls, body validation, the CA certificate, environment replacement, metrics.
//! Daemons here never set the machine's clock and install CAs into a temp directory.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Daemon, TOKEN_HEADER, connect_json, http};
use serde_json::json;

fn rfc3339(time: SystemTime) -> String {
    let nanos = time
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let secs = i64::try_from(nanos / 1_000_000_000).expect("fits");
    let sub = u32::try_from(nanos % 1_000_000_000).expect("fits");
    chrono::DateTime::from_timestamp(secs, sub)
        .expect("in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

async fn envs(daemon: &Daemon) -> serde_json::Value {
    let response = http().get(daemon.url("/envs")).send().await.expect("/envs");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.expect("body");
    assert!(text.ends_with('\n'), "{text:?}");
    serde_json::from_str(&text).expect("json")
}

#[tokio::test]
async fn envs_reflect_init_with_replace_semantics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(dir.path());
    assert_eq!(envs(&daemon).await, json!({ "E2B_SANDBOX": "true" }));

    daemon
        .init_ok(json!({ "envVars": { "A": "1", "B": "two words", "E2B_SANDBOX": "false" } }))
        .await;
    assert_eq!(
        envs(&daemon).await,
        json!({ "A": "1", "B": "two words", "E2B_SANDBOX": "true" })
    );

    // Replace, not merge: A goes away.
    daemon.init_ok(json!({ "envVars": { "B": "3" } })).await;
    assert_eq!(
        envs(&daemon).await,
        json!({ "B": "3", "E2B_SANDBOX": "true" })
    );

    // No envVars field leaves them alone; an empty object clears them.
    daemon.init_ok(json!({ "defaultWorkdir": "/tmp" })).await;
    assert_eq!(
        envs(&daemon).await,
        json!({ "B": "3", "E2B_SANDBOX": "true" })
    );
    daemon.init_ok(json!({ "envVars": {} })).await;
    assert_eq!(envs(&daemon).await, json!({ "E2B_SANDBOX": "true" }));
}

#[tokio::test]
async fn a_repeated_init_gives_204_and_the_same_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(dir.path());
    let body = json!({
        "accessToken": "repeat-token",
        "timestamp": rfc3339(SystemTime::now()),
        "envVars": { "K": "v" },
        "defaultUser": "root",
        "defaultWorkdir": "/tmp",
    });
    for _ in 0..3 {
        let response = daemon.init(body.clone()).await;
        assert_eq!(response.status(), 204);
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert_eq!(response.headers()["x-envd-version"], "0.6.13");
        let response = http()
            .get(daemon.url("/envs"))
            .header(TOKEN_HEADER, "repeat-token")
            .send()
            .await
            .expect("envs");
        let vars: serde_json::Value = response.json().await.expect("json");
        assert_eq!(vars, json!({ "K": "v", "E2B_SANDBOX": "true" }));
    }

    // A restarted daemon (fresh state) accepts the same /init again.
    drop(daemon);
    let daemon = Daemon::start_for_init(dir.path());
    daemon.init_ok(body).await;
}

#[tokio::test]
async fn a_stale_init_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(dir.path());
    let now = SystemTime::now();
    let newest = rfc3339(now);
    daemon
        .init_ok(
            json!({ "timestamp": newest, "envVars": { "GEN": "new" }, "defaultWorkdir": "/tmp" }),
        )
        .await;

    // Older: acknowledged, not applied (neither the variables nor the workdir).
    let older = rfc3339(now - Duration::from_secs(3600));
    daemon
        .init_ok(json!({ "timestamp": older, "envVars": { "GEN": "old" }, "defaultWorkdir": "/" }))
        .await;
    assert_eq!(envs(&daemon).await["GEN"], "new");
    let (status, stat) = connect_json(
        &daemon,
        "/filesystem.Filesystem/Stat",
        json!({ "path": "" }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(stat["entry"]["path"], "/tmp", "the workdir stayed /tmp");

    // Equal counts as newer; so does no timestamp at all.
    daemon
        .init_ok(json!({ "timestamp": newest, "envVars": { "GEN": "same" } }))
        .await;
    assert_eq!(envs(&daemon).await["GEN"], "same");
    daemon
        .init_ok(json!({ "envVars": { "GEN": "untimed" } }))
        .await;
    assert_eq!(envs(&daemon).await["GEN"], "untimed");
    // An untimed /init does not lower the bar.
    daemon
        .init_ok(json!({ "timestamp": older, "envVars": { "GEN": "old" } }))
        .await;
    assert_eq!(envs(&daemon).await["GEN"], "untimed");
}

#[tokio::test]
async fn malformed_and_oversized_bodies_are_400() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(dir.path());
    let deep = format!("{{\"x\":{}{}}}", "[".repeat(64), "]".repeat(64));
    let huge = format!(
        "{{\"envVars\":{{\"BIG\":\"{}\"}}}}",
        "x".repeat(envd::limits::DEFAULT_MAX_JSON_BODY_BYTES)
    );
    let cases: Vec<(&str, String)> = vec![
        ("truncated", "{\"envVars\":".into()),
        ("not an object", "[1,2]".into()),
        ("empty token", json!({ "accessToken": "" }).to_string()),
        ("numeric token", json!({ "accessToken": 42 }).to_string()),
        ("escaped token", r#"{"accessToken":"tok\u0065n"}"#.into()),
        (
            "non-string env value",
            json!({ "envVars": { "A": 1 } }).to_string(),
        ),
        ("bad timestamp", json!({ "timestamp": "noon" }).to_string()),
        ("too deep", deep),
        ("too big", huge),
    ];
    for (what, body) in cases {
        let response = daemon.init_raw(body).await;
        assert_eq!(response.status(), 400, "{what}");
        assert_eq!(response.headers()["x-envd-version"], "0.6.13", "{what}");
    }
    // Nothing was applied, in particular no token.
    assert_eq!(envs(&daemon).await, json!({ "E2B_SANDBOX": "true" }));
    // An empty body is a valid, empty /init.
    assert_eq!(daemon.init_raw("").await.status(), 204);
}

#[tokio::test]
async fn the_ca_bundle_is_installed_once_and_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("ca-certificates.crt");
    let cert = dir.path().join("e2b-ca.crt");
    let system = "-----BEGIN CERTIFICATE-----\nSYSTEM\n-----END CERTIFICATE-----\n";
    std::fs::write(&bundle, system).expect("bundle");
    let daemon = Daemon::start_for_init(dir.path());
    let first = "-----BEGIN CERTIFICATE-----\nFIRST\n-----END CERTIFICATE-----";
    let second = "-----BEGIN CERTIFICATE-----\nSECOND\n-----END CERTIFICATE-----\n";

    for _ in 0..2 {
        daemon.init_ok(json!({ "caBundle": first })).await;
        assert_eq!(
            std::fs::read_to_string(&bundle).expect("read"),
            format!("{system}{first}\n")
        );
    }
    assert_eq!(
        std::fs::read_to_string(&cert).expect("read"),
        format!("{first}\n")
    );

    // A restarted daemon re-sent the same PEM: still once.
    drop(daemon);
    let daemon = Daemon::start_for_init(dir.path());
    daemon.init_ok(json!({ "caBundle": first })).await;
    assert_eq!(
        std::fs::read_to_string(&bundle).expect("read"),
        format!("{system}{first}\n")
    );

    // A different PEM replaces the first.
    daemon.init_ok(json!({ "caBundle": second })).await;
    assert_eq!(
        std::fs::read_to_string(&bundle).expect("read"),
        format!("{system}{second}")
    );
    assert_eq!(std::fs::read_to_string(&cert).expect("read"), second);
}

#[tokio::test]
async fn metrics_report_this_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start_for_init(dir.path());
    for _ in 0..2 {
        let response = http()
            .get(daemon.url("/metrics"))
            .send()
            .await
            .expect("/metrics");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert_eq!(response.headers()["content-type"], "application/json");
        let text = response.text().await.expect("body");
        assert!(text.ends_with('\n'));
        let keys = [
            "ts",
            "cpu_count",
            "cpu_used_pct",
            "mem_total_mib",
            "mem_used_mib",
            "mem_total",
            "mem_used",
            "mem_cache",
            "disk_used",
            "disk_total",
        ];
        let positions: Vec<usize> = keys
            .iter()
            .map(|key| text.find(&format!("\"{key}\":")).expect(key))
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "key order: {text}"
        );
        let m: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(m.as_object().expect("object").len(), keys.len());
        let int = |key: &str| m[key].as_u64().unwrap_or_else(|| panic!("{key} in {text}"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("now")
            .as_secs();
        assert!(int("ts").abs_diff(now) <= 5, "{text}");
        // Online CPUs: at least as many as this process may run on.
        let usable = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        assert!(int("cpu_count") >= usable, "{text}");
        let pct = m["cpu_used_pct"].as_f64().expect("float");
        assert!((0.0..=100.0).contains(&pct), "{text}");
        assert!(int("mem_total") > 64 * 1024 * 1024, "{text}");
        assert!(
            int("mem_used") > 0 && int("mem_used") <= int("mem_total"),
            "{text}"
        );
        assert_eq!(int("mem_total_mib"), int("mem_total") / (1024 * 1024));
        assert_eq!(int("mem_used_mib"), int("mem_used") / (1024 * 1024));
        assert!(int("mem_cache") <= int("mem_total"), "{text}");
        assert!(
            int("disk_total") > 0 && int("disk_used") <= int("disk_total"),
            "{text}"
        );
    }

    // Like /envs, it needs the token once one is set.
    daemon.init_ok(json!({ "accessToken": "m-token" })).await;
    for (path, token, want) in [
        ("/metrics", None, 401),
        ("/metrics", Some("m-token"), 200),
        ("/envs", None, 401),
        ("/envs", Some("m-token"), 200),
    ] {
        let mut request = http().get(daemon.url(path));
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        assert_eq!(
            request.send().await.expect("send").status(),
            want,
            "{path} {token:?}"
        );
    }
}
